"""Property-based tests (hypothesis): the facts loader on arbitrary bytes and rows, both
backends' reductions against float64 on generated logits, the collapse flags on generated
top-1 sequences."""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mlx_lens.core.contract import LayerStats
from mlx_lens.core.errors import LensError
from mlx_lens.experiment.facts import Fact, load_facts
from mlx_lens.experiment.metrics import CollapseSettings, layer_summary, next_token_flags
from tests.lens_checks import assert_reductions_match_float64
from tests.test_backends import _mlx_reductions, _torch_reductions

# Bounded: each example is a small fp32 problem or a small file; CI stays fast and repeatable.
FEW = settings(max_examples=60, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.too_slow])


def _load(data: bytes, suffix: str):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"facts{suffix}"
        path.write_bytes(data)
        try:
            return load_facts(str(path)), None
        except LensError as exc:
            return None, (str(exc), str(path))


def _one_located_line(message: str, path: str) -> None:
    """A LensError of the loader: one line, naming the file (and its line, where it has one)."""
    assert "\n" not in message
    assert message.startswith(path), message
    assert re.match(re.escape(path) + r"(:\d+)?: ", message), message


@FEW
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".jsonl", ".csv"]))
def test_facts_loader_on_arbitrary_bytes(data, suffix):
    facts, error = _load(data, suffix)
    if error:
        _one_located_line(*error)
    else:
        assert facts and all(isinstance(f, Fact) for f in facts)


_VALUES = st.one_of(st.text(max_size=30), st.integers(), st.floats(allow_nan=True), st.none(),
                    st.booleans(), st.lists(st.integers(), max_size=2))
_ROW = st.dictionaries(st.sampled_from(["prompt", "answer", "id", "group", "control_prompt",
                                         "control_answer", "other"]), _VALUES, max_size=7)


@FEW
@given(rows=st.lists(_ROW, max_size=5))
def test_facts_loader_on_arbitrary_rows(rows):
    """JSONL rows of any keys and value types: facts, or one FILE:LINE line."""
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    facts, error = _load(data, ".jsonl")
    if error:
        _one_located_line(*error)
    else:
        assert len(facts) == len(rows)
        for fact, row in zip(facts, rows):
            assert fact.prompt == row["prompt"] and fact.answer == row["answer"]


# Logit rows with ties (values drawn from a small set), very large logits (|z| up to 1e4, where
# most probabilities underflow to 0) and very small spreads (1e-6 apart, nearly uniform).
_BASE = st.sampled_from([-3.0, 0.0, 0.5, 0.5, 2.0, 7.25])
_SCALE = st.sampled_from([1e-6, 1.0, 30.0, 1e4])


@st.composite
def _logits(draw):
    """[2 rows, 2 positions, V] with V above the widest top-k (20), as every real vocabulary;
    no row all zero (its cosine to the final row is undefined)."""
    vocab = draw(st.integers(32, 160))
    values = draw(hnp.arrays(np.float32, (2, 2, vocab),
                             elements=st.one_of(_BASE, st.floats(-4, 4, width=32))))
    values[..., 0] = np.where((values == 0).all(-1), 1.0, values[..., 0])
    return (values * np.float32(draw(_SCALE))).astype(np.float32)


@FEW
@given(logits=_logits())
def test_reductions_match_float64_on_generated_logits(logits):
    """Both backends' running reductions on fixed logits, within their derived bound
    (docs/numerics.md §2); -inf logits are not generated: a lens row is a finite GEMM."""
    for reductions, base2 in ((_mlx_reductions, False), (_torch_reductions, True)):
        assert_reductions_match_float64(reductions, logits, base2=base2)


@st.composite
def _next_token(draw):
    """LayerStats at one position: per row a top-1 id, p1 >= p2 and an entropy in bits."""
    rows = draw(st.integers(1, 12))
    top = draw(st.lists(st.integers(0, 20), min_size=rows, max_size=rows))
    p1 = np.array(draw(st.lists(st.floats(0, 1), min_size=rows, max_size=rows)))
    p2 = p1 * np.array(draw(st.lists(st.floats(0, 1), min_size=rows, max_size=rows)))
    entropy = np.array(draw(st.lists(st.floats(0, 16), min_size=rows, max_size=rows)))
    ids = np.stack([np.array(top), np.full(rows, 99)], -1)[:, None, :]
    stats = LayerStats(entropy=entropy[:, None], topk_ids=ids,
                       topk_probs=np.stack([p1, p2], -1)[:, None, :],
                       kl_to_final=np.zeros(rows), cos_to_final=np.zeros(rows))
    prompt = draw(st.lists(st.integers(0, 20), min_size=1, max_size=6))
    return stats, prompt, draw(st.integers(0, 20))


@FEW
@given(case=_next_token())
def test_collapse_flags_follow_their_definitions(case):
    """The original's rules restated row by row (docs/design.md), and the L_* summaries are
    the first rows that hold them."""
    stats, prompt, answer = case
    s = CollapseSettings()
    flags = next_token_flags(stats, prompt, answer, s)
    for r in range(len(stats.entropy)):
        top1, (p1, p2), h = stats.topk_ids[r, 0, 0], stats.topk_probs[r, 0], stats.entropy[r, 0]
        copy = (top1 in prompt and p1 > s.copy_threshold and p1 - p2 > s.copy_margin) or h < 1.0
        assert flags["copy_collapse"][r] == copy
        assert flags["entropy_collapse"][r] == (h <= 1.0)
        assert flags["is_answer"][r] == (top1 == answer)
    summary = layer_summary(stats, flags)
    for key, flag in (("L_copy", "copy_collapse"), ("L_copy_H", "entropy_collapse"),
                      ("L_semantic", "is_answer")):
        hits = [r for r, v in enumerate(flags[flag]) if v]
        assert summary[key] == (hits[0] if hits else None)


@st.composite
def _rows_with_doubt(draw):
    """Per row: does the rule hold, and may exact arithmetic say otherwise (a lead within its
    bound of the threshold)? At most 6 uncertain rows, so that every resolution can be tried."""
    n = draw(st.integers(1, 10))
    holds = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    uncertain = np.zeros(n, bool)
    uncertain[draw(st.lists(st.integers(0, n - 1), max_size=6, unique=True))] = True
    return holds, uncertain, draw(st.integers(1, 3))


@FEW
@given(case=_rows_with_doubt())
def test_a_milestone_is_a_layer_only_where_no_resolution_moves_it(case):
    """first_decided against its definition: resolve every uncertain row every way; the
    milestone is a row (or never) exactly when all resolutions agree, else undecided."""
    from itertools import product

    from mlx_lens.experiment.milestones import UNDECIDED, first_decided

    holds, uncertain, run = case

    def onset(h):
        hits = [r for r in range(len(h) - run + 1) if h[r:r + run].all()]
        return hits[0] if hits else None

    doubtful = np.flatnonzero(uncertain)
    outcomes = set()
    for values in product([False, True], repeat=len(doubtful)):
        h = holds.copy()
        h[doubtful] = values
        outcomes.add(onset(h))
    got = first_decided(holds, uncertain, run)
    assert got == (outcomes.pop() if len(outcomes) == 1 else UNDECIDED)


@st.composite
def _copy_case(draw):
    """A next-token LayerStats (top-1 ids from a small vocabulary with a whitespace and a
    punctuation token), and a prompt over the same vocabulary."""
    rows = draw(st.integers(1, 8))
    top = draw(st.lists(st.integers(0, 6), min_size=rows, max_size=rows))
    p1 = np.array(draw(st.lists(st.floats(0, 1), min_size=rows, max_size=rows)))
    p2 = p1 * np.array(draw(st.lists(st.floats(0, 1), min_size=rows, max_size=rows)))
    stats = LayerStats(entropy=np.zeros((rows, 1)),
                       topk_ids=np.stack([np.array(top), np.full(rows, 9)], -1)[:, None, :],
                       topk_probs=np.stack([p1, p2], -1)[:, None, :],
                       kl_to_final=np.zeros(rows), cos_to_final=np.zeros(rows))
    prompt = draw(st.lists(st.integers(0, 6), min_size=1, max_size=8))
    return stats, prompt


NAMES = {0: " ", 1: ",", 2: " Berlin", 3: " is", 4: "ber", 5: " capital", 6: "lin", 9: "x"}


@FEW
@given(case=_copy_case())
def test_copy_flags_follow_their_definitions(case):
    """The k-row window of top-1 ids (rows >= 1) found contiguously in the prompt, none of them
    whitespace or punctuation, with the strict or soft probability rule at the row itself."""
    from mlx_lens.experiment.milestones import (COPY_WINDOWS, MilestoneSettings, copy_flags,
                                                copy_milestones)

    stats, prompt = case
    s = MilestoneSettings()
    flags = copy_flags(stats, prompt, NAMES.get, s)
    top1 = stats.topk_ids[:, 0, 0].tolist()
    p1, p2 = stats.topk_probs[:, 0, 0], stats.topk_probs[:, 0, 1]
    for k in COPY_WINDOWS:
        for r in range(len(top1)):
            window = top1[r - k + 1:r + 1] if r - k + 1 >= 1 else None
            found = (window is not None and not any(t in (0, 1) for t in window)
                     and any(prompt[i:i + k] == window for i in range(len(prompt))))
            assert flags[f"copy_strict_k{k}"][r] == (found and p1[r] > 0.95
                                                     and p1[r] - p2[r] > 0.10)
            assert flags[f"copy_soft_k{k}"][r] == (found and p1[r] > 0.33)
    assert not any(v[0] for v in flags.values())  # row 0 is the embedding: never a copy
    echo = copy_milestones(stats, prompt, flags)["embedding_echo"]
    assert echo == (top1[0] == prompt[-1])


@st.composite
def _leads(draw):
    """Per row and piece: a lead (bits), its bound, and a threshold."""
    rows, pieces = draw(st.integers(1, 6)), draw(st.integers(1, 3))
    lead = np.array(draw(st.lists(st.sampled_from([-3.0, -0.05, 0.0, 0.05, 0.7, 0.75, 2.0]),
                                  min_size=rows * pieces, max_size=rows * pieces)))
    bound = np.array(draw(st.lists(st.sampled_from([0.0, 0.01, 0.1]), min_size=rows * pieces,
                                   max_size=rows * pieces)))
    return (lead.reshape(rows, pieces), bound.reshape(rows, pieces),
            draw(st.sampled_from([0.0, 0.72])), draw(st.integers(1, 2)))


@FEW
@given(case=_leads())
def test_an_onset_is_undecided_only_where_some_lead_within_its_bound_could_move_it(case):
    """AnswerRows.onset against its definition: every lead moved anywhere within its bound
    (its extremes suffice: the rule is monotone in each lead), the onset of the moved leads;
    a layer exactly when all agree."""
    from itertools import product

    from mlx_lens.experiment.milestones import UNDECIDED, AnswerRows

    lead, bound, threshold, run = case
    rows = AnswerRows(lead, lead, bound)  # log2 p per piece: any values, unused by onset

    def onset(moved):
        holds = (moved > threshold).all(-1)
        hits = [r for r in range(len(holds) - run + 1) if holds[r:r + run].all()]
        return hits[0] if hits else None

    outcomes = {onset(lead + bound * np.array(signs).reshape(lead.shape))
                for signs in product([-1.0, 1.0], repeat=lead.size)}
    assert rows.onset(threshold, run) == (outcomes.pop() if len(outcomes) == 1 else UNDECIDED)


_FINITE = [-3.0, -1.0, -0.0, 0.0, 0.5, 2.0, 7.25]


@FEW
@given(values=st.one_of(
    hnp.arrays(np.float64, st.integers(1, 300), elements=st.sampled_from(_FINITE)),
    hnp.arrays(np.float64, st.integers(1, 300),
               elements=st.sampled_from([*_FINITE, -np.inf, np.inf, np.nan]))),
       k=st.integers(0, 40))
def test_top_k_is_the_stable_sorts_first_k(values, k):
    """core.numerics.top_k (the probes' top-k in O(n)) against a stable sort of the whole
    array: finite arrays with many ties (and -0.0 beside 0.0), and arrays with infinities and
    NaN."""
    from mlx_lens.core.numerics import top_k

    np.testing.assert_array_equal(top_k(values, k), np.argsort(-values, kind="stable")[:k])


@FEW
@given(lengths=st.lists(st.integers(1, 40), max_size=9))
def test_length_batches_cover_every_prompt_at_least_cost(lengths):
    """The probes' batches: every prompt once, and no cut of the sorted lengths into
    consecutive batches pads fewer tokens for as many forward passes (brute force)."""
    from itertools import combinations

    from mlx_lens.experiment.single import length_batches

    batches = length_batches(lengths)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    call = max(lengths, default=0)

    def cost(groups):
        return sum(len(g) * max(g) + call for g in groups)

    ordered = sorted(lengths)
    cuts = [[ordered[a:b] for a, b in zip((0, *c), (*c, len(ordered)))]
            for k in range(len(ordered)) for c in combinations(range(1, len(ordered)), k)]
    assert cost([[lengths[i] for i in b] for b in batches]) == min(map(cost, cuts), default=0)
