"""Activation patching in the MLX capture loop, on mlx-lm's blocks: what a clean run would
have put at one layer and position, restored into a corrupted run
(mlx_lens/experiment/patching.py drives it; torch_ref/patch.py is the reference).

A patched run restores the clean values at the blocks `blocks` (consecutive): the input of
block r (kind "resid", blocks = r .. r), or the output of the attention or MLP module of each
block in `blocks` ("attn", "mlp"; the module's class swapped for one that restores, for the
call). It runs only the blocks from the first restored one on, from the corrupted run's
recorded input of that block. All variants of one block go in one batch (a caller puts the
unpatched run among them: the batch's own baseline). A corrupted run may also be the clean
prompt with noise added to its row 0 (`record`'s noise: causal tracing).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_lens.core import refusals
from mlx_lens.mlx.arch import first_array



@dataclass
class Recorded:
    """One forward pass over sequences of one length, per block (compute dtype): resid[i] its
    input ([B, T, d]; resid[L] the last block's output), attn[i] and mlp[i] its attention and
    MLP modules' outputs."""

    ids: list[list[int]]
    resid: list[mx.array]
    attn: list[mx.array]
    mlp: list[mx.array]


@contextmanager
def recording(module: nn.Module, sink: list, output: bool = False):
    """Within the block, every call of `module` appends its first argument (or, with output,
    its result) to sink: the module's class swapped for a recording subclass, then restored."""
    base = type(module)

    class Recording(base):
        def __call__(self, *args, **kwargs):
            result = base.__call__(self, *args, **kwargs)
            if output:  # a module may return more than its output (gemma4: shared KV)
                sink.append(result[0] if isinstance(result, tuple) else result)
            else:
                sink.append(args[0] if args else first_array(args, kwargs)[1])
            return result

    module.__class__ = Recording
    try:
        yield
    finally:
        module.__class__ = base


@contextmanager
def _restoring(module: nn.Module, restore):
    """Within the block, `module`'s output goes through restore()."""
    base = type(module)

    class Restoring(base):
        def __call__(self, *args, **kwargs):
            out = base.__call__(self, *args, **kwargs)
            if isinstance(out, tuple):  # a module that returns more than its output (gemma4)
                return (restore(out[0]), *out[1:])
            return restore(out)

    module.__class__ = Restoring
    try:
        yield
    finally:
        module.__class__ = base


class MlxPatcher:
    def __init__(self, backend):
        self.b = backend

    def _modules(self, kind: str) -> list[nn.Module]:
        name = self.b.layout.attention if kind == "attn" else self.b.layout.mlp
        if name is None:
            raise refusals.no_sub_block(self.b.info.architecture, kind)
        return [getattr(block, name) for block in self.b.blocks]

    def record(self, batch: Sequence[Sequence[int]], noise: np.ndarray | None = None) -> Recorded:
        x = mx.array([list(s) for s in batch])
        out = {"attn": [], "mlp": []}
        if noise is not None:  # added to row 0 in the compute dtype, as the model adds its terms
            self.b._added = {0: mx.array(noise).astype(self.b._embed(x[:, :1]).dtype)}
        with ExitStack() as stack:
            for kind in [k for k in out if (self.b.layout.attention if k == "attn"
                                            else self.b.layout.mlp) is not None]:
                for module, sink in zip(self._modules(kind), [[] for _ in self.b.blocks]):
                    stack.enter_context(recording(module, sink, output=True))
                    out[kind].append(sink)
            try:
                resid = self.b._run(x)
                mx.eval(resid, out["attn"], out["mlp"])
            finally:
                self.b._added = None
        return Recorded([list(s) for s in batch], resid,
                        *([s[0] for s in out[kind]] for kind in ("attn", "mlp")))

    def patched_logits(self, base: Recorded, clean: Recorded, kind: str, blocks: range,
                       restore: np.ndarray, n_scored: int) -> tuple[np.ndarray, np.ndarray]:
        """fp32 output logits [V, B, n_scored, vocab] at the last n_scored positions of base's
        B sequences, run from block blocks.start on, variant v with clean's values restored at
        `blocks` where restore [V, B, T] is set (sequence b's from clean's sequence b); and the
        norms of the decoded rows [V, B, n_scored] (for bounds)."""
        n_var, n_seq = restore.shape[:2]
        mask = mx.array(restore[..., None])

        def restore_into(value: mx.array, source: mx.array) -> mx.array:
            """value [V * B, T, d] with source's [B, T, d] values where the mask says (either
            may come flattened to [B * T, d], as a mixture of experts returns it)."""
            shaped = value.reshape(n_var, n_seq, -1, value.shape[-1])
            src = source.reshape(n_seq, -1, value.shape[-1])[:, :shaped.shape[2]]
            return mx.where(mask, src[None], shaped).reshape(value.shape)

        start = blocks.start
        h = mx.concatenate([base.resid[start]] * n_var)
        if kind == "resid":
            h = restore_into(h, clean.resid[start])
        if start < len(self.b.blocks):  # else the last row: only the head reads it
            with ExitStack() as stack:
                if kind != "resid":  # the blocks compute the corrupted values themselves
                    sources = clean.attn if kind == "attn" else clean.mlp
                    for i in blocks:
                        stack.enter_context(_restoring(
                            self._modules(kind)[i], lambda o, src=sources[i]: restore_into(o, src)))
                ids = mx.array(base.ids * n_var)  # drives the model's forward where it does
                h = self.b._run(ids, start, h)[-1]
        x = self.b.final_norm(h[:, -n_scored:].astype(mx.float32))
        z = self.b.head_logits(x, 0, self.b.info.vocab)
        return (np.array(z).reshape(n_var, n_seq, n_scored, -1),
                np.array(mx.linalg.norm(x, axis=-1)).astype(np.float64).reshape(n_var, n_seq,
                                                                                 n_scored))
