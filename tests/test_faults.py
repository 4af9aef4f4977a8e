"""Faults a user meets: bad paths, over-long prompts, a killed run, a dead run's leftovers."""
from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from mlx_lens import run_dir
from mlx_lens.cli import main


def test_published_run_has_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        latest = run_dir.publish(run_dir.start(tmp_path / "runs"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(latest.stat().st_mode) == 0o755


def test_next_run_removes_only_dead_runs_staging(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process now
    host = socket.gethostname()
    week = time.time() - 8 * 24 * 3600
    folders = {name: root / f"{run_dir.STAGING_PREFIX}{name}" for name in (
        f"{host}-{dead.pid}-dead", f"{host}-{os.getpid()}-live", "otherhost-1-fresh",
        "otherhost-1-old")}
    for folder in folders.values():
        folder.mkdir()
        (folder / "output-m.json").write_text("{}")
    os.utime(folders["otherhost-1-old"], (week, week))
    mine = run_dir.start(root)
    left = sorted(p.name for p in root.iterdir())
    assert left == sorted([mine.name, folders[f"{host}-{os.getpid()}-live"].name,
                           folders["otherhost-1-fresh"].name])
    assert mine.name.startswith(f"{run_dir.STAGING_PREFIX}{host}-{os.getpid()}-")


def run_cli(args, cwd, capsys):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        code = main(args)
    finally:
        os.chdir(old)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("out_dir, message", [
    ("a-file", "--out_dir {out_dir} exists and is not a folder"),
    ("a-file/sub", "cannot create --out_dir {out_dir}: Not a directory"),
])
def test_out_dir_unfit_is_one_line_before_loading(tmp_path, capsys, out_dir, message):
    (tmp_path / "a-file").write_text("mine")
    out_dir = tmp_path / out_dir
    # a model that does not exist: the out_dir error comes first, before any model is looked at
    code, err = run_cli(["run", "/no/such/model", "--out_dir", str(out_dir)], tmp_path, capsys)
    assert code == 2
    assert err.splitlines() == [f"mlx-lens: error: {message.format(out_dir=out_dir)}"]
    assert (tmp_path / "a-file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def _start_run(models, cwd):
    """`mlx-lens run` in a process of its own, once its first model's main() is running."""
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lens.cli", "run", *map(str, models),
                             "--backend", "torch"], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    # "backend: ..." is printed just before the model loads (by the child in a multi-model run);
    # the run is far from done then: torch is still to be imported.
    for line in proc.stdout:
        if line.startswith("backend:"):
            return proc
    proc.wait()
    raise AssertionError(f"the run ended before loading a model: {proc.stderr.read()}")


def _assert_terminated_cleanly(proc, cwd, n_processes):
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.splitlines()[-n_processes:] == ["mlx-lens: terminated"] * n_processes, err
    assert os.listdir(cwd / "runs") == []  # no staging left, nothing published


def test_sigterm_discards_the_staging_folder(tiny_model_dirs, tmp_path):
    proc = _start_run([tiny_model_dirs["llama"]], tmp_path)
    try:
        assert len(list(tmp_path.glob(f"runs/{run_dir.STAGING_PREFIX}*"))) == 1
        proc.terminate()
        _assert_terminated_cleanly(proc, tmp_path, 1)
    finally:
        proc.kill()


def test_sigterm_stops_a_multi_model_runs_child(tiny_model_dirs, tmp_path):
    """The child gets SIGTERM too and cleans up; its "terminated" line comes before the parent's."""
    proc = _start_run([tiny_model_dirs["llama"], tiny_model_dirs["gpt2"]], tmp_path)
    try:
        proc.terminate()
        _assert_terminated_cleanly(proc, tmp_path, 2)
    finally:
        proc.kill()
