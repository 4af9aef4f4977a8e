"""The MLX lens on tiny random models of every supported architecture (mlx on the CPU here)."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_lens import mlx_backend
from mlx_lens.contract import LENSES, norm_plan
from mlx_lens.mlx_backend import MlxBackend
from mlx_lens.models import resolve
from tests.lens_checks import (PROMPT, assert_chunked_sweep_matches_logits, assert_softcap_applied,
                               assert_sweep_matches_logits, backend_cache)
from tests.tiny_models import CONFIGS


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs):
    return backend_cache(MlxBackend, tiny_model_dirs)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_last_row_is_the_models_own_logits(loaded, name):
    """The hand-written capture loop and decode against mlx-lm's own forward pass. Both run the
    same fp32 kernels on the same inputs, so 1e-5 leaves room only for reordered fp32 sums."""
    backend = loaded(name)
    ids = backend.tokenizer.encode(PROMPT)
    own = np.array(backend.own_logits(ids))
    for lens in LENSES:
        assert np.abs(backend.layer_logits(ids, lens)[-1] - own).max() <= 1e-5, lens
    np.testing.assert_array_equal(backend.final_logits(ids), own[-1])


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
        for row, ref in enumerate(norm_plan(lens, len(backend.blocks))):
            h = rows[row].astype(mx.float32)
            if ref == "final":
                h = final(h)
            elif ref is not None:
                h = getattr(backend.blocks[ref], backend.arch.input_norm)(h)
            want = h @ backend.head.weight.T
            if backend.softcap:
                want = mx.tanh(want / backend.softcap) * backend.softcap
            assert np.abs(got[row] - np.array(want)).max() <= 1e-5, (lens, row)


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
    The model's own head is a quantised matmul that dequantises in the same way, so the two
    agree to fp32 rounding (1e-4 on logits of magnitude ~10)."""
    from mlx_lm import convert

    out = tmp_path / "llama-4bit"
    convert(str(tiny_model_dirs["llama"]), mlx_path=str(out), quantize=True, q_bits=4,
            q_group_size=32)
    backend = MlxBackend(resolve(str(out)))
    assert isinstance(backend.head, mlx_backend._QUANTIZED)
    ids = backend.tokenizer.encode(PROMPT)
    own = np.array(backend.own_logits(ids))
    assert np.abs(backend.layer_logits(ids, "final-norm")[-1] - own).max() <= 1e-4
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
