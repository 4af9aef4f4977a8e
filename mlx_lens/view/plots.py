"""Pictures of a run, drawn from its artifacts alone (no model): the logit-lens grid, the
next-token trajectory, a fact suite's bands, and several models' trajectories overlaid.

Figures are plain `matplotlib.figure.Figure` objects, never pyplot's: nothing here needs a
display or touches the caller's backend (pyplot's notebook figures stay as they are), and a
figure is freed like any object once dropped, so no figure manager can leak them.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import colors, font_manager
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.textpath import text_to_path
from matplotlib.ticker import MaxNLocator

from mlx_lens.core.files import atomic_write
from mlx_lens.output.artifacts import read_csv
from mlx_lens.output.suite_tables import ALL
from mlx_lens.core.errors import LensError
from mlx_lens.output.suite_tables import read_suite_table

DPI = 120
GRID_COLOURS = ("entropy", "p1")
MIN_FONT = 5.0  # points: the smallest text a grid shrinks to
MAX_FONT = 8.0
LABEL_CHARS = 8  # a token longer than this is cut and ends in "…"
MAX_COLUMNS = 64  # a longer prompt's grid shows its last positions (the next-token one stays)
_MAX_SIZE = (40.0, 30.0)  # inches; a grid shrinks its font (not below MIN_FONT) to stay inside
_BAD = "#d9d9d9"  # cells of rows blanked as non-finite
_MARK = "#e41a1c"  # the answer's boxes and the collapse lines
_WHITESPACE = {" ": "␣", "\n": "⏎", "\t": "⇥"}
# Fonts tried after DejaVu Sans, for glyphs it lacks (CJK, symbols), where installed.
_FALLBACK_FONTS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans", "Noto Sans Symbols 2",
                   "Arial Unicode MS", "PingFang SC", "Hiragino Sans", "Apple SD Gothic Neo",
                   "Apple Symbols", "Microsoft YaHei", "Segoe UI Symbol")


@functools.lru_cache(maxsize=1)
def _fonts() -> tuple[list[str], frozenset[int]]:
    """The font families text is drawn in (matplotlib falls back along the list per glyph) and
    the code points they cover."""
    installed = {f.name for f in font_manager.fontManager.ttflist}
    families = ["DejaVu Sans", *(f for f in _FALLBACK_FONTS if f in installed)]
    covered: set[int] = set()
    for family in families:
        path = font_manager.findfont(font_manager.FontProperties(family=family),
                                     fallback_to_default=False)
        covered.update(font_manager.get_font(path).get_charmap())
    return families, frozenset(covered)


def _style():
    """Never LaTeX (a token is text, whatever the user's rc file says); the fonts above."""
    return matplotlib.rc_context({"text.usetex": False, "font.family": _fonts()[0]})


def _styled(draw: Callable) -> Callable:
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with _style():
            return draw(*args, **kwargs)
    return wrapper


def token_label(token: str, chars: int = LABEL_CHARS) -> str:
    """A token as the pictures show it: spaces as "␣" (as the HTML report shows them),
    newlines as "⏎", tabs as "⇥", other invisible characters as escapes; cut to `chars`
    characters and "…"; a glyph no installed font has as "□" (rather than a warning per
    glyph). Draw it with parse_math=False."""
    shown = "".join(_WHITESPACE.get(c) or (c if c.isprintable() else ascii(c)[1:-1])
                    for c in token)
    if len(shown) > chars:
        shown = shown[:chars] + "…"
    covered = _fonts()[1]
    return "".join(c if ord(c) in covered else "□" for c in shown)


def _text_width(text: str, size: float, weight: str = "normal") -> float:
    """Width in points of text drawn at `size` points."""
    prop = font_manager.FontProperties(family=_fonts()[0], size=size, weight=weight)
    return text_to_path.get_text_width_height_descent(text, prop, ismath=False)[0]


def _colour_top(values) -> float:
    """The top of an entropy colour scale: the largest finite value, at least 1 bit."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    return max(1.0, float(finite.max())) if finite.size else 1.0


def _model(payload: dict) -> str:
    return payload["diagnostics"].get("model", "?")


def _text_colour(rgba: np.ndarray) -> np.ndarray:
    """Black on light cells, white on dark ones (ITU-R 601 luma)."""
    luma = rgba[..., :3] @ np.array([0.299, 0.587, 0.114])
    return np.where(luma[..., None] > 0.5, colors.to_rgba_array("black"),
                    colors.to_rgba_array("white"))


def _wrap(text: str, width: float, size: float) -> list[str]:
    """text broken at spaces into lines at most `width` points wide at `size` points."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and _text_width(f"{lines[-1]} {word}", size) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


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


@_styled
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
    widest_cell = max([_text_width(t, 1.0) for t in set(cell_text.ravel()) | {"00"}]
                      + [_text_width(t, 1.0, "bold") for t in cell_text[is_answer]])
    widest_x = max(_text_width(t, 1.0) for t in x_labels)
    widest_y = max(_text_width(t, 1.0) for t in y_labels)

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
    title = [f"{_model(payload)}: logit lens ({d.get('lens', '?')}{cut})",
             *_wrap(caption, (size["width"] - size["axes_x"] - 0.15) * 72, fs + 1)]
    size = layout(fs, len(title))
    fig = Figure(figsize=(size["width"], size["height"]), dpi=DPI)
    # Explicit axes geometry (not a layout engine): the cells are exactly the size measured.
    ax = fig.add_axes((size["axes_x"] / size["width"], size["bottom"] / size["height"],
                       size["axes_w"] / size["width"], size["axes_h"] / size["height"]))

    norm = colors.Normalize(0.0, _colour_top(values) if colour == "entropy" else 1.0)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=_BAD)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, origin="lower",
                      aspect="auto", interpolation="nearest")
    ink = _text_colour(cmap(norm(np.ma.masked_invalid(values))))
    for r, c in zip(*np.nonzero(cell_text != "")):
        ax.text(c, r, cell_text[r, c], ha="center", va="center", fontsize=fs, color=ink[r, c],
                fontweight="bold" if is_answer[r, c] else "normal", parse_math=False)
    for r in np.flatnonzero(is_answer[:, -1]):
        ax.add_patch(Rectangle((n_cols - 1.5, r - 0.5), 1, 1, fill=False, edgecolor=_MARK,
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


def _collapse_lines(axes, d: dict) -> None:
    """L_copy and L_semantic, where the run found them, as labelled vertical lines."""
    for name, style in (("L_copy", "--"), ("L_semantic", ":")):
        if d.get(name) is not None:
            for ax in axes:
                ax.axvline(d[name], color=_MARK if name == "L_semantic" else "0.35",
                           linestyle=style, linewidth=1.2, label=f"{name} = {d[name]}")


@_styled
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
    fig.suptitle(f"{_model(payload)}: next-token trajectory ({d.get('lens', '?')})"
                 + (f", answer {token_label(answer)!r}" if answer is not None else ""),
                 parse_math=False)
    return fig


def _suite_groups(aggregates: pd.DataFrame) -> list[str]:
    named = sorted(set(aggregates["group"]) - {ALL})
    return [ALL, *named] if ALL in set(aggregates["group"]) else named


@_styled
def suite_bands(aggregates: pd.DataFrame, title: str = "") -> Figure:
    """A fact suite per layer (Wendler et al. 2024's layout): the mean p(answer), the controls'
    p(control answer) and p(answer | control prompt) (where the table has it) with their 95%
    bootstrap bands, and a strip of the mean entropy below; one column per group ("all"
    first)."""
    groups = _suite_groups(aggregates)
    fig = Figure(figsize=(1.6 + 3.4 * len(groups), 5.4), dpi=DPI, layout="constrained")
    axes = fig.subplots(2, len(groups), sharex=True, sharey="row", squeeze=False,
                        height_ratios=[4, 1])
    norm = colors.Normalize(0.0, _colour_top(aggregates.loc[aggregates["metric"] == "entropy",
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


@_styled
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


@_styled
def tuned_eval(frame: pd.DataFrame, title: str = "") -> Figure:
    """The tuned-lens paper's main figure: per layer, KL to the model's output and next-token
    cross-entropy on held-out text, logit lens vs tuned lens (bits); the model's own
    cross-entropy dashed."""
    fig = Figure(figsize=(8.0, 6.0), dpi=DPI, layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    layer = frame["layer"].to_numpy()
    for ax, quantity, label in ((axes[0], "kl", "KL(model || lens) (bits)"),
                                (axes[1], "ce", "cross-entropy (bits)")):
        for i, lens in enumerate(("logit", "tuned")):
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
    save_png(tuned_eval(frame, f"{model}: logit lens vs tuned lens, held-out text"), png)
    return [csv, png]


_RECORD_NEEDS = ("layer", "pos", "token", "entropy", "top1", "prob1")
_PURE_NEEDS = ("layer", "entropy", "p_answer", "answer_rank", "kl_to_final_bits")
_AGGREGATE_NEEDS = ("group", "layer", "metric", "n", "mean", "ci_low", "ci_high")


def _read(path: Path, reader: Callable, needs: tuple[str, ...] = ()):
    """One artifact, or a one-line LensError naming it."""
    try:
        table = reader(path)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LensError(f"cannot read {path}: {reason}") from None
    missing = [c for c in needs if c not in table.columns]
    if missing:
        raise LensError(f"cannot read {path}: no column {', '.join(missing)}")
    return table


def _payload(path: Path) -> dict:
    payload = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(payload, dict) or not isinstance(payload.get("diagnostics"), dict):
        raise ValueError("no diagnostics")
    return payload


def save_png(fig: Figure, path: Path) -> Path:
    # A temporary name, then a rename: a reader never sees half a PNG.
    with _style():
        atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=DPI))
    return path


def draw_run_dir(run_dir: Path, colour: str = "entropy") -> list[Path]:
    """Every picture of a run folder, from its artifacts: per model plot-<model>-grid.png,
    plot-<model>-trajectory.png and, with a fact suite, plot-<model>-suite.png; with two models
    or more, plot-overlay.png. Every artifact is read before anything is drawn."""
    run_dir = Path(run_dir)
    names = sorted(p.name[len("output-"):-len(".json")] for p in run_dir.glob("output-*.json"))
    if not names:
        raise LensError(f"no mlx-lens artifacts in {run_dir}")
    runs, tables = {}, {}
    for name in names:
        payload = _read(run_dir / f"output-{name}.json", _payload)
        records = _read(run_dir / f"output-{name}-records.csv", read_csv, _RECORD_NEEDS)
        pure = _read(run_dir / f"output-{name}-pure-next-token.csv", read_csv, _PURE_NEEDS)
        runs[name] = (records, pure, payload)
        suite = [run_dir / f"suite-{name}-aggregates{s}" for s in (".parquet", ".csv")]
        found = [p for p in suite if p.is_file()]
        if found:
            tables[name] = _read(found[0], read_suite_table, _AGGREGATE_NEEDS)
    written = []
    for name, (records, pure, payload) in runs.items():
        written.append(save_png(grid(records, payload, colour), run_dir / f"plot-{name}-grid.png"))
        written.append(save_png(trajectory(pure, payload), run_dir / f"plot-{name}-trajectory.png"))
        if name in tables:
            written.append(save_png(suite_bands(tables[name], title=name),
                                 run_dir / f"plot-{name}-suite.png"))
    if len(runs) >= 2:
        pictures = {name: (pure, payload) for name, (_, pure, payload) in runs.items()}
        written.append(save_png(overlay(pictures), run_dir / "plot-overlay.png"))
    return written
