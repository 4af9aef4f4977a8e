"""The content of the original's artifacts (mlx_lens/output/artifacts.py writes them): the records
frame (every layer and position) and the pure next-token frame, with token names.

Column order is the original's; new columns are only ever appended.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd

from mlx_lens.core.contract import LayerStats
from mlx_lens.experiment.milestones import ANSWER_COLUMNS, COPY_COLUMNS
from mlx_lens.experiment.probes import TOP_K_RECORDS, TOP_K_VERBOSE

NEXT_TOKEN = "⟨NEXT⟩"  # the original's label for the pure next-token row
TOPK_COLUMNS = [c for i in range(1, TOP_K_VERBOSE + 1) for c in (f"top{i}", f"prob{i}")]
RECORD_COLUMNS = ["layer", "pos", "token", "entropy", *TOPK_COLUMNS, "rest_mass"]
PURE_COLUMNS = [*RECORD_COLUMNS, "copy_collapse", "entropy_collapse", "is_answer",
                "p_answer", "answer_rank", "kl_to_final_bits", "cos_to_final", "kl_bound_bits",
                *ANSWER_COLUMNS, *COPY_COLUMNS]


class TokenNames:
    """Decodes each distinct token id once."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode, self._cache = decode, {}

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id not in self._cache:
            self._cache[token_id] = self._decode([token_id])
        return self._cache[token_id]

    def topk(self, ids: np.ndarray, probs: np.ndarray, k: int) -> list[list]:
        """[[token, prob], ...] as the original's JSON holds it (id -1: no token)."""
        return [[self(i), float(p)] for i, p in zip(ids[:k], probs[:k]) if i >= 0]


def verbose_positions(prompt_tokens: Sequence[str], words: Sequence[str]) -> np.ndarray:
    """Positions that get 20 candidates: the last one and those holding one of `words`
    (mlx_lens/experiment/probes.py's verbose_words_for)."""
    verbose = np.array([any(w in tok for w in words) for tok in prompt_tokens], bool)
    verbose[-1] = True
    return verbose


def _topk_frame(stats: LayerStats, rows: np.ndarray, pos: np.ndarray, k: np.ndarray,
                names: TokenNames) -> pd.DataFrame:
    """top/prob columns (blank beyond each row's k) and rest_mass for cells (rows[i], pos[i])."""
    ids = stats.topk_ids[rows, pos, :TOP_K_VERBOSE]
    probs = stats.topk_probs[rows, pos, :TOP_K_VERBOSE]
    shown = (np.arange(TOP_K_VERBOSE)[None, :] < k[:, None]) & (ids >= 0)  # -1: blanked row
    cols = {}
    for j in range(TOP_K_VERBOSE):
        cols[f"top{j + 1}"] = [names(i) if s else "" for i, s in zip(ids[:, j], shown[:, j])]
        cols[f"prob{j + 1}"] = np.where(shown[:, j], probs[:, j], np.nan)
    frame = pd.DataFrame(cols)
    rest = np.clip(1.0 - np.where(shown, probs, 0.0).sum(1), 0.0, None)
    frame["rest_mass"] = np.where(shown.any(1), rest, np.nan)
    return frame


def records_frame(stats: LayerStats, prompt_tokens: Sequence[str], names: TokenNames,
                  verbose: np.ndarray) -> pd.DataFrame:
    """Every (layer, position); `verbose` (verbose_positions): the positions shown with 20."""
    n_rows, n_pos = stats.entropy.shape
    rows, pos = np.divmod(np.arange(n_rows * n_pos), n_pos)
    k = np.where(np.asarray(verbose, bool)[pos], TOP_K_VERBOSE, TOP_K_RECORDS)
    head = pd.DataFrame({"layer": rows, "pos": pos, "token": np.asarray(prompt_tokens, object)[pos],
                         "entropy": stats.entropy[rows, pos]})
    return pd.concat([head, _topk_frame(stats, rows, pos, k, names)], axis=1)[RECORD_COLUMNS]


def pure_next_token_frame(stats: LayerStats, flags: dict[str, np.ndarray], names: TokenNames,
                          answer: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """The last position per layer; `answer`: the full-answer and copy columns (None: not
    computed, empty cells)."""
    n_rows, n_pos = stats.entropy.shape
    rows, pos = np.arange(n_rows), np.full(n_rows, n_pos - 1)
    head = pd.DataFrame({"layer": rows, "pos": pos, "token": NEXT_TOKEN,
                         "entropy": stats.entropy[:, -1]})
    frame = pd.concat([head, _topk_frame(stats, rows, pos, np.full(n_rows, TOP_K_VERBOSE), names)],
                      axis=1)
    for name, values in flags.items():
        frame[name] = values
    frame["p_answer"] = stats.p_answer if stats.p_answer is not None else np.nan
    frame["answer_rank"] = rank_column(stats.answer_rank, frame.index)
    frame["kl_to_final_bits"] = stats.kl_to_final
    frame["cos_to_final"] = stats.cos_to_final
    frame["kl_bound_bits"] = stats.kl_bound if stats.kl_bound is not None else np.nan
    for name in (*ANSWER_COLUMNS, *COPY_COLUMNS):
        frame[name] = answer[name] if answer is not None else np.nan
    return frame[PURE_COLUMNS]


def rank_column(ranks: np.ndarray | None, index: pd.Index) -> pd.Series:
    """Ranks as nullable integers: a blanked row's -1, or no answer at all, is an empty cell."""
    rank = pd.Series(ranks if ranks is not None else pd.NA, index=index, dtype="Int64")
    return rank.where(rank > 0)
