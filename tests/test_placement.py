"""Device and dtype policy on mocked memory figures; footprints from the checkpoints themselves."""
import pytest

from mlx_lens.loading import placement
from mlx_lens.loading.default_model import gguf_path
from mlx_lens.loading.placement import GIB, DoesNotFit, Footprint, pick_device, footprint, need_bytes
from mlx_lens.loading.sources import resolve

SEVEN_B = Footprint(7_240_000_000, 14_500_000_000)  # bf16 checkpoint on disk
THIRTY_FOUR_B = Footprint(34_400_000_000, 68_800_000_000)


def test_cuda_first_when_it_fits_in_the_checkpoints_dtype():
    assert pick_device(SEVEN_B, [("cuda", 80 * GIB), ("cpu", 64 * GIB)], "auto", gpu="bf16") == \
        ("cuda", "bf16")
    assert pick_device(SEVEN_B, [("mps", 64 * GIB)], "auto", gpu="bf16") == ("mps", "fp16")


@pytest.mark.parametrize("model_type, stored, cuda", [
    ("llama", "bfloat16", "bf16"),  # bf16-trained: the original computed fp16, which overflows it
    ("llama", "float16", "fp16"),
    ("llama", "float32", "fp32"),  # kept whole, as MLX keeps it (the original: fp16)
    ("gemma2", "float32", "fp32"),  # the original: bf16
    ("llama", None, "fp16"),  # the config names no dtype (a GGUF's): the original's half
    ("gemma2", None, "bf16"),
])
def test_auto_on_cuda_follows_the_checkpoints_dtype(model_type, stored, cuda):
    """--dtype auto from the device and the checkpoint's config, by hand: CUDA computes in the
    checkpoint's dtype; MPS and the CPU keep the original's policy whatever the checkpoint."""
    from transformers import AutoConfig

    from torch_ref.placement import checkpoint_dtype

    config = AutoConfig.for_model(model_type, dtype=stored)
    gpu = checkpoint_dtype(config)
    assert pick_device(SEVEN_B, [("cuda", 80 * GIB)], "auto", gpu) == ("cuda", cuda)
    assert pick_device(SEVEN_B, [("mps", 64 * GIB)], "auto", gpu) == ("mps", "fp16")
    assert pick_device(SEVEN_B, [("cpu", 64 * GIB)], "auto", gpu) == ("cpu", "fp32")


def test_falls_back_to_cpu_in_fp32_up_to_27b():
    # 7B fp16 needs ~17.6 GiB: not on a 16 GiB GPU; fp32 on a 64 GiB CPU (~34 GiB) fits.
    assert pick_device(SEVEN_B, [("cuda", 16 * GIB), ("cpu", 64 * GIB)], "auto") == ("cpu", "fp32")


def test_cpu_uses_bf16_from_30b():
    assert pick_device(THIRTY_FOUR_B, [("cpu", 256 * GIB)], "auto") == ("cpu", "bf16")


def test_explicit_dtype_and_stored_size():
    assert pick_device(SEVEN_B, [("cpu", 64 * GIB)], "bf16") == ("cpu", "bf16")
    assert need_bytes(SEVEN_B, None) == int(SEVEN_B.stored_bytes * 1.2 + 2 * GIB)
    assert pick_device(SEVEN_B, [("gpu", 24 * GIB)], "stored") == ("gpu", "stored")


def test_fits_nowhere_is_one_clear_line():
    with pytest.raises(DoesNotFit) as err:
        pick_device(THIRTY_FOUR_B, [("cuda", 24 * GIB), ("cpu", 32 * GIB)], "auto")
    msg = str(err.value)
    assert "\n" not in msg and "fits no device" in msg and "cuda has 24.0 GiB" in msg


def test_unknown_size_defers_to_the_first_device():
    assert pick_device(None, [("cuda", 1), ("cpu", 1)], "auto") == ("cuda", "fp16")


def test_footprint_from_safetensors_headers(tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dirs["llama_untied"]
    fp = footprint(resolve(str(path)))
    model = AutoModelForCausalLM.from_pretrained(path)
    assert fp.n_params == sum(p.numel() for p in model.parameters())
    assert fp.stored_bytes == 4 * fp.n_params  # fp32 on disk


def test_footprint_of_a_gguf(smollm2_dir):
    fp = footprint(resolve(str(gguf_path())))
    assert 134e6 < fp.n_params < 136e6  # SmolLM2-135M (tied embeddings stored once)


def test_cli_skips_a_model_that_fits_nowhere(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    from mlx_lens.cli.main import main

    monkeypatch.setattr(placement, "LENS_BYTES", 0)
    monkeypatch.setattr("torch_ref.placement.available_ram", lambda: 1000)
    monkeypatch.chdir(tmp_path)
    code = main(["run", str(tiny_model_dirs["llama"]), "--backend", "torch"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "fits no device" in err[0]
    assert list((tmp_path / "runs").iterdir()) == []  # no run-latest, no staging left
