"""Running reductions over vocabulary chunks of lens logits, on the MLX device.

The same statistics as the torch reference, written for MLX: lazy graphs, evaluated once per
chunk so that only O(chunk) logits are ever alive. With m the running max,
S = sum e^(z-m), A = sum e^(z-m) (z-m): logsumexp = m + log S, entropy = log S - A/S, and a
running top-k, at every row and position. At the next-token (last) position only, where they
are reported: D = sum e^(z-m) (z_f - z) (z_f: the last row) for KL(P || P_f) = -D/S - lse +
lse_f, the dot products of the cosine to z_f, and the count of tokens above the answer.
All in fp32 (Metal has no float64).

Every sum over the vocabulary is blocked (`blocked_sum`): a single fp32 reduction over a whole
vocabulary chunk loses ~3e-4 relative on 150k terms of very different sizes (docs/numerics.md);
blocks of 64 bound each term's rounding depth by 64 per level.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

from mlx_lens.bounds import SUM_BLOCK, summation_depth
from mlx_lens.contract import LayerStats, SweepOptions


def blocked_sum(x: mx.array) -> mx.array:
    """Sum over the last axis in levels of SUM_BLOCK terms (zero-padded), so that no term goes
    through more than SUM_BLOCK roundings per level."""
    while x.shape[-1] > SUM_BLOCK:
        pad = -x.shape[-1] % SUM_BLOCK
        if pad:
            x = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
        x = x.reshape(*x.shape[:-1], -1, SUM_BLOCK).sum(-1)
    return x.sum(-1)


def _top(values: mx.array, ids: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The k largest along the last axis with their ids, unordered (argpartition: O(n) per row)."""
    part = mx.argpartition(-values, kth=k - 1, axis=-1)[..., :k]
    return mx.take_along_axis(values, part, -1), mx.take_along_axis(ids, part, -1)


class RunningStats:
    def __init__(self, k: int, answer_logit: mx.array | None, answer_id: int | None):
        self.k, self.answer_logit, self.answer_id = k, answer_logit, answer_id  # logit: [R]
        self.state: dict[str, mx.array] = {}  # per row and position
        self.last: dict[str, mx.array] = {}  # per row, at the last position
        self.vocab, self.widest = 0, 0  # for the summation depth

    def update(self, z: mx.array, start: int) -> None:
        """Fold a chunk z [R, T, C] of logits (vocabulary from `start`) into the state."""
        st = self.state
        self.vocab, self.widest = self.vocab + z.shape[-1], max(self.widest, z.shape[-1])
        cm = z.max(-1)
        first = not st
        m = cm if first else mx.maximum(st["m"], cm)
        shifted = z - m[..., None]
        e = mx.exp(shifted)
        s, a = blocked_sum(e), blocked_sum(e * shifted)
        if first:
            st.update(s=s, a=a)
        else:
            c = mx.exp(st["m"] - m)
            st["a"] = c * (st["a"] + st["s"] * (st["m"] - m)) + a
            st["s"] = c * st["s"] + s
        self._update_last(z[:, -1], e[:, -1], None if first else mx.exp(st["m"][:, -1] - m[:, -1]),
                          start)
        st["m"] = m

        k = min(self.k, z.shape[-1])
        ids = mx.broadcast_to(mx.arange(start, start + z.shape[-1]), z.shape)
        v, i = _top(z, ids, k)
        if "top_v" in st:
            v, i = _top(mx.concatenate([st["top_v"], v], -1),
                        mx.concatenate([st["top_i"], i], -1), self.k)
        st["top_v"], st["top_i"] = v, i
        mx.eval(st, self.last)  # bound the lazy graph: this chunk's logits can be freed now

    def _update_last(self, z: mx.array, e: mx.array, c: mx.array | None, start: int) -> None:
        """z, e: [R, C] at the last position; c rescales D to the new max (None: first chunk)."""
        zf = z[-1]
        chunk = {"d": blocked_sum(e * (zf - z)), "dot": blocked_sum(z * zf),
                 "nz": blocked_sum(z * z), "nf": blocked_sum(zf * zf)}
        if self.answer_id is not None:
            beats = z > self.answer_logit[:, None]
            local = self.answer_id - start
            if 0 <= local < z.shape[-1]:
                # The answer never outranks itself; its probability comes from this chunk's GEMM.
                beats = beats & (mx.arange(z.shape[-1]) != local)
                self.last["answer"] = z[:, local]
            chunk["above"] = beats.sum(-1).astype(mx.int32)
        if c is not None:
            chunk["d"] = chunk["d"] + c * self.last["d"]
            for key in ("dot", "nz", "nf", "above"):
                if key in chunk:
                    chunk[key] = chunk[key] + self.last[key]
        self.last.update(chunk)

    def finish(self) -> dict[str, mx.array]:
        st, last = self.state, self.last
        lse = st["m"] + mx.log(st["s"])
        lse_last = lse[:, -1]
        order = mx.argsort(-st["top_v"], axis=-1)
        top_v = mx.take_along_axis(st["top_v"], order, -1)
        kl = -last["d"] / st["s"][:, -1] - lse_last + lse_last[-1]
        kl = mx.concatenate([kl[:-1], mx.zeros(1)])  # the last row against itself is 0
        out = {
            "entropy": (mx.log(st["s"]) - st["a"] / st["s"]) / math.log(2),
            "topk_ids": mx.take_along_axis(st["top_i"], order, -1),
            "topk_probs": mx.exp(top_v - lse[..., None]),
            "kl_to_final": mx.maximum(kl, 0) / math.log(2),
            "cos_to_final": last["dot"] / mx.sqrt(last["nz"] * last["nf"]),
        }
        if self.answer_id is not None:
            out["p_answer"] = mx.exp(last["answer"] - lse_last)
            out["answer_rank"] = last["above"] + 1
        mx.eval(out)
        out["summation_depth"] = summation_depth(self.vocab, self.widest)
        return out


def sweep_states(x: mx.array, opts: SweepOptions, logits: Callable, vocab: int, step: int,
                 progress: Callable = lambda it, desc: it) -> LayerStats:
    """The lens statistics of decoded states x [R, T, d] (rows already normalised), through
    logits(x, start, stop) -> fp32 logits of that vocabulary slice, `step` tokens at a time."""
    a = opts.answer_id
    answer_logit = logits(x[:, -1], a, a + 1)[:, 0] if a is not None else None
    stats = RunningStats(opts.top_k, answer_logit, a)
    for start in progress(range(0, vocab, step), "decoding vocabulary chunks"):
        stats.update(logits(x, start, min(start + step, vocab)), start)
    return LayerStats.from_arrays(stats.finish())
