"""What a model's blocks lack for a feature, in one line, for both backends, and the norm a
lens names (the layout read from the model: mlx_lens/mlx/arch.py, torch_ref/arch.py)."""
from __future__ import annotations

from mlx_lens.core.errors import LensError


def no_sub_block(architecture: str, kind: str) -> LensError:
    return LensError(f"{architecture}'s blocks have no separable "
                     f"{'attention' if kind == 'attn' else 'MLP'} to patch (resid is patched "
                     f"everywhere; a block of one sub-block, a state-space mixer, is patched as "
                     f"attn)")


def no_middle(architecture: str) -> LensError:
    return LensError(f"{architecture}'s blocks have no middle the lens can read (one sub-block, "
                     f"or an MLP that reads a sub-block's output)")


def no_norm(architecture: str, before_mlp: bool) -> LensError:
    return LensError(f"{architecture}'s blocks have no norm in front of their "
                     f"{'MLP' if before_mlp else 'attention'} that the lens can read (post-norm, "
                     f"or a norm inside a wrapper): the next-norm lens has nothing to read")


def per_layer_inputs(architecture: str) -> LensError:
    return LensError(f"{architecture}'s blocks also read a per-layer input made from the tokens "
                     f"(hidden_size_per_layer_input), which a restored residual does not carry: "
                     f"patching would mix the clean residual with the corrupted prompt's "
                     f"per-layer inputs")


def norm_of(ref, final, input_norms: list | None, mlp_norms: list | None, architecture: str):
    """The norm module (of a backend's fp32 copies) that a lens NormRef names: the final norm,
    block i's input norm, ("mlp", i) its MLP's norm, or None (no norm); refused in one line
    where the blocks have no such norm (input_norms / mlp_norms None)."""
    if ref == "final" or ref is None:
        return final if ref == "final" else None
    norms = mlp_norms if isinstance(ref, tuple) else input_norms
    if norms is None:
        raise no_norm(architecture, isinstance(ref, tuple))
    return norms[ref[1] if isinstance(ref, tuple) else ref]
