"""Where the lens's parts sit in a transformers causal LM, read from the loaded model.

transformers names the parts differently per family (model.layers, transformer.h,
gpt_neox.layers; input_layernorm, ln_1; self_attn, attn, attention) but says where they are:
`get_input_embeddings`, `get_output_embeddings`, the base model and, in it, the ModuleList of
`num_hidden_layers` blocks. The rest is read from one short forward pass (`read_layout`): the
final norm is the module that reads the last block's output; inside a block, the input norm is
the norm that reads the block's input, the attention and the MLP are the first and last other
modules it calls, the MLP norm is the norm whose output the MLP reads, and a block is parallel
where its MLP reads the block's input (directly or through the attention's norm).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from mlx_lens.core.errors import LensError


@dataclass(frozen=True)
class Layout:
    blocks: str  # dotted path of the ModuleList of decoder blocks on the *ForCausalLM module
    final_norm: str  # dotted path of the final norm
    # attributes of a block: the norm in front of its attention (None: a post-norm block),
    # the norm in front of its MLP (None: the MLP reads the residual itself), the attention
    # and the MLP modules
    input_norm: str | None
    mlp_norm: str | None
    attention: str | None  # a state-space block's one mixer; None: not separable
    mlp: str | None  # None: a block of one sub-block (the mixer), which has no middle
    parallel: bool  # the MLP reads the block's input, not the residual after the attention


# Model types whose forward reads nothing per block but the blocks and config.layer_types: a
# patched run starts at block r by cutting both (torch_ref/patch.py). Elsewhere (per-layer
# caches, masks or inputs indexed by layer) the whole forward runs.
CUT_AT_BLOCK = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text",
                          "gpt2", "gpt_neox"})


def _is_norm(module: torch.nn.Module) -> bool:
    """A norm module itself, not a wrapper that holds one (DBRX's NormAttentionNorm)."""
    return "norm" in type(module).__name__.lower() and not any(True for _ in module.children())


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return kwargs.get("hidden_states", next((v for v in kwargs.values()
                                             if isinstance(v, torch.Tensor)), None))


def _output_tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def find_blocks(model: torch.nn.Module, n_layers: int) -> str:
    """The dotted path of the shallowest ModuleList of n_layers modules in the model's decoder
    (`get_decoder`: a multimodal model's language model, not its vision tower)."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        decoder = model.base_model
    prefix = next(name for name, m in model.named_modules() if m is decoder)
    lists = [(name.count("."), name) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers
             and (not prefix or name.startswith(prefix + "."))]
    if not lists:
        raise LensError(f"no list of {n_layers} decoder blocks found in {type(model).__name__}")
    return min(lists)[1]


def read_layout(model: torch.nn.Module, n_layers: int) -> tuple[Layout, "Probe"]:
    """The layout of `model` from one forward pass over two tokens (with hooks, no cache), and
    that pass's last state and logits, to check the head path with."""
    blocks_path = find_blocks(model, n_layers)
    blocks = model.get_submodule(blocks_path)
    # the module that holds the blocks (a multimodal model's language model) holds the final norm
    owner_path = blocks_path.rpartition(".")[0]
    base = model.get_submodule(owner_path)
    calls: list[tuple[str, torch.Tensor | None, torch.Tensor]] = []
    outputs: list[tuple[str, object]] = []  # every value each module returned
    watched = {f"block.{n}": m for n, m in blocks[0].named_children()}
    watched.update({f"base.{n}": m for n, m in base.named_children() if m is not blocks})
    watched["first"], watched["last"] = blocks[0], blocks[-1]

    def hook(name):
        def record(_module, args, kwargs, out):
            calls.append((name, _first_tensor(args, kwargs), _output_tensor(out)))
            outputs.extend((name, t) for t in (out if isinstance(out, tuple) else (out,)))
        return record

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in watched.items()]
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([[1, 2]],
                                               device=model.get_input_embeddings().weight.device),
                        use_cache=False)
    except Exception as exc:
        raise LensError(f"cannot read the layout of {type(model).__name__}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
    try:
        layout = _uniform(_roles(calls, outputs, blocks_path, blocks[0], base, model, owner_path),
                      blocks)
        last = [y for n, _, y in calls if n == "last"][-1]
    except (StopIteration, IndexError, AttributeError) as exc:  # a block never called as read
        raise LensError(f"cannot read the layout of {type(model).__name__}: its forward does not "
                        f"call its blocks as a decoder does ({type(exc).__name__})") from exc
    return layout, Probe(last[0, -1], out.logits[0, -1])


def _uniform(layout: Layout, blocks) -> Layout:
    """Block 0's roles where every block has them; a hybrid model whose blocks differ (a mixer
    here, attention and an MLP there) keeps only what all share (its residual rows)."""
    def everywhere(name):
        return name is not None and all(isinstance(getattr(b, name, None), torch.nn.Module)
                                        for b in blocks)

    if not (everywhere(layout.attention) and (layout.mlp is None or everywhere(layout.mlp))
            and (layout.mlp_norm is None or everywhere(layout.mlp_norm))):
        layout = replace(layout, attention=None, mlp=None, mlp_norm=None, parallel=False)
    if layout.input_norm is not None and not everywhere(layout.input_norm):
        layout = replace(layout, input_norm=None)
    return layout


@dataclass(frozen=True)
class Probe:
    """The reading pass's last position: what the final norm read, and the model's logits."""

    state: torch.Tensor  # [d]
    logits: torch.Tensor  # [V]


def _roles(calls, outputs, blocks_path, block, base, model, owner_path) -> Layout:
    kind = type(model).__name__
    first = next(c for c in calls if c[0] == "first")
    last_out = [c for c in calls if c[0] == "last"][-1][2]
    after = [c for c in calls if c[0].startswith("base.") and c[1] is last_out]
    if not after or not _is_norm(base.get_submodule(after[0][0].removeprefix("base."))):
        raise LensError(f"{kind}: no final norm reads the last block's output")
    name = after[0][0].removeprefix("base.")
    final_norm = f"{owner_path}.{name}" if owner_path else name
    inner = [(n.removeprefix("block."), x, y) for n, x, y in calls if n.startswith("block.")]
    norms = {n for n, _, _ in inner if _is_norm(block.get_submodule(n))}
    # dropouts, activations and rotary tables hold no parameters: not a sub-block
    others = [c for c in inner if c[0] not in norms
              and any(True for _ in block.get_submodule(c[0]).parameters())]
    if not others:
        raise LensError(f"{kind}: a block that calls no sub-block with parameters "
                        f"(it calls {', '.join(n for n, _, _ in inner) or 'nothing'})")
    input_norm = next((n for n, x, _ in inner if n in norms and x is first[1]), None)
    called = {n for n, _, _ in inner}
    if any(n not in called and any(True for _ in m.parameters())
           for n, m in block.named_children()):
        # the block calls inside a sub-block (a wrapper's parts): its roles cannot be read
        return Layout(blocks_path, final_norm, input_norm, None, None, None, False)
    if len({n for n, _, _ in others}) == 1:  # one mixer (a state-space block): no middle
        return Layout(blocks_path, final_norm, input_norm, None, others[0][0], None, False)
    # the MLP: the last sub-block after the attention that reads a norm's output (Gemma-4's
    # per-layer-input projection, called after it, reads none), else the last one
    normed = [c for c in others[1:] if any(c[1] is y for n, _, y in inner if n in norms)]
    attention, mlp = others[0], (normed or others)[-1]
    mlp_norm = next((n for n, _, y in inner if n in norms and y is mlp[1]), None)
    if mlp_norm is None and any(v is mlp[1] for n, v in outputs if n.startswith("block.")):
        # the MLP reads what a sub-block returned (DBRX: the norm inside its attention
        # wrapper), not the residual: neither the middle nor the sub-blocks' outputs can be
        # read as such
        return Layout(blocks_path, final_norm, input_norm, None, None, None, False)
    mlp_reads = next(x for n, x, _ in inner if n == mlp_norm) if mlp_norm else mlp[1]
    attn_input = attention[1]
    parallel = mlp_reads is first[1] or mlp_reads is attn_input
    return Layout(blocks_path, final_norm, input_norm, mlp_norm, attention[0], mlp[0], parallel)
