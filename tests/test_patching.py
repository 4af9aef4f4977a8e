"""Activation patching against computations that do not share its code: plain transformers
forward hooks written here (replace a decoder layer's input, its attention module's output,
its MLP's output, on the full model), every tiny architecture; MLX against torch; and the exact
identities: restoring everything reproduces the clean run, restoring the corrupted run's own
values changes nothing, bit for bit."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from mlx_lens.experiment.patching import KINDS, one_at_a_time
from mlx_lens.mlx.backend import MlxBackend
from tests.lens_checks import HandBuilt, backend_cache, patch_bound_bits, piece_log2p
from tests.tiny_models import CONFIGS
from torch_ref.backend import TorchBackend

BACKENDS = {"torch": TorchBackend, "mlx": MlxBackend}
CLEAN = "The capital of Germany is"
CORRUPT = "The capital of France is"


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs):
    caches = {kind: backend_cache(cls, tiny_model_dirs) for kind, cls in BACKENDS.items()}
    return lambda kind, name: caches[kind](name)


def _pair(backend, answer: str = " Berlin Brandenburg"):
    tok = backend.tokenizer
    clean, corrupt = tok.encode(CLEAN), tok.encode(CORRUPT)
    assert len(clean) == len(corrupt) and clean != corrupt
    pieces = tok.encode(answer, add_special_tokens=False)
    return clean + pieces[:-1], corrupt + pieces[:-1], pieces


def _hooked(backend, ids, kind, block, position, values):
    """Logits [T, V] of the full model on ids with values [T, d] put at `position` of `kind`
    at `block`, by hooks on transformers' own modules (not torch_ref/patch.py); and a record
    of every kind's clean values when `values` is None."""
    spec = backend.layout
    record = {k: [] for k in KINDS}
    handles = []
    for i, layer in enumerate(backend.blocks):
        def pre(m, args, kwargs, i=i):
            h = args[0] if args else kwargs["hidden_states"]
            record["resid"].append(h[0].clone())
            if values is not None and kind == "resid" and i == block:
                h = h.clone()
                h[0, position] = values[position]
                return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
            return None

        def post(kind_of, i=i):
            def hook(m, args, out):
                first = out[0] if isinstance(out, tuple) else out
                record[kind_of].append(first[0].clone())
                if values is not None and kind == kind_of and i == block:
                    first = first.clone()
                    first[0, position] = values[position]
                    return (first, *out[1:]) if isinstance(out, tuple) else first
                return None
            return hook

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(getattr(layer, spec.attention).register_forward_hook(post("attn")))
        handles.append(getattr(layer, spec.mlp).register_forward_hook(post("mlp")))
    try:
        with torch.no_grad():
            out = backend.model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out.logits[0].float().numpy(), record


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_torch_patching_matches_plain_transformers_hooks(loaded, name):
    """Every kind at a middle block and at the subject's position, and at the last position:
    the patched run (blocks from r on, a batch of variants) against the full model with one
    hook replacing that one value, within two fp32 evaluations' bound."""
    backend = loaded("torch", name)
    clean_ids, corrupt_ids, pieces = _pair(backend)
    n = len(pieces)
    subject = next(t for t, (a, b) in enumerate(zip(clean_ids, corrupt_ids)) if a != b)
    _, clean_values = _hooked(backend, clean_ids, None, None, None, None)
    clean, corrupt = backend.record([clean_ids]), backend.record([corrupt_ids])
    block = backend.info.n_layers // 2
    last = len(clean_ids) - n  # the prompt's last position
    for kind in KINDS:
        z, norms = backend.patched_logits(corrupt, clean, kind, range(block, block + 1),
                                          one_at_a_time([subject, last], len(clean_ids)), n)
        for v, position in ((1, subject), (2, last)):
            want, _ = _hooked(backend, corrupt_ids, kind, block, position,
                              clean_values[kind][block])
            got, exp = piece_log2p(z[v, 0], pieces), piece_log2p(want[-n:], pieces)
            assert np.all(np.abs(got - exp) <= patch_bound_bits(backend, norms[v, 0], want[-n:])), kind


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("name", ["llama", "gemma3_sliding", "gpt_neox", "gpt2"])
def test_exact_identities(loaded, kind, name):
    """Bit for bit: restoring every position at row 0 (or the last row at the last position,
    for the first piece) gives the clean run's own computation in the same batch shape;
    restoring the corrupted run's own values changes nothing."""
    backend = loaded(kind, name)
    clean_ids, corrupt_ids, pieces = _pair(backend)
    n, length = len(pieces), len(clean_ids)
    clean, corrupt = backend.record([clean_ids]), backend.record([corrupt_ids])
    everything = np.ones((2, 1, length), bool)
    everything[0] = False  # the unpatched run, then every position restored
    restored, _ = backend.patched_logits(corrupt, clean, "resid", range(1), everything, n)
    own, _ = backend.patched_logits(clean, clean, "resid", range(1), everything, n)
    assert np.array_equal(restored[1], own[1])
    assert not np.array_equal(restored[0], own[0])  # the unpatched runs differ
    layers = backend.info.n_layers
    at_last = one_at_a_time([length - n], length)
    last = range(layers, layers + 1)
    restored, _ = backend.patched_logits(corrupt, clean, "resid", last, at_last, n)
    own, _ = backend.patched_logits(clean, clean, "resid", last, at_last, n)
    assert np.array_equal(restored[1, :, 0], own[1, :, 0])
    for k in KINDS:
        z, _ = backend.patched_logits(corrupt, corrupt, k, range(1, 3),
                                      one_at_a_time(range(length), length), n)
        assert all(np.array_equal(z[v], z[0]) for v in range(1, len(z))), k


@pytest.mark.parametrize("kind", BACKENDS)
def test_batched_patching_equals_one_at_a_time(loaded, kind):
    """Within two fp32 evaluations' bound (a batch of 5 against batches of 2)."""
    backend = loaded(kind, "qwen2")
    clean_ids, corrupt_ids, pieces = _pair(backend)
    n = len(pieces)
    clean, corrupt = backend.record([clean_ids]), backend.record([corrupt_ids])
    for k in KINDS:
        length = len(clean_ids)
        batched, norms = backend.patched_logits(corrupt, clean, k, range(1, 2),
                                                one_at_a_time(range(4), length), n)
        for t in range(4):
            alone, _ = backend.patched_logits(corrupt, clean, k, range(1, 2),
                                              one_at_a_time([t], length), n)
            tol = patch_bound_bits(backend, norms[t + 1, 0], batched[t + 1, 0])
            assert np.all(np.abs(piece_log2p(batched[t + 1, 0], pieces)
                                 - piece_log2p(alone[1, 0], pieces)) <= tol), (k, t)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mlx_patching_agrees_with_torch(loaded, name):
    """Every patched run of every kind, MLX against torch: the parity model (each backend within
    L + 1 products of exact arithmetic), per piece of both answers' log2 p."""
    ref, cand = loaded("torch", name), loaded("mlx", name)
    clean_ids, corrupt_ids, pieces = _pair(ref)
    n, length = len(pieces), len(clean_ids)
    runs = {k: (b.record([clean_ids]), b.record([corrupt_ids])) for k, b in
            (("torch", ref), ("mlx", cand))}
    variants = one_at_a_time(range(length), length)
    for kind in KINDS:
        for block in (0, ref.info.n_layers - 1):
            za, norms = ref.patched_logits(*runs["torch"][::-1], kind, range(block, block + 1),
                                              variants, n)
            zb, _ = cand.patched_logits(*runs["mlx"][::-1], kind, range(block, block + 1),
                                           variants, n)
            tol = patch_bound_bits(ref, norms[:, 0], za[:, 0])
            assert np.all(np.abs(piece_log2p(za[:, 0], pieces) - piece_log2p(zb[:, 0], pieces)) <= tol)


def test_the_command_and_its_bad_input(tiny_model_dirs, tmp_path, capsys):
    from mlx_lens.cli.main import main

    model = str(tiny_model_dirs["llama"])
    out = tmp_path / "out"
    assert main(["patch", model, "--backend", "torch", "--clean", CLEAN, "--corrupt", CORRUPT,
                 "--answer", "Berlin", "--corrupt-answer", "Paris", "--out_dir", str(out)]) == 0
    summary = json.loads((out / "patch-llama.json").read_text())
    assert summary["tokens"][summary["first_difference_position"]].strip() == "Germany"
    assert {p.name for p in out.iterdir()} == {"patch-llama.parquet", "patch-llama.csv",
                                               "patch-llama.json", "plot-llama-patch.png"}
    frame = pd.read_parquet(out / "patch-llama.parquet")
    length = len(summary["tokens"])
    assert len(frame) == length * ((3 + 1) + 3 + 3)  # rows 0..L for resid, blocks for attn, mlp
    capsys.readouterr()
    for args, message in ((["--corrupt", "The capital city of France is"], "tokens"),
                          (["--kinds", "resid,heads"], "unknown kind"),
                          (["--window", "0"], "--window"),
                          (["--answer", " "], "empty answer"),
                          (["--corrupt", CLEAN], "the corrupted prompt is the clean one"),
                          # the metric's gap is exactly minus that of the run above
                          (["--answer", "Paris", "--corrupt-answer", "Berlin"],
                           "the clean prompt must favour its answer more")):
        target = tmp_path / "bad"
        code = main(["patch", model, "--backend", "torch", "--clean", CLEAN, "--corrupt", CORRUPT,
                     "--answer", "Berlin", *args, "--out_dir", str(target)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and len(err) == 1 and message in err[0], (args, err)
        assert not target.exists()


def test_a_fact_suite_trace(tiny_model_dirs, tmp_path, capsys):
    """`mlx-lens patch --facts`: facts that cannot be aligned are listed and skipped, one line
    each; per fact, kind, place and layer the recovery is its metric against that fact's own
    baselines; the aggregates are the per-fact mean and median and the pooled recovery,
    sum(patched - corrupt) / sum(clean - corrupt) over facts; the picture is drawn."""
    from mlx_lens.cli.main import main

    facts = tmp_path / "facts.jsonl"
    rows = [{"id": "de", "prompt": CLEAN, "answer": "Berlin", "control_prompt": CORRUPT,
             "control_answer": "Paris"},
            {"id": "fr", "prompt": CORRUPT, "answer": "Paris", "control_prompt": CLEAN,
             "control_answer": "Berlin"},
            {"id": "it", "prompt": "The capital of Italy is", "answer": "Rome",
             "control_prompt": "The capital of Spain is", "control_answer": "Madrid"},
            # de with its answers swapped: its gap is minus de's, so one of the two is named
            {"id": "swapped", "prompt": CLEAN, "answer": "Paris", "control_prompt": CORRUPT,
             "control_answer": "Berlin"},
            {"id": "longer", "prompt": "The capital city of Germany is", "answer": "Berlin",
             "control_prompt": CORRUPT, "control_answer": "Paris"},
            {"id": "alone", "prompt": CLEAN, "answer": "Berlin"}]
    facts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["patch", str(tiny_model_dirs["llama"]), "--backend", "torch", "--facts",
                 str(facts), "--kinds", "resid,mlp", "--out_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "skipped longer: the prompt is" in printed and "skipped alone: no control" in printed
    assert "4 of 6 facts patched" in printed
    long = pd.read_parquet(out / "patch-llama-suite-layers.parquet")
    assert set(long["fact_id"]) == {"de", "fr", "it", "swapped"}
    assert set(long["kind"]) == {"resid", "mlp"}
    gap = long["clean_metric"] - long["corrupt_metric"]
    np.testing.assert_allclose(long["recovery"], (long["metric"] - long["corrupt_metric"]) / gap,
                               rtol=1e-12)
    summary = json.loads((out / "patch-llama-suite.json").read_text())
    inverted = sorted(set(long["fact_id"][gap <= 0]))
    assert len(set(inverted) & {"de", "swapped"}) == 1
    assert sorted(summary["gap_not_positive"]) == inverted
    assert f"{len(inverted)} left out of the aggregates: the clean prompt does not" in printed
    aggregates = pd.read_parquet(out / "patch-llama-suite-aggregates.parquet")
    # Below: the same stored float64 numbers summed in another order, a few terms each: an error
    # of ~n eps = 1e-15 of the terms' size; rtol 1e-9 leaves a cancellation of 1e6 in the sums.
    # The facts named in gap_not_positive are in no aggregate.
    for (kind, where, layer), part in long[gap > 0].groupby(["kind", "where", "layer"]):
        row = aggregates[(aggregates["kind"] == kind) & (aggregates["where"] == where)
                         & (aggregates["layer"] == layer)].iloc[0]
        assert row["n"] == 4 - len(inverted) == summary["aggregated"]
        np.testing.assert_allclose(row["mean"], part["recovery"].mean(), rtol=1e-9)
        np.testing.assert_allclose(row["median"], part["recovery"].median(), rtol=1e-9)
        pooled = ((part["metric"] - part["corrupt_metric"]).sum()
                  / (part["clean_metric"] - part["corrupt_metric"]).sum())
        np.testing.assert_allclose(row["pooled"], pooled, rtol=1e-9)
    # the facts' gaps differ (de and fr mirror each other, it does not): pooling is no mean
    assert not np.allclose(aggregates["pooled"], aggregates["mean"])
    assert (out / "plot-llama-patch-suite.png").stat().st_size > 0


class _HandBuilt(HandBuilt):
    """A patching backend whose answers' log2 p are set by hand: `runs` maps a prompt to
    {answer word: log2 p} at its next-token position; `patched` maps (base prompt, kind,
    block, position) to the same after that value is restored from the clean run (else the
    base's own). Only the methods patching calls do anything."""

    def __init__(self, runs: dict, patched: dict, n_layers: int = 2):
        super().__init__(n_layers, 8)
        self.runs, self.patched = runs, patched

    def record(self, batch, noise=None):
        return [tuple(ids) for ids in batch]

    def _logits(self, log2p: dict) -> np.ndarray:
        """fp32 logits ln p of the given words, the rest of the mass on one filler word, every
        other word's p exactly 0 (exp(-1e4) underflows)."""
        z = np.full(self.VOCAB, -1e4)
        ids = self.tokenizer.encode(" ".join(log2p))
        p = 2.0 ** np.array(list(log2p.values()))
        z[ids] = np.log(p)
        z[self.tokenizer.encode("filler")[0]] = np.log1p(-p.sum())
        return z.astype(np.float32)

    def patched_logits(self, base, clean, kind, blocks, restore, n_scored):
        assert n_scored == 1  # one-word answers
        block = blocks.start
        out = np.empty((*restore.shape[:2], 1, self.VOCAB), np.float32)
        for v, b in np.ndindex(*restore.shape[:2]):
            prompt = self.tokenizer.decode(base[b])
            at = np.flatnonzero(restore[v, b])
            key = (prompt, kind, block, int(at[0])) if len(at) == 1 else None
            out[v, b, 0] = self._logits(self.patched.get(key, self.runs[prompt]))
        return out, np.ones(out.shape[:3])


# The hand-built log2 p (bits): each fact's clean and corrupted metric (log2 p(answer) - log2
# p(control answer)), and one restoration (resid, block 1, the subject at position 2) that moves
# the corrupted run's.
GERMANY, FRANCE = "capital of Germany is", "capital of France is"
HAND_RUNS = {GERMANY: {"Berlin": -1, "Paris": -4},  # de: clean 3,
             FRANCE: {"Berlin": -3, "Paris": -4},  # corrupted 1: gap 2
             "capital of Peru is": {"Lima": -1, "Santiago": -5},  # pe: clean 4,
             "capital of Chile is": {"Lima": -5, "Santiago": -5},  # corrupted 0: gap 4
             "capital of Italy is": {"Rome": -3, "Madrid": -2},  # it: clean -1,
             "capital of Spain is": {"Rome": -2, "Madrid": -2}}  # corrupted 0: gap -1
HAND_PATCHED = {(FRANCE, "resid", 1, 2): {"Berlin": -2, "Paris": -5},  # metric 3: recovery 1
                ("capital of Chile is", "resid", 1, 2): {"Lima": -2, "Santiago": -5}}  # 0.75
# Tolerance: each logit is ln p rounded to fp32 (|error| <= 2^-24 |ln p| <= 2^-24 ln 32, p >=
# 1/32), which moves a log softmax by at most twice that (docs/numerics.md §3): e = 2^-23 ln 32 /
# ln 2 bits per log2 p. A metric is two of them (2e), a recovery (m - c) / (g) with gap g >= 1
# bit and |recovery| <= 1 moves by at most (4e + 4e) / (1 - 4e) < 9e ~ 5.4e-6.
HAND_TOL = 9 * 2.0 ** -23 * np.log(32) / np.log(2)


def test_recovery_on_hand_built_log_probabilities():
    """A trace's recovery against numbers set by hand: with a corrupt answer the metric is the
    difference of the two answers' log2 p, recovery (patched - corrupt) / (clean - corrupt):
    (3 - 1) / (3 - 1) = 1 where the subject is restored at block 1, 0 wherever nothing moves;
    without one, log2 p(answer) alone: (-2 + 3) / (-1 + 3) = 0.5."""
    from mlx_lens.experiment.patching import PatchOptions, run_patching

    backend = _HandBuilt(HAND_RUNS, HAND_PATCHED)
    both = run_patching(backend, PatchOptions(GERMANY, FRANCE, "Berlin", "Paris",
                                              kinds=("resid",)))
    alone = run_patching(backend, PatchOptions(GERMANY, FRANCE, "Berlin", kinds=("resid",)))
    for result, clean, corrupt, restored in ((both, 3, 1, 1.0), (alone, -1, -3, 0.5)):
        s = result.summary
        assert abs(s["clean_metric"] - clean) <= HAND_TOL
        assert abs(s["corrupt_metric"] - corrupt) <= HAND_TOL
        frame = result.frame.set_index(["layer", "pos"])["recovery"]
        want = pd.Series(0.0, frame.index)
        want[1, 2] = restored
        assert np.all(np.abs(frame - want) <= HAND_TOL)
        assert {k: v for k, v in s["strongest"]["resid"].items() if k != "recovery"} == {
            "layer": 1, "pos": 2}


def test_pooled_recovery_on_hand_built_log_probabilities():
    """A suite's aggregates against numbers set by hand: de (gap 2, patched - corrupt 2) and pe
    (gap 4, patched - corrupt 3) pool to 5/6, their mean recovery (1 + 0.75) / 2; it, whose
    clean prompt favours its answer less than the corrupted one does (gap -1), is left out of
    every aggregate and named apart (it would have shrunk the pooled denominator to 5, pooling
    to 1)."""
    from mlx_lens.experiment.facts import Fact
    from mlx_lens.experiment.patching import run_patch_suite

    facts = [Fact("de", GERMANY, "Berlin", control_prompt=FRANCE, control_answer="Paris"),
             Fact("pe", "capital of Peru is", "Lima", control_prompt="capital of Chile is",
                  control_answer="Santiago"),
             Fact("it", "capital of Italy is", "Rome", control_prompt="capital of Spain is",
                  control_answer="Madrid")]
    result = run_patch_suite(_HandBuilt(HAND_RUNS, HAND_PATCHED), facts, kinds=("resid",),
                             batch=2)
    assert result.summary["gap_not_positive"] == ["it"] and result.summary["aggregated"] == 2
    agg = result.aggregates.set_index(["where", "layer"])
    assert (agg["n"] == 2).all()
    want = pd.DataFrame({"pooled": 0.0, "mean": 0.0}, agg.index)
    want.loc[("subject", 1)] = [5 / 6, 0.875]
    assert np.all(np.abs(agg[["pooled", "mean"]] - want) <= HAND_TOL)
    # the one restoring layer's CI: resamples draw de or pe, each ratio between 0.75 and 1
    row = agg.loc[("subject", 1)]
    assert 0.75 - HAND_TOL <= row["pooled_ci_low"] <= row["pooled_ci_high"] <= 1 + HAND_TOL
    assert (agg["ci_unit"] == "fact").all() and (agg["n_clusters"] == 2).all()
    # de and pe one cluster: every resample draws both, so the CIs are points
    facts[:2] = [dataclasses.replace(f, cluster="one") for f in facts[:2]]
    result = run_patch_suite(_HandBuilt(HAND_RUNS, HAND_PATCHED), facts, kinds=("resid",),
                             batch=2)
    row = result.aggregates.set_index(["where", "layer"]).loc[("subject", 1)]
    assert row["ci_unit"] == "cluster" and row["n_clusters"] == 1
    assert np.all(np.abs(row[["pooled_ci_low", "pooled_ci_high"]] - 5 / 6) <= HAND_TOL)
    assert np.all(np.abs(row[["ci_low", "ci_high"]] - 0.875) <= HAND_TOL)
    assert set(result.long["cluster"]) == {"one", "it"}


def test_a_pair_whose_clean_prompt_does_not_favour_its_answer_is_refused():
    """Recovery divides by clean - corrupt: with the answers swapped the gap is -2 bits (and 0
    with an answer both prompts give alike), so the trace is refused in one line, before any
    patched run."""
    from mlx_lens.core.errors import LensError
    from mlx_lens.experiment.patching import PatchOptions, run_patching

    runs = {**HAND_RUNS, "capital of Spain is": {"Berlin": -3, "Paris": -4}}
    backend = _HandBuilt(runs, HAND_PATCHED)
    for clean, corrupt, answer, corrupt_answer in ((GERMANY, FRANCE, "Paris", "Berlin"),
                                                   (FRANCE, "capital of Spain is", "Berlin",
                                                    None)):
        with pytest.raises(LensError, match="must favour its answer more") as refused:
            run_patching(backend, PatchOptions(clean, corrupt, answer, corrupt_answer,
                                               kinds=("resid",)))
        assert "\n" not in str(refused.value)


def test_the_heatmap_says_where_it_clips():
    """The colours span [0, 1]: a recovery outside takes the end's colour, and the colour bar
    says so (an arrow at that end, the values' range in its label); inside, it says nothing."""
    from mlx_lens.view.patching import heatmap

    summary = {"kinds": ["resid"], "tokens": ["a", "b"], "window": 1, "model": "hand",
               "metric": "log2 p(answer)", "answer": "x", "corrupt_answer": None,
               "first_difference_position": 0}
    frame = pd.DataFrame({"kind": "resid", "layer": [0, 0, 1, 1], "pos": [0, 1, 0, 1],
                          "recovery": [0.0, 1.0, 0.5, 0.25]})
    for values, extend, note in (([0.0, 1.0, 0.5, 0.25], "neither", None),
                                 ([-0.3, 1.0, 0.5, 0.25], "min", "-0.30 to 1.00"),
                                 ([-0.3, 1.4, 0.5, 0.25], "both", "-0.30 to 1.40")):
        fig = heatmap(frame.assign(recovery=values), summary)
        bar = fig.axes[0].images[0].colorbar
        assert bar.extend == extend
        label = bar.ax.get_ylabel()
        assert (note is None) == ("clipped" not in label)
        assert note is None or f"clipped to [0, 1]: values span {note}" in label
