#!/usr/bin/env python
"""Benchmark: where the time of a single-prompt `mlx-lens run` goes, on a ~0.5B model.

Builds once, into the cache, a random model with Qwen2-0.5B's shape (d_model 896, 24 layers,
14 query / 2 key-value heads, MLP 4864, a tied 151,936-token vocabulary; 494M parameters,
2 GB in fp32), then runs `mlx-lens run MODEL --backend torch` in a fresh process, as a user
does, and prints the run's own time line (load, sweep, probes, write) and the wall time.

    python scripts/bench_run.py [--reps 2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mlx_lens.loading.default_model import cache_root, default_model_dir  # noqa: E402
from mlx_lens.loading.quiet import quiet_library_bars  # noqa: E402

QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                 max_position_embeddings=32768, tie_word_embeddings=True)


def model_05b() -> Path:
    folder = cache_root() / "bench-qwen2-0.5b-shape"
    if (folder / ".complete").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    print(f"building the 0.5B benchmark model in {folder} (once) ...", flush=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN2_05B))
    quiet_library_bars()
    model.save_pretrained(folder)
    # SmolLM2's tokenizer: real text to tokenise; its 49,152 ids fit the larger vocabulary.
    AutoTokenizer.from_pretrained(str(default_model_dir())).save_pretrained(folder)
    (folder / ".complete").write_text("ok\n")
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    folder = model_05b()
    exe = Path(sys.executable).with_name("mlx-lens")
    for _ in range(args.reps):
        start = time.perf_counter()
        proc = subprocess.run([str(exe), "run", str(folder), "--backend", "torch", "--out_dir",
                               str(cache_root() / "bench-run-out")], capture_output=True,
                              text=True, check=True)
        wall = time.perf_counter() - start
        line = next(x for x in proc.stdout.splitlines() if x.startswith("time:"))
        print(f"{line}; process wall {wall:.1f} s (imports included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
