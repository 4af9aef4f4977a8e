#!/usr/bin/env python
"""Benchmark: training a tuned lens on the default model (docs/tuned-lens.md).

  throughput  tokens per second of training steps (the tuned-lens recipe: every row, every
              position, the whole vocabulary), per backend, after one warm-up step
  --full      `mlx-lens tune` with the default settings, then `mlx-lens tune --eval`, on one
              backend; targets: under 15 minutes, held-out KL of the tuned lens below the logit
              lens's at every row but the last, and its mean over rows at most half.

    python scripts/bench_tune.py                       # throughput, torch and mlx, 256 tokens
    python scripts/bench_tune.py --backends torch --full
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mlx_lens import backend_choice  # noqa: E402
from mlx_lens.tuned import training  # noqa: E402
from mlx_lens.core.training import Recipe  # noqa: E402
from mlx_lens.tuned.corpus import load_corpus  # noqa: E402
from mlx_lens.loading.placement import peak_memory_mib  # noqa: E402
from mlx_lens.loading.sources import resolve  # noqa: E402
from mlx_lens.tuned.lens_file import TunedLens  # noqa: E402

FULL_LIMIT_S = 15 * 60


def throughput(backend, tokens: int, steps: int) -> float:
    opts = training.TuneOptions(tokens_per_step=tokens)
    corpus = load_corpus(None, backend.tokenizer, opts.seq_len)
    tuner = backend.tuner(TunedLens.identity(backend.info.n_layers, backend.info.d_model), Recipe())
    times = []
    for step in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        tuner.gradients(training.batch_at(corpus.train, step, opts.sequences_per_step, 0))
        tuner.update(opts.lr(step))
        times.append(time.perf_counter() - start)
    return opts.step_tokens / min(times[1:])


def full(backend) -> dict:
    corpus = load_corpus(None, backend.tokenizer, training.TuneOptions.seq_len)
    out = Path(tempfile.mkdtemp(prefix="bench-tune-")) / "lens"
    try:
        start = time.perf_counter()
        lens = training.train(backend, corpus, training.TuneOptions(), out)
        seconds = time.perf_counter() - start
        frame = training.evaluate(backend, lens, corpus.held_out)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    print(frame.to_string(index=False, float_format="%.3f"))
    inner = frame.iloc[:-1]
    checks = {
        f"training under {FULL_LIMIT_S // 60} minutes": seconds <= FULL_LIMIT_S,
        "tuned KL below logit KL at every row but the last":
            bool((inner.kl_tuned_bits < inner.kl_logit_bits).all()),
        "mean tuned KL at most half the logit lens's":
            inner.kl_tuned_bits.mean() <= 0.5 * inner.kl_logit_bits.mean(),
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'} {name}")
    return {"train_s": seconds, "eval": frame.to_dict(orient="list"), "checks": checks}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["torch", "mlx"])
    parser.add_argument("--tokens", type=int, default=256, help="tokens per timed step")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up)")
    parser.add_argument("--full", action="store_true", help="a whole default training and its eval")
    args = parser.parse_args()
    result = {"date": datetime.now().isoformat(timespec="seconds"), "backends": {}}
    for name in args.backends:
        backend = backend_choice.load(name, resolve(None))
        entry = {"device": backend.info.device,
                 "tokens_per_s": throughput(backend, args.tokens, args.steps)}
        print(f"{name} [{backend.info.device}]: {entry['tokens_per_s']:.1f} tokens/s "
              f"({args.tokens} tokens per step)", flush=True)
        if args.full:
            entry["full"] = full(backend)
        entry["peak_rss_mib"] = peak_memory_mib()
        result["backends"][name] = entry
    out = Path("runs/bench") / f"bench-tune-{datetime.now():%Y%m%d-%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
