#!/usr/bin/env python
"""Benchmark: where the wall time of a single-prompt `mlx-lens run` goes, phase by phase,
against the floor of each phase.

For each model it runs `mlx-lens run MODEL --backend B` in a fresh process, as a user does
(minimum over --reps), and splits its wall time into:
  start-up         the command's own imports, until the command starts
  load             the backend's framework imports (torch and transformers, or mlx and mlx-lm)
                   and the model's weights and tokenizer
  sweep, probes, framework_check, write, pictures   the run's own phases (its `time:` line)
  rest             inside the command but in no phase: the run folder's rotation, printing
  exit             the interpreter's start and its shutdown after the command returned
and measures the floor of each, on the same host and model:
  start-up + load + exit   a fresh interpreter that imports the framework a model of this
                   architecture needs and exits at once, plus reading the weight files once
                   from the page cache (bytes / measured read bandwidth)
  sweep            the model's forward pass without its head on the prompt and its
                   teacher-forced answer, plus one fp32 GEMM of every row at every position by
                   the unembedding (scripts/bench.py)
  probes           the model's forward pass without its head on the 14 probes and the prompt
                   (one padded batch, or batches of similar length: the faster), plus the head
                   on their 15 last rows
  framework_check  the model's own forward pass of the prompt, as the check runs it
  write, pictures, rest   no floor: they count against the ratio whole.
Targets (issue 22): end to end on the 0.5B-shaped model at least 5x faster than the original
experiment's script (--original), and the phases' sum within 1.3x of their floors; each is also
given without the pictures phase, as the original draws none.

The default model is the packaged SmolLM2-135M; `0.5b` a random model with Qwen2-0.5B's shape
(d_model 896, 24 layers, 14 query / 2 key-value heads, MLP 4864, a tied 151,936-token
vocabulary; 494M parameters, 2 GB in fp32), built once into the cache.

--original CMD times a shell command that runs the original experiment's script (logos-in-layers
001_layers_and_logits/run.py, TransformerLens 2.16) on the 0.5B-shaped model; it needs its own
environment (docs/performance.md "A whole run" says how it was set up for the numbers there).

    python scripts/bench_run.py [--models default,0.5b] [--reps 3] [--backend torch]
    python scripts/bench_run.py --models 0.5b --original /path/to/run_original.sh
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mlx_lens.loading.default_model import cache_root, default_model_dir  # noqa: E402
from mlx_lens.loading.quiet import quiet_library_bars  # noqa: E402

QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                 max_position_embeddings=32768, tie_word_embeddings=True)
PHASES = ("load", "sweep", "probes", "framework_check", "write", "pictures")
# The command as the console script runs it, with the time its imports took and the time the
# command itself took (from inside, so that what follows is the interpreter's shutdown).
_TIMED_MAIN = ("import sys, time; t0 = time.perf_counter(); import mlx_lens.cli.main as cli; "
               "t1 = time.perf_counter(); rc = getattr(cli, 'command', cli.main)(sys.argv[1:]); "
               "t2 = time.perf_counter(); "
               "print(f'BENCH imports {t1 - t0:.6f} command {t2 - t1:.6f}', flush=True); "
               "sys.exit(rc)")


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


def wall(cmd: list[str] | str, **kw) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {cmd}\n{proc.stderr[-2000:]}")
    return elapsed, proc


def our_run(folder: Path, backend: str, out: Path) -> dict[str, float]:
    """One `mlx-lens run` in a fresh process, split into phases (seconds)."""
    seconds, proc = wall([sys.executable, "-c", _TIMED_MAIN, "run", str(folder), "--backend",
                          backend, "--out_dir", str(out)])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("time:"))
    phases = {name: float(t) for name, t in re.findall(r"(\w+) ([\d.]+) s", line.split("(", 1)[1])}
    bench = next(x for x in proc.stdout.splitlines() if x.startswith("BENCH")).split()
    imports, command = float(bench[2]), float(bench[4])
    out = {"start-up": imports, **{p: phases.get(p, 0.0) for p in PHASES}}
    out["rest"] = command - sum(phases.get(p, 0.0) for p in PHASES)
    out["exit"] = seconds - imports - command  # interpreter start and shutdown
    out["wall"] = seconds
    return out


def import_floor(folder: Path, backend: str) -> float:
    """A fresh interpreter that imports what a model of this architecture needs in the
    framework (its model module and the tokenizer's) and exits at once, its objects frozen as
    `mlx-lens` freezes them: the least any tool on this stack pays to start and stop."""
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    if backend == "torch":
        from transformers.models.auto.configuration_auto import model_type_to_module_name

        module = model_type_to_module_name(model_type)
        code = (f"import torch; import transformers.models.{module}.modeling_{module}; "
                "from transformers import AutoTokenizer")
    else:
        import mlx_lm.utils as mlx_utils

        module = mlx_utils.MODEL_REMAPPING.get(model_type, model_type)
        code = f"import mlx.core; import mlx_lm.models.{module}; from transformers import AutoTokenizer"
    return wall([sys.executable, "-c", code + "; import gc; gc.freeze()"])[0]


def read_floor(folder: Path) -> tuple[float, int]:
    """Seconds to read the weight files once, sequentially, from the page cache (a run just
    read them), 64 MiB at a time into one buffer touched beforehand; and their size in bytes."""
    import numpy as np

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{folder} has no .safetensors weights to time the reading of")
    buffer = np.ones(64 * 2**20, np.uint8)  # its pages are in memory before the clock starts
    start = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buffer):
                pass
    return time.perf_counter() - start, sum(f.stat().st_size for f in files)


def compute_floors(folder: Path, backend_name: str, reps: int) -> dict[str, float]:
    """The floors of the in-process phases, each the minimum over reps, on one loaded model,
    in its own framework (scripts/bench.py's Framework)."""
    from bench import Framework, floor_runs
    from mlx_lens import backend_choice
    from mlx_lens.core.contract import SweepOptions
    from mlx_lens.experiment.probes import ANSWER, PROMPT, TEST_PROMPTS
    from mlx_lens.experiment.single import encode_prompt, encode_prompt_and_answer, length_batches
    from mlx_lens.loading.sources import resolve

    backend = backend_choice.load(backend_name, resolve(str(folder)))
    framework = Framework(backend)
    tok = backend.tokenizer
    ids, pieces = encode_prompt_and_answer(tok, PROMPT, ANSWER, backend.info.n_ctx)
    forward_ids = SweepOptions(answer_ids=tuple(pieces)).forward_ids(ids)
    prompts = [encode_prompt(tok, p) for p in TEST_PROMPTS] + [ids]
    grouped = [[prompts[i] for i in b] for b in length_batches([len(p) for p in prompts])]
    rows = framework.lens_rows(ids)[:len(prompts)]  # as many rows as there are prompts

    def batches(groups):
        def run():
            for group in groups:
                framework.body(group)
            framework.head(rows)
        return run

    sweep = floor_runs(backend, forward_ids)
    runs = {"forward": sweep["forward"], "gemm": sweep["gemm"],
            # the model's body on the prompts (one padded batch, or batches of similar length:
            # the better of the two), and the head on their last rows
            "probes one batch": batches([prompts]), "probes grouped": batches(grouped),
            "framework_check": lambda: framework.output(ids)}
    for fn in runs.values():  # a framework's first call pays for its set-up, once
        fn()
    best = {name: float("inf") for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {"sweep": best["forward"] + best["gemm"],
            "probes": min(best["probes one batch"], best["probes grouped"]),
            "framework_check": best["framework_check"]}


def bench_model(name: str, backend: str, reps: int, original: str | None) -> dict:
    folder = default_model_dir() if name == "default" else model_05b() if name == "0.5b" \
        else Path(name)
    runs, originals = [], []
    with tempfile.TemporaryDirectory() as tmp:
        our_run(folder, backend, Path(tmp) / "warm-up")  # page cache, tile calibration
        for i in range(reps):  # alternating with the original's: the host drifts
            runs.append(our_run(folder, backend, Path(tmp) / f"run-{i}"))
            if original:
                originals.append(wall(original, shell=True)[0])
    ours = min(runs, key=lambda r: r["wall"])
    read = [read_floor(folder) for _ in range(reps)]
    read_s, size = min(r[0] for r in read), read[0][1]
    floors = {"imports": min(import_floor(folder, backend) for _ in range(reps)),
              **compute_floors(folder, backend, reps)}
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    result = {"model": folder.name, "backend": backend, "model_type": model_type, "ours": ours,
              "ours_walls": [r["wall"] for r in runs], "floors": floors,
              "weights_bytes": size, "read_seconds": read_s}
    if original:
        result["original_walls"] = originals
    return result


def format_result(r: dict) -> str:
    ours, floors = r["ours"], r["floors"]
    model_type = r["model_type"]
    rows = [("start-up + load + exit", ours["start-up"] + ours["load"] + ours["exit"],
             floors["imports"] + r["read_seconds"],
             f"a fresh interpreter importing {r['backend']} and {model_type}'s model module, "
             f"then exiting; + reading {r['weights_bytes'] / 1e9:.2f} GB of weights "
             f"({r['weights_bytes'] / r['read_seconds'] / 1e9:.1f} GB/s)"),
            ("sweep", ours["sweep"], floors["sweep"], "forward + one GEMM of the lens"),
            ("probes", ours["probes"], floors["probes"], "one forward of the 15 prompts"),
            ("framework_check", ours["framework_check"], floors["framework_check"],
             "one forward of the prompt"),
            ("write", ours["write"], 0.0, ""), ("pictures", ours["pictures"], 0.0, ""),
            ("rest", ours["rest"], 0.0, "the run folder's rotation, printing")]
    lines = [f"{r['model']} [{r['backend']}]: wall {ours['wall']:.2f} s (runs: "
             + ", ".join(f"{w:.2f}" for w in r["ours_walls"]) + "); start-up "
             f"{ours['start-up']:.2f} s (our imports), load {ours['load']:.2f} s (framework "
             f"imports, weights, tokenizer), exit {ours['exit']:.2f} s (interpreter start and "
             "shutdown)",
             "| phase | ours | floor | ours / floor | the floor |", "|---|---|---|---|---|"]
    for phase, t, floor, what in rows:
        ratio = f"{t / floor:.2f}" if floor else ""
        shown = f"{floor:.2f} s" if floor else ""
        lines.append(f"| {phase} | {t:.2f} s | {shown} | {ratio} | {what} |")
    total_floor = sum(f for _, _, f, _ in rows)
    # The original draws no pictures, so each target is also given for the same work: the run
    # less its pictures phase (matplotlib is imported inside it; with --no-plots it never is).
    bare = ours["wall"] - ours["pictures"]
    ratio, bare_ratio = ours["wall"] / total_floor, bare / total_floor
    lines.append(f"| total | {ours['wall']:.2f} s | {total_floor:.2f} s | {ratio:.2f} | |")
    lines.append(f"| total without pictures | {bare:.2f} s | {total_floor:.2f} s | "
                 f"{bare_ratio:.2f} | the original's work: it draws none |")
    for what, x in (("", ratio), (" without pictures", bare_ratio)):
        lines.append(f"{'PASS' if x <= 1.3 else 'FAIL'} phases' sum{what} within 1.3x of their "
                     f"floors: {x:.2f}")
    if "original_walls" in r:
        best, walls = min(r["original_walls"]), r["original_walls"]
        lines.append(f"original script: {best:.2f} s wall (runs: "
                     + ", ".join(f"{w:.2f}" for w in walls) + "; ours: "
                     + ", ".join(f"{w:.2f}" for w in r["ours_walls"]) + ")")
        for what, t in (("", ours["wall"]), (" without pictures", bare)):
            speed = best / t
            lines.append(f"{'PASS' if speed >= 5 else 'FAIL'} at least 5x faster than the "
                         f"original's script{what} (minimum against minimum): {speed:.1f}x")
        lines.append(f"(5x would need {best / 5:.2f} s: {best / 5 / total_floor:.2f}x the floors)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="default,0.5b",
                        help="comma-separated: default, 0.5b, or model folders")
    parser.add_argument("--backend", default="torch", choices=("torch", "mlx"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--original", default=None, metavar="CMD",
                        help="a shell command running the original's script on the 0.5B model")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default runs/bench/bench-run-YYYYMMDD-HHMM.json)")
    args = parser.parse_args()
    results = []
    for name in args.models.split(","):
        results.append(bench_model(name, args.backend, args.reps,
                                   args.original if name == "0.5b" else None))
        print(format_result(results[-1]) + "\n", flush=True)
    out = args.out or Path("runs/bench") / f"bench-run-{time.strftime('%Y%m%d-%H%M')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
