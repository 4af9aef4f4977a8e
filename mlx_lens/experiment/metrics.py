"""Collapse flags at the pure next-token position and the layer summaries built on them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from mlx_lens.core.contract import LayerStats


@dataclass(frozen=True)
class CollapseSettings:
    copy_threshold: float = 0.90  # p(top-1) must exceed this ...
    copy_margin: float = 0.05  # ... and beat p(top-2) by more than this
    entropy_bits: float = 1.0  # entropy at or below this is an entropy collapse


def rules(s: CollapseSettings) -> dict[str, str]:
    """Each of the original's milestones' rule in words, for the JSON beside its value: they
    start at row 0 (the embedding, which through a tied head decodes to its own input token),
    and the copy rule's entropy fallback counts any confident layer, the answer included."""
    copy = (f"the original's rule, from row 0: the first layer whose top-1 is a prompt token with "
            f"p1 > {s.copy_threshold} and p1 - p2 > {s.copy_margin}, or whose entropy is below "
            f"{s.entropy_bits} bit")
    return {"L_copy": copy,
            "L_copy_H": f"the original's rule, from row 0: the first layer whose entropy is at "
                        f"most {s.entropy_bits} bit",
            "L_semantic": "the original's rule: the first layer whose top-1 is the answer's "
                          "first piece",
            "delta_layers": "the original's rule: L_semantic - L_copy"}


def next_token_flags(stats: LayerStats, prompt_ids: Iterable[int], answer_id: int | None,
                     s: CollapseSettings) -> dict[str, np.ndarray]:
    """Per-row booleans at the last position (the original's rules, docs/design.md)."""
    top1 = stats.topk_ids[:, -1, 0]
    p1, p2 = stats.topk_probs[:, -1, 0], stats.topk_probs[:, -1, 1]
    entropy = stats.entropy[:, -1]
    in_prompt = np.isin(top1, np.fromiter(prompt_ids, dtype=np.int64))
    strict = in_prompt & (p1 > s.copy_threshold) & ((p1 - p2) > s.copy_margin)
    return {
        # The original falls back to the entropy rule: a near-certain layer counts as collapsed.
        "copy_collapse": strict | (entropy < s.entropy_bits),
        "entropy_collapse": entropy <= s.entropy_bits,
        "is_answer": (top1 == answer_id) if answer_id is not None else np.zeros_like(strict),
    }


def first_row(mask: np.ndarray) -> int | None:
    """The first row where mask holds, or None."""
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def layer_summary(stats: LayerStats, flags: dict[str, np.ndarray]) -> dict[str, int | None]:
    """L_copy, L_copy_H, L_semantic, delta_layers, and first layers by KL and answer rank. A
    blanked (non-finite) row meets no rule: its NaNs compare false, and its rank of -1 (no
    rank, mlx_lens/experiment/health.py) is not a rank <= k."""
    out = {
        "L_copy": first_row(flags["copy_collapse"]),
        "L_copy_H": first_row(flags["entropy_collapse"]),
        "L_semantic": first_row(flags["is_answer"]),
    }
    both = out["L_copy"] is not None and out["L_semantic"] is not None
    out["delta_layers"] = out["L_semantic"] - out["L_copy"] if both else None
    kl = stats.kl_to_final
    out["first_kl_below_0.5"] = first_row(kl < 0.5)
    out["first_kl_below_1.0"] = first_row(kl < 1.0)
    if stats.answer_rank is not None:
        rank = stats.answer_rank
        for k in (1, 5, 10):
            out[f"first_rank_le_{k}"] = first_row((rank >= 1) & (rank <= k))
    return out
