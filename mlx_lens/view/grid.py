"""The logit-lens grid: a row per layer, a column per position, each cell its top-1 token,
coloured by entropy or p(top-1), the answer's cells boxed."""
from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import colors
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from mlx_lens.view.style import (BAD, DPI, MARK, colour_top, model_name, styled, text_colour,
                                 text_width, token_label, wrap)

GRID_COLOURS = ("entropy", "p1")
MIN_FONT = 5.0  # points: the smallest text a grid shrinks to
MAX_FONT = 8.0
MAX_COLUMNS = 64  # a longer prompt's grid shows its last positions (the next-token one stays)
_MAX_SIZE = (40.0, 30.0)  # inches; a grid shrinks its font (not below MIN_FONT) to stay inside


def _grid_cells(records: pd.DataFrame, value_column: str):
    """[layers, positions] arrays of the last MAX_COLUMNS positions: values and top-1 tokens;
    the layers, those positions' prompt tokens, and how many positions were left out."""
    wide = records.pivot(index="layer", columns="pos", values=[value_column, "top1"])
    positions = wide[value_column].columns.to_numpy()
    left_out = max(0, len(positions) - MAX_COLUMNS)
    tokens = records.drop_duplicates("pos").set_index("pos")["token"].reindex(positions)
    return (wide[value_column].to_numpy(dtype=float)[:, left_out:],
            wide["top1"].fillna("").to_numpy(dtype=object)[:, left_out:],
            wide.index.to_numpy(), tokens.fillna("").to_numpy(dtype=object)[left_out:], left_out)


@styled
def grid(records: pd.DataFrame, payload: dict, colour: str = "entropy") -> Figure:
    """The logit-lens grid: a row per layer (embeddings at the bottom, the model's output at the
    top), a column per prompt position, each cell its top-1 token, coloured by entropy in bits or
    by p(top-1). The last column is the next-token prediction; a box marks its cells where the
    answer is top-1. Font and figure size follow the number of rows and columns."""
    if colour not in GRID_COLOURS:
        raise ValueError(f"colour must be one of {GRID_COLOURS}, got {colour!r}")
    d = payload["diagnostics"]
    values, top1, layers, tokens, left_out = _grid_cells(
        records, "entropy" if colour == "entropy" else "prob1")
    n_rows, n_cols = values.shape
    cell_text = np.vectorize(token_label, otypes=[object])(top1)
    x_labels = [token_label(t) for t in tokens]
    y_labels = [str(layer) for layer in layers]
    what = "entropy (bits)" if colour == "entropy" else "p(top-1)"
    answer = d.get("answer_token")
    is_answer = np.zeros_like(values, dtype=bool)  # drawn in bold and boxed
    if answer is not None:
        is_answer[:, -1] = top1[:, -1] == answer
    cut = f", last {n_cols} of {n_cols + left_out} positions" if left_out else ""
    caption = (f"Cell: the top-1 prediction for the token after that position, colour: {what}. "
               "Rows: layers, 0 = embeddings, top = the model's output."
               + (f" Box: the answer {token_label(answer)!r} is top-1 at the next token (last "
                  "column)." if answer is not None else ""))

    # Text widths are measured at 1 pt and scale with the font: the widest cell text and tick
    # labels fix the cells and margins, so no text overflows its cell at any font size.
    widest_cell = max([text_width(t, 1.0) for t in set(cell_text.ravel()) | {"00"}]
                      + [text_width(t, 1.0, "bold") for t in cell_text[is_answer]])
    widest_x = max(text_width(t, 1.0) for t in x_labels)
    widest_y = max(text_width(t, 1.0) for t in y_labels)

    def layout(fs: float, title_lines: int) -> dict[str, float]:  # inches
        cell_w = (widest_cell + 1.6) * fs / 72
        cell_h = max(1.8 * fs / 72, 2.0 / n_rows)  # a few rows still leave room for the y label
        m = {"left": (widest_y + 3.5) * fs / 72 + 0.15, "right": 5.0 * fs / 72 + 0.45,
             "bottom": (widest_x + 3.5) * fs / 72 + 0.15,
             "top": 1.3 * title_lines * (fs + 1) / 72 + 0.2}
        width = max(n_cols * cell_w + m["left"] + m["right"], 6.5)
        return {**m, "axes_w": n_cols * cell_w, "axes_h": n_rows * cell_h, "width": width,
                "height": n_rows * cell_h + m["top"] + m["bottom"],
                "axes_x": (width - n_cols * cell_w - m["right"] + m["left"]) / 2}  # centred

    fs = MAX_FONT
    while fs > MIN_FONT and (layout(fs, 3)["width"] > _MAX_SIZE[0]
                             or layout(fs, 3)["height"] > _MAX_SIZE[1]):
        fs = max(MIN_FONT, fs - 0.25)
    size = layout(fs, 3)
    title = [f"{model_name(payload)}: logit lens ({d.get('lens', '?')}{cut})",
             *wrap(caption, (size["width"] - size["axes_x"] - 0.15) * 72, fs + 1)]
    size = layout(fs, len(title))
    fig = Figure(figsize=(size["width"], size["height"]), dpi=DPI)
    # Explicit axes geometry (not a layout engine): the cells are exactly the size measured.
    ax = fig.add_axes((size["axes_x"] / size["width"], size["bottom"] / size["height"],
                       size["axes_w"] / size["width"], size["axes_h"] / size["height"]))

    norm = colors.Normalize(0.0, colour_top(values) if colour == "entropy" else 1.0)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=BAD)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, origin="lower",
                      aspect="auto", interpolation="nearest")
    ink = text_colour(cmap(norm(np.ma.masked_invalid(values))))
    for r, c in zip(*np.nonzero(cell_text != "")):
        ax.text(c, r, cell_text[r, c], ha="center", va="center", fontsize=fs, color=ink[r, c],
                fontweight="bold" if is_answer[r, c] else "normal", parse_math=False)
    for r in np.flatnonzero(is_answer[:, -1]):
        ax.add_patch(Rectangle((n_cols - 1.5, r - 0.5), 1, 1, fill=False, edgecolor=MARK,
                               linewidth=max(1.0, fs / 4), zorder=3, clip_on=False))  # over spines
    ax.axvline(n_cols - 1.5, color="white", linewidth=max(1.5, fs / 3))  # next-token column

    ax.set_xticks(range(n_cols), x_labels, rotation=90, fontsize=fs, parse_math=False)
    ax.set_yticks(range(n_rows), y_labels, fontsize=fs)
    ax.tick_params(length=2)
    ax.set_xlabel("prompt token", fontsize=fs + 1)
    ax.set_ylabel("layer", fontsize=fs + 1)
    ax.set_title("\n".join(title), fontsize=fs + 1, loc="left", parse_math=False)
    cax = fig.add_axes(((size["axes_x"] + size["axes_w"] + 0.12) / size["width"],
                        size["bottom"] / size["height"], 0.15 / size["width"],
                        size["axes_h"] / size["height"]))
    bar = fig.colorbar(image, cax=cax)
    bar.set_label(what, fontsize=fs + 1)
    bar.ax.tick_params(labelsize=fs)
    return fig
