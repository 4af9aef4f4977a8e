"""An activation-patching trace as a three-panel heatmap: per kind (the residual at the start of
each block, each block's attention and MLP output), layer by position, the share of the clean
run's metric that restoring there brings back."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from mlx_lens.view.style import DPI, styled, token_label

_TITLES = {"resid": "residual at the block's start", "attn": "attention output",
           "mlp": "MLP output"}


@styled
def heatmap(frame: pd.DataFrame, summary: dict) -> Figure:
    kinds = [k for k in summary["kinds"] if k in set(frame["kind"])]
    tokens = [token_label(t) for t in summary["tokens"]]
    fig = Figure(figsize=(4.0 + 3.2 * len(kinds), 2.0 + 0.42 * len(tokens)), dpi=DPI,
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(kinds), sharey=True))
    image = None
    for ax, kind in zip(axes, kinds):
        rows = frame[frame["kind"] == kind]
        grid = rows.pivot(index="pos", columns="layer", values="recovery").sort_index()
        image = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="Purples", vmin=0,
                          vmax=1, origin="upper", interpolation="nearest")
        ax.set_title(_TITLES[kind] + (f" (window {summary['window']}, centred)"
                                      if kind != "resid" and summary["window"] > 1 else ""),
                     fontsize=9)
        ax.set_xlabel("layer")
        ax.set_yticks(range(len(tokens)), tokens, fontsize=8)
        subject = summary.get("first_difference_position")
        if subject is not None:
            ax.axhline(subject, color="C1", linewidth=0.8, linestyle=":")
    # The colours span [0, 1]; a value outside (restoring overshoots, or moves the metric the
    # other way) takes the end's colour, and the colour bar says so with an arrow and its range.
    values = frame.loc[frame["kind"].isin(kinds), "recovery"].to_numpy(dtype=float)
    low, high = (np.nanmin(values), np.nanmax(values)) if np.isfinite(values).any() else (0, 1)
    extend = {(False, False): "neither", (True, False): "min", (False, True): "max",
              (True, True): "both"}[low < 0, high > 1]
    label = "recovery (0: corrupted, 1: clean)"
    if extend != "neither":
        label += f"\nclipped to [0, 1]: values span {low:.2f} to {high:.2f}"
    fig.colorbar(image, ax=axes, shrink=0.8, label=label, extend=extend)
    fig.suptitle(f"{summary['model']}: restoring the clean run ({summary['metric']}); "
                 f"{token_label(summary['answer'])!r} vs "
                 f"{token_label(summary['corrupt_answer'] or '-')!r}", parse_math=False,
                 fontsize=10)
    return fig


@styled
def suite_heatmap(aggregates: pd.DataFrame, summary: dict) -> Figure:
    """A fact suite's trace: per kind, the recovery pooled over facts per layer (the mean in a
    folder written before it was pooled) with its 95% bootstrap band, restored at the prompt's
    last position and at the subject."""
    kinds = [k for k in summary["kinds"] if k in set(aggregates["kind"])]
    pooled = "pooled" in aggregates
    value, low, high = ("pooled", "pooled_ci_low", "pooled_ci_high") if pooled else \
        ("mean", "ci_low", "ci_high")
    fig = Figure(figsize=(4.0 * len(kinds), 3.8), dpi=DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(kinds), sharey=True))
    for ax, kind in zip(axes, kinds):
        for i, where in enumerate(("subject", "last")):
            rows = aggregates[(aggregates["kind"] == kind) & (aggregates["where"] == where)]
            layer = rows["layer"].to_numpy()
            label = "at the subject" if where == "subject" else "at the last position"
            ax.plot(layer, rows[value], color=f"C{i}", label=label)
            ax.fill_between(layer, rows[low], rows[high], color=f"C{i}", alpha=0.25)
        ax.set_title(_TITLES[kind], fontsize=9)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"recovery ({'pooled over facts' if pooled else 'mean'}, 95% band)")
    axes[0].legend(loc="best", fontsize=8)
    left_out = len(summary.get("gap_not_positive", []))
    aggregated = summary.get("aggregated", summary["patched"])  # a folder from before it: all
    fig.suptitle(f"{summary['model']}: restoring each fact against its control "
                 f"({aggregated} of {summary['facts']} facts"
                 + (f"; {left_out} patched with a gap <= 0 left out" if left_out else "") + ")",
                 fontsize=10)
    return fig
