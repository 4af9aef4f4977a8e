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

from dataclasses import dataclass

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
    attention: str
    mlp: str
    parallel: bool  # the MLP reads the block's input, not the residual after the attention


def half_dtype(model_type: str) -> str:
    """Half precision on CUDA (the original's policy: Gemma bf16, the others fp16)."""
    return "bf16" if model_type.startswith("gemma") else "fp16"


def _is_norm(module: torch.nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return kwargs.get("hidden_states", next((v for v in kwargs.values()
                                             if isinstance(v, torch.Tensor)), None))


def _output_tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def find_blocks(model: torch.nn.Module, n_layers: int) -> str:
    """The dotted path of the shallowest ModuleList of n_layers modules in the base model."""
    lists = [(name.count("."), name) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers
             and name.startswith(model.base_model_prefix)]
    if not lists:
        raise LensError(f"no list of {n_layers} decoder blocks found in {type(model).__name__}")
    return min(lists)[1]


def read_layout(model: torch.nn.Module, n_layers: int) -> tuple[Layout, "Probe"]:
    """The layout of `model` from one forward pass over two tokens (with hooks, no cache), and
    that pass's last state and logits, to check the head path with."""
    blocks_path = find_blocks(model, n_layers)
    blocks = model.get_submodule(blocks_path)
    base = model.base_model
    calls: list[tuple[str, torch.Tensor | None, torch.Tensor]] = []
    watched = {f"block.{n}": m for n, m in blocks[0].named_children()}
    watched.update({f"base.{n}": m for n, m in base.named_children() if m is not blocks})
    watched["first"], watched["last"] = blocks[0], blocks[-1]

    def hook(name):
        def record(_module, args, kwargs, out):
            calls.append((name, _first_tensor(args, kwargs), _output_tensor(out)))
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
    layout = _roles(calls, blocks_path, blocks[0], base, model)
    last = [y for n, _, y in calls if n == "last"][-1]
    return layout, Probe(last[0, -1], out.logits[0, -1])


@dataclass(frozen=True)
class Probe:
    """The reading pass's last position: what the final norm read, and the model's logits."""

    state: torch.Tensor  # [d]
    logits: torch.Tensor  # [V]


def _roles(calls, blocks_path, block, base, model) -> Layout:
    kind = type(model).__name__
    first = next(c for c in calls if c[0] == "first")
    last_out = [c for c in calls if c[0] == "last"][-1][2]
    after = [c for c in calls if c[0].startswith("base.") and c[1] is last_out]
    if not after or not _is_norm(base.get_submodule(after[0][0].removeprefix("base."))):
        raise LensError(f"{kind}: no final norm reads the last block's output")
    prefix = model.base_model_prefix
    final_norm = f"{prefix}.{after[0][0].removeprefix('base.')}" if prefix else after[0][0]
    inner = [(n.removeprefix("block."), x, y) for n, x, y in calls if n.startswith("block.")]
    norms = {n for n, _, _ in inner if _is_norm(block.get_submodule(n))}
    # dropouts, activations and rotary tables hold no parameters: not a sub-block
    others = [c for c in inner if c[0] not in norms
              and any(True for _ in block.get_submodule(c[0]).parameters())]
    if len({n for n, _, _ in others}) < 2:
        raise LensError(f"{kind}: a block with no separate attention and MLP "
                        f"(it calls {', '.join(n for n, _, _ in inner) or 'nothing'})")
    attention, mlp = others[0], others[-1]
    input_norm = next((n for n, x, _ in inner if n in norms and x is first[1]), None)
    mlp_norm = next((n for n, _, y in inner if n in norms and y is mlp[1]), None)
    mlp_reads = next(x for n, x, _ in inner if n == mlp_norm) if mlp_norm else mlp[1]
    attn_input = attention[1]
    parallel = mlp_reads is first[1] or mlp_reads is attn_input
    return Layout(blocks_path, final_norm, input_norm, mlp_norm, attention[0], mlp[0], parallel)
