"""Causal tracing as ROME defines it (mlx_lens/experiment/tracing.py) against computations that do
not share its code: transformers' own forward with the noise added by a hook written here, on
every tiny architecture (MLX within the parity bound of it); the exact identities (restoring
the subject's row 0 gives the clean run, restoring nothing or a position before the subject the
noised run, bit for bit); N samples batched against N runs of one; a hand-built backend whose
indirect effects are known; the command, its artifacts (the noise file reruns the noised runs in
plain transformers) and its bad input."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mlx_lens.experiment.patching import KINDS, restored_blocks
from mlx_lens.experiment.single import subject_span
from mlx_lens.experiment.tracing import NoiseOptions, places_of, run_trace, run_trace_suite
from mlx_lens.loading.sources import resolve
from mlx_lens.mlx.backend import MlxBackend
from tests.lens_checks import HandBuilt, backend_cache, patch_bound_bits, piece_log2p
from tests.tiny_models import CONFIGS
from torch_ref.backend import TorchBackend

BACKENDS = {"torch": TorchBackend, "mlx": MlxBackend}
CLEAN = "The capital of Germany is"
ANSWER = "Berlin Brandenburg"  # several pieces on the tiny tokenizer: the whole answer scored
SAMPLES = 3


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs):
    caches = {kind: backend_cache(cls, tiny_model_dirs) for kind, cls in BACKENDS.items()}
    return lambda kind, name: caches[kind](name)


def _noised_inputs(backend, seed: int = 0):
    """The prompt with its answer's pieces but the last, the pieces, the subject's span and
    noise [SAMPLES, T, d] at it (sd 1: of the order of the tiny models' embeddings)."""
    tok = backend.tokenizer
    ids = tok.encode(CLEAN)
    pieces = tok.encode(" " + ANSWER, add_special_tokens=False)
    span = subject_span(tok, ids, "Germany")
    seq = ids + pieces[:-1]
    noise = np.zeros((SAMPLES, len(seq), backend.info.d_model), np.float32)
    noise[:, span[0]:span[1]] = np.random.default_rng(seed).standard_normal(
        (SAMPLES, span[1] - span[0], backend.info.d_model))
    return seq, pieces, span, noise


def _hooked_logits(model, blocks, seq: list[int], noise: np.ndarray) -> np.ndarray:
    """transformers' own forward of SAMPLES copies of seq with noise added to the input of
    block 0 by a forward pre-hook written here (not torch_ref's): logits [SAMPLES, T, V]."""
    def add(_module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        h = h + torch.from_numpy(noise).to(h.dtype)
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    handle = blocks[0].register_forward_pre_hook(add, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([seq] * len(noise)), use_cache=False)
    finally:
        handle.remove()
    return out.logits.float().numpy()


def _own(backend, run, n: int, n_seq: int):
    """A recorded run's own output logits and decoded rows' norms (nothing restored)."""
    layers = backend.info.n_layers
    return backend.patched_logits(run, run, "resid", range(layers, layers + 1),
                                  np.zeros((1, n_seq, len(run.ids[0])), bool), n)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_noised_run_is_transformers_with_the_noise_added(loaded, name):
    """Row 0 (the input of block 0: embeddings with learned positions and scales) plus noise at
    the subject, through the whole model: torch_ref's record against transformers' forward with
    the hook, and MLX against both, each within two fp32 evaluations' bound per piece."""
    ref, cand = loaded("torch", name), loaded("mlx", name)
    seq, pieces, _, noise = _noised_inputs(ref)
    n = len(pieces)
    want = _hooked_logits(ref.model, ref.blocks, seq, noise)[:, -n:]
    z, norms = _own(ref, ref.record([seq] * SAMPLES, noise), n, SAMPLES)
    zm, _ = _own(cand, cand.record([seq] * SAMPLES, noise), n, SAMPLES)
    for s in range(SAMPLES):
        tol = patch_bound_bits(ref, norms[0, s], want[s])
        exp = piece_log2p(want[s], pieces)
        assert np.all(np.abs(piece_log2p(z[0, s], pieces) - exp) <= tol), s
        assert np.all(np.abs(piece_log2p(zm[0, s], pieces) - exp) <= 2 * tol), s
    clean, _ = _own(ref, ref.record([seq] * SAMPLES), n, SAMPLES)
    assert not np.array_equal(clean[0, 0], z[0, 0])  # the noise acts


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3_sliding", "gpt_neox"])
def test_exact_identities(loaded, kind, name):
    """Bit for bit, in one batch shape: restoring row 0 at the subject's tokens gives the clean
    run; restoring nothing gives the noised run; restoring a position before the subject (the
    same in both runs at every layer: attention is causal) changes nothing; restoring the last
    row at the prompt's last position gives the clean run's first piece."""
    backend = loaded(kind, name)
    seq, pieces, span, noise = _noised_inputs(backend)
    n, length, layers = len(pieces), len(seq), backend.info.n_layers
    clean, noised = backend.record([seq] * SAMPLES), backend.record([seq] * SAMPLES, noise)
    subject = np.zeros((2, SAMPLES, length), bool)
    subject[1, :, span[0]:span[1]] = True
    restored, _ = backend.patched_logits(noised, clean, "resid", range(1), subject, n)
    own, _ = backend.patched_logits(clean, clean, "resid", range(1), subject, n)
    assert np.array_equal(restored[1], own[1])
    assert not np.array_equal(restored[0], own[0])
    before = np.zeros((1 + span[0], SAMPLES, length), bool)
    for t in range(span[0]):
        before[1 + t, :, t] = True
    for k in KINDS:
        for r in (0, layers - 1):
            blocks = restored_blocks(k, r, 3, layers)
            z, _ = backend.patched_logits(noised, clean, k, blocks, before, n)
            alone, _ = backend.patched_logits(noised, noised, k, blocks, before, n)
            assert np.array_equal(z[0], alone[0]), (k, r)
            assert all(np.array_equal(z[v], z[0]) for v in range(1, len(z))), (k, r)
    at_last = np.zeros((2, SAMPLES, length), bool)
    at_last[1, :, length - n] = True
    last = range(layers, layers + 1)
    restored, _ = backend.patched_logits(noised, clean, "resid", last, at_last, n)
    own, _ = backend.patched_logits(clean, clean, "resid", last, at_last, n)
    assert np.array_equal(restored[1, :, 0], own[1, :, 0])


@pytest.mark.parametrize("kind", BACKENDS)
def test_samples_batched_equal_runs_of_one(loaded, kind):
    """SAMPLES noised runs in one batch against one run per sample, every kind restored at the
    subject's last token: within two fp32 evaluations' bound per piece."""
    backend = loaded(kind, "qwen2")
    seq, pieces, span, noise = _noised_inputs(backend)
    n, length, layers = len(pieces), len(seq), backend.info.n_layers
    at = np.zeros((2, SAMPLES, length), bool)
    at[1, :, span[1] - 1] = True
    clean = backend.record([seq] * SAMPLES)
    for k in KINDS:
        blocks = restored_blocks(k, 1, 3, layers)
        batched, norms = backend.patched_logits(backend.record([seq] * SAMPLES, noise), clean,
                                                k, blocks, at, n)
        for s in range(SAMPLES):
            alone, _ = backend.patched_logits(backend.record([seq], noise[s:s + 1]),
                                              backend.record([seq]), k, blocks, at[:, :1], n)
            tol = patch_bound_bits(backend, norms[:, s], batched[:, s])
            assert np.all(np.abs(piece_log2p(batched[:, s], pieces)
                                 - piece_log2p(alone[:, 0], pieces)) <= tol[:, None]), (k, s)


def test_log_probabilities_of_chosen_tokens():
    """log_prob64 against the whole float64 log softmax: the same expression rounded in another
    order, a few roundings (<= 6) of terms no larger than 2 max|z| + ln V apart."""
    from mlx_lens.core.numerics import log_prob64, log_softmax64

    vocab = 152064  # Qwen-2's: a realistic vocabulary
    z = (np.random.default_rng(0).standard_normal((3, 4, vocab)) * 30).astype(np.float32)
    index = np.random.default_rng(1).integers(0, vocab, (3, 4))
    want = np.take_along_axis(log_softmax64(z), index[..., None], -1)[..., 0]
    tol = 6 * 2.0 ** -53 * (2 * np.abs(z).max() + np.log(vocab))
    assert np.abs(log_prob64(z, index) - want).max() <= tol
    assert np.abs(log_prob64(z, index[0])[0] - want[0]).max() <= tol  # index[0] broadcast


def test_rome_windows_are_centred():
    """ROME's trace_important_window: layer - K // 2 .. layer - (-K // 2) - 1, cut at the ends."""
    assert restored_blocks("mlp", 0, 10, 30) == range(0, 5)
    assert restored_blocks("mlp", 12, 10, 30) == range(7, 17)
    assert restored_blocks("attn", 29, 10, 30) == range(24, 30)
    assert restored_blocks("attn", 4, 3, 30) == range(3, 6)
    assert restored_blocks("mlp", 4, 1, 30) == range(4, 5)
    assert restored_blocks("resid", 30, 10, 30) == range(30, 31)  # the last row: no window


def test_the_packaged_suite_names_each_subject(smollm2_dir):
    """Every default fact's subject is its country, found as the tokens that spell it; a facts
    file's subject must be in its prompt."""
    from transformers import AutoTokenizer

    from mlx_lens.core.errors import LensError
    from mlx_lens.experiment.facts import default_facts, encode_facts

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    for f in encode_facts(default_facts(), tok, None):
        a, b = f.subject_span
        assert tok.decode(f.ids[a:b]).strip() == f.fact.subject == f.fact.cluster, f.fact.id
    assert subject_span(tok, tok.encode("The Eiffel Tower is in"), "Eiffel Tower") == (1, 4)
    with pytest.raises(LensError, match="the subject 'Rome' is not in the prompt"):
        subject_span(tok, tok.encode("The capital of Italy is"), "Rome")


def test_a_facts_file_names_subjects(tmp_path):
    from mlx_lens.core.errors import LensError
    from mlx_lens.experiment.facts import load_facts

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "The capital of Peru is", "answer": "Lima",
                                "subject": " Peru "}) + "\n")
    assert load_facts(str(good))[0].subject == "Peru"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "The capital of Peru is", "answer": "Lima",
                               "subject": "Chile"}) + "\n")
    with pytest.raises(LensError, match=r"bad.jsonl:1: the subject 'Chile' is not in the prompt"):
        load_facts(str(bad))


def test_places_as_rome_groups_them():
    # a 3-token subject at 2..4 of 9 tokens
    assert [places_of(t, (2, 5), 9) for t in range(9)] == [
        [], [], ["first_subject"], ["middle_subject"], ["last_subject"], ["first_after"],
        ["further"], ["further"], ["last"]]
    # a one-token subject right before the last position: first and last, then first_after+last
    assert [places_of(t, (3, 4), 5) for t in range(5)] == [
        [], [], [], ["first_subject", "last_subject"], ["first_after", "last"]]


# -- the metric on a hand-built backend ----------------------------------------------------------
class _HandBuilt(HandBuilt):
    """A tracing backend whose p(answer) is set by hand: P_CLEAN unnoised; noised, sample s
    (of SAMPLES, prompt-major in a batch) has P_LOW[s], or RESTORED[(prompt's first word, kind,
    first restored block, position)][s] where that one position is restored. Row 0 at every
    token is ROW0 (sample std sqrt(4/3))."""

    ROW0 = np.array([1.0, -1.0, 1.0, -1.0])
    P_CLEAN = 0.5
    # skewed samples: their mean (the metric) is not their median
    P_LOW = np.array([0.05, 0.05, 0.20])  # mean 0.1: total effect 0.4
    RESTORED = {("capital", "resid", 1, 2): np.array([0.20, 0.25, 0.45]),  # mean 0.3: IE 0.2
                ("capital", "resid", 1, 3): np.array([0.10, 0.10, 0.10]),  # IE 0
                ("North", "resid", 2, 1): np.array([0.40, 0.45, 0.65])}  # 0.5: IE 0.4

    def __init__(self):
        super().__init__(2, 4)

    def residuals(self, ids):
        return np.broadcast_to(self.ROW0, (3, len(ids), 4)).copy()

    def record(self, batch, noise=None):
        return [tuple(ids) for ids in batch], noise is not None

    def patched_logits(self, base, clean, kind, blocks, restore, n_scored):
        (seqs, noised), answer = base, self.tokenizer.encode("Berlin")[0]
        out = np.full((*restore.shape[:2], n_scored, self.VOCAB), -1e4, np.float32)
        for v, b in np.ndindex(*restore.shape[:2]):
            p = self.P_CLEAN
            if noised:
                at = np.flatnonzero(restore[v, b])
                first = self.tokenizer.decode(seqs[b][:1])
                key = (first, kind, blocks.start, int(at[0])) if len(at) == 1 else None
                p = self.RESTORED.get(key, self.P_LOW)[b % SAMPLES]
            out[v, b, -1, answer] = np.log(p)
            out[v, b, -1, self.tokenizer.encode("filler")[0]] = np.log1p(-p)
        return out, np.ones(out.shape[:3])


# Each ln p is rounded to fp32 (relative error 2^-24 of |ln p| <= ln 20), which moves p by at
# most p 2^-24 ln 20 and a mean, difference or ratio over a total effect of 0.4 by a few times
# that: 1e-6 holds it with room for the float64 softmax's own rounding (~1e-16).
HAND_TOL = 1e-6


def test_indirect_effects_on_hand_built_probabilities():
    """p(answer) is the mean over samples of each sample's p: noised 0.1, clean 0.5, restoring
    row 1 at the subject 0.3 (indirect effect 0.2, recovery 0.5), at the next token 0.1 (0);
    the noise is 3 x the sample std of row 0 at the subject times numpy's normal draws of the
    seed, and the tokens before the subject are traced too (their effect is whatever the
    backend gives: here none)."""
    backend = _HandBuilt()
    opts = NoiseOptions(samples=SAMPLES, seed=7, window=1, kinds=("resid",))
    result = run_trace(backend, "capital of Germany is", "Berlin", "Germany", opts)
    s, frame = result.summary, result.frame.set_index(["layer", "pos"])
    assert abs(s["p_clean"] - 0.5) <= HAND_TOL and abs(s["p_corrupted"] - 0.1) <= HAND_TOL
    assert abs(s["total_effect"] - 0.4) <= HAND_TOL
    assert abs(frame.loc[(1, 2), "indirect_effect"] - 0.2) <= HAND_TOL
    assert abs(frame.loc[(1, 2), "recovery"] - 0.5) <= HAND_TOL
    assert abs(frame.loc[(1, 2), "p_answer_sd"] - np.sqrt(0.0175)) <= HAND_TOL  # ddof 1
    assert abs(frame.loc[(1, 3), "indirect_effect"]) <= HAND_TOL
    assert frame.loc[(1, 2), "place"] == "first_subject+last_subject"
    assert s["subject_span"] == [2, 3] and s["strongest"]["resid"] == {
        "layer": 1, "pos": 2, "indirect_effect": pytest.approx(0.2, abs=HAND_TOL)}
    std = np.sqrt(4 / 3)
    assert s["noise"]["embedding_std"] == pytest.approx(std, rel=1e-12)
    want = np.random.default_rng(7).standard_normal((SAMPLES, 1, 4)) * 3 * std
    assert np.array_equal(result.noise["prompt"], want.astype(np.float32))


def test_a_suite_on_hand_built_probabilities():
    """Per place, each fact's value is its positions' mean; a fact without a subject is skipped
    by name; the average indirect effect is the facts' mean."""
    from mlx_lens.experiment.facts import Fact

    backend = _HandBuilt()
    facts = [Fact("de", "capital of Germany is", "Berlin", subject="Germany", cluster="c1"),
             Fact("kp", "North Korea has its capital called", "Berlin", subject="North Korea",
                  cluster="c2"),
             Fact("none", "capital of Peru is", "Berlin")]
    opts = NoiseOptions(samples=SAMPLES, window=1, kinds=("resid",))
    result = run_trace_suite(backend, facts, opts)
    assert result.skipped == ["none: no subject to noise (the facts file's 'subject' field)"]
    long = result.long.set_index(["fact_id", "layer", "place"])
    assert abs(long.loc[("de", 1, "last_subject"), "indirect_effect"] - 0.2) <= HAND_TOL
    assert abs(long.loc[("de", 1, "first_subject"), "indirect_effect"] - 0.2) <= HAND_TOL
    assert abs(long.loc[("kp", 2, "last_subject"), "indirect_effect"] - 0.4) <= HAND_TOL
    assert abs(long.loc[("kp", 2, "first_subject"), "indirect_effect"]) <= HAND_TOL
    assert set(long.loc["kp"].index.get_level_values("place")) == {
        "first_subject", "last_subject", "first_after", "further", "last"}
    agg = result.aggregates.set_index(["place", "layer"])
    assert abs(agg.loc[("last_subject", 1), "effect_mean"] - 0.1) <= HAND_TOL  # (0.2 + 0) / 2
    assert abs(agg.loc[("last_subject", 2), "recovery_pooled"] - 0.5) <= HAND_TOL  # 0.4 / 0.8
    assert agg.loc[("last_subject", 1), "n"] == 2 and (agg["ci_unit"] == "fact").all()


# -- the command ---------------------------------------------------------------------------------
def test_the_command_writes_a_trace_that_plain_transformers_reruns(tiny_model_dirs, tmp_path):
    """`mlx-lens patch --noise`: the table, summary, noise file and heatmap; the noise file's
    tensors, added to row 0 at its span by a hook in plain transformers, give the summary's
    noised p(answer) (the mean over samples) within two fp32 evaluations' bound."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlx_lens.cli.main import main

    model = tiny_model_dirs["llama"]
    out = tmp_path / "out"
    assert main(["patch", str(model), "--backend", "torch", "--noise", "--clean", CLEAN,
                 "--subject", "Germany", "--answer", ANSWER, "--samples", "4", "--window", "3",
                 "--out_dir", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {
        "trace-llama.parquet", "trace-llama.csv", "trace-llama.json",
        "trace-llama-noise.safetensors", "plot-llama-trace.png"}
    summary = json.loads((out / "trace-llama.json").read_text())
    frame = pd.read_parquet(out / "trace-llama.parquet")
    layers = frame["layer"].max()  # resid rows 0..L, attn and mlp 0..L - 1
    assert len(frame) == len(summary["tokens"]) * (3 * layers + 1)
    assert summary["noise"]["samples"] == 4 and summary["window"] == 3
    with safe_open(str(out / "trace-llama-noise.safetensors"), framework="numpy") as f:
        meta = json.loads(f.metadata()["mlx_lens"])
        noise = f.get_tensor("prompt")
    a, b = meta["prompts"]["prompt"]["subject_span"]
    ids = meta["prompts"]["prompt"]["token_ids"]
    assert noise.shape[:2] == (4, b - a) and meta["noise"]["sd"] == summary["noise"]["sd"]
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    pieces = AutoTokenizer.from_pretrained(model).encode(" " + ANSWER, add_special_tokens=False)
    seq = ids + pieces[:-1]
    full = np.zeros((4, len(seq), noise.shape[-1]), np.float32)
    full[:, a:b] = noise
    logits = _hooked_logits(hf, hf.model.layers, seq, full)[:, -len(pieces):]
    p = np.exp2(piece_log2p(logits, pieces).sum(-1))  # per sample
    # Each piece's log2 p within the parity bound of the backend's (its decoded rows' norms,
    # read from the backend); the answer's within their sum t, so each p within p (2^t - 1)
    # of the other's, and the mean over samples within the mean of those.
    backend = TorchBackend(resolve(str(model)))
    _, norms = _own(backend, backend.record([seq] * 4, full), len(pieces), 4)
    t = patch_bound_bits(backend, norms[0], logits).sum(-1)
    assert abs(p.mean() - summary["p_corrupted"]) <= (p * np.expm1(t * np.log(2)) * 2 ** t).mean()


def test_bad_input(tiny_model_dirs, tmp_path, capsys):
    from mlx_lens.cli.main import main

    model = str(tiny_model_dirs["llama"])
    for args, says in ((["--noise", "--corrupt", "x y"], "--corrupt has no use with --noise"),
                       (["--noise", "--clean", "a b c"], "--noise needs --subject"),
                       (["--noise", "--clean", "a b c", "--subject", "d"],
                        "the subject 'd' is not in the prompt"),
                       (["--noise", "--samples", "0"], "--samples must be at least 1"),
                       (["--noise", "--noise-scale", "-1"], "--noise-scale must be a positive number"),
                       (["--subject", "Germany"], "--subject needs --noise"),
                       (["--noise", "--facts", "default", "--subject", "x"],
                        "--subject has no use with --facts")):
        out = tmp_path / "never"
        assert main(["patch", model, "--backend", "torch", *args, "--out_dir", str(out)]) != 0
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, (args, err)
        assert not out.exists()


def test_a_suite_trace_from_the_command(tiny_model_dirs, tmp_path, capsys):
    """`--noise --facts`: every fact with a subject traced (MLX), one line for each other; the
    tables per fact and per (kind, place, layer), the noise per fact, the picture, and
    `mlx-lens plot` drawing it again from the artifacts."""
    from safetensors import safe_open

    from mlx_lens.cli.main import main

    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(r) + "\n" for r in (
        {"id": "de", "prompt": "The capital of Germany is", "answer": "Berlin",
         "subject": "Germany"},
        {"id": "fr", "prompt": "France has its capital in", "answer": "Paris",
         "subject": "France"},
        {"id": "nosubject", "prompt": "The capital of Spain is", "answer": "Madrid"})))
    out = tmp_path / "out"
    assert main(["patch", str(tiny_model_dirs["qwen2"]), "--backend", "mlx", "--noise",
                 "--facts", str(facts), "--samples", "2", "--window", "2", "--out_dir",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert "skipped nosubject: no subject to noise" in printed
    assert "2 of 3 facts traced" in printed and "layers whose mean lies inside" in printed
    long = pd.read_parquet(out / "trace-qwen2-suite-layers.parquet")
    assert set(long["fact_id"]) == {"de", "fr"}
    assert set(long.loc[long["fact_id"] == "fr", "place"]) == {
        "first_subject", "last_subject", "first_after", "further", "last"}
    agg = pd.read_parquet(out / "trace-qwen2-suite-aggregates.parquet")
    assert set(agg["place"]) == set(long["place"]) and (agg["n"] <= 2).all()
    with safe_open(str(out / "trace-qwen2-suite-noise.safetensors"), framework="numpy") as f:
        assert set(f.keys()) == {"de", "fr"} and f.get_tensor("de").shape[0] == 2
    (out / "plot-qwen2-trace-suite.png").unlink()
    assert main(["plot", str(out)]) == 0
    assert (out / "plot-qwen2-trace-suite.png").is_file()


def test_the_headline_names_the_layers_a_peak_cannot_be_told_from():
    from mlx_lens.cli.patch import headline

    rows = pd.DataFrame({"kind": "mlp", "place": "last_subject", "layer": range(5),
                         "effect_mean": [0.1, 0.5, 0.45, 0.2, 0.41],
                         "effect_ci_low": [0.0, 0.4, 0.3, 0.1, 0.3],
                         "effect_ci_high": [0.2, 0.6, 0.6, 0.3, 0.5], "n": 8})
    assert headline(rows) == ("MLP at the last subject token: the average indirect effect peaks "
                              "at layer 1, +0.5000 (95% CI +0.4000 to +0.6000, 8 facts); layers "
                              "whose mean lies inside that interval: 1-2, 4")
    assert headline(rows.assign(kind="attn")) == "no MLP trace at the last subject token"
