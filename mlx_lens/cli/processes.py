"""Several models in one run: each in its own process, one shared run folder, a summary table.

A process per model returns all of its memory before the next model loads, and a crash in one
model cannot take the others' artifacts with it. Each process writes into a folder of its own,
moved into the run's folder once it succeeded: a failed model leaves nothing half-written, and
two models of one name (A/final, B/final) are given names apart there.
"""
from __future__ import annotations

import codecs
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mlx_lens.core.errors import LensError
from mlx_lens.core.progress import RELAYED_TO_TERMINAL, on_terminal
from mlx_lens.experiment.milestones import LEADING_COPIES, layer_or_never
from mlx_lens.experiment.single import final_answer
from mlx_lens.loading.placement import DoesNotFit
from mlx_lens.loading.sources import ModelSource, resolve

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
                *(layer_or_never(s[key]) if s else "" for key in HEADLINE), answer]


def summary_of(payload: dict) -> dict:
    d, top = payload["diagnostics"], final_answer(payload)
    return {"model": d["model"], "backend": d["backend"], "device": d["device"],
            "dtype": d["compute_dtype"], **{key: d[key] for key in HEADLINE},
            "n_layers": payload["model_stats"]["num_layers"], "answer": top[0], "p": top[1]}


def _apart(source: ModelSource) -> str:
    """A name with what tells two models of one name apart: the folder above, the hub org."""
    if source.hub_id is not None:
        return source.hub_id.replace("/", "-")
    return f"{source.path.parent.name}-{source.name}"


def artifact_names(models: list[str]) -> list[str | None]:
    """Each model's name in the run folder's files: its own, or where several share one, with
    what tells them apart in front, numbered (-2, -3) where even that does not (one model named
    twice). None for a model that cannot be resolved (it fails in its turn, with its reason)."""
    sources = []
    for model in models:
        try:
            sources.append(resolve(model))
        except LensError:
            sources.append(None)
    counts = Counter(s.name for s in sources if s is not None)
    names, taken = [], set()
    for source in sources:
        if source is None:
            names.append(None)
            continue
        wanted = source.name if counts[source.name] == 1 else _apart(source)
        name, n = wanted, 1
        while name in taken:
            n += 1
            name = f"{wanted}-{n}"
        taken.add(name)
        names.append(name)
    return names


def run_one_process(model: str, name: str | None, out_dir: Path,
                    child_args: list[str]) -> ModelOutcome:
    """One model in a process of its own, its files in out_dir under `name`."""
    try:
        own = resolve(model).name
    except LensError as exc:
        return ModelOutcome(model, f"failed: {exc}")
    folder = out_dir / f".model-{name}"  # the child's own: moved in whole, or not at all
    cmd = [sys.executable, "-m", "mlx_lens.cli.main", "run", model, "--out_dir", str(folder),
           *child_args]
    try:
        code, last = run_child(cmd)
        if code == 0:
            for path in sorted(folder.iterdir()):  # output-<own>..., suite-<own>-...
                kind, rest = path.name.split("-", 1)
                path.rename(out_dir / f"{kind}-{name}{rest.removeprefix(own)}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    last = last.removeprefix("mlx-lens: error: ")
    if code == EXIT_SKIPPED:
        return ModelOutcome(model, f"skipped: {last}")
    if code != 0:
        return ModelOutcome(model, f"failed: {last}")
    payload = json.loads((out_dir / f"output-{name}.json").read_text(encoding="utf-8"))
    return ModelOutcome(model, "ok", summary_of(payload))


def run_child(cmd: list[str]) -> tuple[int, str]:
    """Run a model's process, passing its output on as it comes: its stderr as written (its
    progress bars too, where this run's stderr is a terminal), its stdout line by line but for
    the paths it wrote, which name its own folder (the run lists where they end up). Returns
    its exit code and the last line of its stderr."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if on_terminal():
        env[RELAYED_TO_TERMINAL] = "1"
    tail = [""]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:
        relays = [threading.Thread(target=_pass_lines, args=(proc.stdout,)),
                  threading.Thread(target=_pass_as_written, args=(proc.stderr, tail))]
        for relay in relays:
            relay.start()
        try:
            proc.wait()
        except BaseException:  # Ctrl-C or SIGTERM here: stop the child too, it cleans up after itself
            proc.terminate()
            proc.wait()
            raise
        finally:
            for relay in relays:  # the child's last words come before this process's own
                relay.join()
    lines = tail[0].strip().splitlines()
    return proc.returncode, lines[-1] if lines else f"exit {proc.returncode}"


def _pass_lines(stream) -> None:
    for line in io.TextIOWrapper(stream, encoding="utf-8", errors="replace"):
        if not line.startswith("  wrote "):
            sys.stdout.write(line)
            sys.stdout.flush()


def _pass_as_written(stream, tail: list[str]) -> None:
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
    while chunk := stream.read1(65536):
        text = decode(chunk)
        sys.stderr.write(text)
        sys.stderr.flush()
        tail[0] = (tail[0] + text)[-4096:]  # enough for the last line


def table(outcomes: list[ModelOutcome]) -> str:
    rows = [["model", "device", "dtype", "status", *HEADLINE, "final answer"]]
    rows += [o.row() for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
