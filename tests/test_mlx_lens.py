"""The MLX lens on tiny random models of every supported architecture (mlx on the CPU here)."""
from __future__ import annotations

from unittest import mock

import mlx.core as mx
import numpy as np
import pytest

from mlx_lens.mlx import backend as mlx_backend
from mlx_lens.core.contract import LENSES, norm_plan
from mlx_lens.mlx.backend import MlxBackend
from mlx_lens.loading.sources import resolve
from mlx_lens.mlx.reduce import sweep_states
from tests.lens_checks import (NORM_AND_HEAD, PROMPT, assert_chunked_sweep_matches_logits,
                               assert_large_vocabulary_sweep, assert_reductions_match_float64,
                               assert_softcap_applied, assert_sweep_matches_logits,
                               backend_cache, gemm_bound)
from tests.tiny_models import CONFIGS


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs):
    return backend_cache(MlxBackend, tiny_model_dirs)


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


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_last_row_is_the_models_own_logits(loaded, name):
    """The hand-written capture loop and decode against mlx-lm's own forward pass: the same
    blocks, then the model's norm and head in the lens's own order of operations. Bound:
    NORM_AND_HEAD length-d dot products' worth of rounding (gemm_bound)."""
    backend = loaded(name)
    ids = backend.tokenizer.encode(PROMPT)
    own = mlx_lm_logits(backend, ids)
    for lens in LENSES:
        logits = backend.layer_logits(ids, lens)
        bound = gemm_bound(backend, ids, lens, logits, NORM_AND_HEAD)[-1]
        assert np.all(np.abs(logits[-1] - own) <= bound), lens
    assert np.all(np.abs(backend.final_logits([ids])[0] - own[-1]) <= bound[-1])


def test_gemma3_scales_embeddings_by_sqrt_d_in_the_compute_dtype(loaded):
    """Row 0 is embed * sqrt(d) with sqrt(d) in fp32 here (transformers' semantics), not
    mlx-lm's bf16-rounded constant: the tiny width 96 makes the two differ (9.798 vs 9.8125)."""
    backend = loaded("gemma3_text")
    ids = backend.tokenizer.encode(PROMPT)
    root = np.float32(backend.hidden ** 0.5)
    np.testing.assert_array_equal(backend.residuals(ids)[0],
                                  np.array(backend.embed(mx.array(ids))) * root)
    assert root != np.array(mx.array(backend.hidden ** 0.5, mx.bfloat16).astype(mx.float32))


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2", "gemma3_text"])
def test_each_row_uses_its_lens_norm(loaded, name):
    """Rows decoded by layer_logits equal head(norm(row)) with the model's own norm modules."""
    backend = loaded(name)
    ids = backend.tokenizer.encode(PROMPT)
    rows = backend._rows(ids)
    inner = backend.inner
    final = getattr(inner, backend.arch.final_norm)
    for lens in LENSES:
        got = backend.layer_logits(ids, lens)
        bound = gemm_bound(backend, ids, lens, got, NORM_AND_HEAD)
        for row, ref in enumerate(norm_plan(lens, len(backend.blocks))):
            h = rows[row].astype(mx.float32)
            if ref == "final":
                h = final(h)
            elif ref is not None:
                h = getattr(backend.blocks[ref], backend.arch.input_norm)(h)
            want = h @ backend.head.weight.T
            if backend.softcap:
                want = mx.tanh(want / backend.softcap) * backend.softcap
            assert np.all(np.abs(got[row] - np.array(want)) <= bound[row]), (lens, row)


def test_gemma2_softcap_is_applied(loaded):
    assert_softcap_applied(loaded("gemma2"))


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
@pytest.mark.parametrize("lens", LENSES)
def test_chunked_sweep_equals_float64(loaded, name, lens, monkeypatch):
    backend = loaded(name)
    n_states = len(backend.tokenizer.encode(PROMPT)) * (backend.info.n_layers + 1)
    monkeypatch.setattr(backend, "chunk_bytes", 4 * 100 * n_states)  # 100-token chunks
    assert_chunked_sweep_matches_logits(backend, lens)


def test_quantised_model_decodes_through_fp32_dequantised_head(tiny_model_dirs, tmp_path):
    """A 4-bit checkpoint made by mlx-lm's own converter: the lens dequantises the (tied,
    quantised) embedding to fp32; its last row must match the quantised model's own logits.
    The model's own head is a quantised matmul that dequantises in the same way (one more
    rounding per weight, within NORM_AND_HEAD's bound)."""
    from mlx_lm import convert

    out = tmp_path / "llama-4bit"
    convert(str(tiny_model_dirs["llama"]), mlx_path=str(out), quantize=True, q_bits=4,
            q_group_size=32)
    backend = MlxBackend(resolve(str(out)))
    assert isinstance(backend.head, mlx_backend._QUANTIZED)
    ids = backend.tokenizer.encode(PROMPT)
    own = np.array(backend.own_logits(ids))
    logits = backend.layer_logits(ids, "final-norm")
    bound = gemm_bound(backend, ids, "final-norm", logits, NORM_AND_HEAD)[-1]
    assert np.all(np.abs(logits[-1] - own) <= bound)
    answer = backend.tokenizer.encode(" Berlin", add_special_tokens=False)[0]
    assert_sweep_matches_logits(backend, ids, "final-norm", answer)


def test_unmappable_rope_is_refused(tiny_model_dirs, tmp_path):
    import json
    import shutil

    folder = shutil.copytree(tiny_model_dirs["llama"], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "made-up", "rope_theta": 1e4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="rope type 'made-up' cannot be mapped"):
        MlxBackend(resolve(str(folder)))


def _mlx_reductions(logits, opts):
    """mlx_reduce's reductions on fixed logits, in one chunk as a short prompt gets them."""
    vocab = logits.shape[-1]
    return sweep_states(mx.array(logits), opts, lambda x, start, stop: x[..., start:stop],
                        vocab, vocab)


def test_reductions_are_exact_to_their_bound_on_real_vocabularies(real_vocab_logits):
    """>= 100k tokens and real weights: only the reductions' own rounding, at its bound. An
    unblocked fp32 sum over the vocabulary fails this (docs/numerics.md §2)."""
    for logits in real_vocab_logits:
        assert_reductions_match_float64(_mlx_reductions, logits, base2=False)


@pytest.mark.parametrize("lens", ["final-norm", "raw"])
def test_sweep_equals_float64_on_a_large_vocabulary(large_vocab_dir, lens):
    assert_large_vocabulary_sweep(MlxBackend(resolve(str(large_vocab_dir))), lens)
