"""`mlx-lens run --self-test`: is the norm's learned scale applied as the model defines it?

The original experiment's KL sanity check, made sound. At layers 0, L/4, L/2 and 3L/4 the
residual after the block (last position) is decoded (a) through the lens's own norm module,
with its learned scale, and (u) through the unit-scale normalisation alone. The model's own
norm parameters are then applied by hand to the unit-normalised residual (m), following the
architecture's declared norm semantics (RMS or LayerNorm, Gemma's 1 + w). KL(a || u) must equal
KL(m || u): the lens normalises exactly as the model does.

The original applied the scale to the raw, un-normalised residual instead; that reference
differs from the normalised one by the residual's RMS (a temperature), so it cannot match in
general: on SmolLM2 its two KLs differ by 16-218 bits with RMS 1.5-11.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlx_lens.core import bounds
from mlx_lens.core.contract import Backend, InspectableBackend, require
from mlx_lens.core.lens import NormRef
from mlx_lens.core.numerics import log_softmax64

PROMPT = "The capital of Germany is"
# The learned and by-hand logits differ by rounding only: the fp32 module's norm (a length-d mean
# of squares, half a dot product) and the two head GEMMs (one each), docs/numerics.md §1.
ROUNDING_DOT_PRODUCTS = 3


def _kl_bits(lp: np.ndarray, lq: np.ndarray) -> float:
    return float((np.exp(lp) * (lp - lq)).sum() / np.log(2))


@dataclass
class SelfTestRow:
    layer: int  # block index; its output residual is row layer + 1
    norm: NormRef
    kl_learned: float  # KL(module with learned scale || unit scale), bits
    kl_manual: float  # KL(learned scale applied by hand || unit scale), bits
    bound: float  # bits: how far rounding alone can move kl_learned from kl_manual (§3)
    # max over the vocabulary of |z_learned - z_by_hand| / its derived bound: the logits
    # themselves, which the KL alone cannot hold (a shift of every logit leaves it unchanged)
    logit_use: float

    @property
    def passed(self) -> bool:
        return abs(self.kl_learned - self.kl_manual) <= self.bound and self.logit_use <= 1.0


def self_test_layers(n_layers: int) -> list[int]:
    return sorted({0, n_layers // 4, n_layers // 2, 3 * n_layers // 4})


def run_self_test(backend: Backend, prompt: str = PROMPT) -> list[SelfTestRow]:
    """Every tested layer under the final norm and under the next block's input norm."""
    backend = require(backend, InspectableBackend, "the self-test")
    ids = backend.tokenizer.encode(prompt)
    resid = backend.residuals(ids)
    info, w_norm = backend.info, backend.head_row_norms()
    rows = []
    for layer in self_test_layers(info.n_layers):
        h = resid[layer + 1, -1:]
        for ref in dict.fromkeys(("final", layer + 1 if layer + 1 < info.n_layers else "final")):
            spec = backend.norm_spec(ref)
            unit = log_softmax64(backend.decode_rows(spec.normalise(h), None)[0])
            z_learned = backend.decode_rows(h, ref)[0]
            learned = log_softmax64(z_learned)
            by_hand = spec(h)
            manual = backend.decode_rows(by_hand, None)[0]
            b = (bounds.dot_bound(np.linalg.norm(by_hand[0]), w_norm, info.d_model,
                                  ROUNDING_DOT_PRODUCTS)
                 + 2 * bounds.elementwise_bound(manual, info.softcap))
            bound = bounds.kl_shift_bound(learned[None], unit, b[None], np.zeros(1))[0]
            use = float(bounds.over_bound(z_learned.astype(np.float64) - manual, b).max())
            manual = log_softmax64(manual)
            rows.append(SelfTestRow(layer, ref, _kl_bits(learned, unit), _kl_bits(manual, unit),
                                    float(bounds.nats_to_bits(bound)), use))
    return rows


def report(rows: list[SelfTestRow]) -> str:
    lines = [f"{'layer':>5} {'norm':>6} {'KL learned':>11} {'KL by hand':>11} {'diff':>9} "
             f"{'bound':>9} {'logits/bound':>12}  ok"]
    for r in rows:
        name = "final" if r.norm == "final" else f"in{r.norm}"
        lines.append(f"{r.layer:>5} {name:>6} {r.kl_learned:>11.5f} {r.kl_manual:>11.5f} "
                     f"{abs(r.kl_learned - r.kl_manual):>9.2e} {r.bound:>9.1e} "
                     f"{r.logit_use:>12.1e}  {'yes' if r.passed else 'NO'}")
    return "\n".join(lines)
