"""Running reductions over vocabulary chunks of lens logits, on the device (torch).

Full-vocabulary logits for all rows are never held at once: each chunk [R, T, C] updates running
statistics (online logsumexp with shifted moments), so peak extra memory is O(chunk).
With m the running max, S = sum e^(z-m), A = sum e^(z-m) (z-m) and D = sum e^(z-m) (z_f - z)
(z_f: last row's logits for the same token):
    logsumexp = m + log S,  entropy = log S - A/S,  KL(P || P_f) = -D/S - lse + lse_f.
"""
from __future__ import annotations

import math

import torch


class RunningStats:
    def __init__(self, k: int, answer_logit: torch.Tensor | None, answer_id: int | None):
        self.k = k
        self.answer_logit = answer_logit  # [R, T], computed outside the chunk GEMMs
        self.answer_id = answer_id
        self.m = self.s = self.a = self.d = None
        self.dot = self.nz = self.nf = 0.0
        self.top_v = self.top_i = None
        self.above = 0  # tokens whose logit beats the answer's
        self.answer_in_chunk = None

    def update(self, z: torch.Tensor, start: int) -> None:
        zf = z[-1:]
        cm = z.amax(-1)
        if self.m is None:
            m = cm
            e = torch.exp(z - m[..., None])
            self.s, self.a = e.sum(-1), (e * (z - m[..., None])).sum(-1)
            self.d = (e * (zf - z)).sum(-1)
        else:
            m = torch.maximum(self.m, cm)
            c = torch.exp(self.m - m)
            e = torch.exp(z - m[..., None])
            self.a = c * (self.a + self.s * (self.m - m)) + (e * (z - m[..., None])).sum(-1)
            self.s = c * self.s + e.sum(-1)
            self.d = c * self.d + (e * (zf - z)).sum(-1)
        self.m = m
        self.dot = self.dot + (z * zf).sum(-1)
        self.nz = self.nz + (z * z).sum(-1)
        self.nf = self.nf + (zf * zf).sum(-1)

        v, i = z.topk(min(self.k, z.shape[-1]), dim=-1)
        i = i + start
        if self.top_v is not None:
            v, j = torch.cat([self.top_v, v], -1).topk(self.k, dim=-1)
            i = torch.cat([self.top_i, i], -1).gather(-1, j)
        self.top_v, self.top_i = v, i

        if self.answer_id is not None:
            beats = z > self.answer_logit[..., None]
            local = self.answer_id - start
            if 0 <= local < z.shape[-1]:
                beats[..., local] = False  # the answer never outranks itself
                self.answer_in_chunk = z[..., local]
            self.above = self.above + beats.sum(-1)

    def finish(self) -> dict[str, torch.Tensor]:
        lse = self.m + torch.log(self.s)
        entropy = torch.log(self.s) - self.a / self.s
        kl = -self.d / self.s - lse + lse[-1:]
        out = {
            "entropy": entropy / math.log(2),
            "topk_ids": self.top_i,
            "topk_probs": torch.exp(self.top_v - lse[..., None]),
            "kl_to_final": kl.clamp_min(0) / math.log(2),
            "cos_to_final": self.dot / torch.sqrt(self.nz * self.nf),
        }
        if self.answer_id is not None:
            out["p_answer"] = torch.exp(self.answer_in_chunk - lse)
            out["answer_rank"] = self.above + 1
        return out
