"""MLX and torch agree, layer by layer, on every architecture (tiny random models, fp32).

Each configuration is one tiny random model (tests/tiny_models.py: weights with std 0.2-0.5,
so distributions are far from uniform) loaded from the same safetensors folder by both backends.
Tolerances and their causes live in mlx_lens/parity.py, next to the comparison.
"""
from __future__ import annotations

import pytest

from mlx_lens.contract import LENSES
from mlx_lens.mlx_backend import MlxBackend
from mlx_lens.models import resolve
from mlx_lens.parity import Tolerance, compare
from tests.tiny_models import CONFIGS
from torch_ref.backend import TorchBackend

PROMPTS = [
    "Give the city name only, plain text. The capital of Germany is called simply",
    "Berlin is the capital of",
    "The capital of France is called simply",
]


@pytest.fixture(scope="module")
def pair(tiny_model_dirs):
    cache = {}

    def get(name):
        if name not in cache:
            source = resolve(str(tiny_model_dirs[name]))
            cache[name] = TorchBackend(source), MlxBackend(source)
        return cache[name]

    return get


@pytest.mark.parametrize("lens", LENSES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_backends_agree(pair, name, lens):
    torch_backend, mlx_backend = pair(name)
    # The answer is torch's own final top-1, so L_semantic is defined on a random model.
    report = compare(torch_backend, mlx_backend, PROMPTS, lens, answer=None)
    assert not report.failures(), report.table()
    cells = sum(len(torch_backend.tokenizer.encode(p)) for p in PROMPTS) * report.max_kl.size
    assert report.decisive.sum() > 0.8 * cells  # the top-1 check covers most positions
    assert all(p.summaries[0]["L_semantic"] is not None for p in report.prompts)


# Reduced precision vs the same backend's fp32 run, decoded with the fp32 unembedding. Worst KL
# measured over all 12 configurations, both backends, 3 prompts: bf16 6.2e-2 (MLX gemma2),
# fp16 7.6e-4 (torch llama3_scaling). bf16 keeps 8 mantissa bits (relative error ~4e-3 per op),
# fp16 11 (~5e-4); the bounds leave ~2x headroom over the worst case measured.
REDUCED = {"bf16": 0.15, "fp16": 2e-3}


@pytest.mark.parametrize("dtype", sorted(REDUCED))
@pytest.mark.parametrize("backend_class", [TorchBackend, MlxBackend], ids=["torch", "mlx"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_reduced_precision_bound(pair, tiny_model_dirs, name, backend_class, dtype):
    reference = pair(name)[0 if backend_class is TorchBackend else 1]
    low = backend_class(resolve(str(tiny_model_dirs[name])), dtype=dtype)
    assert low.info.compute_dtype in ("bfloat16", "float16") and low.info.unembed_dtype == "float32"
    bound = Tolerance(REDUCED[dtype], float("inf"), f"{dtype} compute, fp32 unembedding")
    report = compare(reference, low, PROMPTS, "final-norm", answer=None, tol=bound)
    assert report.max_kl.max() <= bound.kl, report.table()


# The suite bites: each of these known mistakes must make it fail.
def _mlx_without_rope_fixes(folder, monkeypatch):
    from mlx_lens import mlx_backend

    monkeypatch.setattr(mlx_backend, "config_fixes", lambda config: {})
    return MlxBackend(resolve(str(folder)))


@pytest.mark.parametrize("name", ["llama_rope5e5", "llama3_scaling", "qwen2"])
def test_suite_fails_without_the_rope_fixup(pair, tiny_model_dirs, name, monkeypatch):
    broken = _mlx_without_rope_fixes(tiny_model_dirs[name], monkeypatch)
    report = compare(pair(name)[0], broken, PROMPTS, "final-norm", answer=None)
    assert any("max KL" in f for f in report.failures())


def test_suite_fails_with_the_wrong_norm(pair, monkeypatch):
    from mlx_lens import mlx_backend
    from mlx_lens.contract import norm_plan

    torch_backend, mlx = pair("llama")
    monkeypatch.setattr(mlx_backend, "norm_plan", lambda lens, n: norm_plan("next-norm", n))
    report = compare(torch_backend, mlx, PROMPTS, "final-norm", answer=None)
    assert any("max KL" in f for f in report.failures())


def test_suite_fails_without_the_softcap(pair):
    torch_backend, mlx = pair("gemma2")
    cap, mlx.softcap = mlx.softcap, None
    try:
        report = compare(torch_backend, mlx, PROMPTS, "final-norm", answer=None)
    finally:
        mlx.softcap = cap
    assert any("max KL" in f for f in report.failures())
