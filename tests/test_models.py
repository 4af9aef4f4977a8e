"""Resolving model arguments, and the real loading paths: GGUF files and hub ids."""
import numpy as np
import pytest

from mlx_lens.core.lens import FINAL_NORM
from mlx_lens.loading.default_model import gguf_path
from mlx_lens.core.errors import LensError
from mlx_lens.loading.sources import resolve


def test_resolve_kinds(tiny_model_dirs, tmp_path):
    folder = resolve(str(tiny_model_dirs["llama"]))
    assert folder.name == "llama" and folder.path.is_dir() and not folder.is_gguf
    hub = resolve("mistralai/Mistral-7B-v0.1")
    assert hub.hub_id == "mistralai/Mistral-7B-v0.1" and hub.name == "Mistral-7B-v0.1"
    gguf = resolve(str(gguf_path()))
    assert gguf.is_gguf and gguf.name == "SmolLM2-135M-Instruct.Q4_1"
    (tmp_path / "weights.bin").write_bytes(b"")
    for bad, message in [("no-such-model", "model not found"), (str(tmp_path), "no config.json"),
                         (str(tmp_path / "weights.bin"), "not a .gguf file")]:
        with pytest.raises(LensError, match=message):
            resolve(bad)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_hub_id_without_a_hub_is_one_clear_error(backend):
    from mlx_lens import backend_choice

    with pytest.raises(LensError, match="mlx-lens-test/does-not-exist"):
        backend_choice.load(backend, resolve("mlx-lens-test/does-not-exist"))


def test_packaged_gguf_on_both_backends(smollm2_dir):
    """torch reads the GGUF itself (dequantised by transformers); MLX reads the cached fp32
    folder made from it. Both are fp32 from the same dequantised weights, so their final logits
    agree within the parity bound of two fp32 backends (docs/numerics.md §4), and so does their
    top-1 unless that bound allows a swap."""
    from mlx_lens import backend_choice
    from mlx_lens.core import bounds
    from mlx_lens.checks.parity import logit_bound

    source = resolve(str(gguf_path()))
    ids = None
    loaded, logits = {}, {}
    for name in ("torch", "mlx"):
        loaded[name] = b = backend_choice.load(name, source)
        ids = ids or b.tokenizer.encode("The capital of Germany is called")
        logits[name] = b.final_logits([ids])[0]
    reference = loaded["torch"]
    z = reference.layer_logits(ids, FINAL_NORM)
    bound = logit_bound(reference, ids, FINAL_NORM, z, reference.head_row_norms())[-1, -1]
    assert np.all(np.abs(logits["torch"] - logits["mlx"]) <= bound)
    top = logits["torch"].argmax()
    assert logits["mlx"].argmax() == top or bounds.may_swap(z[-1, -1], bound, np.array(top)).any()
