"""Numeric health of a sweep: NaN or inf in a captured residual or a lens row, and a KL to the
final row below minus its error bound.

A broken checkpoint or an overflow in half precision makes rows non-finite; their statistics
would be garbage that still looks like numbers (a top-1 id picked among NaNs, a rest mass of 1).
Such rows are reported by layer and blanked: their cells are written empty, never as numbers.
A logit of -inf (or any non-finite logit) makes its row's statistics non-finite in both
reducers (0 x -inf in the vocabulary sums), so such a row is reported and blanked the same way.

KL is >= 0 in exact arithmetic; the reducers report the value as computed, and one below minus
its derived bound (`LayerStats.kl_bound`) is a cancellation the bound does not cover: reported
by layer, the value kept as it is.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mlx_lens.core.contract import KL_TO_FINAL, LayerStats


def nonfinite_layers(stats: LayerStats) -> dict[str, list[int]]:
    """Layers (rows) whose residual, or whose lens statistics at any position, are not finite."""
    residual = ([] if stats.finite_residual is None
                else np.flatnonzero(~stats.finite_residual).tolist())
    lens = ~np.isfinite(stats.entropy).all(-1) | ~np.isfinite(stats.topk_probs).all((-1, -2))
    if stats.piece_log2p is not None:  # the answer's teacher-forced positions too
        lens |= ~np.isfinite(stats.piece_log2p).all(-1)
    return {"nonfinite_residual_layers": residual,
            "nonfinite_lens_layers": np.flatnonzero(lens).tolist()}


def blank_rows(stats: LayerStats, rows: list[int]) -> LayerStats:
    """The same statistics with `rows` blanked: NaN values, top-k ids -1 (no token), rank -1."""
    if not rows:
        return stats
    out = {}
    for f in dataclasses.fields(stats):
        value = getattr(stats, f.name)
        if isinstance(value, np.ndarray) and f.name != "finite_residual":
            value = value.copy()
            value[rows] = -1 if value.dtype.kind == "i" else np.nan
        out[f.name] = value
    return LayerStats(**out)


def kl_below_bound_layers(stats: LayerStats) -> list[int]:
    """Layers whose KL to the final row is below minus its error bound."""
    if stats.kl_bound is None:
        return []
    return np.flatnonzero(stats.kl_to_final < -stats.kl_bound).tolist()


def checked(stats: LayerStats) -> tuple[LayerStats, dict[str, list[int]]]:
    """The statistics with every non-finite row blanked, and the report of those rows and of
    the rows whose KL is below its bound (kept)."""
    report = nonfinite_layers(stats)
    blanked = blank_rows(stats, sorted(set().union(*report.values())))
    return blanked, {**report, "kl_below_bound_layers": kl_below_bound_layers(stats)}


def warning(health: dict[str, list[int]]) -> str | None:
    """One line for the console, or None when there is no finding."""
    residual, lens = health["nonfinite_residual_layers"], health["nonfinite_lens_layers"]
    negative = health.get("kl_below_bound_layers", [])
    where = [f"in the residual stream at layers {_list(residual)}" if residual else "",
             f"in the lens at layers {_list(lens)}" if lens else ""]
    parts = [f"non-finite values (NaN/inf) {' and '.join(w for w in where if w)}; "
             "those rows are written as empty cells" if residual or lens else "",
             f"{KL_TO_FINAL} below minus its error bound at layers {_list(negative)} "
             "(docs/numerics.md §2)" if negative else ""]
    return "; ".join(p for p in parts if p) or None


def brief(health: dict[str, list[int]]) -> str:
    """The findings of one report in a few words, for a suite's line."""
    blanked = sorted(set(health["nonfinite_residual_layers"]) | set(health["nonfinite_lens_layers"]))
    negative = health.get("kl_below_bound_layers", [])
    return ", ".join(p for p in [f"non-finite at layers {_list(blanked)}" if blanked else "",
                                 f"{KL_TO_FINAL} below its bound at layers {_list(negative)}"
                                 if negative else ""] if p)


def _list(layers: list[int]) -> str:
    return ", ".join(map(str, layers))
