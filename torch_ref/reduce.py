"""Lens statistics by tiles of [rows x vocabulary], on the device (torch).

The decoded states x [N, d] (N = positions x rows, position-major, so the R rows of the
next-token position come last) meet the unembedding W [V, d] one tile at a time: a vocabulary
chunk of W in fp32, times a slice of rows. Each tile's logits are reduced while they are still in
cache, and full-vocabulary logits are never held: peak extra memory is two tile buffers and the
per-row state (plus the fp32 chunk of W when the model computes in half precision).

Logits arrive in base-2 units (z = natural logits x log2 e, folded into the head), so that
exp2, several times faster than exp on CPUs, gives the softmax, and everything comes out in bits.
Per row, over vocabulary chunks (online logsumexp): m the running max, S = sum 2^(z-m),
A = sum 2^(z-m) (z-m); log2-sum-exp2 = m + log2 S, entropy = log2 S - A/S; a running top-k.
At the next-token position only, where they are reported: D = sum 2^(z-m) (z_f - z) with z_f
the last row, for KL(P || P_f) = -D/S - lse + lse_f; dot products for the cosine to z_f; the
count of tokens above the answer, for its rank.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

# A tile of 512 rows x 4096 tokens (8 MiB of fp32 logits) and its exp stay in a CPU's L3 cache;
# fewer rows make the GEMM slower, shorter rows make top-k slower (measured on the benchmark CPU).
TILE_ELEMENTS = 2**21
ROWS_PER_TILE = 512
# On a GPU, tiles are sized for launch overhead instead: up to 256 MiB, and at most 1/32 of the
# free device memory (two tile buffers and the fp32 chunk of W must fit beside the model).
GPU_TILE_ELEMENTS = 2**26
GPU_ROWS_PER_TILE = 8192


def tile_shape(device: torch.device) -> tuple[int, int]:
    """(elements, rows) of one tile on this device."""
    if device.type != "cuda":
        return TILE_ELEMENTS, ROWS_PER_TILE
    free, _ = torch.cuda.mem_get_info(device)
    return max(2**20, min(GPU_TILE_ELEMENTS, free // (4 * 32))), GPU_ROWS_PER_TILE


LOG2E = 1 / math.log(2)
_rowdot = torch.linalg.vecdot  # row-wise dot product, without a [B, C] temporary


class TiledStats:
    def __init__(self, n_rows: int, n_last: int, k: int, answer_logit: torch.Tensor | None,
                 answer_id: int | None, device: torch.device):
        self.n_last, self.k = n_last, k
        self.answer_logit, self.answer_id = answer_logit, answer_id  # [n_last]
        self.m = torch.full((n_rows,), -math.inf, device=device)  # base-2 units throughout
        self.s = torch.zeros(n_rows, device=device)
        self.a = torch.zeros(n_rows, device=device)
        self.top_v = torch.full((n_rows, k), -math.inf, device=device)
        self.top_i = torch.full((n_rows, k), -1, dtype=torch.long, device=device)
        self.last = {key: torch.zeros(n_last, device=device) for key in ("d", "dot", "nz", "nf")}
        self.last["above"] = torch.zeros(n_last, dtype=torch.long, device=device)
        self.last["answer"] = torch.zeros(n_last, device=device)

    def update(self, z: torch.Tensor, rows: slice, k: int, start: int,
               scratch: torch.Tensor) -> None:
        """Fold a tile z [B, C] of logits (rows `rows`, vocabulary from `start`) into the state,
        keeping the top k <= self.k of these rows. z is overwritten; scratch is a buffer of at
        least z.numel() elements."""
        v, i = z.topk(min(k, z.shape[-1]), dim=-1)
        v, j = torch.cat([self.top_v[rows, :k], v], -1).topk(k, dim=-1)
        self.top_v[rows, :k] = v
        self.top_i[rows, :k] = torch.cat([self.top_i[rows, :k], i + start], -1).gather(-1, j)

        m_old = self.m[rows]
        m = torch.maximum(m_old, z.amax(-1))
        c = torch.exp2(m_old - m)  # rescales earlier sums to the new max (0 for the first chunk)
        if rows.stop == len(self.m):  # the next-token rows, before z is shifted in place
            self._update_last(z[-self.n_last:], m[-self.n_last:], c[-self.n_last:], start)
        shifted = z.sub_(m[:, None])
        e = torch.exp2(shifted, out=scratch[:z.numel()].view(z.shape))
        s_old = self.s[rows]
        self.a[rows] = c * (self.a[rows] + s_old * torch.nan_to_num(m_old - m)) + _rowdot(e, shifted)
        self.s[rows] = c * s_old + e.sum(-1)
        self.m[rows] = m

    def _update_last(self, z: torch.Tensor, m: torch.Tensor, c: torch.Tensor, start: int) -> None:
        zf = z[-1]
        e = torch.exp2(z - m[:, None])
        st = self.last
        st["d"] = c * st["d"] + e @ zf - _rowdot(e, z)
        st["dot"] += z @ zf
        st["nz"] += _rowdot(z, z)
        st["nf"] += zf @ zf
        if self.answer_id is not None:
            beats = z > self.answer_logit[:, None]
            local = self.answer_id - start
            if 0 <= local < z.shape[-1]:
                beats[:, local] = False  # the answer never outranks itself
                st["answer"] = z[:, local].clone()
            st["above"] += beats.sum(-1)

    def finish(self) -> dict[str, torch.Tensor]:
        """Per row: entropy (bits), top-k ids and probabilities; per next-token row: the rest."""
        lse = self.m + torch.log2(self.s)
        last, lse_last, s_last = self.last, lse[-self.n_last:], self.s[-self.n_last:]
        kl = -last["d"] / s_last - lse_last + lse_last[-1]
        kl[-1] = 0.0  # the last row against itself; the sums above leave fp32 rounding
        out = {
            "entropy": torch.log2(self.s) - self.a / self.s,
            "topk_ids": self.top_i,
            "topk_probs": torch.exp2(self.top_v - lse[:, None]),
            "kl_to_final": kl.clamp_min(0),
            "cos_to_final": last["dot"] / torch.sqrt(last["nz"] * last["nf"]),
        }
        if self.answer_id is not None:
            out["p_answer"] = torch.exp2(last["answer"] - lse_last)
            out["answer_rank"] = last["above"] + 1
        return out


def row_slices(groups: list[tuple[int, int]], rows_per_tile: int) -> list[tuple[slice, int]]:
    """(rows, k) slices of at most rows_per_tile rows over consecutive groups of (rows, k),
    never spanning two groups, cut from the end: the last slice holds the last rows, i.e. all
    the next-token rows (where z_f lives) when they end the last group."""
    out, end = [], sum(n for n, _ in groups)
    for n, k in reversed(groups):
        for stop in range(end, end - n, -rows_per_tile):
            out.append((slice(max(stop - rows_per_tile, end - n), stop), k))
        end -= n
    return out[::-1]


def tiled_sweep(x: torch.Tensor, groups: list[tuple[int, int]], head_chunk: Callable,
                vocab: int, stats: TiledStats, progress: Callable = lambda it, desc: it) -> None:
    """Drive `stats` over all tiles of x [N, d], whose rows come in groups of (rows, top-k).
    head_chunk(start, stop) gives the function (x_rows, out) -> fp32 base-2 logits [B, C] of
    that vocabulary chunk, made once per chunk."""
    elements, rows = tile_shape(x.device)
    rows_per_tile = max(stats.n_last, min(x.shape[0], rows))
    # A power of two: BLAS runs chunk widths like 14563 up to 25% slower than 8192 (measured).
    step = 1 << max(6, (elements // rows_per_tile).bit_length() - 1)
    slices = row_slices(groups, rows_per_tile)
    tile = torch.empty(rows_per_tile * min(step, vocab), device=x.device)
    scratch = torch.empty_like(tile)
    for start in progress(range(0, vocab, step), "decoding vocabulary chunks"):
        stop = min(start + step, vocab)
        head = head_chunk(start, stop)
        for rows, k in slices:
            shape = (rows.stop - rows.start, stop - start)
            z = head(x[rows], tile[:shape[0] * shape[1]].view(shape))
            stats.update(z, rows, k, start, scratch)
