"""A fact suite per layer: mean probabilities with bootstrap bands and an entropy strip, one
column per group."""
from __future__ import annotations

import pandas as pd
from matplotlib import colors
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mlx_lens.output.suite_tables import ALL
from mlx_lens.view.style import DPI, colour_top, styled


def _suite_groups(aggregates: pd.DataFrame) -> list[str]:
    named = sorted(set(aggregates["group"]) - {ALL})
    return [ALL, *named] if ALL in set(aggregates["group"]) else named


def _log2p_row(aggregates: pd.DataFrame, groups: list[str], axes) -> None:
    """Mean log2 p of the whole answer (teacher-forced) and of the control's whole answer,
    with their 95% bootstrap bands."""
    for ax, group in zip(axes, groups):
        rows = aggregates[aggregates["group"] == group]
        for metric, colour, style, label in (
                ("answer_log2p", "C0", "-", "log2 p(whole answer | prompt)"),
                ("control_log2p", "C1", "--", "log2 p(whole control answer | control prompt)")):
            m = rows[rows["metric"] == metric].sort_values("layer")
            if m.empty or m["mean"].isna().all():
                continue
            ax.fill_between(m["layer"], m["ci_low"], m["ci_high"], color=colour, alpha=0.25,
                            linewidth=0)
            ax.plot(m["layer"], m["mean"], color=colour, linestyle=style, label=label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("log2 p: mean, 95% CI")
    axes[0].legend(loc="lower right", fontsize=8)


@styled
def suite_bands(aggregates: pd.DataFrame, title: str = "") -> Figure:
    """A fact suite per layer (Wendler et al. 2024's layout): the mean p(answer), the controls'
    p(control answer) and p(answer | control prompt) (where the table has it) with their 95%
    bootstrap bands, and a strip of the mean entropy below; one column per group ("all"
    first)."""
    groups = _suite_groups(aggregates)
    # the whole answers' log2 p, where the table has it (suites from before it do not)
    whole = aggregates.loc[aggregates["metric"] == "answer_log2p", "mean"].notna().any()
    fig = Figure(figsize=(1.6 + 3.4 * len(groups), 8.0 if whole else 5.4), dpi=DPI,
                 layout="constrained")
    axes = fig.subplots(3 if whole else 2, len(groups), sharex=True, sharey="row", squeeze=False,
                        height_ratios=[4, 3, 1] if whole else [4, 1])
    if whole:
        _log2p_row(aggregates, groups, axes[1])
        axes = axes[[0, 2]]
    norm = colors.Normalize(0.0, colour_top(aggregates.loc[aggregates["metric"] == "entropy",
                                                            "mean"]))
    # The control is thin, dashed and on top: with an isomorphic control prompt (the default
    # suite's: the next country) its mean nearly equals the answer's, and both must show.
    lines = (("p_answer", "C0", dict(linewidth=2.0), "p(answer | prompt)"),
             ("control_p", "C1", dict(linewidth=1.2, linestyle="--"),
              "p(control answer | control prompt)"),
             ("control_p_answer", "C2", dict(linewidth=1.2, linestyle=":"),
              "p(answer | control prompt)"))
    for col, group in enumerate(groups):
        rows = aggregates[aggregates["group"] == group]
        top, strip = axes[0, col], axes[1, col]
        for metric, colour, style, label in lines:
            m = rows[rows["metric"] == metric].sort_values("layer")
            if m.empty or m["mean"].isna().all():  # no controls, or a table from before them
                continue
            top.fill_between(m["layer"], m["ci_low"], m["ci_high"], color=colour, alpha=0.25,
                             linewidth=0)
            top.plot(m["layer"], m["mean"], color=colour, label=label, **style)
        n = rows.loc[rows["metric"] == "p_answer", "n"]
        top.set_title(f"{group} ({n.max() if len(n) else 0} facts)", parse_math=False)
        top.grid(alpha=0.3)
        e = rows[rows["metric"] == "entropy"].sort_values("layer")
        image = strip.imshow(e["mean"].to_numpy(dtype=float)[None, :], aspect="auto",
                             cmap="viridis", norm=norm, interpolation="nearest",
                             extent=(e["layer"].min() - 0.5, e["layer"].max() + 0.5, 0, 1))
        strip.set_yticks([])
        strip.set_xlabel("layer")
        strip.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].set_ylim(bottom=0.0)  # after every group is drawn: the row shares one scale
    axes[0, 0].set_ylabel("probability: mean, 95% CI")
    axes[1, 0].set_ylabel("mean\nentropy")
    axes[0, 0].legend(loc="upper left", fontsize=8)
    fig.colorbar(image, ax=axes[1, :].tolist(), label="bits", aspect=6, pad=0.01)
    fig.suptitle(f"{title}: fact suite per layer" if title else "fact suite per layer",
                 parse_math=False)
    return fig
