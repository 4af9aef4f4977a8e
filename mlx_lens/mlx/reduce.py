"""Running reductions over vocabulary chunks of lens logits, on the MLX device.

The same statistics as the torch reference, written for MLX: lazy graphs, evaluated once per
chunk so that only O(chunk) logits are ever alive. With m the running max,
S = sum e^(z-m), A = sum e^(z-m) (z-m): logsumexp = m + log S, entropy = log S - A/S, and a
running top-k, at every row and position. At the next-token (last) position only, where they
are reported: D = sum e^(z-m) (z_f - z) (z_f: the last row) for KL(P || P_f) = -D/S - lse +
lse_f; G = sum e^(z-m) |z_f - z| and G_x = sum e^(z-m) |z_f - z| (m - z) for KL's error bound
(a computed KL below minus it is a numeric-health finding, never clamped to 0); the dot
products of the cosine to z_f, and the count of tokens above the answer.
All in fp32 (Metal has no float64).

Every sum over the vocabulary is blocked (`blocked_sum`): a single fp32 reduction over a whole
vocabulary chunk loses ~3e-4 relative on 150k terms of very different sizes (docs/numerics.md);
blocks of 64 bound each term's rounding depth by 64 per level.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from mlx_lens.core.bounds import SUM_BLOCK, kl_bound_from_sums, summation_depth
from mlx_lens.core.contract import SweepOptions


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
    """Running statistics of logits in groups: a chunk is [N, R, C], N groups (a prompt's
    positions, or a batch's prompts) of R rows (the lens's rows) over C tokens. The last
    n_scored groups are scored: each against its own last row (KL, cosine) and for its own token
    ids (probability, rank)."""

    def __init__(self, k: int, n_scored: int, scored_ids: mx.array | None,
                 scored_logits: mx.array | None):
        # scored_ids [G, A]; scored_logits [G, R, A]: each row's logits of its group's scored
        # tokens, from a GEMM of their own
        self.k, self.n_scored = k, n_scored
        self.scored_ids, self.scored_logits = scored_ids, scored_logits
        self.state: dict[str, mx.array] = {}  # per group and row
        self.last: dict[str, mx.array] = {}  # per scored group and row
        self.vocab, self.widest = 0, 0  # for the summation depth

    def update(self, z: mx.array, start: int) -> None:
        """Fold a chunk z [N, R, C] of logits (vocabulary from `start`) into the state."""
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
        g = -self.n_scored
        rescale = None if first else (mx.exp(st["m"][g:] - m[g:]), m[g:] - st["m"][g:])
        self._update_scored(z[g:], e[g:], shifted[g:], rescale, start)
        st["m"] = m

        k = min(self.k, z.shape[-1])
        ids = mx.broadcast_to(mx.arange(start, start + z.shape[-1]), z.shape)
        v, i = _top(z, ids, k)
        if "top_v" in st:
            v, i = _top(mx.concatenate([st["top_v"], v], -1),
                        mx.concatenate([st["top_i"], i], -1), self.k)
        st["top_v"], st["top_i"] = v, i
        mx.eval(st, self.last)  # bound the lazy graph: this chunk's logits can be freed now

    def _update_scored(self, z: mx.array, e: mx.array, shifted: mx.array,
                       rescale: tuple[mx.array, mx.array] | None, start: int) -> None:
        """z, e, shifted (z - m): [G, R, C], the scored groups; rescale: the factor that takes
        earlier sums to the new max m, and the rise of m (None: first chunk)."""
        zf = z[:, -1:]  # each group's last row: the model's output at that position
        terms = e * (zf - z)
        chunk = {"d": blocked_sum(terms), "g": blocked_sum(mx.abs(terms)),
                 "gx": blocked_sum(mx.abs(terms) * -shifted), "dot": blocked_sum(z * zf),
                 "nz": blocked_sum(z * z), "nf": blocked_sum(zf * zf)}
        if self.scored_ids is not None:
            logit = self.scored_logits  # [G, R, A]
            above = (z[:, :, None, :] > logit[..., None]).sum(-1).astype(mx.int32)
            local = self.scored_ids - start  # [G, A]
            inside = (local >= 0) & (local < z.shape[-1])
            if mx.any(inside).item():
                cols = mx.clip(local, 0, z.shape[-1] - 1)[:, None, :]  # [G, 1, A]
                own = mx.take_along_axis(z, mx.broadcast_to(cols, logit.shape), -1)
                inside = mx.broadcast_to(inside[:, None, :], logit.shape)
                # A token never outranks itself; its probability comes from this chunk's GEMM.
                above = above - (inside & (own > logit)).astype(mx.int32)
                self.last["answer"] = mx.where(inside, own, self.last.get("answer", own))
            chunk["above"] = above
        if rescale is not None:
            c, rise = rescale
            last = self.last
            # earlier chunks' sums at the new max m: m - z = (m_old - z) + rise
            chunk["gx"] = chunk["gx"] + c * (last["gx"] + rise * last["g"])
            for key in ("d", "g"):
                chunk[key] = chunk[key] + c * last[key]
            for key in ("dot", "nz", "nf", "above"):
                if key in chunk:
                    chunk[key] = chunk[key] + self.last[key]
        self.last.update(chunk)

    def finish(self) -> dict[str, mx.array]:
        """Per group and row: entropy (bits), top-k; per scored group and row: KL and cosine to
        the group's last row, the scored tokens' probabilities, log-probabilities (bits) and
        ranks, and their leads over the best other token (bits: the runner-up where the token is
        the top-1, else the top-1)."""
        st, last = self.state, self.last
        lse = st["m"] + mx.log(st["s"])
        lse_s = lse[-self.n_scored:]
        order = mx.argsort(-st["top_v"], axis=-1)
        top_v = mx.take_along_axis(st["top_v"], order, -1)
        s_s = st["s"][-self.n_scored:]
        kl = -last["d"] / s_s - lse_s + lse_s[:, -1:]
        kl = mx.concatenate([kl[:, :-1], mx.zeros((kl.shape[0], 1))], -1)  # last row vs itself
        depth = summation_depth(self.vocab, self.widest)
        mu1 = -st["a"][-self.n_scored:] / s_s
        kl_bound = kl_bound_from_sums(depth, mu1, mu1[:, -1:], last["g"] / s_s, last["gx"] / s_s,
                                      lse_s, lse_s[:, -1:])
        out = {
            "entropy": (mx.log(st["s"]) - st["a"] / st["s"]) / math.log(2),
            "topk_ids": mx.take_along_axis(st["top_i"], order, -1),
            "topk_probs": mx.exp(top_v - lse[..., None]),
            "kl_to_final": kl / math.log(2), "kl_bound": kl_bound / math.log(2),
            "cos_to_final": last["dot"] / mx.sqrt(last["nz"] * last["nf"]),
        }
        if self.scored_ids is not None:
            out["logp_scored"] = (last["answer"] - lse_s[..., None]) / math.log(2)  # bits
            out["p_scored"] = mx.exp(last["answer"] - lse_s[..., None])
            out["rank_scored"] = last["above"] + 1
            g = -self.n_scored
            first = out["topk_ids"][g:, :, :1] == self.scored_ids[:, None, :]
            best_other = mx.where(first, top_v[g:, :, 1:2], top_v[g:, :, :1])
            out["lead_scored"] = (last["answer"] - best_other) / math.log(2)
        mx.eval(out)
        out = {k: np.array(v) for k, v in out.items()}
        out["summation_depth"] = depth
        return out


def _scored_logits(x: mx.array, ids: mx.array, logits: Callable) -> mx.array:
    """[G, R, A]: each row's logits of its group's scored ids; x [G, R, d], ids [G, A]."""
    return mx.stack([mx.stack([logits(x[gi], int(i), int(i) + 1)[:, 0] for i in ids[gi].tolist()],
                              -1) for gi in range(ids.shape[0])])


def _groups(x: mx.array, n_scored: int, scored: list[tuple[int, ...]] | None, top_k: int,
            logits: Callable, vocab: int, step: int, progress: Callable) -> dict:
    """Drive RunningStats over x [N, R, d] (groups of rows), `step` tokens at a time."""
    ids = mx.array(scored) if scored is not None else None
    scored_logits = _scored_logits(x[-n_scored:], ids, logits) if ids is not None else None
    stats = RunningStats(top_k, n_scored, ids, scored_logits)
    for start in progress(range(0, vocab, step), "decoding vocabulary chunks"):
        stats.update(logits(x, start, min(start + step, vocab)), start)
    out = stats.finish()
    # |x| of each scored row, for the bounds of the decode (fp32's own error in it, ~d u
    # relative, moves those first-order bounds at second order)
    out["x_norm"] = np.array(mx.linalg.norm(x[-n_scored:], axis=-1)).astype(np.float64)
    return out


def sweep_states(x: mx.array, opts: SweepOptions, logits: Callable, vocab: int, step: int,
                 progress: Callable = lambda it, desc: it) -> dict:
    """The lens statistics of decoded states x [R, T, d] (rows already normalised), through
    logits(x, start, stop) -> fp32 logits of that vocabulary slice, `step` tokens at a time.
    The last n = opts.n_scored positions are scored, position j for answer
    piece j (the prompt's next token first, then the teacher-forced pieces):
    mlx_lens/core/stats.py makes LayerStats of the result."""
    scored = [(a,) for a in opts.answer_ids] or None
    return _groups(x.transpose(1, 0, 2), opts.n_scored, scored, opts.top_k,
                   logits, vocab, step, progress)


def sweep_next_token(x: mx.array, scored: list[tuple[int, ...]], top_k: int, logits: Callable,
                     vocab: int, step: int, progress: Callable = lambda it, desc: it) -> dict:
    """The next-token statistics of groups: x [G, R, d] holds the normalised rows of one
    position of one prompt per group; scored[g] the token ids whose probability and rank group
    g reports (as many for every group). mlx_lens/core/stats.py makes LayerStats of them."""
    return _groups(x, x.shape[0], scored, top_k, logits, vocab, step, progress)


def lens_pairs(x: mx.array, logits: Callable, vocab: int, step: int, k: int) -> dict:
    """Every lens against every other, at the same rows: x [P, N, d] holds N decoded rows
    under each of P lenses. Two passes over the vocabulary, `step` tokens at a time: the first
    gives each row's logsumexp and top-k, the second, with log p known, KL(P_a || P_b) =
    sum p_a (log p_a - log p_b) and the Jensen-Shannon divergence
    1/2 sum p_a (log p_a - log M) + 1/2 sum p_b (log p_b - log M), M = (P_a + P_b) / 2.
    Returns kl, js [P, P, N] (bits), top_ids [P, N, k] (most probable first) and the sums'
    summation depth (mlx_lens/core/bounds.py, pair_reduction_bounds)."""
    n_lens, n_rows = x.shape[:2]
    k = min(k, vocab)
    flat = x.reshape(n_lens * n_rows, -1)
    chunks = [(start, min(start + step, vocab)) for start in range(0, vocab, step)]
    m = s = top_v = top_i = None
    for start, stop in chunks:
        z = logits(flat, start, stop)
        new_m = z.max(-1) if m is None else mx.maximum(m, z.max(-1))
        e = blocked_sum(mx.exp(z - new_m[:, None]))
        s = e if s is None else s * mx.exp(m - new_m) + e
        m = new_m
        v, i = _top(z, mx.broadcast_to(mx.arange(start, stop), z.shape), min(k, stop - start))
        if top_v is not None:
            v, i = _top(mx.concatenate([top_v, v], -1), mx.concatenate([top_i, i], -1), k)
        top_v, top_i = v, i
        mx.eval(m, s, top_v, top_i)
    lse = (m + mx.log(s)).reshape(n_lens, n_rows, 1)
    pairs = [(a, b) for a in range(n_lens) for b in range(a + 1, n_lens)]
    kl = {pair: 0.0 for pair in pairs + [(b, a) for a, b in pairs]}
    js = {pair: 0.0 for pair in pairs}
    for start, stop in chunks:
        lp = logits(flat, start, stop).reshape(n_lens, n_rows, -1) - lse
        p = mx.exp(lp)
        for a, b in pairs:  # each unordered pair once: KL both ways from one log-ratio
            d = lp[a] - lp[b]
            kl[a, b] = kl[a, b] + blocked_sum(p[a] * d)
            kl[b, a] = kl[b, a] - blocked_sum(p[b] * d)
            mix = mx.logaddexp(lp[a], lp[b]) - math.log(2)
            js[a, b] = js[a, b] + blocked_sum(0.5 * (p[a] * (lp[a] - mix))
                                              + 0.5 * (p[b] * (lp[b] - mix)))
        mx.eval(kl, js)
    kl_out, js_out = np.zeros((2, n_lens, n_lens, n_rows), np.float32)
    for (a, b), value in kl.items():
        kl_out[a, b] = np.array(value)
    for (a, b), value in js.items():
        js_out[a, b] = js_out[b, a] = np.array(value)
    order = mx.argsort(-top_v, axis=-1)
    ids = mx.take_along_axis(top_i, order, -1).reshape(n_lens, n_rows, -1)
    return {"kl": kl_out / math.log(2), "js": js_out / math.log(2),
            "top_ids": np.array(ids).astype(np.int64),
            "summation_depth": summation_depth(vocab, max(b - a for a, b in chunks))}
