"""The next-token position per layer (entropy, p(answer), rank, KL(layer || final)), for one model,
and several models' trajectories overlaid against relative depth."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mlx_lens.core.contract import KL_TO_FINAL
from mlx_lens.view.style import DPI, MARK, model_name, styled, token_label


# copies from row 1, not the original's L_copy: from row 0, a tied head's embedding decodes to
# its own input token, and its entropy fallback calls any confident layer a copy
_LINES = (("L_copy_strict_k1", "--", "0.35"), ("L_copy_soft_k1", "-.", "0.6"),
          ("L_semantic", ":", MARK), ("L_answer_confirmed", "-", "C2"))


def _collapse_lines(axes, d: dict) -> None:
    """The first copies from row 1, L_semantic and the whole answer's confirmed onset, where
    the run found them, as labelled vertical lines (an undecided onset is named in the legend,
    without a line)."""
    for name, style, colour in _LINES:
        value = d.get(name)
        if isinstance(value, int):
            lead = d.get(f"{name}_lead_bits")
            label = f"{name} = {value}" + (f" (lead {lead:.2f} bits)" if lead is not None else "")
            for ax in axes:
                ax.axvline(value, color=colour, linestyle=style, linewidth=1.2, label=label)
        elif value is not None:
            axes[0].plot([], [], color=colour, linestyle=style, label=f"{name}: {value}")


@styled
def trajectory(pure: pd.DataFrame, payload: dict) -> Figure:
    """The next-token position per layer: entropy, p(answer), the answer's rank, the whole
    answer's log2 p against its first piece's (where the run scored it) and KL(layer || final),
    with the first copies from row 1, L_semantic and the confirmed onset marked."""
    d = payload["diagnostics"]
    whole = "answer_log2p" in pure.columns  # runs from before full-answer scoring lack it
    fig = Figure(figsize=(8.0, 11.0 if whole else 9.0), dpi=DPI, layout="constrained")
    axes = fig.subplots(5 if whole else 4, 1, sharex=True)
    layer = pure["layer"].to_numpy()
    panels = [("entropy", "entropy (bits)"), ("p_answer", "p(answer)"),
              ("answer_rank", "answer rank (1 = top-1)"), ("kl_to_final_bits", f"{KL_TO_FINAL} (bits)")]
    if whole:
        panels.insert(3, ("answer_log2p", "log2 p: whole answer"))
    for ax, (column, label) in zip(axes, panels):
        ax.plot(layer, pure[column].to_numpy(dtype=float, na_value=np.nan), marker=".",
                color="C0", label="log2 p: whole answer" if column == "answer_log2p" else None)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if whole:  # the first piece beside the whole answer: what first-token scoring sees
        first = (pure["first_piece_log2p"].to_numpy(dtype=float, na_value=np.nan)
                 if "first_piece_log2p" in pure.columns  # runs before it: p underflows
                 else np.log2(pure["p_answer"].to_numpy(dtype=float, na_value=np.nan)))
        axes[3].plot(layer, first, color="C1", linestyle="--", label="log2 p: first piece")
        axes[3].set_ylabel("log2 p(answer)")
        axes[3].legend(loc="best", fontsize=8)
    axes[1].set_ylim(-0.02, 1.02)
    axes[2].set_yscale("log")
    _collapse_lines(axes, d)
    if any(d.get(name) is not None for name, _, _ in _LINES):
        axes[0].legend(loc="best", fontsize=8)
    axes[-1].set_xlabel("layer (0 = embeddings)")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    answer = "".join(d["answer_pieces"]) if "answer_pieces" in d else d.get("answer_token")
    fig.suptitle(f"{model_name(payload)}: next-token trajectory ({d.get('lens', '?')})"
                 + (f", answer {token_label(answer)!r}" if answer is not None else ""),
                 parse_math=False)
    return fig


@styled
def overlay(runs: dict[str, tuple[pd.DataFrame, dict]]) -> Figure:
    """Several models' next-token trajectories (entropy, p(answer), KL(layer || final)) against
    relative depth, layer / L: one line per model."""
    fig = Figure(figsize=(8.0, 7.5), dpi=DPI, layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    panels = (("entropy", "entropy (bits)"), ("p_answer", "p(answer)"),
              ("kl_to_final_bits", f"{KL_TO_FINAL} (bits)"))
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
