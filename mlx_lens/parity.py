"""Backend parity: do two backends give the same lens, layer by layer? (float64 comparisons)

Used by the parity test suite and by `mlx-lens parity MODEL`, which a user runs before trusting
a new checkpoint on MLX.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mlx_lens.contract import Backend, LayerStats, Lens
from mlx_lens.errors import LensError
from mlx_lens.experiment import answer_token_id, encode_prompt
from mlx_lens.metrics import CollapseSettings, layer_summary, next_token_flags

SUMMARY_KEYS = ("L_copy", "L_copy_H", "L_semantic")


@dataclass(frozen=True)
class Tolerance:
    kl: float  # KL(reference || candidate) per layer and position, nats
    entropy_bits: float  # |entropy gap| per layer and position
    cause: str


# Where both backends run the same fp32 math: measured KL <= 5e-10 and entropy gap <= 3e-5 bits
# on tiny models, 8.5e-9 / 8.3e-5 bits on SmolLM2-135M (entropy moves linearly with small
# probability changes, KL quadratically, so near-uniform rows dominate the entropy gap).
DEFAULT = Tolerance(1e-6, 1e-4, "same fp32 math on both backends")
BY_ARCHITECTURE: dict[str, Tolerance] = {
    # mlx-lm's gpt_neox MLP uses the tanh-approximate GELU, transformers the exact one
    # (FACTS.md); measured up to KL 2.7e-5 and 6e-3 bits on the raw lens.
    "gpt_neox": Tolerance(1e-4, 2e-2, "GELU flavour: mlx-lm tanh approximation vs transformers exact"),
}


def tolerance(architecture: str) -> Tolerance:
    return BY_ARCHITECTURE.get(architecture, DEFAULT)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


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
    """Reference (a) vs candidate (b) on one prompt and lens, per layer (max over positions)."""

    max_kl: np.ndarray  # [R] nats, KL(a || b)
    entropy_gap: np.ndarray  # [R] bits
    top1_mismatch: np.ndarray  # [R] decisive positions whose top-1 differs
    decisive: np.ndarray  # [R] positions where a's top-1/top-2 gap makes the top-1 well defined
    summaries: tuple[dict, dict] = field(default_factory=lambda: ({}, {}))


def compare_prompt(a: Backend, b: Backend, ids: list[int], lens: Lens, answer_id: int,
                   kl_tol: float, collapse: CollapseSettings | None = None) -> PromptParity:
    la, lb = _log_softmax(a.layer_logits(ids, lens)), _log_softmax(b.layer_logits(ids, lens))
    pa, pb = np.exp(la), np.exp(lb)
    kl = (pa * (la - lb)).sum(-1)
    entropy_gap = np.abs((pa * la).sum(-1) - (pb * lb).sum(-1)) / np.log(2)
    top2 = -np.sort(-pa, axis=-1)[..., :2]
    # Pinsker: KL <= tol bounds each probability's change by sqrt(tol/2), so where a's top-1
    # leads by more than sqrt(2 tol) the candidate's top-1 must be the same token.
    decisive = (top2[..., 0] - top2[..., 1]) > np.sqrt(2 * kl_tol)
    mismatch = decisive & (la.argmax(-1) != lb.argmax(-1))
    summaries = tuple(
        {k: v for k, v in layer_summary(
            s, next_token_flags(s, ids, answer_id, collapse or CollapseSettings())).items()
         if k in SUMMARY_KEYS}
        for s in (_stats(la, answer_id), _stats(lb, answer_id)))
    return PromptParity(kl.max(-1), entropy_gap.max(-1), mismatch.sum(-1), decisive.sum(-1),
                        summaries)


@dataclass
class ParityReport:
    architecture: str
    lens: Lens
    tol: Tolerance
    prompts: list[PromptParity]

    @property
    def max_kl(self) -> np.ndarray:
        return np.max([p.max_kl for p in self.prompts], axis=0)

    @property
    def entropy_gap(self) -> np.ndarray:
        return np.max([p.entropy_gap for p in self.prompts], axis=0)

    @property
    def top1_mismatch(self) -> np.ndarray:
        return np.sum([p.top1_mismatch for p in self.prompts], axis=0)

    @property
    def decisive(self) -> np.ndarray:
        return np.sum([p.decisive for p in self.prompts], axis=0)

    def failures(self) -> list[str]:
        out = []
        if self.max_kl.max() > self.tol.kl:
            out.append(f"max KL {self.max_kl.max():.2e} nats > {self.tol.kl:.0e} "
                       f"(layer {int(self.max_kl.argmax())})")
        if self.top1_mismatch.sum():
            out.append(f"{int(self.top1_mismatch.sum())} decisive top-1 mismatches")
        if self.entropy_gap.max() > self.tol.entropy_bits:
            out.append(f"entropy gap {self.entropy_gap.max():.2e} bits > "
                       f"{self.tol.entropy_bits:.0e}")
        for i, p in enumerate(self.prompts):
            if p.summaries[0] != p.summaries[1]:
                out.append(f"prompt {i}: {p.summaries[0]} vs {p.summaries[1]}")
        return out

    def table(self) -> str:
        lines = [f"{'layer':>5} {'max KL (nats)':>14} {'top-1 agree':>12} {'entropy gap':>12}"]
        for r, (kl, gap, bad, n) in enumerate(zip(self.max_kl, self.entropy_gap,
                                                  self.top1_mismatch, self.decisive)):
            lines.append(f"{r:>5} {kl:>14.2e} {f'{int(n - bad)}/{int(n)}':>12} {gap:>12.2e}")
        return "\n".join(lines)


def compare(a: Backend, b: Backend, prompts: list[str], lens: Lens, answer: str | None,
            tol: Tolerance | None = None) -> ParityReport:
    """a is the reference. answer None scores a's own final top-1 token on each prompt, so that
    L_semantic is defined even for a model that does not know the answer."""
    arch = a.info.architecture
    tol = tol or tolerance(arch)
    results = []
    for prompt in prompts:
        ids = encode_prompt(a.tokenizer, prompt)
        if ids != encode_prompt(b.tokenizer, prompt):
            raise LensError(f"the backends tokenise {prompt!r} differently")
        answer_id = (int(a.final_logits(ids).argmax()) if answer is None
                     else answer_token_id(a.tokenizer, ids, prompt, answer))
        results.append(compare_prompt(a, b, ids, lens, answer_id, tol.kl))
    return ParityReport(arch, lens, tol, results)
