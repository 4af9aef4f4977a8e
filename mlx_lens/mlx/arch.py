"""What the MLX lens needs to know about each architecture, on top of mlx-lm's model files.

One row per config model_type. Paths are attribute paths from mlx-lm's `Model.model` (the inner
stack) unless they say otherwise. `config_fixes` maps a transformers-5 config onto the keys
mlx-lm reads, and `fix_modules` gives mlx-lm's modules the checkpoint's own semantics where
mlx-lm hard-codes others; without them several models load silently wrong (docs/stack.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from mlx_lens.core.errors import LensError


def _no_windows(inner, blocks) -> list[int | None]:
    return [None] * len(blocks)


def _llama_windows(inner, blocks):  # layer_types may mark some blocks sliding-window
    return [inner.sliding_window if getattr(b, "use_sliding", False) else None for b in blocks]


def _gemma3_windows(inner, blocks):  # every pattern-th block is global, the others sliding
    p = inner.sliding_window_pattern
    return [None if i % p == p - 1 else inner.window_size for i in range(len(blocks))]


@dataclass(frozen=True)
class MlxArch:
    embed: str = "embed_tokens"
    blocks: str = "layers"
    final_norm: str = "norm"
    input_norm: str = "input_layernorm"
    # of a block: the norm in front of its MLP (whose input is the middle of the block, after
    # the attention sub-block) and its attention module (a parallel block's middle row is its
    # input plus the attention's output)
    mlp_norm: str = "post_attention_layernorm"
    attention: str = "self_attn"
    mlp: str = "mlp"  # of a block: its MLP module
    head: str | None = "lm_head"  # on the outer Model; missing there means tied to `embed`
    positions: str | None = None  # learned absolute position embedding, added to row 0
    embed_scale: Callable[[int], mx.array] | None = None  # of hidden_size
    windows: Callable = _no_windows  # sliding-window size per block (None: full causal)
    array_mask: bool = False  # the block wants an explicit additive mask, not "causal"
    softcap: bool = False  # config["final_logit_softcapping"] is the model's head transform
    layer_norm: bool = False  # LayerNorm (mean, variance, bias) rather than RMSNorm
    norm_offset: float = 0.0  # the norm scales by offset + weight (Gemma: 1 + w)


_LLAMA = MlxArch(windows=_llama_windows)
_PLAIN = MlxArch()

ARCHITECTURES: dict[str, MlxArch] = {
    "llama": _LLAMA,  # also Llama-3 and Yi
    "mistral": _LLAMA,  # mlx-lm maps mistral to llama
    "qwen2": _PLAIN,
    "qwen3": _PLAIN,
    "phi3": _PLAIN,
    "gemma2": MlxArch(head=None, mlp_norm="pre_feedforward_layernorm",
                      embed_scale=lambda d: mx.array(d ** 0.5), array_mask=True, softcap=True,
                      norm_offset=1.0),
    # sqrt(d) in the compute dtype, as transformers and Google's reference compute it. mlx-lm's
    # own forward rounds it through bf16 whatever the dtype (25.25 for 25.2982 at d = 640):
    # docs/stack.md. The lens's capture loop does not use mlx-lm's embedding step.
    "gemma3_text": MlxArch(mlp_norm="pre_feedforward_layernorm",
                           embed_scale=lambda d: mx.array(d ** 0.5), windows=_gemma3_windows,
                           softcap=True, norm_offset=1.0),
    "gpt2": MlxArch(embed="wte", blocks="h", final_norm="ln_f", input_norm="ln_1", mlp_norm="ln_2",
                    attention="attn", head=None,
                    positions="wpe", layer_norm=True),
    "gpt_neox": MlxArch(embed="embed_in", blocks="h", final_norm="final_layer_norm",
                        attention="attention", head="model.embed_out", layer_norm=True),
}

_ROPE_TYPES = {"default", "linear", "dynamic", "llama3", "yarn", "longrope"}


def _rope_fixes(rope: dict, theta_key: str = "rope_theta") -> dict:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise LensError(f"rope type {rope_type!r} cannot be mapped to mlx-lm "
                        f"(mappable: {', '.join(sorted(_ROPE_TYPES))})")
    fixes = {theta_key: rope["rope_theta"]} if "rope_theta" in rope else {}
    if rope_type != "default":
        fixes["rope_scaling"] = {**rope, "rope_type": rope_type}
    return fixes


def config_fixes(config: dict) -> dict:
    """Keys to pass as mlx-lm's `model_config` so it reads what transformers wrote."""
    fixes: dict = {}
    rope = config.get("rope_parameters") or {}
    if "full_attention" in rope:  # per-layer-type RoPE (Gemma-3)
        fixes.update(_rope_fixes(rope["full_attention"]))
        local = rope.get("sliding_attention", {})
        if "rope_theta" in local:
            fixes["rope_local_base_freq"] = local["rope_theta"]
    elif rope:
        fixes.update(_rope_fixes(rope))
    mt = config.get("model_type")
    if mt == "gpt2" and "n_ctx" not in config:
        fixes["n_ctx"] = config["n_positions"]
    if mt == "gpt_neox":
        fixes["rotary_emb_base"] = fixes.pop("rope_theta", config.get("rotary_emb_base", 10000))
        fixes["rotary_pct"] = rope.get("partial_rotary_factor",
                                       config.get("partial_rotary_factor", config.get("rotary_pct")))
        if config.get("intermediate_size", 4 * config["hidden_size"]) != 4 * config["hidden_size"]:
            raise LensError("gpt_neox with an MLP width other than 4x hidden cannot be mapped "
                            "(mlx-lm hard-codes 4x)")
    return fixes


# transformers' hidden_act names of the tanh-approximate GELU, the one mlx-lm's gpt_neox hard-codes.
_TANH_GELUS = {"gelu_new", "gelu_fast", "gelu_pytorch_tanh"}


def fix_modules(model_type: str, inner, config: dict) -> None:
    """Give mlx-lm's modules the semantics the checkpoint declares, in place."""
    if model_type != "gpt_neox":
        return
    act = config.get("hidden_act", "gelu")
    if act in _TANH_GELUS:
        return
    if act != "gelu":
        raise LensError(f"gpt_neox activation {act!r} cannot be mapped to mlx-lm")
    from mlx_lm.models import gpt_neox

    class ExactGeluMLP(gpt_neox.MLP):  # "gelu" is the exact (erf) GELU, as in Pythia
        def __call__(self, x: mx.array) -> mx.array:
            return self.dense_4h_to_h(nn.gelu(self.dense_h_to_4h(x)))

    for block in inner.h:
        block.mlp.__class__ = ExactGeluMLP


def fix_weights(model_type: str, weights: dict) -> dict:
    """transformers-5 gpt2 files carry a `transformer.` prefix and a tied lm_head mlx-lm lacks."""
    if model_type != "gpt2":
        return weights
    return {k.removeprefix("transformer."): v for k, v in weights.items() if k != "lm_head.weight"}


def softcap_of(config: dict) -> float | None:
    value = config.get("final_logit_softcapping")
    return float(value) if value and math.isfinite(value) else None
