"""Progress bars for long work, on stderr, and only on a terminal (no log spam in CI or pipes)."""
from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm import tqdm


def progress(items: Iterable, desc: str, total: int | None = None) -> Iterable:
    return tqdm(items, desc=desc, total=total, leave=False, file=sys.stderr,
                disable=not sys.stderr.isatty(), dynamic_ncols=True)
