"""The head path a checkpoint declares beyond norm -> unembedding (-> soft-cap), for both
backends: config keys that scale the logits, or the last hidden state before a bias-free head
(the same thing), by one factor.

The lens decodes every row through the model's own head path; each backend folds the factor
into its fp32 copy of the unembedding (s W, and s b for a head with a bias), so every use of
the head (the decode, the bounds' row norms, a tuned lens's hashes) sees the head the model
applies. Whether the model applies exactly this is checked at load (bounds.head_path_refusal).
"""
from __future__ import annotations

# config key -> how the model applies it (mlx-lm's and transformers' model files)
SCALES = {
    "logit_scale": "cohere, cohere2: logits times the scale",
    "logits_scaling": "granite family: logits divided by the scale",
    "dim_model_base": "minicpm: the last state divided by hidden_size / dim_model_base",
    "lm_head_multiplier": "falcon_h1: logits times the multiplier",
    "mup_width_multiplier": "phi3small: logits divided by the multiplier",
}


def text_config(config: dict) -> dict:
    """The text model's config of a multimodal checkpoint (itself otherwise)."""
    return config.get("text_config") or config


def logit_scale(config: dict) -> float:
    """The factor the model's head path multiplies its logits by (1.0: none)."""
    c = text_config(config)
    scale = 1.0
    if c.get("logit_scale") is not None:
        scale *= c["logit_scale"]
    if c.get("logits_scaling"):
        scale /= c["logits_scaling"]
    if c.get("dim_model_base"):
        scale *= c["dim_model_base"] / c["hidden_size"]
    if c.get("lm_head_multiplier"):
        scale *= c["lm_head_multiplier"]
    if c.get("mup_width_multiplier"):
        scale /= c["mup_width_multiplier"]
    return float(scale)
