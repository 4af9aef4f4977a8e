"""Each backend's lens (MLX on mlx-lm, torch on transformers) on tiny random models of every
supported architecture, held to the same checks; then what only one backend has."""
from __future__ import annotations

import json
from unittest import mock

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_lens.core import bounds
from mlx_lens.core.contract import SweepOptions
from mlx_lens.core.lens import FINAL_NORM, Lens
from mlx_lens.core.stats import prompt_stats
from mlx_lens.loading.sources import resolve
from mlx_lens.mlx import backend as mlx_backend
from mlx_lens.mlx import reduce as mlx_reduce
from mlx_lens.mlx.backend import MlxBackend
from tests.lens_checks import (LENSES, NORM_AND_HEAD, PROMPT, assert_chunked_sweep_matches_logits,
                               assert_large_vocabulary_sweep, assert_reductions_match_float64,
                               assert_softcap_applied, assert_sweep_matches_logits,
                               backend_cache, gemm_bound)
from tests.tiny_models import CONFIGS, framework_cases
from torch_ref import reduce as torch_reduce
from torch_ref.backend import TorchBackend

BACKENDS = {"mlx": MlxBackend, "torch": TorchBackend}


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs):
    """(backend name, model name) -> the loaded backend, each loaded once per module."""
    caches = {kind: backend_cache(cls, tiny_model_dirs) for kind, cls in BACKENDS.items()}
    return lambda kind, name: caches[kind](name)


class _ComputeDtypeMx:
    """mlx.core, except that `bfloat16` names the model's compute dtype."""

    def __init__(self, dtype):
        self.bfloat16 = dtype

    def __getattr__(self, name):
        return getattr(mx, name)


def mlx_lm_logits(backend, ids: list[int]) -> np.ndarray:
    """mlx-lm's own forward pass, [T, V]. On Gemma-3, with sqrt(d) in the compute dtype as
    transformers and Google's reference have it: mlx-lm's module otherwise rounds it through
    bf16 whatever the dtype (docs/stack.md), so its `mx.bfloat16` is pointed at the dtype."""
    from mlx_lm.models import gemma3_text

    dtype = backend.embed.weight.dtype
    with mock.patch.object(gemma3_text, "mx", _ComputeDtypeMx(dtype)):
        return np.array(backend.own_logits(ids).astype(mx.float32))


def own_logits(kind: str, backend, ids: list[int]) -> np.ndarray:
    """The framework's own forward pass (mlx-lm's, transformers'), not the lens code: [T, V]."""
    if kind == "mlx":
        return mlx_lm_logits(backend, ids)
    return backend.model(input_ids=torch.tensor([ids])).logits[0].detach().numpy()


def small_chunks(kind: str, backend, monkeypatch) -> None:
    """Vocabulary chunks of 100 tokens (and, on torch, row slices of 20), so that a tiny model's
    sweep goes through several running merges."""
    if kind == "mlx":
        n_states = len(backend.tokenizer.encode(PROMPT)) * (backend.info.n_layers + 1)
        monkeypatch.setattr(backend, "chunk_bytes", 4 * 100 * n_states)
    else:
        monkeypatch.setattr(torch_reduce.tiles, "cpu_tile", lambda seconds: (20 * 100, 20))


def _mlx_reductions(logits, opts):
    """The MLX reductions on fixed logits, in one chunk as a short prompt gets them."""
    vocab = logits.shape[-1]
    return prompt_stats(mlx_reduce.sweep_states(mx.array(logits), opts,
                                                lambda x, start, stop: x[..., start:stop],
                                                vocab, vocab), opts.n_scored)


def _torch_reductions(logits, opts):
    """The torch reductions on fixed logits: the head is the identity (to base 2)."""
    def head_chunk(start, stop):
        return lambda x, out=None: torch.mul(x[:, start:stop], torch_reduce.LOG2E, out=out)

    x = torch.from_numpy(np.ascontiguousarray(logits))
    return prompt_stats(torch_reduce.sweep_states(x, opts, head_chunk, logits.shape[-1]),
                        opts.n_scored)


# -- the same checks on both backends ---------------------------------------------------------
@pytest.mark.parametrize("kind, name", framework_cases(BACKENDS))
def test_last_row_is_the_models_own_logits(loaded, kind, name):
    """The lens's capture and decode against the framework's own forward pass: the same blocks,
    then the model's norm and head in the lens's own order of operations. Bound: NORM_AND_HEAD
    length-d dot products' worth of rounding (gemm_bound), far below any real lens error (a
    wrong norm moves logits by O(1))."""
    backend = loaded(kind, name)
    ids = backend.tokenizer.encode(PROMPT)
    own = own_logits(kind, backend, ids)
    for lens in LENSES:
        logits = backend.layer_logits(ids, lens)
        bound = gemm_bound(backend, ids, lens, logits, NORM_AND_HEAD)[-1]
        assert np.all(np.abs(logits[-1] - own) <= bound), lens.name
    assert np.all(np.abs(backend.final_logits([ids])[0] - own[-1]) <= bound[-1])


@pytest.mark.parametrize("kind", BACKENDS)
def test_gemma2_softcap_is_applied(loaded, kind):
    assert_softcap_applied(loaded(kind, "gemma2"))


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
@pytest.mark.parametrize("lens", LENSES, ids=lambda lens: lens.name)
def test_chunked_sweep_equals_float64(loaded, kind, name, lens, monkeypatch):
    backend = loaded(kind, name)
    small_chunks(kind, backend, monkeypatch)
    assert_chunked_sweep_matches_logits(backend, lens)


@pytest.mark.parametrize("kind, reductions, base2", [("mlx", _mlx_reductions, False),
                                                     ("torch", _torch_reductions, True)])
def test_reductions_are_exact_to_their_bound_on_real_vocabularies(real_vocab_logits, kind,
                                                                   reductions, base2):
    """>= 100k tokens and real weights: only the reductions' own rounding, at its bound. An
    unblocked fp32 sum over the vocabulary fails this (docs/numerics.md §2)."""
    for logits in real_vocab_logits:
        assert_reductions_match_float64(reductions, logits, base2=base2)


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("lens", [FINAL_NORM, Lens("raw")], ids=lambda lens: lens.name)
def test_sweep_equals_float64_on_a_large_vocabulary(large_vocab_dir, kind, lens):
    assert_large_vocabulary_sweep(BACKENDS[kind](resolve(str(large_vocab_dir))), lens)


def test_lens_rules():
    assert Lens("final-norm").norm_plan(3) == ["final"] * 4
    assert Lens("next-norm").norm_plan(3) == [0, 1, 2, "final"]
    assert Lens("raw").norm_plan(3) == [None, None, None, "final"]


# -- the rows each lens decodes: torch against transformers' own hidden states ----------------
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_torch_rows_use_their_lens_norm(loaded, name):
    """Rows 0..L-1 against transformers' own hidden_states (captured independently of our hooks),
    normalised by the norm module each lens names."""
    backend = loaded("torch", name)
    ids = backend.tokenizer.encode(PROMPT)
    out = backend.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    hidden = [h[0] for h in out.hidden_states[:-1]]  # the last one is already post-norm
    weight = backend.model.get_output_embeddings().weight
    n = len(hidden)
    for lens in LENSES:
        got = backend.layer_logits(ids, lens)
        bound = gemm_bound(backend, ids, lens, got, NORM_AND_HEAD)
        for row, ref in enumerate(lens.norm_plan(n)[:-1]):
            if ref == "final":
                x = backend.final_norm(hidden[row])
            elif ref is None:
                x = hidden[row]
            else:
                x = backend.input_norms[ref](hidden[row])
            want = (x @ weight.T).detach()
            if backend.softcap:
                want = torch.tanh(want / backend.softcap) * backend.softcap
            assert np.all(np.abs(got[row] - want.numpy()) <= bound[row]), (lens.name, row)


class _Recorder:
    """Stands in for one of mlx-lm's blocks in its own model's block list and keeps what went
    in and what came out."""

    def __init__(self, block, seen: list):
        self.block, self.seen = block, seen

    def __call__(self, h, *args, **kwargs):
        out = self.block(h, *args, **kwargs)
        self.seen.append((h, out))
        return out

    def __getattr__(self, name):  # what the model's loop asks of a block (e.g. use_sliding)
        return getattr(self.block, name)


def mlx_lm_rows(backend, ids: list[int]) -> list:
    """The residual rows of mlx-lm's own forward pass (its embedding, masks and block loop, not
    the lens's capture): block 0's input, then each block's output, [T, d] float32 each. Gemma-3
    with sqrt(d) in the compute dtype, as in mlx_lm_logits."""
    from mlx_lm.models import gemma3_text

    *parents, name = backend.layout.blocks.split(".")
    owner = backend.inner
    for parent in parents:
        owner = getattr(owner, parent)
    blocks, seen = getattr(owner, name), []
    setattr(owner, name, [_Recorder(b, seen) for b in blocks])
    try:
        with mock.patch.object(gemma3_text, "mx", _ComputeDtypeMx(backend.embed.weight.dtype)):
            mx.eval(backend.model(mx.array([ids])))
    finally:
        setattr(owner, name, blocks)
    return [seen[0][0][0].astype(mx.float32)] + [out[0].astype(mx.float32) for _, out in seen]


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2", "gemma3_text"])
def test_mlx_rows_use_their_lens_norm(loaded, name):
    """Rows decoded by layer_logits equal head(norm(row)) with the model's own norm modules, the
    rows taken from mlx-lm's own forward pass (independent of the lens's capture loop), as the
    torch test takes transformers' hidden states."""
    backend = loaded("mlx", name)
    ids = backend.tokenizer.encode(PROMPT)
    rows = mlx_lm_rows(backend, ids)
    assert len(rows) == backend.info.n_layers + 1
    final = getattr(backend.inner, backend.layout.final_norm)
    for lens in LENSES:
        got = backend.layer_logits(ids, lens)
        bound = gemm_bound(backend, ids, lens, got, NORM_AND_HEAD)
        for row, ref in enumerate(lens.norm_plan(len(backend.blocks))):
            h = rows[row]
            if ref == "final":
                h = final(h)
            elif ref is not None:
                h = getattr(backend.blocks[ref], backend.layout.input_norm)(h)
            want = h @ backend.head.weight.T
            if backend.softcap:
                want = mx.tanh(want / backend.softcap) * backend.softcap
            assert np.all(np.abs(got[row] - np.array(want)) <= bound[row]), (lens.name, row)


# -- MLX only -----------------------------------------------------------------------------------
def test_gemma3_scales_embeddings_by_sqrt_d_in_the_compute_dtype(loaded):
    """Row 0 is embed * sqrt(d) with sqrt(d) in fp32 here (transformers' semantics), not
    mlx-lm's bf16-rounded constant: the tiny width 96 makes the two differ (9.798 vs 9.8125)."""
    backend = loaded("mlx", "gemma3_text")
    ids = backend.tokenizer.encode(PROMPT)
    root = np.float32(backend.hidden ** 0.5)
    np.testing.assert_array_equal(backend.residuals(ids)[0],
                                  np.array(backend.embed(mx.array(ids))) * root)
    assert root != np.array(mx.array(backend.hidden ** 0.5, mx.bfloat16).astype(mx.float32))


@pytest.mark.parametrize("name, bits, mode", [("llama", 4, "affine"), ("llama_untied", 8, "affine"),
                                              ("llama_untied", 4, "mxfp4")])
def test_quantised_model_decodes_through_fp32_dequantised_head(tiny_model_dirs, tmp_path, name,
                                                               bits, mode):
    """Checkpoints made by mlx-lm's own converter, as mlx-community publishes them (affine 4-
    and 8-bit, mxfp4; a tied quantised embedding, an untied quantised head): the lens
    dequantises the head to fp32; its last row must match the quantised model's own logits.
    The model's own head is a quantised matmul that dequantises in the same way (one more
    rounding per weight, within NORM_AND_HEAD's bound)."""
    from mlx_lm import convert

    out = tmp_path / f"{name}-{mode}{bits}"
    convert(str(tiny_model_dirs[name]), mlx_path=str(out), quantize=True, q_bits=bits,
            q_group_size=32, q_mode=mode)
    backend = MlxBackend(resolve(str(out)))
    assert backend.head.bits == bits and backend.head.mode == mode
    assert isinstance(backend.head, mlx_backend._QUANTIZED)
    ids = backend.tokenizer.encode(PROMPT)
    own = np.array(backend.own_logits(ids))
    logits = backend.layer_logits(ids, FINAL_NORM)
    bound = gemm_bound(backend, ids, FINAL_NORM, logits, NORM_AND_HEAD)[-1]
    assert np.all(np.abs(logits[-1] - own) <= bound)
    answer = backend.tokenizer.encode(" Berlin", add_special_tokens=False)[0]
    assert_sweep_matches_logits(backend, ids, FINAL_NORM, answer)
    # transformers cannot read mlx-lm's quantisation: torch, and so parity, refuse it by name
    from mlx_lens.core.errors import LensError

    with pytest.raises(LensError, match=f"mlx-lm quantised folder \\({bits}-bit {mode}\\), "
                                        f"which transformers cannot read: run it with "
                                        f"--backend mlx; parity compares"):
        TorchBackend(resolve(str(out)))


def test_unmappable_rope_is_refused(tiny_model_dirs, tmp_path):
    import json
    import shutil

    folder = shutil.copytree(tiny_model_dirs["llama"], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "made-up", "rope_theta": 1e4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="rope type 'made-up' cannot be mapped"):
        MlxBackend(resolve(str(folder)))


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_head_path_the_lens_does_not_apply_is_refused(tiny_model_dirs, kind, monkeypatch):
    """The load's head-path check bites: a lens that would scale the logits where the model
    does not (as it would miss a scale the model applies) is refused by name with the gap."""
    from mlx_lens.core.errors import LensError

    module = "mlx_lens.mlx.backend" if kind == "mlx" else "torch_ref.backend"
    monkeypatch.setattr(f"{module}.logit_scale", lambda config: 2.0)
    with pytest.raises(LensError, match=r"llama: the lens's decode .* differs .* bound\): its "
                                        r"head path is not one the lens reads"):
        BACKENDS[kind](resolve(str(tiny_model_dirs["llama"])))


# -- torch only ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, model_type, message", [
    ("torch", "made_up", "transformers does not implement it, nor does mlx-lm"),
    ("mlx", "made_up", "mlx-lm does not implement it, nor does transformers"),
    ("mlx", "bert", "mlx-lm does not implement it; transformers does: --backend torch"),
])
def test_unsupported_architecture_is_refused_by_name(tmp_path, kind, model_type, message):
    """A type the backend's library does not implement, in one line naming the other backend
    where its library does."""
    from mlx_lens.core.errors import LensError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(LensError, match=f"unsupported architecture '{model_type}' for the {kind} "
                                        f"backend: {message}"):
        BACKENDS[kind](resolve(str(tmp_path)))


def test_narrow_positions_get_only_narrow_k(loaded, monkeypatch):
    """Positions marked narrow keep their top-5 exactly; their other columns are empty."""
    backend = loaded("torch", "llama")
    small_chunks("torch", backend, monkeypatch)
    ids = backend.tokenizer.encode(PROMPT)
    wide = tuple(t % 3 == 0 for t in range(len(ids)))
    full = backend.sweep(ids, SweepOptions())
    part = backend.sweep(ids, SweepOptions(wide=wide))
    narrow = ~np.array(wide)
    narrow[-1] = False  # the next-token position is always wide
    np.testing.assert_array_equal(part.topk_ids[:, ~narrow], full.topk_ids[:, ~narrow])
    np.testing.assert_array_equal(part.topk_ids[:, narrow, :5], full.topk_ids[:, narrow, :5])
    assert (part.topk_ids[:, narrow, 5:] == -1).all() and (part.topk_probs[:, narrow, 5:] == 0).all()
    # Two tilings: each within its derived bound of float64, so within twice it of each other.
    logits = backend.layer_logits(ids, FINAL_NORM)
    b = gemm_bound(backend, ids, FINAL_NORM, logits, 2)
    tol = bounds.sweep_tolerances(logits, b, max(part.summation_depth, full.summation_depth))
    assert np.all(np.abs(part.entropy - full.entropy) <= 2 * tol["entropy"])


def test_cpu_tile_calibration_times_a_tile(tmp_path, monkeypatch):
    """The first sweep on a machine times the candidate tiles (torch_ref/tiles.py); the cache
    hides that code on a machine that has run once, so it runs here, into a fresh cache."""
    from torch_ref import tiles

    monkeypatch.setenv("MLX_LENS_CACHE", str(tmp_path))
    monkeypatch.delenv("MLX_LENS_CPU_TILE", raising=False)
    monkeypatch.setattr(tiles, "CANDIDATES", ((256, 2048), (512, 1024)))
    tiles.cpu_tile.cache_clear()
    try:
        elements, rows = tiles.cpu_tile(torch_reduce.tile_seconds)
    finally:
        tiles.cpu_tile.cache_clear()
    assert (elements, rows) in {(256 * 2048, 256), (512 * 1024, 512)}
    assert (tmp_path / "cpu-tiles.json").is_file()


def test_an_untied_mlx_model_without_its_head_is_refused(tiny_model_dirs):
    """Tiedness comes from the model's arguments, not from a missing attribute: the head of an
    untied model is the linear layer of vocabulary width outside the blocks, an untied model
    without one is refused by name instead of decoding through its embeddings, and a tied one
    needs none."""
    import mlx.nn as nn

    from mlx_lens.core.errors import LensError
    from mlx_lens.mlx.arch import read_layout

    untied = MlxBackend(resolve(str(tiny_model_dirs["llama_untied"])))
    model, vocab = untied.model, untied.info.vocab
    assert read_layout(model, vocab, tied=False)[0].head == "lm_head"
    model["lm_head"] = nn.Linear(untied.info.d_model, vocab - 1, bias=False)
    with pytest.raises(LensError, match="llama model is untied .* no head of 512 outputs"):
        read_layout(model, vocab, tied=False)
    tied = MlxBackend(resolve(str(tiny_model_dirs["llama"])))
    assert tied.head is tied.embed


@pytest.mark.parametrize("forced", ["512x", "x4096", "512", "0x4096", "512x-1", "5l2x4096",
                                    "512*4096"])
def test_a_malformed_cpu_tile_is_one_line(forced, monkeypatch):
    """MLX_LENS_CPU_TILE must be ROWSxTOKENS, both above 0: anything else is a LensError naming
    the variable (one line from the command line), not int()'s error or a tile of 0 rows."""
    from mlx_lens.core.errors import LensError
    from torch_ref import tiles

    monkeypatch.setenv("MLX_LENS_CPU_TILE", forced)
    tiles.cpu_tile.cache_clear()
    try:
        with pytest.raises(LensError, match=r"^MLX_LENS_CPU_TILE=.* is not ROWSxTOKENS"):
            tiles.cpu_tile(lambda rows, tokens: pytest.fail("calibrated instead"))
        monkeypatch.setenv("MLX_LENS_CPU_TILE", " 512X4096 ")
        tiles.cpu_tile.cache_clear()
        assert tiles.cpu_tile(lambda rows, tokens: pytest.fail("calibrated instead")) == (
            512 * 4096, 512)
    finally:
        tiles.cpu_tile.cache_clear()
