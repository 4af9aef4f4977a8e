"""MLX and torch agree, layer by layer, on every architecture (tiny random models, fp32).

Each configuration is one tiny random model (tests/tiny_models.py: weights with std 0.2-0.5,
so distributions are far from uniform) loaded from the same safetensors folder by both backends.
The bounds are derived, not measured: mlx_lens/checks/parity.py and docs/numerics.md §4.
"""
from __future__ import annotations

import mlx.core
import numpy as np
import pytest
import torch

from mlx_lens.core.lens import FINAL_NORM, RULES, Lens
from tests.lens_checks import LENSES
from mlx_lens.core import bounds
from mlx_lens.mlx.backend import MlxBackend
from mlx_lens.loading.sources import resolve
from mlx_lens.checks.parity import compare
from tests import test_backends
from tests.tiny_models import CONFIGS, MLX_LM_DIFFERS, framework_cases
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


@pytest.mark.parametrize("lens", LENSES, ids=RULES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_backends_agree(pair, name, lens):
    torch_backend, mlx_backend = pair(name)
    # The answer is torch's own final top-1, so L_semantic is defined on a random model.
    report = compare(torch_backend, mlx_backend, PROMPTS, lens, answer=None)
    assert not report.failures(), report.table()
    cells = sum(len(torch_backend.tokenizer.encode(p)) for p in PROMPTS) * report.max_kl.size
    # A sensitivity floor, not a tolerance: the top-1 comparison must reach most positions (a
    # random model whose top-1 leads by less than the bound everywhere would test nothing).
    assert report.decisive.sum() > 0.8 * cells


# Reduced precision: the lens's last row against the model's own output in that dtype, within
# bounds.framework_logit_bound (docs/numerics.md §4).
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("kind, name", framework_cases(["torch", "mlx"]))
def test_reduced_precision_decodes_the_models_own_state_in_fp32(tiny_model_dirs, name, kind,
                                                                dtype):
    backend_class = MlxBackend if kind == "mlx" else TorchBackend
    low = backend_class(resolve(str(tiny_model_dirs[name])), dtype=dtype)
    half = low.info.compute_dtype
    assert half in ("bfloat16", "float16") and low.info.unembed_dtype == "float32"
    ids = low.tokenizer.encode(PROMPTS[0])
    lens = low.layer_logits(ids, FINAL_NORM)[-1]
    own = own_logits(low, ids)
    x_norm = np.linalg.norm(low.lens_inputs(ids, FINAL_NORM)[-1].astype(np.float64), axis=-1)
    bound = bounds.framework_logit_bound(x_norm, low.head_row_norms(), low.info.d_model, own,
                                         low.info.softcap, half)
    assert np.all(np.abs(lens - own) <= bound)
    # Decoded in fp32: the lens's logits are not all values of the half dtype.
    as_half = torch.from_numpy(lens).to(getattr(torch, half)).float().numpy()
    assert np.any(lens != as_half)


def own_logits(backend, ids: list[int]) -> np.ndarray:
    """The model's own output logits in its compute dtype, [T, V] float32."""
    if isinstance(backend, TorchBackend):
        with torch.no_grad():
            return backend.model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    return test_backends.mlx_lm_logits(backend, ids).astype(np.float32)


# The suite bites: each of these known mistakes must make it fail.
def _mlx_without_rope_fixes(folder, monkeypatch):
    from mlx_lens.mlx import backend as mlx_backend

    monkeypatch.setattr(mlx_backend, "config_fixes", lambda config: {})
    return MlxBackend(resolve(str(folder)))


@pytest.mark.parametrize("name", ["llama_rope5e5", "llama3_scaling", "qwen2"])
def test_suite_fails_without_the_rope_fixup(pair, tiny_model_dirs, name, monkeypatch):
    broken = _mlx_without_rope_fixes(tiny_model_dirs[name], monkeypatch)
    report = compare(pair(name)[0], broken, PROMPTS, FINAL_NORM, answer=None)
    assert any("logit discrepancy" in f for f in report.failures())


def test_suite_fails_with_the_wrong_norm(pair, monkeypatch):
    from mlx_lens.mlx.backend import MlxBackend

    torch_backend, mlx = pair("llama")
    # MLX decodes every row through the next block's input norm while torch uses the final norm
    monkeypatch.setattr(mlx, "_normed", lambda rows, lens, site="resid": MlxBackend._normed(
        mlx, rows, Lens("next-norm")))
    report = compare(torch_backend, mlx, PROMPTS, FINAL_NORM, answer=None)
    assert any("logit discrepancy" in f for f in report.failures())


def test_suite_fails_without_the_softcap(pair):
    torch_backend, mlx = pair("gemma2")
    cap, mlx.softcap = mlx.softcap, None
    try:
        report = compare(torch_backend, mlx, PROMPTS, FINAL_NORM, answer=None)
    finally:
        mlx.softcap = cap
    assert any("logit discrepancy" in f for f in report.failures())


def test_suite_fails_with_gemma3s_sqrt_d_rounded_through_bf16(tiny_model_dirs, pair, monkeypatch):
    """mlx-lm's Gemma-3 constant: sqrt(96) = 9.798 taken as bf16's 9.8125 in an fp32 model."""
    from dataclasses import replace

    from mlx_lens.mlx import arch as mlx_arch

    bf16_scale = replace(mlx_arch.OVERRIDES["gemma3_text"],
                         embed_scale=lambda d: mlx.core.array(d ** 0.5, mlx.core.bfloat16))
    monkeypatch.setitem(mlx_arch.OVERRIDES, "gemma3_text", bf16_scale)
    broken = MlxBackend(resolve(str(tiny_model_dirs["gemma3_text"])))
    report = compare(pair("gemma3_text")[0], broken, PROMPTS, FINAL_NORM, answer=None)
    assert any("logit discrepancy" in f for f in report.failures())


def test_suite_fails_with_mlx_lms_tanh_gelu_on_gpt_neox(tiny_model_dirs, pair, monkeypatch):
    """mlx-lm hard-codes the tanh-approximate GELU; the checkpoint declares the exact one."""
    from mlx_lens.mlx import backend as mlx_backend

    monkeypatch.setattr(mlx_backend, "fix_modules", lambda *args: None)
    broken = MlxBackend(resolve(str(tiny_model_dirs["gpt_neox"])))
    report = compare(pair("gpt_neox")[0], broken, PROMPTS, FINAL_NORM, answer=None)
    assert any("logit discrepancy" in f for f in report.failures())


@pytest.mark.parametrize("name", sorted(MLX_LM_DIFFERS))
def test_mlx_follows_the_checkpoint_where_mlx_lm_does_not(pair, tiny_model_dirs, name,
                                                         monkeypatch):
    """Where mlx-lm's forward departs from the checkpoint (Gemma-2's sliding windows), the MLX
    lens agrees with transformers (test_backends_agree), mlx-lm's own logits lie outside the
    framework check's bound (the tiny model makes the difference matter), the framework check
    says why it cannot compare, and the MLX lens without the windows fails parity."""
    from mlx_lens.experiment.single import framework_check
    from mlx_lens.mlx import backend as mlx_backend

    torch_backend, mlx_lens = pair(name)
    ids = mlx_lens.tokenizer.encode(PROMPTS[0])
    lens_last = mlx_lens.layer_logits(ids, FINAL_NORM)[-1, -1]
    x_norm = float(np.linalg.norm(mlx_lens.lens_inputs(ids, FINAL_NORM)[-1, -1]))
    theirs = test_backends.mlx_lm_logits(mlx_lens, ids)[-1]
    bound = bounds.framework_logit_bound(x_norm, mlx_lens.head_row_norms(),
                                         mlx_lens.info.d_model, theirs, mlx_lens.info.softcap,
                                         mlx_lens.info.compute_dtype)
    assert np.any(np.abs(lens_last - theirs) > bound)
    check = framework_check(mlx_lens, ids, lens_last, x_norm, mlx_lens.head_row_norms())
    assert not check["available"] and "sliding window" in check["why"]
    monkeypatch.setattr(mlx_backend, "windows_of", lambda config, n: [None] * n)
    windowless = MlxBackend(resolve(str(tiny_model_dirs[name])))
    report = compare(torch_backend, windowless, PROMPTS, FINAL_NORM, answer=None)
    assert any("logit discrepancy" in f for f in report.failures())


@pytest.mark.parametrize("name", ["gemma3_text", "gpt_neox"])
def test_the_models_own_forward_driving_fails_where_mlx_lm_departs(tiny_model_dirs, pair, name,
                                                                  monkeypatch):
    """The lens's own loop is kept where mlx-lm's forward departs from the checkpoint: driven by
    mlx-lm's forward instead (as every type outside HAND_LOOP is), Gemma-3's rows take mlx-lm's
    bf16 sqrt(d) and parity fails; gpt_neox's exact-GELU fix-up sits in the modules, so the
    driven rows pass (the same modules run either way)."""
    from mlx_lens.mlx import arch as mlx_arch

    monkeypatch.setattr(mlx_arch, "HAND_LOOP", frozenset())
    monkeypatch.setattr("mlx_lens.mlx.backend.HAND_LOOP", frozenset())
    driven = MlxBackend(resolve(str(tiny_model_dirs[name])))
    assert not driven.hand_loop
    report = compare(pair(name)[0], driven, PROMPTS, FINAL_NORM, answer=None)
    assert bool(report.failures()) == (name == "gemma3_text")
