"""Numeric health of a sweep: NaN or inf in a captured residual or a lens row.

A broken checkpoint or an overflow in half precision makes rows non-finite; their statistics
would be garbage that still looks like numbers (a top-1 id picked among NaNs, a rest mass of 1).
Such rows are reported by layer and blanked: their cells are written empty, never as numbers.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mlx_lens.core.contract import LayerStats


def nonfinite_layers(stats: LayerStats) -> dict[str, list[int]]:
    """Layers (rows) whose residual, or whose lens statistics at any position, are not finite."""
    residual = ([] if stats.finite_residual is None
                else np.flatnonzero(~stats.finite_residual).tolist())
    lens = ~np.isfinite(stats.entropy).all(-1) | ~np.isfinite(stats.topk_probs).all((-1, -2))
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


def checked(stats: LayerStats) -> tuple[LayerStats, dict[str, list[int]]]:
    """The statistics with every non-finite row blanked, and the report of those rows."""
    report = nonfinite_layers(stats)
    return blank_rows(stats, sorted(set().union(*report.values()))), report


def warning(health: dict[str, list[int]]) -> str | None:
    """One line for the console, or None when every row is finite."""
    residual, lens = health["nonfinite_residual_layers"], health["nonfinite_lens_layers"]
    if not residual and not lens:
        return None
    parts = [f"in the residual stream at layers {_list(residual)}" if residual else "",
             f"in the lens at layers {_list(lens)}" if lens else ""]
    return (f"non-finite values (NaN/inf) {' and '.join(p for p in parts if p)}; "
            "those rows are written as empty cells")


def _list(layers: list[int]) -> str:
    return ", ".join(map(str, layers))
