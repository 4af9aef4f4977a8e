"""Artifact schemas, a pandas round trip with awkward tokens, and run-folder rotation."""
import json
from datetime import datetime

import numpy as np
import pandas as pd

from mlx_lens.output import run_dir
from mlx_lens.experiment.frames import (NEXT_TOKEN, PURE_COLUMNS, RECORD_COLUMNS, TokenNames,
                                       pure_next_token_frame, records_frame, verbose_positions)
from mlx_lens.output.artifacts import read_csv, write_model_artifacts
from mlx_lens.core.contract import LayerStats
from mlx_lens.experiment.single import ModelResult
from mlx_lens.experiment.metrics import CollapseSettings, next_token_flags

AWKWARD = ["a,b", 'say "hi"', "line\nbreak", "cr\rlf", "Grüße", "北京", "", "nan", "NULL",
           " Berlin", "\\", "'", "  ", "#", "=1+1", "é\t"]


def fake_stats(n_rows=4, n_pos=3, k=20, seed=0):
    rng = np.random.default_rng(seed)
    probs = -np.sort(-rng.dirichlet(np.ones(k + 5), size=(n_rows, n_pos))[..., :k], axis=-1)
    ids = rng.integers(0, len(AWKWARD), size=(n_rows, n_pos, k))
    return LayerStats(entropy=rng.uniform(0, 8, (n_rows, n_pos)), topk_ids=ids,
                      topk_probs=probs, kl_to_final=rng.uniform(0, 3, n_rows),
                      cos_to_final=rng.uniform(-1, 1, n_rows), p_answer=rng.uniform(0, 1, n_rows),
                      answer_rank=rng.integers(1, 100, n_rows))


def names():
    return TokenNames(lambda ids: AWKWARD[ids[0]])


def test_columns_are_the_originals_then_appended():
    top = [c for i in range(1, 21) for c in (f"top{i}", f"prob{i}")]
    assert RECORD_COLUMNS == ["layer", "pos", "token", "entropy", *top, "rest_mass"]
    assert PURE_COLUMNS[:len(RECORD_COLUMNS) + 3] == [*RECORD_COLUMNS, "copy_collapse",
                                                       "entropy_collapse", "is_answer"]


def test_records_verbose_rule_and_rest_mass():
    stats = fake_stats()
    tokens = ["plain", " capital", "x"]
    frame = records_frame(stats, tokens, names(), verbose_positions(tokens, ("capital",)))
    assert list(frame.columns) == RECORD_COLUMNS and len(frame) == 4 * 3
    first = frame[(frame.layer == 1) & (frame.pos == 0)].iloc[0]
    assert first["top5"] == AWKWARD[stats.topk_ids[1, 0, 4]]
    assert first["top6"] == "" and np.isnan(first["prob6"])  # 5 at ordinary positions
    verbose = frame[(frame.pos == 1)].iloc[0]  # token contains "capital": 20
    assert not np.isnan(verbose["prob20"])
    last = frame[(frame.pos == 2)].iloc[0]  # the last position is always verbose
    assert not np.isnan(last["prob20"])
    np.testing.assert_allclose(first["rest_mass"], 1 - stats.topk_probs[1, 0, :5].sum())


def test_csv_and_json_round_trip_awkward_tokens(tmp_path):
    stats = fake_stats()
    flags = next_token_flags(stats, [0, 1], 2, CollapseSettings())
    tokens = ["a,b", "line\nbreak", 'say "hi"']
    rec = records_frame(stats, tokens, names(), verbose_positions(tokens, ()))
    pure = pure_next_token_frame(stats, flags, names())
    payload = {"diagnostics": {"L_copy": None, "x": float("nan")}, "tokens": AWKWARD}
    paths = write_model_artifacts(tmp_path, "m", ModelResult(payload, rec, pure))
    assert [p.name for p in paths] == ["output-m.json", "output-m-records.csv",
                                       "output-m-pure-next-token.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no temps
    back = json.loads(paths[0].read_text(encoding="utf-8"))
    assert back["tokens"] == AWKWARD and back["diagnostics"]["x"] is None

    for path, frame in zip(paths[1:], (rec, pure)):
        got = read_csv(path)
        assert list(got.columns) == list(frame.columns) and len(got) == len(frame)
        for col in frame.columns:
            if pd.api.types.is_numeric_dtype(frame[col]):
                np.testing.assert_allclose(got[col].to_numpy(float), frame[col].to_numpy(float),
                                           rtol=1e-15, err_msg=col)
            else:
                assert got[col].tolist() == frame[col].tolist(), col
    assert set(read_csv(paths[2])["token"]) == {NEXT_TOKEN}


def test_rotation_keeps_every_previous_run(tmp_path):
    root = tmp_path / "runs"
    minute = datetime(2026, 11, 26, 16, 5)
    for i in range(3):  # three runs within one minute
        staging = run_dir.start(root, now=minute)
        (staging / "output-m.json").write_text(str(i))
        run_dir.publish(staging)
    assert (root / "run-latest" / "output-m.json").read_text() == "2"
    assert (root / "run-20261126-1605" / "output-m.json").read_text() == "0"
    assert (root / "run-20261126-1605-2" / "output-m.json").read_text() == "1"
    assert sorted(p.name for p in root.iterdir()) == ["run-20261126-1605", "run-20261126-1605-2",
                                                      "run-latest"]


def test_discarded_run_leaves_latest_alone(tmp_path):
    root = tmp_path / "runs"
    run_dir.publish(run_dir.start(root))
    before = sorted(p.name for p in (root / "run-latest").iterdir())
    run_dir.discard(run_dir.start(root))
    assert sorted(p.name for p in root.iterdir()) == ["run-latest"]
    assert sorted(p.name for p in (root / "run-latest").iterdir()) == before
