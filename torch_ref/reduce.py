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
the last row, for KL(P || P_f) = -D/S - lse + lse_f; G = sum 2^(z-m) |z_f - z| and
G_x = sum 2^(z-m) |z_f - z| (m - z), for KL's error bound (a computed KL below minus it is a
numeric-health finding, never clamped to 0); dot products for the cosine to z_f; the count of
tokens above the answer, for its rank.

Every sum over the vocabulary is blocked (`blocked_sum`, as in the MLX reductions), so that its
rounding error has a known bound: docs/numerics.md.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch

from mlx_lens.core.bounds import SUM_BLOCK, kl_bound_from_sums, summation_depth
from mlx_lens.core.contract import SweepOptions
from torch_ref import tiles

# On a CPU the tile is calibrated per machine (torch_ref/tiles.py). On a GPU, tiles are sized
# for launch overhead instead: up to 256 MiB, and at most 1/32 of the free device memory (two
# tile buffers and the fp32 chunk of W must fit beside the model).
GPU_TILE_ELEMENTS = 2**26
GPU_ROWS_PER_TILE = 8192


def tile_shape(device: torch.device) -> tuple[int, int]:
    """(elements, rows) of one tile on this device."""
    if device.type != "cuda":
        return tiles.cpu_tile(tile_seconds)
    free, _ = torch.cuda.mem_get_info(device)
    return max(2**20, min(GPU_TILE_ELEMENTS, free // (4 * 32))), GPU_ROWS_PER_TILE


LOG2E, LN2 = 1 / math.log(2), math.log(2)


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
    """Running statistics of n_rows rows that come in groups of `group_rows` (one group: every
    row of the lens at one position of one prompt). The last n_scored groups are scored: each
    against its own last row (KL, cosine) and for its own scored token ids (probability, rank)."""

    def __init__(self, n_rows: int, group_rows: int, n_scored: int, k: int,
                 scored_ids: torch.Tensor | None, scored_logits: torch.Tensor | None,
                 device: torch.device, vocab: int):
        self.n_rows, self.group_rows, self.k, self.vocab = n_rows, group_rows, k, vocab
        self.first_scored = n_rows - n_scored * group_rows
        # scored_ids [n_scored, A]; scored_logits [n_scored * group_rows, A]: each row's logits
        # of its group's scored tokens, from a GEMM of their own
        self.scored_ids, self.scored_logits = scored_ids, scored_logits
        self.m = torch.full((n_rows,), -math.inf, device=device)  # base-2 units throughout
        self.s = torch.zeros(n_rows, device=device)
        self.a = torch.zeros(n_rows, device=device)
        self.top_v = torch.full((n_rows, k), -math.inf, device=device)
        self.top_i = torch.full((n_rows, k), -1, dtype=torch.long, device=device)
        n = n_scored * group_rows
        self.last = {key: torch.zeros(n, device=device) for key in ("d", "g", "gx", "dot", "nz")}
        self.last["nf"] = torch.zeros(n_scored, device=device)
        if scored_ids is not None:
            self.last["above"] = torch.zeros(n, scored_ids.shape[1], dtype=torch.long, device=device)
            self.last["answer"] = torch.zeros(n, scored_ids.shape[1], device=device)
        self.widest = 0  # the widest vocabulary chunk, for the summation depth

    def update(self, z: torch.Tensor, rows: slice, k: int, start: int,
               scratch: torch.Tensor) -> None:
        """Fold a tile z [B, C] of logits (rows `rows`, vocabulary from `start`) into the state,
        keeping the top k <= self.k of these rows. z may be overwritten; scratch is a buffer of
        at least 2 z.numel() elements. A tile holds scored groups whole."""
        self.widest = max(self.widest, z.shape[-1])
        v, i = z.topk(min(k, z.shape[-1]), dim=-1)
        v, j = torch.cat([self.top_v[rows, :k], v], -1).topk(k, dim=-1)
        self.top_v[rows, :k] = v
        self.top_i[rows, :k] = torch.cat([self.top_i[rows, :k], i + start], -1).gather(-1, j)

        m_old = self.m[rows]
        m = torch.maximum(m_old, z.amax(-1))
        c = torch.exp2(m_old - m)  # rescales earlier sums to the new max (0 for the first chunk)
        work = scratch[:2 * z.numel()].view(2, *z.shape)
        lo = max(rows.start, self.first_scored) - rows.start
        scored = lo < z.shape[0]
        # Scored rows need z itself afterwards: shift into a buffer then, else in place.
        shifted = torch.sub(z, m[:, None], out=work[0]) if scored else z.sub_(m[:, None])
        e = torch.exp2(shifted, out=work[1])
        s_old = self.s[rows]
        s = blocked_sum(e)
        a = blocked_sum(shifted.mul_(e))
        if scored:
            first = rows.start + lo - self.first_scored
            self._update_scored(z[lo:], e[lo:], c[lo:], m[lo:], torch.nan_to_num(m - m_old)[lo:],
                                start, slice(first, first + len(z) - lo), work[0][lo:])
        self.a[rows] = c * (self.a[rows] + s_old * torch.nan_to_num(m_old - m)) + a
        self.s[rows] = c * s_old + s
        self.m[rows] = m

    def _update_scored(self, z: torch.Tensor, e: torch.Tensor, c: torch.Tensor, m: torch.Tensor,
                       rise: torch.Tensor, start: int, scored: slice, tmp: torch.Tensor) -> None:
        """z, e [n, C]: whole scored groups (rows `scored` of the scored region), their logits
        and 2^(z - m); c and rise: the rescale factor and the rise of the running max m (0 for
        the first chunk); tmp: a buffer of their shape (every product is formed in it)."""
        g = self.group_rows
        z3, e3, t3 = (t.view(-1, g, z.shape[-1]) for t in (z, e, tmp))
        zf = z3[:, -1:]  # each group's last row: the model's output at that position
        st, groups = self.last, slice(scored.start // g, scored.stop // g)
        terms = torch.sub(zf, z3, out=t3).mul_(e3)
        d = blocked_sum(terms).view(-1)
        gap = blocked_sum(terms.abs_()).view(-1)
        # sum e |z_f - z| (m - z) as m G - sum e |z_f - z| z: the cancellation costs u |m| G,
        # second order in the bound it enters (times u); abs keeps the rounding from a sign
        gap_x = (m * gap - blocked_sum(terms.mul_(z3)).view(-1)).abs()
        # earlier chunks' sums at the new max m: m - z = (m_old - z) + rise
        st["gx"][scored] = c * (st["gx"][scored] + rise * st["g"][scored]) + gap_x
        st["g"][scored] = c * st["g"][scored] + gap
        st["d"][scored] = c * st["d"][scored] + d
        st["dot"][scored] += blocked_sum(torch.mul(z3, zf, out=t3)).view(-1)
        st["nz"][scored] += blocked_sum(torch.mul(z, z, out=tmp))
        st["nf"][groups] += blocked_sum(zf[:, 0] * zf[:, 0])
        if self.scored_ids is None:
            return
        logit = self.scored_logits[scored]  # [n, A]
        above = torch.stack([(z > logit[:, a, None]).sum(-1) for a in range(logit.shape[1])], -1)
        local = self.scored_ids[groups].repeat_interleave(g, 0) - start
        inside = (local >= 0) & (local < z.shape[-1])
        if inside.any():
            own = z.gather(1, local.clamp(0, z.shape[-1] - 1))
            above -= (inside & (own > logit)).long()  # a token never outranks itself
            st["answer"][scored] = torch.where(inside, own, st["answer"][scored])
        st["above"][scored] += above

    def finish(self) -> dict[str, torch.Tensor]:
        """Per row: entropy (bits), top-k ids and probabilities; per scored row ([n_scored,
        group_rows, ...]): KL and cosine to its group's last row, the scored tokens' probabilities,
        log-probabilities and ranks, and their leads over the best other token (bits)."""
        g = self.group_rows
        lse = self.m + torch.log2(self.s)
        last, lse_s = self.last, lse[self.first_scored:].view(-1, g)
        s_s = self.s[self.first_scored:].view(-1, g)
        kl = -last["d"].view(-1, g) / s_s - lse_s + lse_s[:, -1:]
        kl[:, -1] = 0.0  # the last row against itself; the sums above leave fp32 rounding
        # In nats from base-2 units: logits and m - z scale by ln 2 (docs/numerics.md §2).
        depth = summation_depth(self.vocab, self.widest)
        mu1 = -self.a[self.first_scored:].view(-1, g) / s_s * LN2
        kl_bound = kl_bound_from_sums(depth, mu1, mu1[:, -1:], last["g"].view(-1, g) / s_s * LN2,
                                      last["gx"].view(-1, g) / s_s * LN2**2, lse_s * LN2,
                                      lse_s[:, -1:] * LN2) / LN2
        out = {
            "entropy": torch.log2(self.s) - self.a / self.s,
            "topk_ids": self.top_i,
            "topk_probs": torch.exp2(self.top_v - lse[:, None]),
            "kl_to_final": kl, "kl_bound": kl_bound,
            "cos_to_final": (last["dot"] / torch.sqrt(last["nz"] * last["nf"].repeat_interleave(g)))
            .view(-1, g),
        }
        if self.scored_ids is not None:
            own = last["answer"].view(-1, g, last["answer"].shape[-1])
            out["logp_scored"] = own - lse_s[..., None]  # bits
            out["p_scored"] = torch.exp2(out["logp_scored"])
            out["rank_scored"] = last["above"].view(out["p_scored"].shape) + 1
            out["lead_scored"] = lead(own, self.top_v[self.first_scored:].view(-1, g, self.k),
                                      self.top_i[self.first_scored:].view(-1, g, self.k),
                                      self.scored_ids)
        out["summation_depth"] = depth
        return out


def lead(own: torch.Tensor, top_v: torch.Tensor, top_i: torch.Tensor,
         ids: torch.Tensor) -> torch.Tensor:
    """[G, R, A]: each scored token's logit minus the best other token's (the runner-up where
    the token is the top-1, else the top-1), from the sorted top-k [G, R, k]; ids [G, A]."""
    first = top_i[..., :1] == ids[:, None, :]
    return own - torch.where(first, top_v[..., 1:2], top_v[..., :1])


def tile_seconds(rows: int, tokens: int) -> float:
    """Best of 2: the sweep's per-tile work (GEMM, base change, reductions) over tiles.ROWS x
    tiles.TOKENS in tiles of rows x tokens, for the CPU tile's calibration."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tiles.ROWS, tiles.D, generator=gen)
    w = torch.randn(tiles.TOKENS, tiles.D, generator=gen) / tiles.D ** 0.5
    tile, scratch = torch.empty(rows * tokens), torch.empty(2 * rows * tokens)
    best = float("inf")
    for _ in range(2):
        stats = TiledStats(tiles.ROWS, 1, 0, 5, None, None, x.device, tiles.TOKENS)
        began = time.perf_counter()
        for start in range(0, tiles.TOKENS, tokens):
            chunk = w[start:start + tokens]
            for first in range(0, tiles.ROWS, rows):
                z = torch.matmul(x[first:first + rows], chunk.T,
                                 out=tile.view(rows, tokens)).mul_(LOG2E)
                stats.update(z, slice(first, first + rows), 5, start, scratch)
        best = min(best, time.perf_counter() - began)
    return best


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
    g = stats.group_rows
    # Whole lens groups per tile, so that each scored group meets its own last row in it.
    rows_per_tile = max(1, min(x.shape[0], rows) // g) * g
    # A power of two: BLAS runs chunk widths like 14563 up to 25% slower than 8192 (measured).
    step = 1 << max(6, (elements // rows_per_tile).bit_length() - 1)
    slices = row_slices(groups, rows_per_tile)
    tile = torch.empty(rows_per_tile * min(step, vocab), device=x.device)
    scratch = torch.empty(2 * tile.numel(), device=x.device)
    for start in progress(range(0, vocab, step), "decoding vocabulary chunks"):
        stop = min(start + step, vocab)
        head = head_chunk(start, stop)
        for rows, k in slices:
            shape = (rows.stop - rows.start, stop - start)
            z = head(x[rows], tile[:shape[0] * shape[1]].view(shape))
            stats.update(z, rows, k, start, scratch)


def _numpy(out: dict) -> dict:
    return {k: v.cpu().numpy() if torch.is_tensor(v) else v for k, v in out.items()}


def _scored_logits(x: torch.Tensor, ids: torch.Tensor, head_chunk: Callable) -> torch.Tensor:
    """[G * R, A]: each row's base-2 logits of its group's scored ids; x [G, R, d], ids [G, A]."""
    cols = [head_chunk(int(i), int(i) + 1)(x[gi])[:, 0]
            for gi in range(len(ids)) for i in ids[gi]]
    return torch.stack(cols).view(*ids.shape, x.shape[1]).transpose(1, 2).reshape(-1, ids.shape[1])


def sweep_states(x: torch.Tensor, opts: SweepOptions, head_chunk: Callable, vocab: int,
                 progress: Callable = lambda it, desc: it) -> dict:
    """The lens statistics of decoded states x [R, T, d] (rows already normalised), through
    head_chunk (as in tiled_sweep) over a vocabulary of `vocab` tokens. The last
    n = opts.n_scored positions are scored, position j for answer piece j (the
    prompt's next token first, then the teacher-forced pieces): mlx_lens/core/stats.py."""
    n_rows, n_pos = x.shape[:2]
    n = opts.n_scored
    first = n_pos - n
    # Position-major groups: positions needing narrow_k candidates first, then the wide ones,
    # the scored positions last.
    wide = opts.wide or [True] * first
    narrow = [t for t in range(first) if not wide[t]]
    order = narrow + [t for t in range(first) if wide[t]] + list(range(first, n_pos))
    grouped = x[:, order].transpose(0, 1)  # [T, R, d]
    ids = (torch.tensor([[a] for a in opts.answer_ids], device=x.device) if opts.answer_ids
           else None)
    logits = _scored_logits(grouped[-n:], ids, head_chunk) if ids is not None else None
    stats = TiledStats(n_rows * n_pos, n_rows, n, opts.top_k, ids, logits, x.device, vocab)
    partitions = [(len(narrow) * n_rows, opts.narrow_k),
                  ((n_pos - len(narrow)) * n_rows, opts.top_k)]
    tiled_sweep(grouped.reshape(n_pos * n_rows, -1), [p for p in partitions if p[0]], head_chunk,
                vocab, stats, progress)
    out = _numpy(stats.finish())
    back = np.argsort(order)
    for key in ("entropy", "topk_ids", "topk_probs"):  # [T, R, ...] in position order
        out[key] = out[key].reshape(n_pos, n_rows, *out[key].shape[1:])[back]
    out["x_norm"] = _norms(grouped[-n:])
    return out


def _norms(x: torch.Tensor) -> np.ndarray:
    """|x| of each decoded row [..., d], for the bounds of the decode: in fp32 on the device (no
    float64 on MPS; fp32's own error, ~d u relative, moves those first-order bounds at second
    order)."""
    return torch.linalg.vector_norm(x, dim=-1).double().cpu().numpy()


def sweep_next_token(x: torch.Tensor, scored: list[tuple[int, ...]], top_k: int,
                     head_chunk: Callable, vocab: int,
                     progress: Callable = lambda it, desc: it) -> dict:
    """The next-token statistics of groups: x [G, R, d] holds the normalised rows of one
    position of one prompt per group; scored[g] the token ids whose probability and rank group
    g reports (as many for every group). mlx_lens/core/stats.py makes LayerStats of them."""
    n_groups, n_rows = x.shape[:2]
    ids = torch.tensor(scored, device=x.device)
    stats = TiledStats(n_groups * n_rows, n_rows, n_groups, top_k, ids,
                       _scored_logits(x, ids, head_chunk), x.device, vocab)
    tiled_sweep(x.reshape(n_groups * n_rows, -1), [(n_groups * n_rows, top_k)], head_chunk,
                vocab, stats, progress)
    out = _numpy(stats.finish())
    for key in ("entropy", "topk_ids", "topk_probs"):  # [G, R, ...]
        out[key] = out[key].reshape(n_groups, n_rows, *out[key].shape[1:])
    out["x_norm"] = _norms(x)
    return out


def lens_pairs(x: torch.Tensor, head_chunk: Callable, vocab: int, k: int) -> dict:
    """Every lens against every other, at the same rows: x [P, N, d] holds N decoded rows
    under each of P lenses, head_chunk as in tiled_sweep (base-2 logits). Two passes over the
    vocabulary: the first gives each row's log2-sum-exp2 and top-k, the second, with log p
    known, KL(P_a || P_b) = sum p_a (log p_a - log p_b) and the Jensen-Shannon divergence
    1/2 sum p_a (log p_a - log M) + 1/2 sum p_b (log p_b - log M), M = (P_a + P_b) / 2.
    Returns kl, js [P, P, N] (bits), top_ids [P, N, k] (most probable first) and the sums'
    summation depth (mlx_lens/core/bounds.py, pair_reduction_bounds)."""
    n_lens, n_rows = x.shape[:2]
    k = min(k, vocab)
    flat = x.reshape(n_lens * n_rows, -1)
    elements, _ = tile_shape(x.device)
    step = 1 << max(6, (elements // flat.shape[0]).bit_length() - 1)
    chunks = [(start, min(start + step, vocab)) for start in range(0, vocab, step)]
    m = torch.full((flat.shape[0],), -math.inf, device=x.device)
    s = torch.zeros_like(m)
    top_v = torch.full((flat.shape[0], k), -math.inf, device=x.device)
    top_i = torch.full((flat.shape[0], k), -1, dtype=torch.long, device=x.device)
    for start, stop in chunks:
        z = head_chunk(start, stop)(flat)
        new_m = torch.maximum(m, z.amax(-1))
        s = s * torch.exp2(m - new_m) + blocked_sum(torch.exp2(z - new_m[:, None]))
        m = new_m
        v, i = z.topk(min(k, stop - start), dim=-1)
        top_v, j = torch.cat([top_v, v], -1).topk(k, dim=-1)
        top_i = torch.cat([top_i, i + start], -1).gather(-1, j)
    lse = (m + torch.log2(s)).view(n_lens, n_rows, 1)
    kl = torch.zeros(n_lens, n_lens, n_rows, device=x.device)
    js = torch.zeros_like(kl)
    pairs = [(a, b) for a in range(n_lens) for b in range(a + 1, n_lens)]
    for start, stop in chunks:
        lp = head_chunk(start, stop)(flat).view(n_lens, n_rows, -1).sub_(lse)
        p = torch.exp2(lp)
        for a, b in pairs:  # each unordered pair once: KL both ways from one log-ratio
            d = lp[a] - lp[b]
            kl[a, b] += blocked_sum(p[a] * d)
            kl[b, a] -= blocked_sum(d.mul_(p[b]))
            mix = torch.logaddexp2(lp[a], lp[b]).sub_(1.0)
            js[a, b] += blocked_sum(torch.sub(lp[a], mix).mul_(p[a]).mul_(0.5)
                                    .add_(torch.sub(lp[b], mix).mul_(p[b]).mul_(0.5)))
    js = js + js.transpose(0, 1)
    return {"kl": kl.cpu().numpy(), "js": js.cpu().numpy(),
            "top_ids": top_i.view(n_lens, n_rows, k).cpu().numpy(),
            "summation_depth": summation_depth(vocab, max(b - a for a, b in chunks))}
