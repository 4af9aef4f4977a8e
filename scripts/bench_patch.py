#!/usr/bin/env python
"""Benchmark: a full activation-patching trace against the straightforward loop.

On the default model (torch, CPU), docs/patching.md's Germany/France pair, all three kinds:
  trace   `run_patching`: per kind and block one batch of every position, blocks from r on
  naive   one full forward pass per (kind, layer, position) and answer, a forward hook on the
          model's own module replacing that one value (TransformerLens's generic patching loop)
and the largest difference of the metric between the two (they must agree to fp32 rounding).
Target: trace >= 3x faster than naive.

    python scripts/bench_patch.py
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mlx_lens import backend_choice  # noqa: E402
from mlx_lens.cli.patch import CORRUPT, CORRUPT_ANSWER  # noqa: E402
from mlx_lens.core.numerics import log_softmax64  # noqa: E402
from mlx_lens.experiment.patching import KINDS, PatchOptions, run_patching  # noqa: E402
from mlx_lens.experiment.probes import ANSWER, PROMPT  # noqa: E402
from mlx_lens.experiment.single import answer_token_ids  # noqa: E402
from mlx_lens.loading.sources import resolve  # noqa: E402

TARGET = 3.0


def _hook(backend, kind: str, i: int, change):
    """A hook that passes block i's input (resid) or its attention / MLP module's output
    through change(x) -> x."""
    block = backend.blocks[i]
    if kind == "resid":
        def pre(m, args, kwargs):
            if args:
                return (change(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": change(kwargs["hidden_states"])}

        return block.register_forward_pre_hook(pre, with_kwargs=True)
    module = getattr(block, backend.layout.attention if kind == "attn" else backend.layout.mlp)

    def post(m, args, out):
        return (change(out[0]), *out[1:]) if isinstance(out, tuple) else change(out)

    return module.register_forward_hook(post)


@torch.no_grad()
def naive(backend, clean: list[int], corrupt: list[int], pieces: list[int]) -> dict:
    """log2 p of the answer per (kind, layer, position), one hooked forward pass each."""
    n = len(pieces)

    def forward(ids, kind, i, change):
        handle = _hook(backend, kind, i, change)
        try:
            return backend.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
        finally:
            handle.remove()

    out = {}
    for kind in KINDS:
        for i in range(len(backend.blocks)):
            kept = []
            forward(clean + pieces[:-1], kind, i, lambda x: kept.append(x.clone()) or x)
            row = np.empty(len(clean))
            for t in range(len(clean)):
                def put(x, t=t):
                    x = x.clone()
                    x[0, t] = kept[0][0, t]
                    return x

                z = forward(corrupt + pieces[:-1], kind, i, put)[-n:].double().numpy()
                row[t] = (log_softmax64(z) / np.log(2))[np.arange(n), pieces].sum()
            out[kind, i] = row
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args()
    backend = backend_choice.load("torch", resolve(None))
    opts = PatchOptions(PROMPT, CORRUPT, ANSWER, CORRUPT_ANSWER)
    started = time.perf_counter()
    result = run_patching(backend, opts)
    trace = time.perf_counter() - started
    tok = backend.tokenizer
    clean, corrupt = tok.encode(PROMPT), tok.encode(CORRUPT)
    started = time.perf_counter()
    loops = {what: naive(backend, clean, corrupt, answer_token_ids(tok, ids, prompt, answer))
             for what, ids, prompt, answer in (("answer", clean, PROMPT, ANSWER),
                                               ("corrupt", corrupt, CORRUPT, CORRUPT_ANSWER))}
    slow = time.perf_counter() - started
    frame = result.frame[result.frame["layer"] < backend.info.n_layers]  # rows the loop has
    metric = np.concatenate([loops["answer"][k, i] - loops["corrupt"][k, i]
                             for k, i in zip(*frame.groupby(["kind", "layer"], sort=False)
                                             .size().index.to_frame().to_numpy().T)])
    delta = np.abs(frame["metric"].to_numpy() - metric).max()
    print(f"trace {trace:.1f} s, naive loop {slow:.1f} s: {slow / trace:.1f}x "
          f"(target >= {TARGET}x: {'met' if slow / trace >= TARGET else 'NOT met'}); "
          f"largest metric difference {delta:.2e} bits over {len(frame)} patched runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
