#!/usr/bin/env python
"""Benchmark: a J-lens fit's cost against its floor on the default model (docs/jlens.md).

The floor of a window is (d / cotangents) x (one forward + one backward of `cotangents` copies
of it): here that forward and backward by the framework alone (gradient of the last hidden
state with respect to the embeddings, through every block), against the fit's own backward
pass (TrainableBackend.jacobian_rows: a perturbation at every block output, position sums);
target: at most 1.3x (process CPU time on a CPU, which other processes' load leaves alone;
wall time on a GPU). Each is timed after one warm-up, best of --reps; the per-window and
100-window fit times (wall) follow, and the peak memory.

    python scripts/bench_jlens.py                                  # torch and mlx
    python scripts/bench_jlens.py --backends torch --cotangents 32
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import timeit
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mlx_lens import backend_choice  # noqa: E402
from mlx_lens.core.files import atomic_write  # noqa: E402
from mlx_lens.loading.placement import peak_memory_mib  # noqa: E402
from mlx_lens.loading.sources import resolve  # noqa: E402
from mlx_lens.tuned.corpus import load_corpus  # noqa: E402

TARGET = 1.3
WINDOWS = 100


def floor_pass(backend, ids: list[int], copies: int):
    """One forward and one backward of `copies` copies of ids by the framework alone."""
    if backend.info.backend == "torch":
        import torch

        model = backend.model
        model.requires_grad_(False)
        x = torch.tensor([ids] * copies, device=backend.input_device)

        def run():
            with torch.enable_grad():
                emb = model.get_input_embeddings()(x).detach().requires_grad_(True)
                out = model.base_model(inputs_embeds=emb, use_cache=False).last_hidden_state
                torch.autograd.grad(out, emb, torch.ones_like(out))
        return run
    import mlx.core as mx

    x = mx.array([ids] * copies)
    inner = backend.model.model

    def run():
        emb = backend.embed(x)
        out, grads = mx.vjp(lambda e: inner(x, input_embeddings=e), [emb],
                            [mx.ones((copies, len(ids), backend.info.d_model), emb.dtype)])
        mx.eval(out, grads)
    return run


def best(run, reps: int) -> tuple[float, float]:
    """The best wall and process-CPU seconds of `reps` runs after a warm-up: on a shared CPU
    host the CPU time is the cost (wall time counts other processes' load too)."""
    run()
    cpu = min(timeit.repeat(run, timer=time.process_time, number=1, repeat=reps))
    return min(timeit.repeat(run, number=1, repeat=reps)), cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["torch", "mlx"])
    parser.add_argument("--cotangents", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--skip", type=int, default=16)
    parser.add_argument("--reps", type=int, default=1)
    args = parser.parse_args()
    result = {"date": datetime.now().isoformat(timespec="seconds"), "backends": {}}
    for name in args.backends:
        backend = backend_choice.load(name, resolve(None))
        d = backend.info.d_model
        ids = load_corpus(None, backend.tokenizer, args.seq_len).train[0].tolist()
        directions = list(range(args.cotangents))
        (fit, fit_cpu) = best(lambda: backend.jacobian_rows(ids, directions, args.skip), args.reps)
        (floor, floor_cpu) = best(floor_pass(backend, ids, args.cotangents), args.reps)
        # the cost on a CPU is its CPU time; on a GPU, wall time
        ratio = fit_cpu / floor_cpu if backend.info.device == "cpu" else fit / floor
        window = math.ceil(d / args.cotangents) * fit
        entry = {"device": backend.info.device, "cotangents": args.cotangents,
                 "seq_len": args.seq_len, "pass_s": fit, "floor_pass_s": floor,
                 "pass_cpu_s": fit_cpu, "floor_pass_cpu_s": floor_cpu, "ratio": ratio,
                 "window_s": window, "fit_100_windows_h": WINDOWS * window / 3600,
                 "peak_rss_mib": peak_memory_mib()}
        print(f"{name} [{backend.info.device}]: a pass of {args.cotangents} directions x "
              f"{args.seq_len} tokens {fit:.2f} s ({fit_cpu:.2f} s CPU), floor {floor:.2f} s "
              f"({floor_cpu:.2f} s CPU): {ratio:.2f}x ({'PASS' if ratio <= TARGET else 'FAIL'} "
              f"<= {TARGET}x); a window {window / 60:.1f} min, {WINDOWS} windows "
              f"{WINDOWS * window / 3600:.1f} h; peak {entry['peak_rss_mib']:.0f} MiB", flush=True)
        result["backends"][name] = entry
    out = Path("runs/bench") / f"bench-jlens-{datetime.now():%Y%m%d-%H%M}.json"
    atomic_write(out, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
