"""A tuned lens against the logit lens on held-out text (mlx-lens tune --eval): the picture
and its table, in the lens's folder."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from mlx_lens.core.contract import KL_TUNED
from mlx_lens.core.files import atomic_write
from mlx_lens.view.style import DPI, save_png, styled


@styled
def tuned_eval(frame: pd.DataFrame, title: str = "") -> Figure:
    """The tuned-lens paper's main figure: per layer, KL(model output || lens) and next-token
    cross-entropy on held-out text, logit lens vs tuned lens (and a J-lens, where the frame has
    one) (bits); the model's own cross-entropy dashed."""
    fig = Figure(figsize=(8.0, 6.0), dpi=DPI, layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    layer = frame["layer"].to_numpy()
    for ax, quantity, label in ((axes[0], "kl", f"{KL_TUNED} (bits)"),
                                (axes[1], "ce", "cross-entropy (bits)")):
        for i, lens in enumerate(n for n in ("logit", "tuned", "jlens")
                                 if f"{quantity}_{n}_bits" in frame):
            ax.plot(layer, frame[f"{quantity}_{lens}_bits"], marker="o", markersize=3,
                    color=f"C{i}", label=f"{lens} lens")
        ax.set_ylabel(label)
        ax.set_yscale("symlog", linthresh=1.0)  # the embedding row's 100+ bits and the last row's 0
        ax.grid(alpha=0.3)
    axes[1].axhline(float(frame["ce_logit_bits"].iloc[-1]), color="0.4", ls="--", lw=1,
                    label="the model's output")
    axes[1].legend(loc="best", fontsize=8)
    axes[-1].set_xlabel("layer (0: embeddings)")
    fig.suptitle(title.replace("$", r"\$") or "logit lens vs tuned lens")
    return fig


def write_eval(frame: pd.DataFrame, lens_dir: Path, model: str) -> list[Path]:
    """eval.csv and its picture eval.png in the lens's folder."""
    csv, png = Path(lens_dir) / "eval.csv", Path(lens_dir) / "eval.png"
    atomic_write(csv, lambda p: frame.to_csv(p, index=False))
    also = " and J-lens" if "kl_jlens_bits" in frame else ""
    save_png(tuned_eval(frame, f"{model}: logit lens vs tuned lens{also}, held-out text"), png)
    return [csv, png]
