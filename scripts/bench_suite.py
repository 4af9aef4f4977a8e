#!/usr/bin/env python
"""Benchmark: a fact suite, batched, against its floor and against one prompt at a time.

On the default model (torch, CPU by default), N facts of the default suite's original template,
without controls (the per-prompt path has none), timed as:
  suite       run_suite: batched forward passes, one decode per batch, the three tables
  floor       the same batched forward passes (each prompt with its answer teacher-forced, rows
              kept at the answer's positions: one per piece) plus ONE fp32 GEMM of all those
              rows against the unembedding: what any batched lens of whole answers must spend
  per-prompt  run_experiment per fact (today's single-prompt path, probes off, its framework
              check included), model loaded once
Targets: suite >= 5x faster than per-prompt, suite <= 1.3x floor.

    python scripts/bench_suite.py                 # 100 facts
    python scripts/bench_suite.py --facts 20 --reps 2
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mlx_lens.core.lens import FINAL_NORM  # noqa: E402
from mlx_lens import backend_choice  # noqa: E402
from mlx_lens.experiment import suite  # noqa: E402
from mlx_lens.experiment.single import ExperimentOptions, run_experiment  # noqa: E402
from mlx_lens.experiment.facts import encode_facts, load_facts  # noqa: E402
from mlx_lens.loading.sources import resolve  # noqa: E402


def best_of(reps: int, fn) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--facts", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    backend = backend_choice.load("torch", resolve(None), device=args.device)
    facts = [dataclasses.replace(f, control_prompt=None, control_answer=None)
             for f in load_facts("default") if f.group == "original"][:args.facts]
    encoded = encode_facts(facts, backend.tokenizer, backend.info.n_ctx)
    # each prompt with its answer teacher-forced, and how many positions are scored
    order = sorted((([*f.ids, *f.answer_ids[:-1]], len(f.answer_ids)) for f in encoded),
                   key=lambda item: (item[1], len(item[0])))
    batch = suite.batch_size(backend, max(len(ids) for ids, _ in order))

    def forward_rows():
        out = []
        for i in range(0, len(order), batch):
            part = order[i:i + batch]
            rows = backend.capture([ids for ids, _ in part])  # R x [B, T, d]
            kept = [torch.stack([h[b, len(ids) - n:len(ids)] for h in rows])
                    for b, (ids, n) in enumerate(part)]  # R x n x d per prompt
            out += [backend._normed(list(k), FINAL_NORM) for k in kept]
        return out

    with torch.no_grad():
        x = torch.cat([rows.transpose(0, 1).reshape(-1, backend.info.d_model)
                       for rows in forward_rows()])
        w = backend.head.weight.float()
        t = {"forward": best_of(args.reps, forward_rows), "gemm": best_of(args.reps, lambda: x @ w.T)}
    t["suite"] = best_of(args.reps, lambda: suite.run_suite(backend, facts))
    t["per-prompt"] = best_of(1, lambda: [
        run_experiment(backend, ExperimentOptions(prompt=f.prompt, answer=f.answer, probes=False),
                       {}) for f in facts])
    floor = t["forward"] + t["gemm"]
    result = {"model": backend.info.name, "device": backend.info.device, "facts": len(facts),
              "batch": batch, "rows": int(x.shape[0]), "seconds": t, "floor": floor,
              "suite_over_floor": t["suite"] / floor,
              "per_prompt_over_suite": t["per-prompt"] / t["suite"],
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(f"{backend.info.name} [{backend.info.device}], {len(facts)} facts, batch {batch}: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()))
    print(f"suite / floor {result['suite_over_floor']:.2f} (target <= 1.3); "
          f"per-prompt / suite {result['per_prompt_over_suite']:.1f} (target >= 5)")
    out = args.out or (Path(__file__).resolve().parents[1] / "runs" / "bench"
                       / f"bench-suite-{datetime.now():%Y%m%d-%H%M}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
