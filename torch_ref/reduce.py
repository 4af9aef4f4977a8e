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

Every sum over the vocabulary is blocked (`blocked_sum`, as in the MLX reductions), so that its
rounding error has a known bound: docs/numerics.md.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from mlx_lens.bounds import SUM_BLOCK, summation_depth
from mlx_lens.contract import LayerStats, SweepOptions

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


def blocked_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis of a contiguous x in levels of SUM_BLOCK terms (zero-padded), so
    that no term goes through more than SUM_BLOCK roundings per level."""
    while x.shape[-1] > SUM_BLOCK:
        pad = -x.shape[-1] % SUM_BLOCK
        if pad:  # only a vocabulary's last chunk: the others are powers of two
            x = torch.nn.functional.pad(x, (0, pad))
        x = x.view(*x.shape[:-1], -1, SUM_BLOCK).sum(-1)
    return x.sum(-1)


class TiledStats:
    def __init__(self, n_rows: int, n_last: int, k: int, answer_logit: torch.Tensor | None,
                 answer_id: int | None, device: torch.device, vocab: int):
        self.n_last, self.k, self.vocab = n_last, k, vocab
        self.answer_logit, self.answer_id = answer_logit, answer_id  # [n_last]
        self.m = torch.full((n_rows,), -math.inf, device=device)  # base-2 units throughout
        self.s = torch.zeros(n_rows, device=device)
        self.a = torch.zeros(n_rows, device=device)
        self.top_v = torch.full((n_rows, k), -math.inf, device=device)
        self.top_i = torch.full((n_rows, k), -1, dtype=torch.long, device=device)
        self.last = {key: torch.zeros(n_last, device=device) for key in ("d", "dot", "nz", "nf")}
        self.last["above"] = torch.zeros(n_last, dtype=torch.long, device=device)
        self.last["answer"] = torch.zeros(n_last, device=device)
        self.widest = 0  # the widest vocabulary chunk, for the summation depth

    def update(self, z: torch.Tensor, rows: slice, k: int, start: int,
               scratch: torch.Tensor) -> None:
        """Fold a tile z [B, C] of logits (rows `rows`, vocabulary from `start`) into the state,
        keeping the top k <= self.k of these rows. z is overwritten; scratch is a buffer of at
        least z.numel() elements."""
        self.widest = max(self.widest, z.shape[-1])
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
        s = blocked_sum(e)
        a = blocked_sum(shifted.mul_(e))  # z's buffer is free now
        self.a[rows] = c * (self.a[rows] + s_old * torch.nan_to_num(m_old - m)) + a
        self.s[rows] = c * s_old + s
        self.m[rows] = m

    def _update_last(self, z: torch.Tensor, m: torch.Tensor, c: torch.Tensor, start: int) -> None:
        zf = z[-1]
        e = torch.exp2(z - m[:, None])
        st = self.last
        st["d"] = c * st["d"] + blocked_sum(e * (zf - z))
        st["dot"] += blocked_sum(z * zf)
        st["nz"] += blocked_sum(z * z)
        st["nf"] += blocked_sum(zf * zf)
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
        out["summation_depth"] = summation_depth(self.vocab, self.widest)
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


def sweep_states(x: torch.Tensor, opts: SweepOptions, head_chunk: Callable, vocab: int,
                 progress: Callable = lambda it, desc: it) -> LayerStats:
    """The lens statistics of decoded states x [R, T, d] (rows already normalised), through
    head_chunk (as in tiled_sweep) over a vocabulary of `vocab` tokens."""
    n_rows, n_pos = x.shape[:2]
    a = opts.answer_id
    answer_logit = head_chunk(a, a + 1)(x[:, -1])[:, 0] if a is not None else None
    stats = TiledStats(n_rows * n_pos, n_rows, opts.top_k, answer_logit, a, x.device, vocab)
    # Position-major rows: positions needing narrow_k candidates first, then the wide ones,
    # the next-token position last.
    wide = list(opts.wide or [True] * n_pos)
    narrow = [t for t in range(n_pos - 1) if not wide[t]]
    order = narrow + [t for t in range(n_pos - 1) if wide[t]] + [n_pos - 1]
    groups = [(len(narrow) * n_rows, opts.narrow_k), ((n_pos - len(narrow)) * n_rows, opts.top_k)]
    tiled_sweep(x[:, order].transpose(0, 1).reshape(n_pos * n_rows, -1),
                [g for g in groups if g[0]], head_chunk, vocab, stats, progress)
    out = stats.finish()
    back = torch.argsort(torch.tensor(order))
    for key in ("entropy", "topk_ids", "topk_probs"):  # back to [R, T, ...]
        out[key] = out[key].view(n_pos, n_rows, *out[key].shape[1:])[back].transpose(0, 1)
    return LayerStats.from_arrays({k: v.cpu().numpy() if torch.is_tensor(v) else v
                                   for k, v in out.items()})
