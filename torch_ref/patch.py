"""Activation patching on transformers' modules: what a clean run would have put at one layer
and position, restored into a corrupted run (mlx_lens/experiment/patching.py drives it).

A patched run restores the clean values at the blocks `blocks` (consecutive), by forward
hooks: the input of block r (kind "resid", blocks = r .. r), or the output of the attention or
MLP module of each block in `blocks` ("attn", "mlp"). It needs only the blocks from the first
restored one on: the model's block list is cut to them for the call (with config.layer_types,
which Gemma and Qwen index by position in that list), and that block's input is replaced by
the corrupted run's recorded one. All variants of one block go in one batch (a caller puts the
unpatched run among them: the batch's own baseline). A corrupted run may also be the clean
prompt with noise added to its row 0 (`record`'s noise: causal tracing).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from mlx_lens.core import refusals
from torch_ref.arch import CUT_AT_BLOCK




@dataclass
class Recorded:
    """One forward pass over sequences of one length, per block (compute dtype, on the
    device): resid[i] its input ([B, T, d]; resid[L] the last block's output), attn[i] and
    mlp[i] its attention and MLP modules' outputs."""

    ids: list[list[int]]
    resid: list[torch.Tensor]
    attn: list[torch.Tensor]
    mlp: list[torch.Tensor]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _with_first(out, value):
    return (value, *out[1:]) if isinstance(out, tuple) else value


def _input_of(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _adding(noise: torch.Tensor):
    """A forward pre-hook adding noise [B, T, d] to a block's input, in the input's dtype."""
    def hook(_module, args, kwargs):
        h = _input_of(args, kwargs)
        h = h + noise.to(h.device, h.dtype)
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
    return hook


class TorchPatcher:
    def __init__(self, backend):
        self.b = backend

    def _modules(self, kind: str) -> list[torch.nn.Module]:
        name = self.b.layout.attention if kind == "attn" else self.b.layout.mlp
        if name is None:
            raise refusals.no_sub_block(self.b.info.architecture, kind)
        return [getattr(block, name) for block in self.b.blocks]

    @torch.no_grad()
    def record(self, batch: Sequence[Sequence[int]], noise: np.ndarray | None = None) -> Recorded:
        resid, out = [], {"attn": [], "mlp": []}
        with ExitStack() as stack:
            if noise is not None:  # row 0 noised before anything reads it (prepended)
                stack.enter_context(_hook(self.b.blocks[0].register_forward_pre_hook(
                    _adding(torch.from_numpy(np.asarray(noise, np.float32))), with_kwargs=True,
                    prepend=True)))
            for block in self.b.blocks:
                stack.enter_context(_hook(block.register_forward_pre_hook(
                    lambda m, args, kwargs: resid.append(_input_of(args, kwargs)),
                    with_kwargs=True)))
            stack.enter_context(_hook(self.b.blocks[-1].register_forward_hook(
                lambda m, args, o: resid.append(_first(o)))))
            for kind in [k for k in ("attn", "mlp") if (self.b.layout.attention if k == "attn"
                                                         else self.b.layout.mlp) is not None]:
                for module in self._modules(kind):
                    stack.enter_context(_hook(module.register_forward_hook(
                        lambda m, args, o, kind=kind: out[kind].append(_first(o)))))
            x = torch.tensor([list(s) for s in batch], device=self.b.input_device)
            self.b.model.base_model(input_ids=x, use_cache=False)
        return Recorded([list(s) for s in batch], resid, out["attn"], out["mlp"])

    @torch.no_grad()
    def patched_logits(self, base: Recorded, clean: Recorded, kind: str, blocks: range,
                       restore: np.ndarray, n_scored: int) -> tuple[np.ndarray, np.ndarray]:
        """fp32 output logits [V, B, n_scored, vocab] at the last n_scored positions of base's
        B sequences, run from block blocks.start on, variant v with clean's values restored at
        `blocks` where restore [V, B, T] is set (sequence b's from clean's sequence b); and the
        norms of the decoded rows [V, B, n_scored] (for bounds)."""
        n_var, n_seq = restore.shape[:2]
        mask = torch.from_numpy(np.ascontiguousarray(restore[..., None]))

        def restore_into(value: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
            """value [V * B, T, d] with source's [B, T, d] values where the mask says (either
            may come flattened to [B * T, d], as a mixture of experts returns it)."""
            shaped = value.reshape(n_var, n_seq, -1, value.shape[-1])
            src = source.reshape(n_seq, -1, value.shape[-1])[:, :shaped.shape[2]]
            return torch.where(mask.to(value.device), src.to(value.device)[None],
                               shaped).reshape(value.shape)

        block = blocks.start
        h = base.resid[block].repeat(n_var, 1, 1)
        if kind == "resid":
            h = restore_into(h, clean.resid[block])
        if block == len(self.b.blocks):  # the last row: only the head reads it
            out = h
        else:
            with ExitStack() as stack:
                if kind != "resid":  # the blocks compute the corrupted values themselves
                    for i in blocks:
                        module = self._modules(kind)[i]
                        src = (clean.attn if kind == "attn" else clean.mlp)[i]
                        stack.enter_context(_hook(module.register_forward_hook(
                            lambda m, args, o, src=src: _with_first(o, restore_into(_first(o), src)))))
                out = self._run_from(block, h, base.ids * n_var, stack)
        x = self.b.final_norm(out[:, -n_scored:].to(self.b.device).float())
        z = self.b.head_logits(x, 0, self.b.info.vocab)
        norms = torch.linalg.vector_norm(x, dim=-1).view(n_var, n_seq, n_scored)
        return z.view(n_var, n_seq, n_scored, -1).cpu().numpy(), norms.double().cpu().numpy()

    def _run_from(self, start: int, h: torch.Tensor, ids: list[list[int]],
                  stack: ExitStack) -> torch.Tensor:
        """The last block's output when blocks start .. L-1 run on h (block start's input): the
        blocks cut to those from `start` where the model's forward allows it (CUT_AT_BLOCK),
        else the whole forward with block start's input replaced."""
        spec, model = self.b.layout, self.b.model
        *parent, name = spec.blocks.split(".")
        owner = model
        for part in parent:
            owner = getattr(owner, part)
        blocks = getattr(owner, name)
        config = model.config
        types = getattr(config, "layer_types", None)
        if self.b.info.architecture in CUT_AT_BLOCK:  # else blocks < start run, to no effect
            stack.enter_context(_swapped(owner, name, torch.nn.ModuleList(list(blocks)[start:])))
            if types is not None:
                stack.enter_context(_swapped(config, "layer_types", types[start:]))
        result = []

        def replace_input(_m, args, kwargs):
            if args:
                return (h.to(args[0].device), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h.to(kwargs["hidden_states"].device)}

        stack.enter_context(_hook(blocks[start].register_forward_pre_hook(replace_input,
                                                                          with_kwargs=True)))
        stack.enter_context(_hook(blocks[-1].register_forward_hook(
            lambda m, args, o: result.append(_first(o)))))
        x = torch.tensor(ids, device=self.b.input_device)
        model.base_model(input_ids=x, use_cache=False)
        return result[0]


@contextmanager
def _hook(handle):
    try:
        yield handle
    finally:
        handle.remove()


@contextmanager
def _swapped(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)
