"""What the torch lens needs to know about each architecture, as data (one row per model_type).

Paths are dotted attribute paths on the transformers *ForCausalLM module.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    blocks: str  # the ModuleList of decoder blocks
    final_norm: str
    input_norm: str  # attribute of a block: the norm in front of its attention
    # of a block: the norm in front of its MLP (its input is the middle of the block, after the
    # attention sub-block), and the attention module (a parallel block's middle row is its input
    # plus the attention's output)
    mlp_norm: str = "post_attention_layernorm"
    attention: str = "self_attn"
    mlp: str = "mlp"  # of a block: its MLP module
    softcap: str | None = None  # config attribute of the final logit soft-cap (tanh)
    half: str = "fp16"  # half precision on CUDA (the original's policy: Gemma bf16)
    layer_norm: bool = False  # LayerNorm (mean, variance, bias) rather than RMSNorm
    norm_offset: float = 0.0  # the norm scales by offset + weight (Gemma: 1 + w)


_LLAMA_LIKE = ArchSpec("model.layers", "model.norm", "input_layernorm")
_GEMMA = ArchSpec("model.layers", "model.norm", "input_layernorm",
                  mlp_norm="pre_feedforward_layernorm", softcap="final_logit_softcapping",
                  half="bf16", norm_offset=1.0)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,  # also Llama-3 and Yi
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "gpt2": ArchSpec("transformer.h", "transformer.ln_f", "ln_1", mlp_norm="ln_2", attention="attn",
                     layer_norm=True),
    "gpt_neox": ArchSpec("gpt_neox.layers", "gpt_neox.final_layer_norm", "input_layernorm",
                         attention="attention", layer_norm=True),
}
