"""The next-token trajectory under every lens of a run (`--lenses`): one line per lens, the
middle of each block as dots at depth i + 0.5, the lens-agreement onset marked."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mlx_lens.core.contract import KL_TO_FINAL
from mlx_lens.view.style import DPI, MARK, model_name, styled

_PANELS = (("answer_rank", "answer rank (1 = top-1)"), ("answer_log2p", "log2 p: whole answer"),
           ("entropy_bits", "entropy (bits)"), ("kl_to_final_bits", f"{KL_TO_FINAL} (bits)"))


@styled
def lens_trajectory(lenses: pd.DataFrame, payload: dict) -> Figure:
    """Per layer at the next-token position, under each lens: the first piece's rank, the
    whole answer's log2 p, entropy and KL(layer || final); lines between blocks, dots in
    the middle of each block."""
    section = payload.get("lenses", {})
    order = section.get("lenses") or list(pd.unique(lenses["lens"]))
    fig = Figure(figsize=(8.0, 10.0), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(_PANELS), 1, sharex=True)
    for i, lens in enumerate(order):
        colour = f"C{i % 10}"
        for site, style in (("resid", dict(marker=".", linestyle="-")),
                            ("mid", dict(marker="o", markersize=3, linestyle="none"))):
            rows = lenses[(lenses["lens"] == lens) & (lenses["site"] == site)]
            if rows.empty:
                continue
            depth = rows["depth"].to_numpy(dtype=float)
            label = lens if site == "resid" else f"{lens}, middle of block"
            for ax, (column, _) in zip(axes, _PANELS):
                ax.plot(depth, rows[column].to_numpy(dtype=float, na_value=np.nan), color=colour,
                        label=label, **style)
    for ax, (_, label) in zip(axes, _PANELS):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    onset = section.get("lens_agreement_onset")
    if isinstance(onset, int):
        for ax in axes:
            ax.axvline(onset, color=MARK, linestyle=":", linewidth=1.2,
                       label=f"lens-agreement onset = {onset}")
    legend = axes[0].legend(loc="best", fontsize=7)
    for text in legend.get_texts():
        text.set_parse_math(False)
    axes[-1].set_xlabel("layer (0 = embeddings; x.5 = the middle of block x)")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    undecided = "" if onset is None or isinstance(onset, int) else f"; lens-agreement onset {onset}"
    fig.suptitle(f"{model_name(payload)}: next-token trajectory under each lens{undecided}",
                 parse_math=False)
    return fig
