"""Several lenses from one forward pass, and the middle of each block: each lens's entries are
its own sweep's, the lens-pair reductions are exact to their derived bound (docs/numerics.md
§6) on real vocabularies and against float64 of each lens's full logits, the middle rows match
transformers' attention outputs taken with forward hooks written here (not the lens's capture),
and MLX agrees with torch within the parity bound."""
from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_lens.checks.parity import logit_bound
from mlx_lens.core import bounds
from mlx_lens.core.contract import PAIR_TOP_K, SweepOptions
from mlx_lens.core.lens import Lens
from mlx_lens.core.numerics import log_softmax64
from mlx_lens.experiment.lenses import jaccard, lens_agreement_onset
from mlx_lens.experiment.milestones import UNDECIDED, AnswerRows
from mlx_lens.mlx import reduce as mlx_reduce
from mlx_lens.mlx.backend import MlxBackend
from tests.lens_checks import LENSES, PROMPT, assert_stats_match_logits, backend_cache
from tests.tiny_models import CONFIGS
from torch_ref import reduce as torch_reduce
from torch_ref.backend import TorchBackend

BACKENDS = {"torch": TorchBackend, "mlx": MlxBackend}
FIELDS = ("entropy", "topk_ids", "topk_probs", "kl_to_final", "kl_bound", "cos_to_final",
          "p_answer", "answer_rank", "piece_log2p", "piece_rank", "piece_lead", "piece_x_norm")


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs):
    caches = {kind: backend_cache(cls, tiny_model_dirs) for kind, cls in BACKENDS.items()}
    return lambda kind, name: caches[kind](name)


def _mlx_pairs(x: np.ndarray) -> dict:
    """The MLX pair reductions on fixed logits x [P, N, V] (the head is the identity), in
    chunks of 4096 tokens so that the running merges are exercised."""
    return mlx_reduce.lens_pairs(mx.array(x), lambda z, start, stop: z[..., start:stop],
                                 x.shape[-1], 4096, PAIR_TOP_K)


def _torch_pairs(x: np.ndarray) -> dict:
    """The torch pair reductions on fixed logits: the head is the identity, to base 2."""
    def head_chunk(start, stop):
        return lambda z, out=None: torch.mul(z[:, start:stop], torch_reduce.LOG2E, out=out)

    return torch_reduce.lens_pairs(torch.from_numpy(np.ascontiguousarray(x)), head_chunk,
                                   x.shape[-1], PAIR_TOP_K)


def _float64_pairs(za: np.ndarray, zb: np.ndarray) -> dict:
    la, lb = log_softmax64(za.astype(np.float64)), log_softmax64(zb.astype(np.float64))
    pa, pb = np.exp(la), np.exp(lb)
    mix = np.logaddexp(la, lb) - np.log(2)
    ln2 = np.log(2)
    return {"kl_ab": (pa * (la - lb)).sum(-1) / ln2, "kl_ba": (pb * (lb - la)).sum(-1) / ln2,
            "js": (0.5 * (pa * (la - mix)).sum(-1) + 0.5 * (pb * (lb - mix)).sum(-1)) / ln2}


def _assert_pairs_match(out: dict, z: list[np.ndarray], b: list[np.ndarray]) -> None:
    """A pair reduction's result against float64 of the logits z (one [N, V] per lens), when
    the reduction's own logits may differ from them by at most b: the reductions' bound (§6)
    plus what a logit change does to KL (§3) and to JS (§6)."""
    depth = out["summation_depth"]
    for a, c in itertools.permutations(range(len(z)), 2):
        want = _float64_pairs(z[a], z[c])
        red = bounds.pair_reduction_bounds(z[a].astype(np.float64), z[c].astype(np.float64), depth)
        la, lc = log_softmax64(z[a].astype(np.float64)), log_softmax64(z[c].astype(np.float64))
        shift_kl = np.array([bounds.kl_shift_bound(la[i:i + 1], lc[i], b[a][i:i + 1], b[c][i])[0]
                             for i in range(len(la))])
        tol_kl = bounds.nats_to_bits(red["kl_ab"] + shift_kl)
        tol_js = bounds.nats_to_bits(red["js"] + bounds.js_shift_bound(b[a], b[c]))
        assert np.all(np.abs(out["kl"][a, c] - want["kl_ab"]) <= tol_kl), (a, c)
        assert np.all(np.abs(out["js"][a, c] - want["js"]) <= tol_js), (a, c)
        assert np.all(out["kl"][a, c] >= -tol_kl)
    for zl, bl, ids in zip(z, b, out["top_ids"]):
        # each reported id is a top-k token up to near-ties (§3): at least the exact k-th
        # largest logit less both bounds, distinct, most probable first up to the same slack
        kth = np.sort(zl.astype(np.float64), -1)[:, -ids.shape[-1]]
        got = np.take_along_axis(zl.astype(np.float64), ids, -1)
        slack = 2 * bl.max(-1, keepdims=True)
        assert np.all(got >= kth[:, None] - slack)
        assert np.all(np.diff(got, axis=-1) <= slack)
        assert all(len(set(row)) == len(row) for row in ids.tolist())


@pytest.mark.parametrize("kind, pairs, base2", [("mlx", _mlx_pairs, False),
                                                ("torch", _torch_pairs, True)])
def test_pair_reductions_are_exact_to_their_bound_on_real_vocabularies(real_vocab_logits, kind,
                                                                       pairs, base2):
    """The final-norm and raw lenses of the 151,936-token model at every row and position, and
    the final-norm lens twice (a lens against itself: KL exactly 0, the same top-k); SmolLM2's
    real head against itself shifted by a constant (the same distribution)."""
    big_final, big_raw, smol = real_vocab_logits
    cases = [[big_final, big_raw, big_final], [smol, smol + np.float32(3.0)]]
    for logits in cases:
        z = [np.ascontiguousarray(x.reshape(-1, x.shape[-1])) for x in logits]
        out = pairs(np.stack(z))
        b = [2 * bounds.U32 * np.abs(x.astype(np.float64)) if base2 else np.zeros(x.shape)
             for x in z]
        _assert_pairs_match(out, z, b)
    out = pairs(np.stack([big_final.reshape(-1, big_final.shape[-1])] * 2))
    assert np.all(out["kl"] == 0)  # the same bits: every log-ratio is exactly 0
    assert np.array_equal(out["top_ids"][0], out["top_ids"][1])


def _mid_gemm_bound(backend, ids, lens, site, logits):
    """Two GEMMs' worth of rounding of a site's decoded rows (tests/lens_checks.py gemm_bound)."""
    x_norm = np.linalg.norm(backend.lens_inputs(ids, lens, site).astype(np.float64), axis=-1)
    return 2 * (bounds.dot_bound(x_norm, backend.head_row_norms(), backend.info.d_model, 1)
                + bounds.elementwise_bound(logits, backend.softcap))


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_lens_from_one_capture(loaded, kind, name):
    """Each lens's entries are bit for bit its own sweep (the same decode of the same rows);
    the middle rows' statistics and every lens pair equal float64 of that lens's full logits
    (layer_logits) within the derived bounds; all lenses agree exactly at the last row."""
    backend = loaded(kind, name)
    ids = backend.tokenizer.encode(PROMPT)
    answer = backend.tokenizer.encode(" Berlin", add_special_tokens=False)[0]
    opts = SweepOptions(answer_ids=(answer,))
    sweep = backend.sweep_lenses(ids, opts, LENSES, mid=True)
    assert sweep.lenses == tuple(lens.name for lens in LENSES)
    assert sweep.mid == ("parallel" if backend.parallel[0] else "sequential")
    for lens in LENSES:
        alone = backend.sweep(ids, SweepOptions(lens=lens, answer_ids=(answer,)))
        both = sweep.stats[lens.name, "resid"]
        for f in FIELDS:
            assert np.array_equal(getattr(alone, f), getattr(both, f), equal_nan=True), f
        mid = sweep.stats[lens.name, "mid"]
        logits = backend.layer_logits(ids, lens, "mid")
        assert len(logits) == backend.info.n_layers + 1
        assert_stats_match_logits(mid, logits, _mid_gemm_bound(backend, ids, lens, "mid", logits),
                                  answer)
    for site in ("resid", "mid"):
        z, b = [], []
        for lens in LENSES:
            logits = backend.layer_logits(ids, lens, site)
            z.append(logits[:, -1])
            b.append(_mid_gemm_bound(backend, ids, lens, site, logits)[:, -1])
        pairs = sweep.pairs[site]
        _assert_pairs_match({"kl": pairs.kl, "js": pairs.js, "top_ids": pairs.top_ids,
                             "summation_depth": pairs.summation_depth}, z, b)
        assert np.all(pairs.kl[..., -1] == 0)  # the last row: the model's output, every lens
        assert all(np.array_equal(pairs.top_ids[0, -1], t) for t in pairs.top_ids[:, -1])
    last = [sweep.stats[lens.name, "resid"] for lens in LENSES]
    assert all(np.array_equal(s.topk_probs[-1], last[0].topk_probs[-1]) for s in last)


@pytest.mark.parametrize("kind", BACKENDS)
def test_batched_lenses_are_the_batched_sweeps(loaded, kind):
    """In a suite's batch each lens's entries are bit for bit that batch's single-lens sweep,
    and a batch of one compares the lenses exactly as the single-prompt sweep does."""
    backend = loaded(kind, "llama")
    tok = backend.tokenizer
    prompts = [tok.encode(PROMPT), tok.encode("The capital of France is")]
    scored = [((tok.encode(" Berlin", add_special_tokens=False)[0],),), ((5,),)]
    per = backend.sweep_next_token_lenses(prompts, scored, LENSES, True, 5)
    for lens in LENSES:
        alone = backend.sweep_next_token(prompts, scored, lens, 5)
        for sweep, stats in zip(per, alone):
            for f in FIELDS:
                assert np.array_equal(getattr(stats, f), getattr(sweep.stats[lens.name, "resid"], f),
                                      equal_nan=True), f
    one = backend.sweep_next_token_lenses(prompts[:1], scored[:1], LENSES, True, 5)[0]
    single = backend.sweep_lenses(prompts[0], SweepOptions(answer_ids=scored[0][0]), LENSES, True)
    for site in ("resid", "mid"):
        assert np.array_equal(one.pairs[site].kl, single.pairs[site].kl)
        assert np.array_equal(one.pairs[site].top_ids, single.pairs[site].top_ids)
    assert per[1].pairs["mid"].kl.shape == (3, 3, backend.info.n_layers + 1)


def _hooked_middles(backend, ids) -> list[np.ndarray]:
    """The middle of each block from transformers' own modules, with forward hooks written here
    on each block (its input) and its attention module (its output): input + attention output,
    through the post-attention norm where the block has one after attention (Gemma)."""
    inputs, outputs = [], []
    handles = []
    for block in backend.blocks:
        handles.append(block.register_forward_pre_hook(
            lambda m, args, kwargs: inputs.append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True))
        attention = getattr(block, backend.layout.attention)
        handles.append(attention.register_forward_hook(
            lambda m, args, out: outputs.append(out[0] if isinstance(out, tuple) else out)))
    try:
        with torch.no_grad():
            backend.model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    middles = []
    for block, x, a in zip(backend.blocks, inputs, outputs):
        if backend.layout.mlp_norm == "pre_feedforward_layernorm":  # Gemma: norm after attention
            with torch.no_grad():
                a = block.post_attention_layernorm(a)
        middles.append((x + a)[0].detach().numpy())
    return middles


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_middle_rows_match_transformers_attention_hooks(loaded, name):
    backend = loaded("torch", name)
    ids = backend.tokenizer.encode(PROMPT)
    got = backend.residuals(ids, "mid")
    want = _hooked_middles(backend, ids)
    assert len(got) == len(want) + 1
    for i, w in enumerate(want):  # the same fp32 operations on the same values: exact
        assert np.array_equal(got[i], w), i
    assert np.array_equal(got[-1], backend.residuals(ids)[-1])


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_parallel_block_is_read_as_input_plus_attention(loaded, tiny_model_dirs, kind):
    """The tiny gpt_neox is a parallel-residual model (its MLP reads the block's input, not the
    middle): both backends say so, and read llama's blocks as sequential."""
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tiny_model_dirs["gpt_neox"]).use_parallel_residual
    assert loaded(kind, "gpt_neox").mid_kind() == "parallel"
    assert loaded(kind, "llama").mid_kind() == "sequential"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_middle_rows_mlx_against_torch(loaded, name):
    """MLX's middle rows, decoded, within the parity bound of torch's (docs/numerics.md §4:
    the middle of block i within i + 2 products of exact arithmetic)."""
    ref, cand = loaded("torch", name), loaded("mlx", name)
    ids = ref.tokenizer.encode(PROMPT)
    for lens in LENSES:
        za, zb = ref.layer_logits(ids, lens, "mid"), cand.layer_logits(ids, lens, "mid")
        bound = logit_bound(ref, ids, lens, za, ref.head_row_norms(), "mid")
        assert np.all(np.abs(zb.astype(np.float64) - za) <= bound), lens.name


def test_a_tuned_lens_reads_no_middle_rows():
    with pytest.raises(ValueError, match="middle of a block"):
        Lens.tuned(type("T", (), {"name": "tuned:x", "weight": None, "bias": None})()
                   ).norm_plan(3, "mid")


def test_jaccard():
    a = np.array([[1, 2, 3, 4], [1, 2, -1, -1]])
    b = np.array([[4, 3, 2, 1], [2, 5, -1, -1]])
    assert jaccard(a, b).tolist() == [1.0, 1 / 3]


def _rows(states: list[str]) -> AnswerRows:
    """AnswerRows of one piece from per-row states: "y" certainly top-1, "n" certainly not,
    "?" within the bound."""
    lead = np.array([{"y": 1.0, "n": -1.0, "?": 0.0}[s] for s in states])[:, None]
    return AnswerRows(np.zeros_like(lead), lead, np.full_like(lead, 0.5))


def _resolved_onset(primary: str, others: list[str], window: int = 2):
    """The lens-agreement onset of fully decided rows, by its definition: another lens's last
    row (the model's output, the same for every lens) confirms nothing."""
    for r, state in enumerate(primary):
        near = range(max(0, r - window), min(len(primary) - 1, r + window + 1))
        if state == "y" and any(o[q] == "y" for o in others for q in near):
            return r
    return None


@pytest.mark.parametrize("seed", range(200))
def test_lens_agreement_onset_is_a_layer_only_when_every_resolution_agrees(seed):
    """Brute force: every way of resolving the undecided rows gives the same onset exactly when
    the onset is a layer (else UNDECIDED)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 7))
    lanes = ["".join(rng.choice(list("yn?"), n, p=[0.3, 0.5, 0.2])) for _ in range(3)]
    got = lens_agreement_onset(_rows(list(lanes[0])), [_rows(list(o)) for o in lanes[1:]])
    unknown = [(lane, r) for lane, s in enumerate(lanes) for r, c in enumerate(s) if c == "?"]
    outcomes = set()
    for choice in itertools.product("yn", repeat=len(unknown)):
        resolved = [list(s) for s in lanes]
        for (lane, r), c in zip(unknown, choice):
            resolved[lane][r] = c
        outcomes.add(_resolved_onset(resolved[0], resolved[1:]))
    if got == UNDECIDED:
        assert len(outcomes) > 1
    else:
        assert outcomes == {got}


# -- the command ------------------------------------------------------------------------------
def _run(args, capsys):
    from mlx_lens.cli.main import main

    code = main(["run", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


FACTS = [{"id": "de", "prompt": "The capital of Germany is", "answer": "Berlin",
          "control_prompt": "The capital of France is", "control_answer": "Paris"},
         {"id": "fr", "prompt": "The capital of France is", "answer": "Paris"}]


def test_run_with_lenses_keeps_the_primary_artifacts(tiny_model_dirs, tmp_path, capsys):
    """--lenses adds the lens tables and a `lenses` section; the primary lens's artifacts are
    those of a run without it, byte for byte (the JSON: but for that section)."""
    import json

    from mlx_lens.loading.sources import resolve
    from mlx_lens.output.artifacts import read_csv

    model = str(tiny_model_dirs["llama"])
    common = [model, "--backend", "torch", "--no-probes", "--no-plots", "--lens", "next-norm"]
    assert _run([*common, "--out_dir", str(tmp_path / "one")], capsys)[0] == 0
    code, out, err = _run([*common, "--lenses", "all", "--out_dir", str(tmp_path / "all")], capsys)
    assert code == 0, err
    # names that say what they show: agreement of lenses sharing the residual and the head, and
    # the norm (under RMSNorm its gain) flipping the top-1
    assert ("lens-agreement onset (primary next-norm and another lens within +-2; the lenses "
            "share the residual and the head: agreement, not independent evidence)") in out
    assert ("; norm-flip layers (a normed lens reads the answer, raw does not; under RMSNorm "
            "only the gain gamma can flip a top-1)") in out
    for suffix in ("-records.csv", "-pure-next-token.csv"):
        assert ((tmp_path / "one" / f"output-llama{suffix}").read_bytes()
                == (tmp_path / "all" / f"output-llama{suffix}").read_bytes())
    one, both = (json.loads((tmp_path / k / "output-llama.json").read_text()) for k in ("one", "all"))
    section = both.pop("lenses")
    assert one == both
    assert section["lenses"] == ["next-norm", "final-norm", "raw"]  # the primary first
    assert section["mid_rows"] == "sequential" and section["not_read_mid_block"] == []
    assert set(section["norm_flip_layers"]) == {"next-norm", "final-norm"}
    lenses = read_csv(tmp_path / "all" / "output-llama-lenses.csv")
    assert len(lenses) == 3 * (4 + 3)  # 3 lenses x (4 rows between blocks + 3 middles)
    assert set(lenses["depth"]) == {0, 0.5, 1, 1.5, 2, 2.5, 3}
    pure = read_csv(tmp_path / "one" / "output-llama-pure-next-token.csv")
    primary = lenses[(lenses["lens"] == "next-norm") & (lenses["site"] == "resid")]
    assert np.array_equal(primary["entropy_bits"].to_numpy(), pure["entropy"].to_numpy())
    pairs = read_csv(tmp_path / "all" / "output-llama-lens-pairs.csv")
    assert len(pairs) == 3 * (4 + 3)  # 3 pairs
    assert pairs["jaccard_top50"].between(0, 1).all()
    # KL >= 0 exactly; computed, it may fall below 0 by no more than the pair reductions' derived
    # error (docs/numerics.md §6) on these lenses' logits of the same rows (torch's own decode
    # of the run's prompt: a row at the next-token position is causal, so the teacher-forced
    # answer after it does not change it), at the deepest blocked sum a chunk width can make
    # (torch's chunks: powers of 2 from 64 tokens)
    backend = TorchBackend(resolve(model))
    ids, vocab = one["diagnostics"]["prompt_token_ids"], backend.info.vocab
    depth = max(bounds.summation_depth(vocab, min(64 << i, vocab))
                for i in range(max(vocab.bit_length() - 5, 1)))
    for (site, a, c), rows in pairs.groupby(["site", "lens_a", "lens_b"]):
        za, zc = (backend.layer_logits(ids, Lens(name), site)[:len(rows), -1].astype(np.float64)
                  for name in (a, c))
        tol = bounds.nats_to_bits(bounds.pair_reduction_bounds(za, zc, depth)["kl_ab"])
        assert (rows.sort_values("layer")["kl_ab_bits"].to_numpy() >= -tol).all(), (site, a, c)
    cells = read_csv(tmp_path / "all" / "output-llama-lens-cells.csv")
    assert set(zip(cells["lens"], cells["site"])) == {(lens, site) for lens in section["lenses"]
                                                      for site in ("resid", "mid")}


def test_unknown_lens_in_lenses_is_one_line(tiny_model_dirs, tmp_path, capsys):
    code, _, err = _run([str(tiny_model_dirs["llama"]), "--lenses", "raw,sideways",
                         "--out_dir", str(tmp_path / "out")], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "sideways" in err
    assert not (tmp_path / "out").exists()
    code, _, err = _run([str(tiny_model_dirs["llama"]), "--lenses", "raw,raw",
                         "--out_dir", str(tmp_path / "out")], capsys)
    assert code != 0 and "twice" in err and not (tmp_path / "out").exists()


def test_suite_with_lenses(tiny_model_dirs, tmp_path, capsys):
    """Per (lens, site): the suite's three tables; the suite's own tables are those of a suite
    without --lenses byte for byte (the same batches, the same decode), and its primary lens's
    rows among the lens tables value for value."""
    import json

    from mlx_lens.output.suite_tables import read_suite_table

    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    out = tmp_path / "out"
    common = [str(tiny_model_dirs["gpt2"]), "--backend", "torch", "--no-probes", "--no-plots",
              "--facts", str(facts)]
    assert _run([*common, "--out_dir", str(tmp_path / "alone")], capsys)[0] == 0
    code, _, err = _run([*common, "--lenses", "final-norm,raw", "--out_dir", str(out)], capsys)
    assert code == 0, err
    for kind in ("layers", "facts", "aggregates"):
        assert ((tmp_path / "alone" / f"suite-gpt2-{kind}.csv").read_bytes()
                == (out / f"suite-gpt2-{kind}.csv").read_bytes())
    layers = read_suite_table(out / "suite-gpt2-layers.parquet")
    lens_layers = read_suite_table(out / "suite-gpt2-lens-layers.parquet")
    assert set(zip(lens_layers["lens"], lens_layers["site"])) == {
        ("final-norm", "resid"), ("final-norm", "mid"), ("raw", "resid"), ("raw", "mid")}
    primary = lens_layers[(lens_layers["lens"] == "final-norm") & (lens_layers["site"] == "resid")]
    for column in ("entropy", "p_answer", "answer_log2p", "control_p"):
        assert np.array_equal(primary[column].to_numpy(), layers[column].to_numpy(), equal_nan=True)
    mid = lens_layers[lens_layers["site"] == "mid"]
    assert mid["layer"].max() == 2 and set(mid["depth"] - mid["layer"]) == {0.5}
    per_fact = read_suite_table(out / "suite-gpt2-lens-facts.parquet")
    assert len(per_fact) == 2 * 4
    first = per_fact[(per_fact["lens"] == "final-norm") & (per_fact["site"] == "resid")]
    assert "lens_agreement_onset" in first.columns and first["norm_flip_layers"].notna().all()
    aggregates = read_suite_table(out / "suite-gpt2-lens-aggregates.parquet")
    assert {"lens", "site", "ci_low", "ci_high"} <= set(aggregates.columns)


def test_a_tuned_lens_beside_the_logit_lens(loaded, tmp_path):
    """A tuned lens is compared at the rows between blocks and reads no middle rows; an
    identity tuned lens is the final-norm lens (h + 0 h + 0 = h exactly): KL exactly 0."""
    from mlx_lens.tuned import lens_file
    from mlx_lens.tuned.lens_file import TunedLens

    backend = loaded("torch", "llama")
    info = backend.info
    tuned = Lens.tuned(lens_file.save(TunedLens.identity(
        info.n_layers, info.d_model,
        {"unembed_sha256": lens_file.unembedding_hash(backend.unembedding, info.vocab)}),
        tmp_path / "tuned"))
    ids = backend.tokenizer.encode(PROMPT)
    sweep = backend.sweep_lenses(ids, SweepOptions(answer_ids=(ids[1],)),
                                 [Lens("final-norm"), tuned], mid=True)
    assert (tuned.name, "mid") not in sweep.stats and (tuned.name, "resid") in sweep.stats
    assert "mid" not in sweep.pairs  # one lens reads the middle: nothing to compare
    assert np.all(sweep.pairs["resid"].kl == 0)


def test_the_api_compares_lenses(tiny_model_dirs):
    import mlx_lens
    from mlx_lens.experiment.facts import Fact

    lens = mlx_lens.load(str(tiny_model_dirs["qwen3"]), backend="torch")
    result = lens.run(probes=False, lenses="raw, next-norm", mid=False)
    assert list(result.payload["lenses"]["lenses"]) == ["final-norm", "raw", "next-norm"]
    assert set(result.lenses["site"]) == {"resid"} and len(result.lens_pairs) == 3 * 4
    suite = lens.run_suite([Fact("de", "The capital of Germany is", "Berlin")], lenses="all")
    assert set(suite.lens_long["lens"]) == {"final-norm", "next-norm", "raw"}


def test_a_model_split_across_processes_does_not_compare_lenses():
    """The pipeline is a results-only backend: --lenses needs the model in one process, and
    `require` refuses it in one line (mlx_lens/core/contract.py)."""
    from mlx_lens.core.contract import ComparingBackend, require
    from mlx_lens.core.errors import LensError
    from mlx_lens.mlx.pipeline import PipelineBackend

    backend = PipelineBackend.__new__(PipelineBackend)  # no processes needed to ask
    with pytest.raises(LensError, match="split across processes"):
        require(backend, ComparingBackend, "--lenses")


@pytest.mark.parametrize("mid, resid, first", [
    # 3 blocks: the middles of blocks 0-2, then the output row (as resid's last)
    ("nyny", "nnny", True),  # block 1's middle reads it, its output (row 2) does not
    ("nnny", "nnny", False),  # only the output row
    ("nnyy", "nnyy", False),  # block 2's middle, but block 1's output (row 2) already
    ("n?yy", "nnny", None),  # block 1's middle may read it: undecided
    ("nyyy", "nnny", True),
])
def test_mid_block_findings(mid, resid, first):
    from mlx_lens.experiment.lenses import _mid_findings

    found = _mid_findings(_rows(list(mid)), _rows(list(resid)))
    assert found["mid_block_first"] is first
    if first:
        assert found["first_mid_block"] == mid.index("y")
        only = [i for i in range(len(mid) - 1) if mid[i] == "y" and resid[i + 1] == "n"]
        assert found["mid_only_blocks"] == only


def test_a_middle_milestone_is_a_block_middle_never_the_output_row():
    """3 blocks: the middle rows are blocks 0-2 and then the model's output row (row 3), where
    alone the answer is the top-1 (rank 1, lead 5 bits; elsewhere rank 9, lead -5 bits). No
    middle of a block reads it: every mid milestone is None, not 3, a middle that does not
    exist. The rows between blocks (resid) keep theirs at the output row, layer 3."""
    from mlx_lens.core.contract import LayerStats, LensSweep, ModelInfo
    from mlx_lens.experiment.lenses import findings
    from mlx_lens.experiment.milestones import MilestoneSettings

    n = 4
    lead = np.array([-5.0, -5.0, -5.0, 5.0])[:, None]
    stats = LayerStats(entropy=np.ones((n, 1)), topk_ids=np.zeros((n, 1, 2), np.int64),
                       topk_probs=np.full((n, 1, 2), 0.5), kl_to_final=np.zeros(n),
                       cos_to_final=np.ones(n), p_answer=np.zeros(n),
                       answer_rank=np.array([9, 9, 9, 1]), piece_log2p=np.zeros((n, 1)),
                       piece_rank=np.array([[9], [9], [9], [1]]), piece_lead=lead,
                       piece_x_norm=np.ones((n, 1)))
    sweep = LensSweep(("final-norm",), {("final-norm", "resid"): stats,
                                        ("final-norm", "mid"): stats}, {}, "sequential")
    info = ModelInfo("hand", "llama", 3, 8, 1, 16, None, "fake", "cpu", "float32", "float32")
    found = findings(sweep, info, 1.0, MilestoneSettings(), "final-norm")
    mid, resid = found["milestones"]["final-norm"]["mid"], found["milestones"]["final-norm"]["resid"]
    assert (mid["L_semantic"], mid["L_answer_top1"]) == (None, None)
    assert (resid["L_semantic"], resid["L_answer_top1"]) == (3, 3)
    assert found["mid_block"]["final-norm"]["first_mid_block"] is None


def test_the_lens_line_says_never_where_the_json_has_null():
    """A lens under which the answer never becomes the top-1, no lens-agreement onset and no
    middle of a block that reads it: 'never' on the console (JSON null), not Python's None."""
    from mlx_lens.experiment.lenses import summary_line

    section = {"milestones": {"final-norm": {"resid": {"L_answer_top1": 2}},
                              "raw": {"resid": {"L_answer_top1": None}},
                              "next-norm": {"resid": {"L_answer_top1": UNDECIDED}}},
               "n_layers": 3, "primary": "final-norm", "onset_window": 1,
               "lens_agreement_onset": None, "norm_flip_layers": {"final-norm": [2]},
               "mid_block": {"final-norm": {"first_mid_block": 1},
                             "raw": {"first_mid_block": None}}}
    assert summary_line(section) == (
        "lenses: whole answer top-1 from layer: final-norm 2, raw never, next-norm undecided; "
        "lens-agreement onset (primary final-norm and another lens within +-1; the lenses "
        "share the residual and the head: agreement, not independent evidence) never; "
        "norm-flip layers (a normed lens reads the answer, raw does not; under RMSNorm only the "
        "gain gamma can flip a top-1) [2]; first mid-block read final-norm 1, raw never")
