#!/usr/bin/env python
"""Benchmark: ROME's causal tracing of the packaged fact suite against its floor.

On the default model (torch), `mlx-lens patch --noise --facts default` with ROME's settings
(3 kinds x every layer, the positions from the subject's first token to the last, N = 10 noise
samples), on every --every-th fact of the suite (all 393 with --every 1: hours on a CPU).

The floor is the forward passes the trace needs, batched as it batches them, run by
transformers itself: for each recorded run one forward of its batch (`model.base_model`), and
for each patched run the blocks it runs (a full forward's time x blocks run / blocks) and the
head on its scored positions (`lm_head` on as many rows). The trace's time over the floor is
what the interventions, the float64 scoring and the bookkeeping add. Target: at most 1.3x.

    python scripts/bench_tracing.py --every 65
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mlx_lens import backend_choice  # noqa: E402
from mlx_lens.experiment.facts import default_facts  # noqa: E402
from mlx_lens.experiment.tracing import NoiseOptions, run_trace_suite  # noqa: E402
from mlx_lens.loading.sources import resolve  # noqa: E402

TARGET = 1.3


class Logged:
    """The backend, its record and patched_logits calls' shapes logged (batch, length, first
    block run, scored positions)."""

    def __init__(self, backend):
        self._b, self.records, self.patches, self.seconds = backend, [], [], 0.0

    def __getattr__(self, name):
        return getattr(self._b, name)

    def _timed(self, f, *args):
        started = time.perf_counter()
        try:
            return f(*args)
        finally:
            self.seconds += time.perf_counter() - started

    def record(self, batch, noise=None):
        self.records.append((len(batch), len(batch[0])))
        return self._timed(self._b.record, batch, noise)

    def patched_logits(self, base, clean, kind, blocks, restore, n_scored):
        self.patches.append((restore.shape[0] * restore.shape[1], restore.shape[2],
                             blocks.start, n_scored))
        return self._timed(self._b.patched_logits, base, clean, kind, blocks, restore, n_scored)


@torch.no_grad()
def floor(backend, records: list, patches: list) -> float:
    """Seconds of transformers' own forward passes for the logged shapes (best of 2 each)."""
    model, layers = backend.model, backend.info.n_layers

    def best(f) -> float:
        times = []
        for _ in range(2):
            started = time.perf_counter()
            f()
            times.append(time.perf_counter() - started)
        return min(times)

    full, head = {}, {}
    for b, t in {(b, t) for b, t in records} | {(b, t) for b, t, _, _ in patches}:
        x = torch.zeros(b, t, dtype=torch.long, device=backend.input_device)
        full[b, t] = best(lambda: model.base_model(input_ids=x, use_cache=False))
    for rows in {b * n for b, _, _, n in patches}:
        h = torch.randn(rows, backend.info.d_model, dtype=backend.dtype, device=backend.device)
        head[rows] = best(lambda: model.get_output_embeddings()(h))
    return (sum(full[s] for s in records)
            + sum(full[b, t] * (layers - start) / layers + head[b * n]
                  for b, t, start, n in patches))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--every", type=int, default=1,
                        help="trace every k-th fact of the packaged suite (default: all)")
    parser.add_argument("--samples", type=int, default=NoiseOptions().samples)
    args = parser.parse_args()
    backend = Logged(backend_choice.load("torch", resolve(None)))
    facts = default_facts()[::args.every]
    started = time.perf_counter()
    result = run_trace_suite(backend, facts, NoiseOptions(samples=args.samples))
    trace = time.perf_counter() - started
    need = floor(backend, backend.records, backend.patches)
    ratio = trace / need
    print(f"{len(facts)} facts, {args.samples} samples, {len(backend.patches)} patched runs: "
          f"trace {trace:.1f} s, floor {need:.1f} s: {ratio:.2f}x (target <= {TARGET}x: "
          f"{'met' if ratio <= TARGET else 'NOT met'}); {trace / len(facts):.1f} s per fact, "
          f"the whole suite ~{trace / len(facts) * 393 / 3600:.1f} h here; in the backend's "
          f"record and patched_logits {backend.seconds:.1f} s, the rest (scoring, tables) "
          f"{trace - backend.seconds:.1f} s")
    mlp = result.aggregates[(result.aggregates["kind"] == "mlp")
                            & (result.aggregates["place"] == "last_subject")]
    best = mlp.loc[mlp["effect_mean"].idxmax()]
    print(f"MLP at the last subject token: effect peaks at layer {int(best['layer'])}, "
          f"{best['effect_mean']:+.4f} [{best['effect_ci_low']:+.4f}, "
          f"{best['effect_ci_high']:+.4f}] over {int(best['n'])} facts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
