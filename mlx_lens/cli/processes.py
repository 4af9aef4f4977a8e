"""Several models in one run: each in its own process, one shared run folder, a summary table.

A process per model returns all of its memory before the next model loads, and a crash in one
model cannot take the others' artifacts with it.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mlx_lens.core.errors import LensError
from mlx_lens.experiment.milestones import LEADING_COPIES
from mlx_lens.experiment.single import final_answer
from mlx_lens.loading.placement import DoesNotFit
from mlx_lens.loading.sources import resolve

# The original experiment's model set (hub ids; they need a reachable hub).
ORIGINAL_MODELS = (
    "mistralai/Mistral-7B-v0.1",
    "meta-llama/Meta-Llama-3-8B",
    "Qwen/Qwen3-8B",
    "google/gemma-2-9b",
    "Qwen/Qwen3-14B",
    "google/gemma-2-27b",
    "01-ai/Yi-34B",
)
EXIT_SKIPPED = DoesNotFit.exit_code  # a model that fits no device
# the milestones a summary leads with: copies from row 1 (the original's L_copy, from row 0,
# stays in the JSON), and the first layer whose top-1 is the answer
HEADLINE = (*LEADING_COPIES, "L_semantic")


class NothingProduced(LensError):
    """Every model of a run of several failed: exit 1, as when any of them fails."""

    exit_code = 1


@dataclass
class ModelOutcome:
    model: str
    status: str  # ok, skipped: ..., failed: ...
    summary: dict | None = None  # from the model's JSON when it ran

    def row(self) -> list[str]:
        s = self.summary or {}
        answer = f"{s['answer']!r} ({s['p']:.2f})" if s else ""
        return [self.model, s.get("device", ""), s.get("dtype", ""), self.status,
                *(str(s.get(key, "")) for key in HEADLINE), answer]


def summary_of(payload: dict) -> dict:
    d, top = payload["diagnostics"], final_answer(payload)
    return {"model": d["model"], "backend": d["backend"], "device": d["device"],
            "dtype": d["compute_dtype"], **{key: d[key] for key in HEADLINE},
            "n_layers": payload["model_stats"]["num_layers"], "answer": top[0], "p": top[1]}


def run_one_process(model: str, out_dir: Path, child_args: list[str]) -> ModelOutcome:
    try:
        name = resolve(model).name
    except LensError as exc:
        return ModelOutcome(model, f"failed: {exc}")
    cmd = [sys.executable, "-m", "mlx_lens.cli.main", "run", model, "--out_dir", str(out_dir),
           *child_args]
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) as proc:
        try:
            _, stderr = proc.communicate()
        except BaseException:  # Ctrl-C or SIGTERM here: stop the child too, it cleans up after itself
            proc.terminate()
            sys.stderr.write(proc.communicate()[1])
            raise
    sys.stderr.write(stderr)
    last = (stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    last = last.removeprefix("mlx-lens: error: ")
    if proc.returncode == EXIT_SKIPPED:
        return ModelOutcome(model, f"skipped: {last}")
    if proc.returncode != 0:
        return ModelOutcome(model, f"failed: {last}")
    payload = json.loads((out_dir / f"output-{name}.json").read_text(encoding="utf-8"))
    return ModelOutcome(model, "ok", summary_of(payload))


def table(outcomes: list[ModelOutcome]) -> str:
    rows = [["model", "device", "dtype", "status", *HEADLINE, "final answer"]]
    rows += [o.row() for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
