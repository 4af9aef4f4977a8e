"""Backend parity: do two backends give the same lens, layer by layer? (float64 comparisons)

Used by the parity test suite and by `mlx-lens parity MODEL`, which a user runs before trusting
a new checkpoint on MLX. Nothing here is a measured tolerance: every logit of the candidate must
lie within the reference's logit plus the derived fp32 bound of docs/numerics.md §4 (each
backend within r + 1 worst-case length-d dot products of exact arithmetic at row r: r blocks and
the decode), and KL, entropy gap and top-1 agreement are held to what that bound allows (§3).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mlx_lens.core import bounds
from mlx_lens.core.contract import InspectableBackend, LayerStats, require
from mlx_lens.core.errors import LensError
from mlx_lens.core.lens import Lens, Site
from mlx_lens.core.numerics import log_softmax64
from mlx_lens.experiment.single import answer_token_id, encode_prompt
from mlx_lens.experiment.metrics import CollapseSettings, layer_summary, next_token_flags

SUMMARY_KEYS = ("L_copy", "L_copy_H", "L_semantic")
FLAG_OF = {"L_copy": "copy_collapse", "L_copy_H": "entropy_collapse", "L_semantic": "is_answer"}
BOUND_DESCRIPTION = ("each backend within r + 1 worst-case length-d fp32 dot products of exact "
                     "arithmetic at layer r (docs/numerics.md §4)")


def logit_bound(backend: InspectableBackend, ids: list[int], lens: Lens, logits: np.ndarray,
                head_norms: np.ndarray, site: Site = "resid") -> np.ndarray:
    """[R, T, V]: how far another fp32 backend's lens logits may be from `backend`'s (§4), at
    a site's rows: the middle of block i lies within i + 2 products (i blocks, an attention
    sub-block, at most one block's worth, and the decode), the output row within L + 1."""
    x_norm = np.linalg.norm(backend.lens_inputs(ids, lens, site).astype(np.float64), axis=-1)
    rows = np.arange(len(x_norm)) + 1
    if site == "mid":
        rows = np.minimum(rows + 1, len(x_norm))
    products = 2 * rows[:, None, None]  # two backends, r + 1 each
    if lens.translators is not None:  # a tuned lens: its translators amplify and round too
        products = 2 * bounds.translated_products(backend.residuals(ids), lens.translators.weight,
                                                  lens.translators.bias)[..., None]
    return (bounds.dot_bound(x_norm, head_norms, backend.info.d_model, products)
            + 2 * bounds.elementwise_bound(logits, backend.info.softcap))


def _stats(logp: np.ndarray, answer_id: int) -> LayerStats:
    """LayerStats (top-2 only) from full float64 log-probs [R, T, V], for the L_* summaries."""
    p = np.exp(logp)
    top = np.argsort(-logp, axis=-1, kind="stable")[..., :2]
    last = logp[:, -1]
    return LayerStats(entropy=-(p * logp).sum(-1) / np.log(2), topk_ids=top,
                      topk_probs=np.take_along_axis(p, top, -1),
                      kl_to_final=(p[:, -1] * (last - last[-1:])).sum(-1) / np.log(2),
                      cos_to_final=np.zeros(len(p)), p_answer=p[:, -1, answer_id],
                      answer_rank=(last > last[:, answer_id:answer_id + 1]).sum(-1) + 1)


@dataclass
class PromptParity:
    """Reference (a) vs candidate (b) on one prompt and lens, per layer (max over positions).
    A `*_use` is a quantity over its derived bound: above 1 is a failure."""

    logit_use: np.ndarray  # [R] |z_b - z_a| / bound, max over positions and tokens
    max_kl: np.ndarray  # [R] nats, KL(a || b)
    kl_use: np.ndarray  # [R]
    entropy_gap: np.ndarray  # [R] bits
    entropy_use: np.ndarray  # [R]
    top1_mismatch: np.ndarray  # [R] decisive positions whose top-1 differs
    decisive: np.ndarray  # [R] positions where a's top-1 leads by more than the bound can move
    summaries: tuple[dict, dict] = field(default_factory=lambda: ({}, {}))
    # per summary: each backend's flags per row at the next-token position, and the rows where
    # the bound cannot decide the flag (a threshold within it, a top-1 that may swap)
    flags: tuple[dict, dict] = field(default_factory=lambda: ({}, {}))
    undecidable: dict = field(default_factory=dict)

    def summary_rows(self, key: str) -> tuple[list[int], list[int]]:
        """The rows where the backends' flags for `key` differ: those the bound explains
        (undecidable) and those it does not."""
        differ = self.flags[0][FLAG_OF[key]] != self.flags[1][FLAG_OF[key]]
        undecided = differ & self.undecidable[key]
        return np.flatnonzero(undecided).tolist(), np.flatnonzero(differ & ~undecided).tolist()


def _undecidable(z: np.ndarray, b: np.ndarray, logp: np.ndarray, shift: dict, answer_id: int,
                 c: CollapseSettings) -> dict[str, np.ndarray]:
    """Per row [R] at the next-token position (z, b, logp [R, V]; shift: logit_shift_bounds
    there): where each summary's rule may go either way within the bound. A top-1 that may swap
    with another token changes the prompt-token and answer tests; p1, p1 - p2 and the entropy
    within their bounds of a threshold change the copy and entropy tests (whether the top-1
    is a prompt token changes only with the top-1 itself)."""
    top1 = z.argmax(-1)
    close = bounds.may_swap(z, b, top1)  # tokens that may overtake the top-1, or it them
    swap = close.any(-1)
    p = np.exp(logp)
    top2 = np.argsort(-z, axis=-1, kind="stable")[:, :2]
    p1, p2 = np.take_along_axis(p, top2, -1).T
    e1, e2 = (bounds.probability_bound(q, shift["logp"]) for q in (p1, p2))
    h = -(p * logp).sum(-1) / np.log(2)
    near_h = np.abs(h - c.entropy_bits) <= bounds.nats_to_bits(shift["entropy"])
    near_copy = ((np.abs(p1 - c.copy_threshold) <= e1)
                 | (np.abs((p1 - p2) - c.copy_margin) <= e1 + e2))
    rows = np.arange(len(z))
    answer_involved = (top1 == answer_id) | close[rows, answer_id]
    return {"L_copy": swap | near_copy | near_h, "L_copy_H": near_h,
            "L_semantic": swap & answer_involved}


def compare_prompt(a: InspectableBackend, b: InspectableBackend, ids: list[int], lens: Lens,
                   answer_id: int,
                   head_norms: np.ndarray, collapse: CollapseSettings | None = None) -> PromptParity:
    za, zb = a.layer_logits(ids, lens), b.layer_logits(ids, lens)
    bound = logit_bound(a, ids, lens, za, head_norms)
    la, lb = log_softmax64(za), log_softmax64(zb)
    pa, pb = np.exp(la), np.exp(lb)
    kl = (pa * (la - lb)).sum(-1)
    gap = np.abs((pa * la).sum(-1) - (pb * lb).sum(-1))  # nats
    shift = bounds.logit_shift_bounds(la, bound)
    # A top-1 that leads the runner-up by more than both their bounds cannot change.
    top2 = np.argsort(-za, axis=-1, kind="stable")[..., :2]
    z2, b2 = np.take_along_axis(za, top2, -1), np.take_along_axis(bound, top2, -1)
    decisive = (z2[..., 0] - z2[..., 1]) > b2.sum(-1)
    mismatch = decisive & (zb.argmax(-1) != top2[..., 0])
    collapse = collapse or CollapseSettings()
    stats = (_stats(la, answer_id), _stats(lb, answer_id))
    flags = tuple(next_token_flags(s, ids, answer_id, collapse) for s in stats)
    summaries = tuple({k: v for k, v in layer_summary(s, f).items() if k in SUMMARY_KEYS}
                      for s, f in zip(stats, flags))
    last = {k: v[:, -1] for k, v in shift.items()}
    undecidable = _undecidable(za[:, -1].astype(np.float64), bound[:, -1], la[:, -1], last,
                               answer_id, collapse)
    return PromptParity(
        logit_use=bounds.over_bound(zb.astype(np.float64) - za, bound).max((-1, -2)),
        max_kl=kl.max(-1), kl_use=bounds.over_bound(kl, shift["kl"]).max(-1),
        entropy_gap=bounds.nats_to_bits(gap.max(-1)),
        entropy_use=bounds.over_bound(gap, shift["entropy"]).max(-1),
        top1_mismatch=mismatch.sum(-1), decisive=decisive.sum(-1), summaries=summaries,
        flags=flags, undecidable=undecidable)


@dataclass
class ParityReport:
    architecture: str
    lens: Lens
    prompts: list[PromptParity]

    def _max(self, name: str) -> np.ndarray:
        return np.max([getattr(p, name) for p in self.prompts], axis=0)

    def _sum(self, name: str) -> np.ndarray:
        return np.sum([getattr(p, name) for p in self.prompts], axis=0)

    @property
    def max_kl(self) -> np.ndarray:
        return self._max("max_kl")

    @property
    def decisive(self) -> np.ndarray:
        return self._sum("decisive")

    def failures(self) -> list[str]:
        out = []
        for name, what in (("logit_use", "logit discrepancy"), ("kl_use", "KL"),
                           ("entropy_use", "entropy gap")):
            use = self._max(name)
            if use.max() > 1:
                out.append(f"{what} {use.max():.3g}x its fp32 bound (layer {int(use.argmax())})")
        if self._sum("top1_mismatch").sum():
            out.append(f"{int(self._sum('top1_mismatch').sum())} decisive top-1 mismatches")
        for i, p in enumerate(self.prompts):
            for key in SUMMARY_KEYS:
                unexplained = p.summary_rows(key)[1]
                if unexplained:  # a difference the derived bound cannot explain
                    out.append(f"prompt {i}: {key} {p.summaries[0][key]} vs "
                               f"{p.summaries[1][key]}, decided differently at layers "
                               f"{', '.join(map(str, unexplained))}")
        return out

    def undecided(self) -> list[str]:
        """The summaries that differ only at layers the bound cannot decide, and those layers."""
        out = []
        for i, p in enumerate(self.prompts):
            for key in SUMMARY_KEYS:
                rows, unexplained = p.summary_rows(key)
                if rows and not unexplained:
                    out.append(f"prompt {i}: {key} {p.summaries[0][key]} vs "
                               f"{p.summaries[1][key]}, undecidable within the bound at "
                               f"layers {', '.join(map(str, rows))}")
        return out

    def table(self) -> str:
        """Per layer; each `/bound` column is the worst quantity over its derived bound."""
        lines = [f"{'layer':>5} {'logit err/bound':>15} {'max KL (nats)':>14} {'KL/bound':>9} "
                 f"{'top-1 agree':>12} {'entropy gap':>12} {'gap/bound':>10}"]
        columns = zip(self._max("logit_use"), self.max_kl, self._max("kl_use"),
                      self._sum("top1_mismatch"), self.decisive, self._max("entropy_gap"),
                      self._max("entropy_use"))
        for r, (use, kl, kl_use, bad, n, gap, gap_use) in enumerate(columns):
            lines.append(f"{r:>5} {use:>15.2e} {kl:>14.2e} {kl_use:>9.1e} "
                         f"{f'{int(n - bad)}/{int(n)}':>12} {gap:>12.2e} {gap_use:>10.1e}")
        return "\n".join(lines)


def compare(a: InspectableBackend, b: InspectableBackend, prompts: list[str], lens: Lens,
            answer: str | None) -> ParityReport:
    """a is the reference. answer None scores a's own final top-1 token on each prompt, so that
    L_semantic is defined even for a model that does not know the answer."""
    a, b = (require(x, InspectableBackend, "parity") for x in (a, b))
    head_norms = a.head_row_norms()
    results = []
    for prompt in prompts:
        ids = encode_prompt(a.tokenizer, prompt, a.info.n_ctx)
        if ids != encode_prompt(b.tokenizer, prompt, b.info.n_ctx):
            raise LensError(f"the backends tokenise {prompt!r} differently")
        answer_id = (int(a.final_logits([ids])[0].argmax()) if answer is None
                     else answer_token_id(a.tokenizer, ids, prompt, answer))
        results.append(compare_prompt(a, b, ids, lens, answer_id, head_norms))
    return ParityReport(a.info.architecture, lens, results)
