"""The next-token position per layer (entropy, p(answer), rank, KL to final), for one model,
and several models' trajectories overlaid against relative depth."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mlx_lens.view.style import DPI, MARK, model_name, styled, token_label


def _collapse_lines(axes, d: dict) -> None:
    """L_copy and L_semantic, where the run found them, as labelled vertical lines."""
    for name, style in (("L_copy", "--"), ("L_semantic", ":")):
        if d.get(name) is not None:
            for ax in axes:
                ax.axvline(d[name], color=MARK if name == "L_semantic" else "0.35",
                           linestyle=style, linewidth=1.2, label=f"{name} = {d[name]}")


@styled
def trajectory(pure: pd.DataFrame, payload: dict) -> Figure:
    """The next-token position per layer: entropy, p(answer), the answer's rank and KL to the
    final distribution, with L_copy and L_semantic marked."""
    d = payload["diagnostics"]
    fig = Figure(figsize=(8.0, 9.0), dpi=DPI, layout="constrained")
    axes = fig.subplots(4, 1, sharex=True)
    layer = pure["layer"].to_numpy()
    panels = (("entropy", "entropy (bits)"), ("p_answer", "p(answer)"),
              ("answer_rank", "answer rank (1 = top-1)"), ("kl_to_final_bits", "KL to final (bits)"))
    for ax, (column, label) in zip(axes, panels):
        ax.plot(layer, pure[column].to_numpy(dtype=float, na_value=np.nan), marker=".",
                color="C0")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_ylim(-0.02, 1.02)
    axes[2].set_yscale("log")
    _collapse_lines(axes, d)
    if d.get("L_copy") is not None or d.get("L_semantic") is not None:
        axes[0].legend(loc="best", fontsize=8)
    axes[-1].set_xlabel("layer (0 = embeddings)")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    answer = d.get("answer_token")
    fig.suptitle(f"{model_name(payload)}: next-token trajectory ({d.get('lens', '?')})"
                 + (f", answer {token_label(answer)!r}" if answer is not None else ""),
                 parse_math=False)
    return fig


@styled
def overlay(runs: dict[str, tuple[pd.DataFrame, dict]]) -> Figure:
    """Several models' next-token trajectories (entropy, p(answer), KL to final) against
    relative depth, layer / L: one line per model."""
    fig = Figure(figsize=(8.0, 7.5), dpi=DPI, layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    panels = (("entropy", "entropy (bits)"), ("p_answer", "p(answer)"),
              ("kl_to_final_bits", "KL to final (bits)"))
    for i, (name, (pure, _)) in enumerate(runs.items()):
        layer = pure["layer"].to_numpy(dtype=float)
        depth = layer / max(layer.max(), 1.0)
        for ax, (column, _) in zip(axes, panels):
            ax.plot(depth, pure[column].to_numpy(dtype=float, na_value=np.nan), color=f"C{i % 10}",
                    label=name)
    for ax, (_, label) in zip(axes, panels):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_ylim(-0.02, 1.02)
    axes[-1].set_xlabel("relative depth (layer / number of layers)")
    axes[-1].set_xlim(0.0, 1.0)
    legend = axes[0].legend(loc="best", fontsize=8)
    for text in legend.get_texts():
        text.set_parse_math(False)
    fig.suptitle(f"next-token trajectories of {len(runs)} models")
    return fig
