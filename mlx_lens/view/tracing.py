"""Causal tracing's pictures (mlx_lens/experiment/tracing.py): one prompt's heatmaps of p(answer)
restored per kind, layer and position, as ROME draws them, and a fact suite's average indirect
effect per layer at each place of ROME's Figure 1."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mlx_lens.view.style import DPI, styled, token_label

# ROME's colours and titles per kind
_KINDS = {"resid": ("Purples", "residual at the block's start"),
          "attn": ("Reds", "attention output"), "mlp": ("Greens", "MLP output")}
_PLACES = {"first_subject": "first subject token", "middle_subject": "middle subject tokens",
           "last_subject": "last subject token", "first_after": "first token after",
           "further": "further tokens", "last": "last position"}


@styled
def heatmap(frame: pd.DataFrame, summary: dict) -> Figure:
    """Per kind, p(answer) restored at each layer (attn / mlp: the window's centre) and
    position; subject tokens starred. Colours run from the noised runs' p (ROME's low score)
    to the highest value drawn; nothing is clipped but values below the noised p, which the
    colour bar marks."""
    kinds = [k for k in summary["kinds"] if k in set(frame["kind"])]
    start, stop = summary["subject_span"]
    tokens = [token_label(t) + ("*" if start <= i < stop else "")
              for i, t in enumerate(summary["tokens"])]
    fig = Figure(figsize=(4.0 + 3.2 * len(kinds), 2.0 + 0.42 * len(tokens)), dpi=DPI,
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(kinds), sharey=True))
    low = summary["p_corrupted"]
    values = frame.loc[frame["kind"].isin(kinds), "p_answer"].to_numpy(dtype=float)
    high = max(float(np.nanmax(values)), summary["p_clean"], low + 1e-12)
    for ax, kind in zip(axes, kinds):
        grid = frame[frame["kind"] == kind].pivot(index="pos", columns="layer",
                                                  values="p_answer").sort_index()
        cmap, title = _KINDS[kind]
        image = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap=cmap, vmin=low,
                          vmax=high, origin="upper", interpolation="nearest")
        window = f" (window {summary['window']}, centred)" if kind != "resid" \
            and summary["window"] > 1 else ""
        ax.set_title(title + window, fontsize=9)
        ax.set_xlabel("layer" if kind == "resid" or summary["window"] == 1
                      else "centre of the restored blocks")
        ax.set_yticks(range(len(tokens)), tokens, fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        below = bool((values < low).any())
        fig.colorbar(image, ax=ax, shrink=0.8, extend="min" if below else "neither",
                     label=f"p({token_label(summary['answer'])})"
                     + (f"\nbelow {low:.3g} (the noised p): clipped" if below else ""))
    noise = summary["noise"]
    fig.suptitle(f"{summary['model']}: restoring the clean run into {noise['samples']} noised "
                 f"runs (subject * noised, sd {noise['sd']:.3g} = {noise['scale']:g} x "
                 f"{noise['embedding_std']:.3g}); p clean {summary['p_clean']:.3f}, noised "
                 f"{low:.3f}", parse_math=False, fontsize=10)
    return fig


@styled
def suite_plot(aggregates: pd.DataFrame, summary: dict) -> Figure:
    """Per kind, the average indirect effect on p(answer) by layer at each place, with its
    95% bootstrap band; the last subject token drawn strongest (ROME's headline: its MLP
    effect in early-middle layers)."""
    kinds = [k for k in summary["kinds"] if k in set(aggregates["kind"])]
    fig = Figure(figsize=(4.2 * len(kinds), 4.0), dpi=DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(kinds), sharey=True))
    for ax, kind in zip(axes, kinds):
        for i, place in enumerate(p for p in _PLACES if p in set(aggregates["place"])):
            rows = aggregates[(aggregates["kind"] == kind) & (aggregates["place"] == place)]
            strong = place == "last_subject"
            layer = rows["layer"].to_numpy()
            ax.plot(layer, rows["effect_mean"], color=f"C{i}", label=_PLACES[place],
                    linewidth=2.2 if strong else 1.0)
            ax.fill_between(layer, rows["effect_ci_low"], rows["effect_ci_high"],
                            color=f"C{i}", alpha=0.25 if strong else 0.1)
        ax.axhline(0, color="0.5", linewidth=0.6)
        window = f", window {summary['window']} centred" if kind != "resid" \
            and summary["window"] > 1 else ""
        ax.set_title(_KINDS[kind][1] + window, fontsize=9)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("average indirect effect on p(answer)\n(95% band over "
                       f"{aggregates['ci_unit'].iloc[0]}s)")
    axes[0].legend(loc="best", fontsize=7)
    noise = summary["noise"]
    fig.suptitle(f"{summary['model']}: causal tracing of {summary['traced']} of "
                 f"{summary['facts']} facts ({noise['samples']} noise samples, sd "
                 f"{noise['sd']:.3g} = {noise['scale']:g} x {noise['embedding_std']:.3g})",
                 parse_math=False, fontsize=10)
    return fig
