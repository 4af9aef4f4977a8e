"""The CPU tile shape of the torch sweep, calibrated once per machine.

The best [rows x tokens] tile depends on the CPU's caches and GEMM kernels: 512 x 4096 ran the
sweep at 1.09x its floor on one host and 1.38x on an AVX-512 one. So the first sweep on a machine
times a few shapes on a synthetic tile (a few seconds) and keeps the fastest, per CPU model,
torch version and thread count, in the cache folder; `MLX_LENS_CPU_TILE=ROWSxTOKENS` overrides.
"""
from __future__ import annotations

import json
import os
import platform
import re
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from mlx_lens.core.errors import LensError
from mlx_lens.core.files import atomic_write

# (rows, tokens): 1 to 32 MiB of fp32 logits, from L2-sized to beyond most L3 slices.
CANDIDATES = ((256, 2048), (256, 4096), (256, 8192), (512, 1024), (512, 2048), (512, 4096),
              (1024, 1024), (1024, 2048), (1024, 4096))
# Every candidate decodes the same work: these rows of width D against this many tokens.
ROWS, TOKENS, D = 1024, 16384, 512


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def cpu_tile(seconds: Callable[[int, int], float]) -> tuple[int, int]:
    """(elements, rows) of the CPU tile: forced, cached for this machine, or calibrated now with
    seconds(rows, tokens), the time of the sweep's work on a ROWS x TOKENS problem in such tiles
    (torch_ref/reduce.py's tile_seconds)."""
    forced = os.environ.get("MLX_LENS_CPU_TILE")
    if forced:
        shape = re.fullmatch(r"\s*([1-9][0-9]*)\s*x\s*([1-9][0-9]*)\s*", forced.lower())
        if shape is None:
            raise LensError(f"MLX_LENS_CPU_TILE={forced!r} is not ROWSxTOKENS, two whole numbers "
                            "above 0 (e.g. 512x4096)")
        rows, tokens = int(shape[1]), int(shape[2])
        return rows * tokens, rows
    from mlx_lens.loading.default_model import cache_root

    key = f"{_cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    path = cache_root() / "cpu-tiles.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        times = {f"{r}x{t}": seconds(r, t) for r, t in CANDIDATES}
        known[key] = {"best": min(times, key=times.get), "seconds": times}
        text = json.dumps(known, indent=1, sort_keys=True) + "\n"
        # concurrent calibrations: the last one wins, both are valid
        atomic_write(path, lambda p: p.write_text(text))
    rows, tokens = (int(v) for v in known[key]["best"].split("x"))
    return rows * tokens, rows
