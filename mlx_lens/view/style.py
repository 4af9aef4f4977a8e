"""What every picture shares: fonts (with fallbacks for glyphs DejaVu Sans lacks), never
LaTeX, token labels as the HTML report shows them, text measurement, colours, and PNGs written
whole.

Figures are plain `matplotlib.figure.Figure` objects, never pyplot's: nothing here needs a
display or touches the caller's backend (pyplot's notebook figures stay as they are), and a
figure is freed like any object once dropped, so no figure manager can leak them.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import matplotlib
import numpy as np
from matplotlib import colors, font_manager
from matplotlib.figure import Figure
from matplotlib.textpath import text_to_path

from mlx_lens.core.files import atomic_write

DPI = 120
LABEL_CHARS = 8  # a token longer than this is cut and ends in "…"
BAD = "#d9d9d9"  # cells of rows blanked as non-finite
MARK = "#e41a1c"  # the answer's boxes and the collapse lines
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


def style():
    """Never LaTeX (a token is text, whatever the user's rc file says); the fonts above."""
    return matplotlib.rc_context({"text.usetex": False, "font.family": _fonts()[0]})


def styled(draw: Callable) -> Callable:
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with style():
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


def text_width(text: str, size: float, weight: str = "normal") -> float:
    """Width in points of text drawn at `size` points."""
    prop = font_manager.FontProperties(family=_fonts()[0], size=size, weight=weight)
    return text_to_path.get_text_width_height_descent(text, prop, ismath=False)[0]


def colour_top(values) -> float:
    """The top of an entropy colour scale: the largest finite value, at least 1 bit."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    return max(1.0, float(finite.max())) if finite.size else 1.0


def model_name(payload: dict) -> str:
    return payload["diagnostics"].get("model", "?")


def text_colour(rgba: np.ndarray) -> np.ndarray:
    """Black on light cells, white on dark ones (ITU-R 601 luma)."""
    luma = rgba[..., :3] @ np.array([0.299, 0.587, 0.114])
    return np.where(luma[..., None] > 0.5, colors.to_rgba_array("black"),
                    colors.to_rgba_array("white"))


def wrap(text: str, width: float, size: float) -> list[str]:
    """text broken at spaces into lines at most `width` points wide at `size` points."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and text_width(f"{lines[-1]} {word}", size) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def save_png(fig: Figure, path: Path) -> Path:
    # A temporary name, then a rename: a reader never sees half a PNG.
    with style():
        atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=DPI))
    return path
