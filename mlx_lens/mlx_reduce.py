"""Running reductions over vocabulary chunks of lens logits, on the MLX device.

The same statistics as the torch reference, written for MLX: lazy graphs, evaluated once per
chunk so that only O(chunk) logits are ever alive. With m the running max,
S = sum e^(z-m), A = sum e^(z-m) (z-m), D = sum e^(z-m) (z_f - z) (z_f: the last row):
    logsumexp = m + log S,  entropy = log S - A/S,  KL(P || P_f) = -D/S - lse + lse_f.
All in fp32 (Metal has no float64).
"""
from __future__ import annotations

import math

import mlx.core as mx


def _top(values: mx.array, ids: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The k largest along the last axis, unordered (argpartition is O(n), topk sorts nothing)."""
    part = mx.argpartition(-values, kth=k - 1, axis=-1)[..., :k]
    return mx.take_along_axis(values, part, -1), mx.take_along_axis(ids, part, -1)


class RunningStats:
    def __init__(self, k: int, answer_logit: mx.array | None, answer_id: int | None):
        self.k, self.answer_logit, self.answer_id = k, answer_logit, answer_id
        self.state: dict[str, mx.array] = {}

    def update(self, z: mx.array, start: int) -> None:
        st = self.state
        zf = z[-1:]
        cm = z.max(-1)
        if not st:
            m = cm
            e = mx.exp(z - m[..., None])
            st.update(s=e.sum(-1), a=(e * (z - m[..., None])).sum(-1), d=(e * (zf - z)).sum(-1),
                      dot=mx.zeros_like(cm), nz=mx.zeros_like(cm), nf=mx.zeros_like(cm),
                      above=mx.zeros(cm.shape, mx.int32))
        else:
            m = mx.maximum(st["m"], cm)
            c = mx.exp(st["m"] - m)
            e = mx.exp(z - m[..., None])
            st["a"] = c * (st["a"] + st["s"] * (st["m"] - m)) + (e * (z - m[..., None])).sum(-1)
            st["s"] = c * st["s"] + e.sum(-1)
            st["d"] = c * st["d"] + (e * (zf - z)).sum(-1)
        st["m"] = m
        st["dot"] = st["dot"] + (z * zf).sum(-1)
        st["nz"] = st["nz"] + (z * z).sum(-1)
        st["nf"] = st["nf"] + (zf * zf).sum(-1)

        k = min(self.k, z.shape[-1])
        ids = mx.broadcast_to(mx.arange(start, start + z.shape[-1]), z.shape)
        v, i = _top(z, ids, k)
        if "top_v" in st:
            v, i = _top(mx.concatenate([st["top_v"], v], -1),
                        mx.concatenate([st["top_i"], i], -1), self.k)
        st["top_v"], st["top_i"] = v, i

        if self.answer_id is not None:
            beats = z > self.answer_logit[..., None]
            local = self.answer_id - start
            if 0 <= local < z.shape[-1]:
                # The answer never outranks itself; its probability comes from this chunk's GEMM.
                beats = beats & (mx.arange(z.shape[-1]) != local)
                st["answer"] = z[..., local]
            st["above"] = st["above"] + beats.sum(-1).astype(mx.int32)
        mx.eval(st)  # bound the lazy graph: this chunk's logits can be freed now

    def finish(self) -> dict[str, mx.array]:
        st = self.state
        lse = st["m"] + mx.log(st["s"])
        order = mx.argsort(-st["top_v"], axis=-1)
        top_v = mx.take_along_axis(st["top_v"], order, -1)
        out = {
            "entropy": (mx.log(st["s"]) - st["a"] / st["s"]) / math.log(2),
            "topk_ids": mx.take_along_axis(st["top_i"], order, -1),
            "topk_probs": mx.exp(top_v - lse[..., None]),
            "kl_to_final": mx.maximum(-st["d"] / st["s"] - lse + lse[-1:], 0) / math.log(2),
            "cos_to_final": st["dot"] / mx.sqrt(st["nz"] * st["nf"]),
        }
        if self.answer_id is not None:
            out["p_answer"] = mx.exp(st["answer"] - lse)
            out["answer_rank"] = st["above"] + 1
        mx.eval(out)
        return out
