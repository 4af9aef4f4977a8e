"""Progress bars for long work, on stderr, and only on a terminal (no log spam in CI or pipes)."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from tqdm import tqdm


# A run of several models passes each model's stderr on through a pipe; it sets this when its own
# stderr is a terminal, so that the model's bars show (mlx_lens/cli/processes.py).
RELAYED_TO_TERMINAL = "MLX_LENS_STDERR_RELAYED_TO_TERMINAL"


def on_terminal() -> bool:
    return sys.stderr.isatty() or os.environ.get(RELAYED_TO_TERMINAL) == "1"


def progress(items: Iterable, desc: str, total: int | None = None) -> Iterable:
    return tqdm(items, desc=desc, total=total, leave=False, file=sys.stderr,
                disable=not on_terminal(), dynamic_ncols=True)
