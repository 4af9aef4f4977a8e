"""Every picture of a run folder, drawn from its artifacts alone (no model): `mlx-lens plot`,
and `mlx-lens run` unless --no-plots."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from mlx_lens.core.errors import LensError, first_line
from mlx_lens.output.artifacts import read_csv
from mlx_lens.output.suite_tables import read_suite_table
from mlx_lens.view.grid import grid
from mlx_lens.view.lenses import lens_trajectory
from mlx_lens.view.patching import heatmap, suite_heatmap
from mlx_lens.view import tracing
from mlx_lens.view.style import save_png
from mlx_lens.view.suite import suite_bands
from mlx_lens.view.trajectory import overlay, trajectory

_RECORD_NEEDS = ("layer", "pos", "token", "entropy", "top1", "prob1")
_PURE_NEEDS = ("layer", "entropy", "p_answer", "answer_rank", "kl_to_final_bits")
_AGGREGATE_NEEDS = ("group", "layer", "metric", "n", "mean", "ci_low", "ci_high")
_PATCH_NEEDS = ("kind", "layer", "pos", "recovery")
_SUITE_PATCH_NEEDS = ("kind", "where", "layer", "mean", "ci_low", "ci_high")
_TRACE_NEEDS = ("kind", "layer", "pos", "p_answer")
_SUITE_TRACE_NEEDS = ("kind", "place", "layer", "effect_mean", "effect_ci_low", "effect_ci_high",
                      "ci_unit")
_LENSES_NEEDS = ("lens", "site", "depth", "answer_rank", "answer_log2p", "entropy_bits",
                 "kl_to_final_bits")


def _read(path: Path, reader: Callable, needs: tuple[str, ...] = ()):
    """One artifact, or a one-line LensError naming it."""
    try:
        table = reader(path)
    except Exception as exc:
        raise LensError(f"cannot read {path}: {first_line(exc)}") from exc
    missing = [c for c in needs if c not in table.columns]
    if missing:
        raise LensError(f"cannot read {path}: no column {', '.join(missing)}")
    return table


def json_object(path: Path) -> dict:
    value = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _payload(path: Path) -> dict:
    payload = json_object(path)
    if not isinstance(payload.get("diagnostics"), dict):
        raise ValueError("no diagnostics")
    return payload


def draw_run_dir(run_dir: Path, colour: str = "entropy") -> list[Path]:
    """Every picture of a run folder, from its artifacts: per model plot-<model>-grid.png,
    plot-<model>-trajectory.png, with several lenses plot-<model>-lenses.png and, with a fact
    suite, plot-<model>-suite.png; with two models or more, plot-overlay.png; for an
    activation-patching trace plot-<model>-patch.png, for a causal trace plot-<model>-trace.png
    (-suite.png for a suite's). Every artifact is read before anything is drawn."""
    run_dir = Path(run_dir)
    names = sorted(p.name[len("output-"):-len(".json")] for p in run_dir.glob("output-*.json"))
    # (file prefix, pictures of a trace, of a suite, the tables' columns they need)
    interventions = (("patch", heatmap, suite_heatmap, _PATCH_NEEDS, _SUITE_PATCH_NEEDS),
                     ("trace", tracing.heatmap, tracing.suite_plot, _TRACE_NEEDS,
                      _SUITE_TRACE_NEEDS))
    traces = {}  # (prefix, name) -> (table, summary, picture): a trace, or a suite's ("-suite")
    for prefix, one, many, needs, suite_needs in interventions:
        for path in sorted(run_dir.glob(f"{prefix}-*.json")):
            name = path.name[len(prefix) + 1:-len(".json")]
            suite = name.endswith("-suite")
            table = run_dir / f"{prefix}-{name}{'-aggregates' * suite}.csv"
            traces[prefix, name] = (_read(table, read_csv, suite_needs if suite else needs),
                                    _read(path, json_object), many if suite else one)
    if not names and not traces:
        raise LensError(f"no mlx-lens artifacts in {run_dir}")
    runs, tables, compared = {}, {}, {}
    for name in names:
        payload = _read(run_dir / f"output-{name}.json", _payload)
        records = _read(run_dir / f"output-{name}-records.csv", read_csv, _RECORD_NEEDS)
        pure = _read(run_dir / f"output-{name}-pure-next-token.csv", read_csv, _PURE_NEEDS)
        runs[name] = (records, pure, payload)
        lenses = run_dir / f"output-{name}-lenses.csv"
        if lenses.is_file():
            compared[name] = _read(lenses, read_csv, _LENSES_NEEDS)
        suite = [run_dir / f"suite-{name}-aggregates{s}" for s in (".parquet", ".csv")]
        found = [p for p in suite if p.is_file()]
        if found:
            tables[name] = _read(found[0], read_suite_table, _AGGREGATE_NEEDS)
    written = []
    for name, (records, pure, payload) in runs.items():
        written.append(save_png(grid(records, payload, colour), run_dir / f"plot-{name}-grid.png"))
        written.append(save_png(trajectory(pure, payload), run_dir / f"plot-{name}-trajectory.png"))
        if name in compared:
            written.append(save_png(lens_trajectory(compared[name], payload),
                                    run_dir / f"plot-{name}-lenses.png"))
        if name in tables:
            written.append(save_png(suite_bands(tables[name], title=name),
                                 run_dir / f"plot-{name}-suite.png"))
    for (prefix, name), (frame, summary, draw) in traces.items():
        model, suite = name.removesuffix("-suite"), name.endswith("-suite")
        written.append(save_png(draw(frame, summary),
                                run_dir / f"plot-{model}-{prefix}{'-suite' * suite}.png"))
    if len(runs) >= 2:
        pictures = {name: (pure, payload) for name, (_, pure, payload) in runs.items()}
        written.append(save_png(overlay(pictures), run_dir / "plot-overlay.png"))
    return written
