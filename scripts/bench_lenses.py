#!/usr/bin/env python
"""Benchmark: several lenses from one forward pass against one lens.

On the default model, for each backend and prompt length T, interleaved over repetitions (min):
  one       a one-lens sweep (final-norm): capture, decode, reductions
  three     --lenses final-norm,next-norm,raw: one capture, each lens's decode, the lens pairs
  three+mid the same with the middle of each block (twice the rows)
Target: three <= 3.2 x one (the forward pass is shared, the decode is the cost).

    python scripts/bench_lenses.py                     # torch, T = 16 and 128
    python scripts/bench_lenses.py --backends torch,mlx --T 16 --reps 3
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mlx_lens import backend_choice  # noqa: E402
from mlx_lens.core.contract import SweepOptions  # noqa: E402
from mlx_lens.core.lens import RULES, Lens  # noqa: E402
from mlx_lens.experiment.frames import TokenNames, verbose_positions  # noqa: E402
from mlx_lens.experiment.probes import TOP_K_RECORDS, TOP_K_VERBOSE, VERBOSE_WORDS  # noqa: E402
from mlx_lens.loading.sources import resolve  # noqa: E402

TARGET = 3.2


def bench(backend, T: int, reps: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(10, backend.tokenizer.vocab_size - 1, T)]
    names = TokenNames(backend.tokenizer.decode)
    wide = tuple(bool(v) for v in verbose_positions([names(i) for i in ids], VERBOSE_WORDS))
    opts = SweepOptions(answer_ids=(ids[0],), wide=wide, narrow_k=TOP_K_RECORDS,
                        top_k=TOP_K_VERBOSE)
    lenses = [Lens(rule) for rule in RULES]
    runs = {"one": lambda: backend.sweep(ids, opts),
            "three": lambda: backend.sweep_lenses(ids, opts, lenses, mid=False),
            "three+mid": lambda: backend.sweep_lenses(ids, opts, lenses, mid=True)}
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="torch", help="comma-separated: torch, mlx")
    parser.add_argument("--T", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    source = resolve(None)
    print(f"{'backend':<8}{'T':>5}{'one s':>9}{'three s':>10}{'ratio':>7}{'+mid s':>9}{'ratio':>7}")
    ok = True
    for kind in args.backends.split(","):
        backend = backend_choice.load(kind.strip(), source)
        for T in args.T:
            t = bench(backend, T, args.reps)
            ratio, mid = t["three"] / t["one"], t["three+mid"] / t["one"]
            ok &= ratio <= TARGET
            print(f"{kind:<8}{T:>5}{t['one']:>9.3f}{t['three']:>10.3f}{ratio:>7.2f}"
                  f"{t['three+mid']:>9.3f}{mid:>7.2f}", flush=True)
    print(f"target: three lenses <= {TARGET} x one lens: {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
