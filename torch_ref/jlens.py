"""A J-lens fit's gradients on torch (autograd): one backward pass of a batch of copies of a
prompt, one output direction per copy, gives that direction's row of J_l for every block output
l at once (docs/jlens.md). Mirrors mlx_lens/mlx/jlens.py."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def jacobian_rows(model: torch.nn.Module, blocks: Sequence[torch.nn.Module], x: torch.Tensor,
                  directions: Sequence[int], skip: int) -> np.ndarray:
    """[L - 1, B, d]: for copy b of the token batch x [B, T], sum over source positions t in
    [skip, T - 1) of d (sum_t' h_L,t'[directions[b]]) / d h_{l+1},t, l = 0..L-2: a zero
    perturbation added to each block's output but the last, differentiated at zero."""
    added: list[torch.Tensor] = []
    last: list[torch.Tensor] = []

    def hook(_module, _args, out, i: int):
        h = out[0] if isinstance(out, tuple) else out
        if i == len(blocks) - 1:
            last.append(h)
            return None
        zero = torch.zeros_like(h, requires_grad=True)
        added.append(zero)
        h = h + zero
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handles = [b.register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i))
               for i, b in enumerate(blocks)]
    try:
        with torch.enable_grad():
            model(input_ids=x, use_cache=False)
            h = last[0]
            onehot = torch.zeros(len(directions), 1, h.shape[-1], dtype=h.dtype, device=h.device)
            onehot[torch.arange(len(directions)), 0, torch.tensor(list(directions))] = 1
            grads = torch.autograd.grad(h, added, onehot.expand_as(h))
    finally:
        for handle in handles:
            handle.remove()
    # sums over the source positions in fp32 at least, whatever the compute dtype
    return np.stack([g[:, skip:x.shape[1] - 1].to(torch.promote_types(g.dtype, torch.float32))
                     .sum(1).cpu().numpy() for g in grads])
