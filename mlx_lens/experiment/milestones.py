"""Milestones that say how sure they are: the whole answer, its lead, and copying without the
embedding's identity.

Beside the original's L_copy / L_copy_H / L_semantic (mlx_lens/experiment/metrics.py, kept as
they were), per row r at the next-token position and the answer's teacher-forced positions:

- the whole answer's log2-probability, sum_j log2 p_r(a_j | prompt, a_<j), and each piece's lead
  over the best other token, lead_j = z(a_j) - max_{t != a_j} z(t) in bits (> 0 exactly when
  the piece is the top-1);
- `L_answer_top1`: the first row where every piece is the top-1 (the whole answer is the lens's
  greedy continuation); `L_answer_confirmed` (and `L_semantic_confirmed` for the first piece
  alone): the first row r where every piece leads by more than the margin at `consecutive`
  rows from r on.
  A row whose lead is within the decode's derived bound of the rule's threshold (0 for top-1,
  the margin for the confirmed onsets; mlx_lens/core/bounds.py, lead_bound) could go either
  way, and so may a blanked (non-finite) row: where such a row decides the milestone, it is
  "undecided", not a number;
- copying: row 0 is the embedding, which through a tied head decodes to its own input token;
  that echo is a flag of row 0 (`embedding_echo`), and copy detection proper starts at row 1:
  the top-1 ids of the last k rows (k = 1..3, rows >= 1) found contiguously in the prompt, none
  of them whitespace or punctuation, with p1 > 0.95 and p1 - p2 > 0.10 (strict) or p1 > 0.33
  (soft), no entropy fallback.
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from mlx_lens.core import bounds
from mlx_lens.core.contract import LayerStats, ModelInfo
from mlx_lens.experiment.metrics import first_row

UNDECIDED = "undecided"
Milestone = int | str | None  # a row, "undecided", or None (never reached)


@dataclass(frozen=True)
class MilestoneSettings:
    # The lead a confirmed onset needs, in bits: the top-2 logit gap of 0.5 nats the original
    # project later used.
    margin_bits: float = 0.5 / math.log(2)
    consecutive: int = 2  # rows in a row that must hold it
    strict_p: float = 0.95
    strict_margin: float = 0.10
    soft_p: float = 0.33


COPY_WINDOWS = (1, 2, 3)  # rows of top-1 ids a copy must find contiguously in the prompt
COPY_COLUMNS = [f"copy_{kind}_k{k}" for kind in ("strict", "soft") for k in COPY_WINDOWS]
# What a headline leads with: the earliest copies from row 1. A copy over k rows implies the
# one-row copy at its last row, and a strict copy the soft one, so these come first.
LEADING_COPIES = ("L_copy_strict_k1", "L_copy_soft_k1")
ANSWER_COLUMNS = ["answer_log2p", "answer_top1", "answer_min_lead_bits", "first_piece_log2p",
                  "first_piece_lead_bits"]


def first_decided(holds: np.ndarray, uncertain: np.ndarray, run: int = 1) -> Milestone:
    """The first row r where `holds` is true at rows r .. r + run - 1, where exact arithmetic
    cannot change the answer: rows whose `uncertain` is set may go either way. A window of
    certain rows decides; scanning stops at the first window that involves an uncertain row
    which could change the outcome (UNDECIDED)."""
    holds, uncertain = np.asarray(holds, bool), np.asarray(uncertain, bool)
    for r in range(len(holds) - run + 1):
        window = slice(r, r + run)
        if (~holds[window] & ~uncertain[window]).any():
            continue  # some row certainly fails: no onset here, whatever the others do
        if not uncertain[window].any():
            return r  # every row certainly holds
        return UNDECIDED
    return None


@dataclass
class AnswerRows:
    """Per row and piece, from a LayerStats with pieces: log2 p, the lead over the best other
    token and that lead's bound (bits)."""

    log2p_pieces: np.ndarray  # [R, k]
    lead: np.ndarray  # [R, k]
    bound: np.ndarray  # [R, k]

    @classmethod
    def of(cls, stats: LayerStats, info: ModelInfo, w_max: float) -> "AnswerRows":
        bound = bounds.lead_bound(stats.piece_x_norm, w_max, info.d_model, info.softcap)
        return cls(stats.piece_log2p, stats.piece_lead, bound)

    def first(self, n: int) -> "AnswerRows":
        """The first n rows (a site's own rows, without the model's output row after them)."""
        return AnswerRows(self.log2p_pieces[:n], self.lead[:n], self.bound[:n])

    @property
    def log2p(self) -> np.ndarray:
        """[R] the whole answer's log2 p."""
        return self.log2p_pieces.sum(-1)

    @property
    def min_lead(self) -> np.ndarray:
        """[R] the weakest piece's lead."""
        return self.lead.min(-1)

    def columns(self) -> dict[str, np.ndarray]:
        """Per-row columns of the next-token tables."""
        return {"answer_log2p": self.log2p, "answer_top1": self.min_lead > 0,
                "answer_min_lead_bits": self.min_lead,
                # the first piece's log2 p: no underflow, unlike log2 of p_answer
                "first_piece_log2p": self.log2p_pieces[:, 0],
                "first_piece_lead_bits": self.lead[:, 0]}

    def onset(self, threshold: float, run: int, pieces: slice = slice(None)) -> Milestone:
        """The first row where the pieces all lead by more than `threshold` bits (> 0: the
        top-1) at `run` consecutive rows, or UNDECIDED. A row certainly holds where every piece
        leads by more than the threshold plus its bound, certainly fails where some piece
        cannot lead by more than the threshold within its bound (a blanked row, NaN, is
        neither)."""
        holds, fails = self.states(threshold, pieces)
        return first_decided(holds, ~holds & ~fails, run)

    def states(self, threshold: float = 0.0,
               pieces: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """[R] each: the rows where the pieces certainly all lead by more than `threshold` bits
        (> 0: the whole answer is the top-1), and where some piece certainly does not; a row
        in neither is undecided."""
        lead, bound = self.lead[:, pieces], self.bound[:, pieces]
        return (lead - bound > threshold).all(-1), (lead + bound <= threshold).any(-1)


# the milestones that may be undecided
DECIDED_BY_BOUND = ("L_answer_top1", "L_answer_confirmed", "L_semantic_confirmed")


def answer_milestones(rows: AnswerRows, l_semantic: int | None, s: MilestoneSettings) -> dict:
    """The full-answer and confirmed milestones, each with its lead (bits) at its row, and the
    first piece's lead at the original's L_semantic."""
    out = {"L_answer_top1": rows.onset(0.0, 1),
           "L_answer_confirmed": rows.onset(s.margin_bits, s.consecutive),
           "L_semantic_confirmed": rows.onset(s.margin_bits, s.consecutive, slice(0, 1))}
    for key, lead in (("L_answer_top1", rows.min_lead), ("L_answer_confirmed", rows.min_lead),
                      ("L_semantic_confirmed", rows.lead[:, 0])):
        out[f"{key}_lead_bits"] = _at(lead, out[key])
    out["L_semantic_lead_bits"] = _at(rows.lead[:, 0], l_semantic)
    return out


def _at(values: np.ndarray, row: Milestone) -> float | None:
    return float(values[row]) if isinstance(row, int) else None


def is_filler(text: str) -> bool:
    """Whitespace or punctuation only: never evidence of copying."""
    return all(c.isspace() or c in string.punctuation for c in text)


def _contiguous(needle: Sequence[int], haystack: Sequence[int]) -> bool:
    k = len(needle)
    return any(list(haystack[i:i + k]) == list(needle) for i in range(len(haystack) - k + 1))


def copy_flags(stats: LayerStats, prompt_ids: Sequence[int], name: Callable[[int], str],
               s: MilestoneSettings) -> dict[str, np.ndarray]:
    """Per row at the next-token position: copy_strict_k{k} and copy_soft_k{k} (row 0 never:
    its echo is `embedding_echo`)."""
    top1 = stats.topk_ids[:, -1, 0]
    p1, p2 = stats.topk_probs[:, -1, 0], stats.topk_probs[:, -1, 1]
    filler = np.array([i < 0 or is_filler(name(int(i))) for i in top1])
    prompt = list(prompt_ids)
    out = {}
    for k in COPY_WINDOWS:
        found = np.zeros(len(top1), bool)
        for r in range(k, len(top1)):  # rows r - k + 1 .. r, all >= 1
            window = slice(r - k + 1, r + 1)
            found[r] = not filler[window].any() and _contiguous(top1[window].tolist(), prompt)
        out[f"copy_strict_k{k}"] = found & (p1 > s.strict_p) & (p1 - p2 > s.strict_margin)
        out[f"copy_soft_k{k}"] = found & (p1 > s.soft_p)
    return out


def copy_rules(s: MilestoneSettings) -> dict[str, str]:
    """Each copy milestone's rule in words, for the JSON beside its value."""
    test = {"strict": f"p1 > {s.strict_p} and p1 - p2 > {s.strict_margin}",
            "soft": f"p1 > {s.soft_p}"}
    return {f"L_copy_{kind}_k{k}": f"from row 1: the first layer whose top-1 ids over the last "
                                   f"{k} layer(s) (rows >= 1) are found contiguously in the "
                                   f"prompt, none whitespace or punctuation, with {test[kind]}"
            for kind in ("strict", "soft") for k in COPY_WINDOWS}


def copy_milestones(stats: LayerStats, prompt_ids: Sequence[int], flags: dict) -> dict:
    """Row 0's echo and the first row of each copy flag."""
    hits = {f"L_{key}": first_row(v) for key, v in flags.items()}
    return {"embedding_echo": bool(stats.topk_ids[0, -1, 0] == list(prompt_ids)[-1]),
            "embedding_echo_p": float(stats.topk_probs[0, -1, 0]), **hits}


def layer_or_never(value: Milestone) -> str:
    """A milestone on the console: its layer, 'undecided', or 'never' (JSON's null)."""
    return "never" if value is None else str(value)


def _row(value: Milestone, lead: float | None) -> str:
    if value is None:
        return "never"
    if value == UNDECIDED:
        return "undecided (a lead within its numeric bound, or a blanked row)"
    return f"layer {value} (lead {lead:.2f} bits)"


def describe(d: dict) -> str:
    """The full-answer, confirmed and copy milestones of a run's diagnostics, in one line that
    names the rules."""
    pieces = d["answer_pieces"]
    copies = [f"{c.removeprefix('copy_')} at {d[f'L_{c}']}" for c in COPY_COLUMNS
              if d.get(f"L_{c}") is not None]
    echo = ("row 0 echoes its input token (the embedding, not a copy); " if d["embedding_echo"]
            else "")
    return (f"whole answer {''.join(pieces)!r} ({len(pieces)} piece{'s' * (len(pieces) != 1)}): "
            f"top-1 {_row(d['L_answer_top1'], d['L_answer_top1_lead_bits'])}; confirmed "
            f"(every piece leads by > {d['margin_bits']:.2f} bits at {d['consecutive']} layers "
            "in a row) "
            f"{_row(d['L_answer_confirmed'], d['L_answer_confirmed_lead_bits'])}; first piece "
            f"confirmed {_row(d['L_semantic_confirmed'], d['L_semantic_confirmed_lead_bits'])} "
            "(layers decided within the fp32 decode's bound of this run's captured rows: "
            "another batch shape or backend can move a row by more); "
            f"{echo}copies from row 1: {', '.join(copies) or 'none'}; the original's rules "
            f"(from row 0, a layer below {d['entropy_bits']:g} bit a copy): L_copy "
            f"{layer_or_never(d['L_copy'])}, L_copy_H {layer_or_never(d['L_copy_H'])}, "
            f"delta_layers {'none' if d['delta_layers'] is None else d['delta_layers']}")
