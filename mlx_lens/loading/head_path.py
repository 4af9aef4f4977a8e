"""The head path a checkpoint declares beyond norm -> unembedding (-> soft-cap), for both
backends: the config keys that scale the logits or the last hidden state before the head.

The lens decodes every row through the same head path as the model's output; a transform it
does not apply would make every row, and the last one, differ from the model's own logits.
Until the lens applies these, a model that declares one is refused by name.
"""
from __future__ import annotations

from mlx_lens.core.errors import LensError

# config key -> the families that use it (mlx-lm's and transformers' model files)
LOGIT_SCALES = {
    "logit_scale": "cohere, cohere2: logits times the scale",
    "logits_scaling": "granite family: logits divided by the scale",
    "dim_model_base": "minicpm: the last hidden state divided by hidden_size / dim_model_base",
    "lm_head_multiplier": "falcon_h1: logits times the multiplier",
    "mup_width_multiplier": "phi3small: logits divided by the multiplier",
}


def refuse_unread_head(config: dict) -> None:
    """One line naming the first head transform the lens does not apply yet."""
    for key, what in LOGIT_SCALES.items():
        value = config.get(key)
        if value is not None and value != 1:
            raise LensError(f"{config.get('model_type')}: the model scales its logits "
                            f"({key} = {value}; {what}), which the lens does not apply yet")
