"""A fact suite's tables on disk: the long (fact, layer) table, the per-fact table and the
aggregates, each as Parquet and as CSV, read back with the same dtypes."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from mlx_lens.core.files import atomic_write

ALL = "all"  # the aggregates' group of rows computed over every fact
_TEXT = pd.Series([""]).dtype  # what pandas gives text by default (str from pandas 3, else object)
_COPY_FLAGS = [f"copy_{kind}_k{k}" for kind in ("strict", "soft") for k in (1, 2, 3)]
_COPY_MILESTONES = [f"L_{flag}" for flag in _COPY_FLAGS]
_SCHEMA = {  # every column the three tables may hold; others are written and read as they come
    **dict.fromkeys(["fact_id", "group", "cluster", "ci_unit", "top1", "prompt", "answer",
                     "answer_token", "final_top1", "metric", "lens", "site", "norm_flip_layers"],
                    _TEXT),
    "depth": "float64",  # a site's layer: i + 0.5 for the middle of block i
    "lens_agreement_onset": "Int64",
    "lens_agreement_onset_undecided": "boolean",  # the primary lens's rows only
    **dict.fromkeys(["layer", "n", "n_clusters"], "int64"),
    **dict.fromkeys(["top1_id", "answer_rank", "L_copy", "L_copy_H", "L_semantic", "delta_layers",
                     "first_rank_le_1", "first_rank_le_5", "first_rank_le_10",
                     "first_kl_below_0.5", "first_kl_below_1.0", "first_control_margin_positive"],
                    "Int64"),
    **dict.fromkeys(["entropy", "p1", "p_answer", "kl_to_final_bits", "cos_to_final", "control_p",
                     "control_p_answer", "control_margin", "p_answer_gain", "final_p1", "mean",
                     "median", "ci_low", "ci_high"], "float64"),
    **dict.fromkeys(["copy_collapse", "entropy_collapse", "is_answer", "correct"], "bool"),
    # the whole answer, the confirmed milestones and copying from row 1
    # (mlx_lens/experiment/milestones.py)
    **dict.fromkeys(["answer_pieces", "L_answer_top1", "L_answer_confirmed",
                     "L_semantic_confirmed", *_COPY_MILESTONES], "Int64"),
    **dict.fromkeys(["answer_log2p", "answer_min_lead_bits", "first_piece_log2p",
                     "first_piece_lead_bits",
                     "control_log2p", "L_answer_top1_lead_bits", "L_answer_confirmed_lead_bits",
                     "L_semantic_confirmed_lead_bits", "L_semantic_lead_bits",
                     "embedding_echo_p"], "float64"),
    **dict.fromkeys(["answer_top1", "L_answer_top1_undecided", "L_answer_confirmed_undecided",
                     "L_semantic_confirmed_undecided", "embedding_echo", *_COPY_FLAGS], "bool"),
    "control_shares_first_piece": "boolean",  # missing for a fact without a control
}
_TEXT_COLUMNS = {c for c, dtype in _SCHEMA.items() if dtype is _TEXT}


def _conform(frame: pd.DataFrame) -> pd.DataFrame:
    """The schema's dtypes, so that every model's files share one Parquet schema. A missing text
    cell becomes "" (a CSV cannot tell them apart; the records CSV writes blank tokens so too)."""
    known = [c for c in frame.columns if c in _SCHEMA]
    for c in known:
        if _SCHEMA[c] == "bool" and frame[c].isna().any():
            raise ValueError(f"column {c!r} is bool but has missing values")  # astype: NaN -> True
    out = frame.astype({c: _SCHEMA[c] for c in known})
    text = [c for c in known if c in _TEXT_COLUMNS]
    out[text] = out[text].fillna("")
    return out.reset_index(drop=True)


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    frame.to_parquet(path, engine="pyarrow", index=False)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    # As the other artifacts: RFC 4180 (CRLF, so a token holding a lone "\r" is quoted too).
    frame.to_csv(path, index=False, encoding="utf-8", lineterminator="\r\n")


def write_suite_tables(out_dir: Path, model_name: str, long: pd.DataFrame,
                       per_fact: pd.DataFrame, aggregates: pd.DataFrame,
                       prefix: str = "") -> list[Path]:
    """suite-<model>-{layers,facts,aggregates}.{parquet,csv}, each written atomically (prefix
    "lens-": the tables per lens and site, suite-<model>-lens-layers.csv ...)."""
    paths = []
    for kind, frame in ((f"{prefix}layers", long), (f"{prefix}facts", per_fact),
                        (f"{prefix}aggregates", aggregates)):
        frame = _conform(frame)
        for suffix, write in ((".parquet", _write_parquet), (".csv", _write_csv)):
            paths.append(Path(out_dir) / f"suite-{model_name}-{kind}{suffix}")
            atomic_write(paths[-1], lambda p, f=frame, w=write: w(f, p))
    return paths


def read_suite_table(path: str | Path) -> pd.DataFrame:
    """Read a suite table (.parquet or .csv) back with the dtypes it was written with: text stays
    text ("nan", "", "NULL" are tokens), Int64 columns keep their NAs."""
    path = Path(path)
    if path.suffix == ".parquet":
        return _conform(pd.read_parquet(path, engine="pyarrow"))
    if path.suffix != ".csv":
        raise ValueError(f"not a suite table (.parquet or .csv): {path}")
    header = pd.read_csv(path, nrows=0).columns
    text = [c for c in header if c in _TEXT_COLUMNS]
    frame = pd.read_csv(path, dtype={c: str for c in text}, keep_default_na=False,
                        na_values={c: [""] for c in header if c not in _TEXT_COLUMNS},
                        encoding="utf-8")
    return _conform(frame)
