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
import time
from functools import lru_cache
from pathlib import Path

import torch

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


def _seconds(rows: int, tokens: int) -> float:
    """Best of 2: the sweep's per-tile work (GEMM, base change, reductions) over ROWS x TOKENS."""
    from torch_ref.reduce import LOG2E, TiledStats

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, D, generator=gen)
    w = torch.randn(TOKENS, D, generator=gen) / D ** 0.5
    tile, scratch = torch.empty(rows * tokens), torch.empty(2 * rows * tokens)
    best = float("inf")
    for _ in range(2):
        stats = TiledStats(ROWS, 1, 0, 5, None, None, x.device, TOKENS)
        began = time.perf_counter()
        for start in range(0, TOKENS, tokens):
            chunk = w[start:start + tokens]
            for first in range(0, ROWS, rows):
                z = torch.matmul(x[first:first + rows], chunk.T,
                                 out=tile.view(rows, tokens)).mul_(LOG2E)
                stats.update(z, slice(first, first + rows), 5, start, scratch)
        best = min(best, time.perf_counter() - began)
    return best


@lru_cache(maxsize=1)
def cpu_tile() -> tuple[int, int]:
    """(elements, rows) of the CPU tile: forced, cached for this machine, or calibrated now."""
    forced = os.environ.get("MLX_LENS_CPU_TILE")
    if forced:
        rows, tokens = (int(v) for v in forced.lower().split("x"))
        return rows * tokens, rows
    from mlx_lens.loading.default_model import cache_root

    key = f"{_cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    path = cache_root() / "cpu-tiles.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        times = {f"{r}x{t}": _seconds(r, t) for r, t in CANDIDATES}
        known[key] = {"best": min(times, key=times.get), "seconds": times}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)  # concurrent calibrations: the last one wins, both are valid
    rows, tokens = (int(v) for v in known[key]["best"].split("x"))
    return rows * tokens, rows
