"""A J-lens fit's gradients on MLX (mx.vjp): one backward pass of a batch of copies of a prompt,
one output direction per copy, gives that direction's row of J_l for every block output l at
once (docs/jlens.md). Mirrors torch_ref/jlens.py."""
from __future__ import annotations

from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from mlx_lens.core.contract import ModelInfo


def jacobian_rows(last_row: Callable[[dict[int, mx.array]], mx.array], dtype: mx.Dtype,
                  shape: tuple[int, int], info: ModelInfo, directions: Sequence[int],
                  skip: int) -> np.ndarray:
    """[L - 1, B, d] float32: for copy b, sum over source positions t in [skip, T - 1) of
    d (sum_t' h_L,t'[directions[b]]) / d h_{l+1},t, l = 0..L-2. last_row(added) is the batch's
    last row with added[r] [B, T, d] added to row r: the gradients are those at added = 0."""
    n, d = info.n_layers, info.d_model
    rows = range(1, n)  # block outputs 0..n-2; the last block's output is the identity
    zeros = [mx.zeros((*shape, d), dtype) for _ in rows]
    onehot = np.zeros((len(directions), 1, d), np.float32)
    onehot[np.arange(len(directions)), 0, list(directions)] = 1
    cotangent = mx.broadcast_to(mx.array(onehot).astype(dtype), (*shape, d))
    _, grads = mx.vjp(lambda *added: last_row(dict(zip(rows, added))), zeros, [cotangent])
    # sums over the source positions in fp32 at least, whatever the compute dtype
    acc = mx.float64 if dtype == mx.float64 else mx.float32
    sums = mx.stack([g[:, skip:shape[1] - 1].astype(acc).sum(1) for g in grads])
    return np.array(sums)
