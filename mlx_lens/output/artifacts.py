"""The original's artifacts on disk: per-model JSON, records CSV and pure next-token CSV (their
content: mlx_lens/experiment/frames.py), and the residuals with --keep-residuals.

Every file is written to a temporary name and renamed, so a crash never leaves a half-written
artifact.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from mlx_lens.core.files import atomic_write, json_safe


# columns of text in the CSVs, beside top1..topK ('', 'nan', 'null' are tokens too)
_TEXT = {"token", "input_token", "lens", "site", "lens_a", "lens_b", "place"}


def read_csv(path: str | Path) -> pd.DataFrame:
    """Read any of the CSVs back: token and lens columns stay text."""
    header = pd.read_csv(path, nrows=0).columns
    text = [c for c in header if c in _TEXT or re.fullmatch(r"top\d+", c)]
    numeric = [c for c in header if c not in text]
    return pd.read_csv(path, dtype={c: str for c in text}, keep_default_na=False,
                       na_values={c: [""] for c in numeric})


def write_model_artifacts(out_dir: Path, model_name: str, result) -> list[Path]:
    """The three artifacts of an experiment's ModelResult (and its residuals, when kept; the
    lens tables, with several lenses)."""
    paths = [out_dir / f"output-{model_name}.json", out_dir / f"output-{model_name}-records.csv",
             out_dir / f"output-{model_name}-pure-next-token.csv"]
    text = json.dumps(json_safe(result.payload), indent=2, ensure_ascii=False, allow_nan=False)
    atomic_write(paths[0], lambda p: p.write_text(text + "\n", encoding="utf-8"))
    for path, frame in zip(paths[1:], (result.records, result.pure)):
        # CRLF (RFC 4180) so that csv quotes tokens holding a lone "\r" too; with "\n" it would not.
        atomic_write(path, lambda p, f=frame: f.to_csv(p, index=False, encoding="utf-8",
                                                        lineterminator="\r\n"))
    for kind, frame in (("lenses", result.lenses), ("lens-pairs", result.lens_pairs),
                        ("lens-cells", result.lens_cells)):
        if frame is not None:  # several lenses (mlx_lens/experiment/lenses.py)
            paths.append(out_dir / f"output-{model_name}-{kind}.csv")
            atomic_write(paths[-1], lambda p, f=frame: f.to_csv(p, index=False, encoding="utf-8",
                                                                lineterminator="\r\n"))
    if result.residuals is not None:
        paths.append(out_dir / f"output-{model_name}-residuals.safetensors")
        atomic_write(paths[-1], lambda p: save_residuals(p, result.residuals, result.prompt_ids))
    return paths


def save_residuals(path: Path, residuals: np.ndarray, token_ids: list[int]) -> None:
    """One [T, d] float32 tensor per row: layer_000 = embeddings, layer_i = after block i-1."""
    from safetensors.numpy import save_file

    tensors = {f"layer_{i:03d}": np.ascontiguousarray(r, np.float32) for i, r in enumerate(residuals)}
    save_file(tensors, str(path), metadata={"token_ids": json.dumps([int(t) for t in token_ids])})


def write_patch_artifacts(out_dir: Path, model_name: str, result) -> list[Path]:
    """An activation-patching trace (mlx_lens/experiment/patching.py): patch-<model>.parquet
    and .csv (kind, layer, pos, token, the metrics) and patch-<model>.json (baselines,
    settings, the strongest restorations)."""
    return _tables_and_summary(Path(out_dir) / f"patch-{model_name}", {"": result.frame},
                               result.summary)


def write_patch_suite_artifacts(out_dir: Path, model_name: str, result) -> list[Path]:
    """A fact suite's trace: patch-<model>-suite-layers (per fact, kind, layer, where) and
    -aggregates (per kind, where, layer), each .parquet and .csv, and patch-<model>-suite.json
    (settings, the facts skipped and why)."""
    return _tables_and_summary(Path(out_dir) / f"patch-{model_name}-suite",
                               {"-layers": result.long, "-aggregates": result.aggregates},
                               result.summary)


def write_trace_artifacts(out_dir: Path, model_name: str, result) -> list[Path]:
    """A causal trace (mlx_lens/experiment/tracing.py): trace-<model>.parquet and .csv (kind,
    layer, pos, token, place, p_answer, its effect), trace-<model>.json (settings, the noise's
    statistic and seed, baselines) and trace-<model>-noise.safetensors (the noise itself)."""
    stem = Path(out_dir) / f"trace-{model_name}"
    s = result.summary
    spans = {"prompt": {"token_ids": s["token_ids"], "subject_span": s["subject_span"]}}
    return (_tables_and_summary(stem, {"": result.frame}, s)
            + [_save_noise(stem.with_name(f"{stem.name}-noise.safetensors"), result.noise,
                           spans, s["noise"])])


def write_trace_suite_artifacts(out_dir: Path, model_name: str, result) -> list[Path]:
    """A fact suite's causal trace: trace-<model>-suite-layers (per fact, kind, layer, place),
    -aggregates (per kind, place, layer), each .parquet and .csv, trace-<model>-suite.json and
    trace-<model>-suite-noise.safetensors (one tensor per fact)."""
    stem = Path(out_dir) / f"trace-{model_name}-suite"
    return (_tables_and_summary(stem, {"-layers": result.long,
                                       "-aggregates": result.aggregates}, result.summary)
            + [_save_noise(stem.with_name(f"{stem.name}-noise.safetensors"), result.noise,
                           result.summary["spans"], result.summary["noise"])])


def _save_noise(path: Path, noise: dict[str, np.ndarray], spans: dict, settings: dict) -> Path:
    """[N, subject tokens, d] float32 per prompt, named by it, and in the metadata each one's
    token ids and subject span: a noised run is row 0 (the input of block 0) plus noise[i] at
    the span, in the model's compute dtype."""
    from safetensors.numpy import save_file

    tensors = {name: np.ascontiguousarray(v, np.float32) for name, v in noise.items()}
    meta = {"mlx_lens": json.dumps(json_safe({"noise": settings, "prompts": spans}))}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))
    return path


def _tables_and_summary(stem: Path, frames: dict[str, pd.DataFrame], summary: dict) -> list[Path]:
    paths = []
    for suffix, frame in frames.items():
        paths += [stem.with_name(f"{stem.name}{suffix}.parquet"),
                  stem.with_name(f"{stem.name}{suffix}.csv")]
        atomic_write(paths[-2], lambda p, f=frame: f.to_parquet(p, engine="pyarrow", index=False))
        atomic_write(paths[-1], lambda p, f=frame: f.to_csv(p, index=False, encoding="utf-8",
                                                            lineterminator="\r\n"))
    paths.append(stem.with_suffix(".json"))
    text = json.dumps(json_safe(summary), indent=2, ensure_ascii=False, allow_nan=False)
    atomic_write(paths[-1], lambda p: p.write_text(text + "\n", encoding="utf-8"))
    return paths
