"""What the MLX lens knows of an architecture, on top of mlx-lm's model files.

Where the parts are is read from the loaded model (`read_layout`), by the rules
torch_ref/arch.py reads transformers' modules with. What reading cannot know stays here, by
config model_type: `OVERRIDES` (where the lens departs from mlx-lm's forward on purpose),
`config_fixes` (a transformers-5 config onto the keys mlx-lm reads), `fix_modules` and
`fix_weights` (mlx-lm's modules given the checkpoint's own semantics where mlx-lm hard-codes
others); without them several models load silently wrong (docs/stack.md). The sliding windows
come from transformers' config (`windows_of`).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_lens.core.errors import LensError


def _declares(config, key: str) -> bool:
    """Whether transformers' config class for this model type has the key (not merely a
    checkpoint that wrote it: Llama's modeling ignores a stray sliding_window)."""
    return any(key in getattr(k, "__annotations__", {}) for k in type(config).__mro__)


def windows_of(config, n_blocks: int) -> list[int | None]:
    """Each block's sliding-window size as transformers applies it (None: full causal), from
    transformers' config object (its defaults filled in: Gemma-2's alternation is in no older
    checkpoint's file): `layer_types` where the class has them, else `sliding_window` on every
    block where the class has that (Mistral, Phi-3, Starcoder2). mlx-lm's own forward ignores
    the windows on gemma2 and phi3; the lens's loop builds its masks from this."""
    window = getattr(config, "sliding_window", None) if _declares(config, "sliding_window") else None
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    types = getattr(config, "layer_types", None) if _declares(config, "layer_types") else None
    if types is None:
        return [window] * n_blocks
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise LensError(f"layer types {', '.join(unknown)} are not read by the MLX lens's loop")
    return [window if t == "sliding_attention" else None for t in types[:n_blocks]]


@dataclass(frozen=True)
class Overrides:
    """What reading the model cannot know: where the lens departs from mlx-lm's own forward on
    purpose, or must build a block's inputs as that family's forward does."""

    # Gemma: row 0 scaled by sqrt(d) in the compute dtype, as transformers and Google's
    # reference compute it; mlx-lm's gemma3_text rounds it through bf16 whatever the dtype
    # (25.25 for 25.2982 at d = 640, docs/stack.md).
    embed_scale: Callable[[int], mx.array] | None = None  # of hidden_size
    array_mask: bool = False  # the block wants an explicit mask array, not "causal"


# Where the lens runs its own loop over the blocks (its embedding step, masks built from
# transformers' windows): the families verified with it, two of which mlx-lm's forward gets
# wrong (gemma2's windows, gemma3_text's sqrt(d)). Elsewhere the model's own forward drives.
HAND_LOOP = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text",
                       "gemma3", "gpt2", "gpt_neox"})
_GEMMA = Overrides(embed_scale=lambda d: mx.array(d ** 0.5))
OVERRIDES: dict[str, Overrides] = {
    "gemma2": Overrides(embed_scale=_GEMMA.embed_scale, array_mask=True),
    "gemma3_text": _GEMMA,
    "gemma3": _GEMMA,  # the multimodal checkpoint's text model
}


# Types whose MLX lens (on mlx-lm's modules) disagrees with transformers beyond the derived
# parity bounds on a tiny model (parity_tests/test_every_model.py), where the cause is not yet
# found and fixed: refused on MLX by name, with what was measured; torch runs them.
REFUSED: dict[str, str] = {
    "ernie4_5_moe": "its lens differs from transformers' at 3.8e3x the parity bound from block 2 "
                    "on (mlx-lm's router has no e_score_correction_bias, read from the code)",
    "glm": "mlx-lm rotates the whole head, transformers a partial_rotary_factor of it (2e4x the "
           "parity bound from block 1)",
    "granitemoehybrid": "mlx-lm rotates the attention where transformers reads a null "
                        "position_embedding_type as no rope (4.8e3x the parity bound)",
    "jamba": "mlx-lm renormalises the top-k router weights, transformers does not (1e3x the "
             "parity bound from block 2)",
    "llama4_text": "mlx-lm applies no chunked attention (2e4x the parity bound from block 1)",
    # the sparse-attention indexer keeps the top index_topk keys by relu scores, which tie at 0:
    # mx.argpartition and torch.topk keep different keys among the ties
    "deepseek_v32": "its indexer keeps other keys than transformers' where scores tie (1.1e4x "
                    "the parity bound from block 1)",
    "glm_moe_dsa": "its indexer keeps other keys than transformers' where scores tie (4.2e3x "
                   "the parity bound)",
    "recurrent_gemma": "its lens differs from transformers' at 36x the parity bound (transformers "
                       "rounds the embedding scale through bf16, read from the code)",
    "longcat_flash": "not verified: transformers' model counts its blocks otherwise and the torch "
                     "backend refuses it, so nothing holds the MLX lens to transformers",
}


def refuse_differing(model_type: str) -> None:
    if model_type in REFUSED:
        raise LensError(f"{model_type} is refused on MLX: {REFUSED[model_type]} "
                        f"(--backend torch runs it)")


@dataclass(frozen=True)
class Layout:
    """Where the lens's parts sit in an mlx-lm model: attribute paths from the outer Model."""

    inner: str  # the module that holds the blocks, the embedding and the final norm
    blocks: str  # of inner: the list of blocks
    embed: str  # of inner
    positions: str | None  # of inner: a learned absolute position embedding, added to row 0
    final_norm: str  # of inner
    head: str | None  # from the outer Model; None: tied to the embedding
    # of a block, as torch_ref/arch.py reads them: the norm in front of the attention (None:
    # post-norm), the norm in front of the MLP (None: the MLP reads the residual), the
    # attention and the MLP, and whether the MLP reads the block's input (parallel)
    input_norm: str | None
    mlp_norm: str | None
    attention: str | None  # a state-space block's one mixer; None: not separable
    mlp: str | None  # None: a block of one sub-block (the mixer), which has no middle
    parallel: bool


def _children(module: nn.Module) -> dict[str, nn.Module]:
    return {k: v for k, v in module.items() if isinstance(v, nn.Module)}


def _is_norm(module: nn.Module) -> bool:
    """A norm module itself, not a wrapper that holds one (DBRX's NormAttnNorm)."""
    return "norm" in type(module).__name__.lower() and not _children(module)


def _has_parameters(module: nn.Module) -> bool:
    return bool(tree_flatten(module.parameters()))


def _is_embedding(module) -> bool:
    return isinstance(module, (nn.Embedding, nn.QuantizedEmbedding))


def _path_of(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is target)


def first_array(args: tuple, kwargs: dict) -> tuple[str | int | None, mx.array | None]:
    """Where a module call's first array argument is (its position or keyword) and the array:
    mlx-lm's blocks take the residual first, by position or by name (gptj: inputs=)."""
    if args and isinstance(args[0], mx.array):
        return 0, args[0]
    return next(((k, v) for k, v in kwargs.items() if isinstance(v, mx.array)), (None, None))


@contextmanager
def _recording(watched: dict[str, nn.Module], calls: list, outputs: list):
    """Every call of a watched module appends (name, first argument, result's first array) to
    calls and (name, value) of every value it returned to outputs: the modules' classes
    swapped for recording subclasses, then restored."""
    bases = {name: type(m) for name, m in watched.items()}
    for name, module in watched.items():
        base = bases[name]

        class Recording(base):
            def __call__(self, *args, _name=name, _base=base, **kwargs):
                out = _base.__call__(self, *args, **kwargs)
                calls.append((_name, first_array(args, kwargs)[1],
                              out[0] if isinstance(out, tuple) else out))
                outputs.extend((_name, v) for v in (out if isinstance(out, tuple) else (out,)))
                return out

        module.__class__ = Recording
    try:
        yield
    finally:
        for name, module in watched.items():
            module.__class__ = bases[name]


def read_layout(model: nn.Module, vocab: int, tied: bool,
                whole: bool = True) -> tuple[Layout, tuple[mx.array, mx.array] | None]:
    """The layout of an mlx-lm model (see _read) with block 0's roles kept where every block
    has them: a hybrid model whose blocks differ keeps only what all share (its residual
    rows)."""
    layout, probe = _read(model, vocab, tied, whole)
    blocks = model.layers

    def everywhere(name):
        return name is not None and all(isinstance(b.get(name), nn.Module) for b in blocks)

    if not (everywhere(layout.attention) and (layout.mlp is None or everywhere(layout.mlp))
            and (layout.mlp_norm is None or everywhere(layout.mlp_norm))):
        layout = replace(layout, attention=None, mlp=None, mlp_norm=None, parallel=False)
    if layout.input_norm is not None and not everywhere(layout.input_norm):
        layout = replace(layout, input_norm=None)
    return layout, probe


def _read(model: nn.Module, vocab: int, tied: bool,
          whole: bool) -> tuple[Layout, tuple[mx.array, mx.array] | None]:
    """The layout of an mlx-lm model from its module tree and one forward pass over two tokens,
    by the rules torch_ref/arch.py reads transformers' modules with; and that pass's last
    state (what the final norm read) and logits at its last position, to check the head path.
    Not `whole`: only block 0's output is evaluated (a pipeline rank loads no other block's
    weights), and there is nothing to check the head path with."""
    kind = getattr(getattr(model, "args", None), "model_type", type(model).__name__)
    blocks = getattr(model, "layers", None)
    if not blocks:
        raise LensError(f"mlx-lm's {kind} model has no `layers` list of blocks")
    *owner, blocks_attr, _ = _path_of(model, blocks[0]).split(".")
    inner_path, inner = ".".join(owner), model
    for part in owner:
        inner = getattr(inner, part)
    tops = _children(inner)
    embeds = [n for n, m in tops.items() if _is_embedding(m)]
    embed = next((n for n in embeds if getattr(inner, n).weight.shape[0] == vocab), None)
    if embed is None:
        raise LensError(f"mlx-lm's {kind} model: no token embedding of {vocab} rows")
    # a learned position table (gpt2's wpe): another embedding with as many rows as positions,
    # not a per-layer-input table (Gemma-4's embed_tokens_per_layer has vocabulary rows)
    positions = next((n for n in embeds if n != embed
                      and getattr(inner, n).weight.shape[0] != vocab), None)
    head = None if tied else _head_path(model, inner, inner_path, vocab, kind)
    calls: list = []
    outputs: list = []
    watched = {f"top.{n}": m for n, m in tops.items() if n not in (embed, positions)}
    watched.update({f"block.{n}": m for n, m in _children(blocks[0]).items()})
    watched["first"], watched["last"] = blocks[0], blocks[-1]
    tokens = mx.array([[1, 2]])
    try:
        with _recording(watched, calls, outputs):
            logits = model(tokens)  # a graph: mlx computes (and loads) only what is evaluated
        mx.eval(logits if whole else [y for n, _, y in calls if n == "first"])
    except Exception as exc:
        raise LensError(f"mlx-lm's {kind} model: cannot read its layout ({exc})") from exc
    if not any(n == "first" for n, _, _ in calls) or not any(n == "last" for n, _, _ in calls):
        raise LensError(f"mlx-lm's {kind} model: its forward does not call its blocks as a "
                        f"decoder does")
    first_in = next(x for n, x, _ in calls if n == "first")
    last_out = [y for n, _, y in calls if n == "last"][-1]
    final = next((n.removeprefix("top.") for n, x, _ in calls
                  if n.startswith("top.") and x is last_out), None)
    if final is None or not _is_norm(tops[final]):
        raise LensError(f"mlx-lm's {kind} model: no final norm reads the last block's output")
    block = _children(blocks[0])
    inside = [(n.removeprefix("block."), x, y) for n, x, y in calls if n.startswith("block.")]
    norms = {n for n, _, _ in inside if _is_norm(block[n])}
    others = [c for c in inside if c[0] not in norms and _has_parameters(block[c[0]])]
    if not others:
        raise LensError(f"mlx-lm's {kind} model: a block that calls no sub-block with parameters")
    input_norm = next((n for n, x, _ in inside if n in norms and x is first_in), None)
    called = {n for n, _, _ in inside}
    if any(n not in called and _has_parameters(m) for n, m in block.items()
           if isinstance(m, nn.Module)):
        # the block calls inside a sub-block (a wrapper's parts): its roles cannot be read
        layout = Layout(inner_path, blocks_attr, embed, positions, final, head, input_norm,
                        None, None, None, False)
        return layout, (last_out[0, -1], logits[0, -1]) if whole else None
    if len({n for n, _, _ in others}) == 1:  # one mixer (a state-space block): no middle
        layout = Layout(inner_path, blocks_attr, embed, positions, final, head, input_norm, None,
                        others[0][0], None, False)
        return layout, (last_out[0, -1], logits[0, -1]) if whole else None
    # the MLP: the last sub-block after the attention that reads a norm's output (Gemma-4's
    # per-layer-input projection, called after it, reads none), else the last one
    normed = [c for c in others[1:] if any(c[1] is y for n, _, y in inside if n in norms)]
    attention, mlp = others[0], (normed or others)[-1]
    mlp_norm = next((n for n, _, y in inside if n in norms and y is mlp[1]), None)
    if mlp_norm is None and any(v is mlp[1] for n, v in outputs if n.startswith("block.")):
        # the MLP reads what a sub-block returned (DBRX: the norm inside its attention
        # wrapper), not the residual: neither the middle nor the sub-blocks' outputs can be
        # read as such
        layout = Layout(inner_path, blocks_attr, embed, positions, final, head, input_norm,
                        None, None, None, False)
        return layout, (last_out[0, -1], logits[0, -1]) if whole else None
    mlp_reads = next(x for n, x, _ in inside if n == mlp_norm) if mlp_norm else mlp[1]
    layout = Layout(inner_path, blocks_attr, embed, positions, final, head, input_norm, mlp_norm,
                    attention[0], mlp[0], mlp_reads is first_in or mlp_reads is attention[1])
    return layout, (last_out[0, -1], logits[0, -1]) if whole else None


def _head_path(model: nn.Module, inner: nn.Module, inner_path: str, vocab: int,
               kind: str) -> str:
    """An untied model's unembedding: the linear layer of `vocab` outputs outside the blocks,
    on the outer Model or beside the blocks."""
    parts = inner_path.split(".") if inner_path else []
    owners, owner = [(model, "")], model
    for i, part in enumerate(parts):  # every module from the outer Model down to the blocks'
        owner = getattr(owner, part)
        owners.append((owner, ".".join(parts[:i + 1]) + "."))
    for owner, prefix in owners:
        for name, m in _children(owner).items():
            if isinstance(m, (nn.Linear, nn.QuantizedLinear)) and m.weight.shape[0] == vocab:
                return prefix + name
    raise LensError(f"mlx-lm's {kind} model is untied (tie_word_embeddings false) but has no "
                    f"head of {vocab} outputs")


_ROPE_TYPES = {"default", "linear", "dynamic", "llama3", "yarn", "longrope"}


def _rope_fixes(rope: dict, model_type: str | None) -> dict:
    """RoPE keys at the top level, where mlx-lm's model files read them. A rope type mlx-lm's
    llama-family rope cannot take is refused on the lens's own loop; a model file that reads
    transformers' rope_parameters itself (gemma4's "proportional") is left to it, and held to
    transformers by parity_tests/test_every_model.py."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _ROPE_TYPES and model_type in HAND_LOOP:
        raise LensError(f"rope type {rope_type!r} cannot be mapped to mlx-lm "
                        f"(mappable: {', '.join(sorted(_ROPE_TYPES))})")
    fixes = {"rope_theta": rope["rope_theta"]} if "rope_theta" in rope else {}
    if "partial_rotary_factor" in rope:
        fixes["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if rope_type in _ROPE_TYPES - {"default"}:
        fixes["rope_scaling"] = {**rope, "rope_type": rope_type}
    elif rope_type == "default":
        fixes["rope_scaling"] = None  # some model files require the key
    return fixes


def config_fixes(config: dict) -> dict:
    """Keys to pass as mlx-lm's `model_config` so it reads what transformers wrote (a
    multimodal checkpoint's text_config whole, with its own fixes: mlx-lm merges the top level
    only)."""
    fixes: dict = {}
    mt = config.get("model_type")
    rope = config.get("rope_parameters") or {}
    if "full_attention" in rope:  # per-layer-type RoPE (Gemma-3)
        fixes.update(_rope_fixes(rope["full_attention"], mt))
        local = rope.get("sliding_attention", {})
        if "rope_theta" in local:
            fixes["rope_local_base_freq"] = local["rope_theta"]
    elif rope:
        fixes.update(_rope_fixes(rope, mt))
    fixes = {k: v for k, v in fixes.items() if k not in config}  # what the file says stands
    if isinstance(config.get("text_config"), dict):
        text = config["text_config"]
        fixes["text_config"] = {**text, **config_fixes(text)}
    if mt == "mimo_v2_flash" and "sliding_window_size" in config:
        # the reference attends to sliding_window_size previous tokens plus the query
        # (transformers' window is one more); mlx-lm's window counts the query among them
        fixes["sliding_window_size"] = config["sliding_window_size"] + 1
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


def fix_modules(model_type: str, model, config: dict) -> None:
    """Give mlx-lm's modules the semantics the checkpoint declares, in place."""
    act = config.get("hidden_activation") or config.get("hidden_act") or \
        config.get("activation_function")
    if model_type in ("gemma", "gpt_bigcode", "starcoder2") and act in _TANH_GELUS:
        _tanh_gelu_mlps(model_type, model)
    if model_type != "gpt_neox":
        return
    inner = model.model
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


def _tanh_gelu_mlps(model_type: str, model) -> None:
    """mlx-lm's gemma, gpt_bigcode and starcoder2 MLPs hard-code the exact (erf) GELU; these
    checkpoints
    declare the tanh one (0.002 bits at the output of a tiny gemma, 1.7x the parity bound),
    which is mlx's gelu_approx formula."""
    from mlx_lm.models import gemma, gpt_bigcode, starcoder2

    if model_type == "gemma":
        class TanhMLP(gemma.MLP):
            def __call__(self, x: mx.array) -> mx.array:
                return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))
    else:
        class TanhMLP((gpt_bigcode if model_type == "gpt_bigcode" else starcoder2).MLP):
            def __call__(self, x: mx.array) -> mx.array:
                return self.c_proj(nn.gelu_approx(self.c_fc(x)))

    for block in model.layers:
        block.mlp.__class__ = TanhMLP


def fix_weights(model_type: str, weights: dict) -> dict:
    """transformers-5 gpt2 files carry a `transformer.` prefix and a tied lm_head mlx-lm lacks."""
    if model_type != "gpt2":
        return weights
    return {k.removeprefix("transformer."): v for k, v in weights.items() if k != "lm_head.weight"}


def softcap_of(config: dict) -> float | None:
    value = config.get("final_logit_softcapping", config.get("logits_soft_cap"))
    return float(value) if value and math.isfinite(value) else None
