"""A fact suite per layer: the answer's probability under its own prompt and under the control
prompt, the paired gain between them, the whole answer's log2 p, each with bootstrap bands, and
an entropy strip; one column per group."""
from __future__ import annotations

import pandas as pd
from matplotlib import colors
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mlx_lens.output.suite_tables import ALL
from mlx_lens.view.style import DPI, colour_top, styled

# p(control answer | control prompt) is not drawn: where the controls are the suite's own facts
# (the packaged suite's: the next country), its mean over facts is p(answer | prompt)'s, an
# identity. What informs is the answer under its own prompt against under the control prompt.
CONTROL = ("control prompt: each fact's control_prompt, which asks for another answer "
           "(the packaged suite: the next country, same template)")
ROWS = {  # metric -> (colour, style, label) per row that draws lines
    "p": {"p_answer": ("C0", dict(linewidth=2.0), "p(answer | prompt)"),
          "control_p_answer": ("C2", dict(linewidth=1.2, linestyle=":"),
                               "p(answer | control prompt)")},
    "gain": {"p_answer_gain": ("C3", dict(linewidth=1.5),
                               "p(answer | prompt) - p(answer | control prompt), per fact")},
    "log2p": {"answer_log2p": ("C0", dict(linewidth=1.5), "log2 p(whole answer | prompt)")},
}
_YLABELS = {"p": "probability: mean, 95% CI", "gain": "gain: mean, 95% CI",
            "log2p": "log2 p: mean, 95% CI"}


def _suite_groups(aggregates: pd.DataFrame) -> list[str]:
    named = sorted(set(aggregates["group"]) - {ALL})
    return [ALL, *named] if ALL in set(aggregates["group"]) else named


def _has(aggregates: pd.DataFrame, metric: str) -> bool:
    """The table has the metric with a value (suites from before it, or without controls, do
    not)."""
    return bool(aggregates.loc[aggregates["metric"] == metric, "mean"].notna().any())


def _lines(ax, rows: pd.DataFrame, lines: dict) -> None:
    for metric, (colour, style, label) in lines.items():
        m = rows[rows["metric"] == metric].sort_values("layer")
        if m.empty or m["mean"].isna().all():
            continue
        ax.fill_between(m["layer"], m["ci_low"], m["ci_high"], color=colour, alpha=0.25,
                        linewidth=0)
        ax.plot(m["layer"], m["mean"], color=colour, label=label, **style)
    ax.grid(alpha=0.3)


@styled
def suite_bands(aggregates: pd.DataFrame, title: str = "") -> Figure:
    """A fact suite per layer (Wendler et al. 2024's layout): the mean p(answer) under the
    fact's prompt and under its control prompt; the mean of their difference per fact, a paired
    gain (a row where the table has it); the whole answer's log2 p (where the table has it);
    each with its 95% bootstrap band, and a strip of the mean entropy below; one column per
    group ("all" first)."""
    groups = _suite_groups(aggregates)
    rows = ["p", *(r for r, metric in (("gain", "p_answer_gain"), ("log2p", "answer_log2p"))
                   if _has(aggregates, metric))]
    heights = {"p": 4, "gain": 2.5, "log2p": 3}
    fig = Figure(figsize=(1.6 + 3.4 * len(groups), 1.4 + sum(heights[r] for r in rows) * 0.9),
                 dpi=DPI, layout="constrained")
    axes = fig.subplots(len(rows) + 1, len(groups), sharex=True, sharey="row", squeeze=False,
                        height_ratios=[heights[r] for r in rows] + [1])
    norm = colors.Normalize(0.0, colour_top(aggregates.loc[aggregates["metric"] == "entropy",
                                                            "mean"]))
    for col, group in enumerate(groups):
        part = aggregates[aggregates["group"] == group]
        for row, name in enumerate(rows):
            _lines(axes[row, col], part, ROWS[name])
            if name == "gain":
                axes[row, col].axhline(0.0, color="0.3", linewidth=0.8)
        n = part.loc[part["metric"] == "p_answer", "n"]
        axes[0, col].set_title(f"{group} ({n.max() if len(n) else 0} facts)", parse_math=False)
        e = part[part["metric"] == "entropy"].sort_values("layer")
        strip = axes[-1, col]
        image = strip.imshow(e["mean"].to_numpy(dtype=float)[None, :], aspect="auto",
                             cmap="viridis", norm=norm, interpolation="nearest",
                             extent=(e["layer"].min() - 0.5, e["layer"].max() + 0.5, 0, 1))
        strip.set_yticks([])
        strip.set_xlabel("layer")
        strip.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].set_ylim(bottom=0.0)  # after every group is drawn: the row shares one scale
    for row, name in enumerate(rows):
        axes[row, 0].set_ylabel(_YLABELS[name])
        if axes[row, 0].get_lines():
            axes[row, 0].legend(loc="upper left" if name != "log2p" else "lower right",
                                fontsize=8)
    axes[-1, 0].set_ylabel("mean\nentropy")
    fig.colorbar(image, ax=axes[-1, :].tolist(), label="bits", aspect=6, pad=0.01)
    heading = f"{title}: fact suite per layer" if title else "fact suite per layer"
    fig.suptitle(f"{heading}\n{CONTROL}", parse_math=False, fontsize=10)
    return fig
