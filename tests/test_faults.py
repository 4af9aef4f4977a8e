"""Faults a user meets: bad paths, over-long prompts, a killed run, a dead run's leftovers."""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mlx_lens.output import run_dir
from mlx_lens.cli.main import main
from mlx_lens.core.errors import LensError
from mlx_lens.experiment.single import encode_prompt
from mlx_lens.experiment.probes import TEST_PROMPTS
from tests.test_cli import run_main


def test_published_run_has_the_umask_permissions(tiny_model_dirs, tmp_path, capsys):
    """A colleague on a shared machine can read published results: folder and files get the
    umask's modes, not mkdtemp's / mkstemp's 0700 / 0600."""
    old = os.umask(0o022)
    try:
        code, _, err = run_main(["run", str(tiny_model_dirs["llama"]), "--backend", "torch",
                             "--no-probes"], tmp_path, capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    latest = tmp_path / "runs" / "run-latest"
    assert stat.S_IMODE(latest.stat().st_mode) == 0o755
    files = list(latest.iterdir())  # timestamp, JSON, two CSVs, two pictures
    assert len(files) == 6 and all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in files)


def test_next_run_removes_only_dead_runs_staging(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process now
    host = socket.gethostname()
    eight_days_ago = time.time() - 8 * 24 * 3600
    folders = {name: root / f"{run_dir.STAGING_PREFIX}{name}" for name in (
        f"{host}-{dead.pid}-dead", f"{host}-{os.getpid()}-live", "otherhost-1-fresh",
        "otherhost-1-old")}
    for folder in folders.values():
        folder.mkdir()
        (folder / "output-m.json").write_text("{}")
    os.utime(folders["otherhost-1-old"], (eight_days_ago, eight_days_ago))
    mine = run_dir.start(root)
    left = sorted(p.name for p in root.iterdir())
    assert left == sorted([mine.name, folders[f"{host}-{os.getpid()}-live"].name,
                           folders["otherhost-1-fresh"].name])
    assert mine.name.startswith(f"{run_dir.STAGING_PREFIX}{host}-{os.getpid()}-")


def test_runs_publishing_at_once_both_survive(tmp_path, monkeypatch):
    """Run A has rotated run-latest away when run B publishes: B waits for A to finish (without
    the lock B took run-latest in between and A's rename failed, leaving A, finished, in its
    staging folder for the next run to delete). Every run ends up published."""
    root = tmp_path / "runs"
    run_dir.publish(run_dir.start(root))  # an earlier run
    a, b = run_dir.start(root), run_dir.start(root)
    (a / "a.txt").write_text("a")
    (b / "b.txt").write_text("b")
    rename, b_done, failures = Path.rename, threading.Event(), []

    def slow_rotation(self, target):  # A pauses right after moving run-latest away
        moved = rename(self, target)
        if self.name == run_dir.LATEST and threading.current_thread().name == "A":
            b_done.wait(timeout=1.0)  # B's publish, if nothing holds it, happens now
        return moved

    def publish(staging):
        try:
            run_dir.publish(staging)
        except OSError as exc:
            failures.append(exc)

    monkeypatch.setattr(Path, "rename", slow_rotation)
    first = threading.Thread(target=publish, args=(a,), name="A")
    first.start()
    time.sleep(0.2)  # A is in its pause
    publish(b)
    b_done.set()
    first.join()
    assert failures == []
    assert not list(root.glob(f"{run_dir.STAGING_PREFIX}*"))
    published = {f.name for run in root.iterdir() for f in run.iterdir()
                 if not f.name.startswith(run_dir.STAMP_PREFIX)}
    assert published == {"a.txt", "b.txt"} and (root / run_dir.LATEST / "b.txt").is_file()
    assert len(list(root.iterdir())) == 3  # the earlier run, A and B


def test_a_reused_out_dir_is_refused_before_loading(tmp_path, capsys):
    """An earlier run's files would mix with this run's (the report would show both): refused
    in one line, before any model is looked at, and the earlier files stay as they were."""
    used = tmp_path / "used"
    used.mkdir()
    (used / "output-old.json").write_text("{}")
    code, out, err = run_main(["run", "/no/such/model", "--out_dir", str(used)], tmp_path, capsys)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"mlx-lens: error: --out_dir {used} is not empty: a run's folder "
                                "holds that run's files only (name a new or empty folder)"]
    assert os.listdir(used) == ["output-old.json"]


@pytest.mark.parametrize("out_dir, message", [
    ("a-file", "--out_dir {out_dir} exists and is not a folder"),
    ("a-file/sub", "cannot create --out_dir {out_dir}: Not a directory"),
])
def test_out_dir_unfit_is_one_line_before_loading(tmp_path, capsys, out_dir, message):
    (tmp_path / "a-file").write_text("mine")
    out_dir = tmp_path / out_dir
    # a model that does not exist: the out_dir error comes first, before any model is looked at
    code, _, err = run_main(["run", "/no/such/model", "--out_dir", str(out_dir)], tmp_path, capsys)
    assert code == 2
    assert err.splitlines() == [f"mlx-lens: error: {message.format(out_dir=out_dir)}"]
    assert (tmp_path / "a-file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_failed_run_takes_away_the_out_dir_it_made(tmp_path, capsys):
    code, _, err = run_main(["run", "/no/such/model", "--out_dir", str(tmp_path / "new")], tmp_path,
                        capsys)
    assert code == 2 and "model not found" in err
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    run_main(["run", "/no/such/model", "--out_dir", str(tmp_path / "kept")], tmp_path, capsys)
    assert (tmp_path / "kept").is_dir()  # the user's own folder stays


def _start_run(models, cwd):
    """`mlx-lens run` in a process of its own, once its first model's main() is running."""
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lens.cli.main", "run", *map(str, models),
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


LONG_PROMPT = "The capital of Germany is Berlin. " * 40  # 282 tokens on the tiny tokenizer


def _previous_run(cwd):
    previous = cwd / "runs" / "run-latest"
    previous.mkdir(parents=True)
    (previous / "keep.txt").write_text("old run")
    return previous


def _assert_nothing_written(cwd):
    assert os.listdir(cwd / "runs") == ["run-latest"]
    assert os.listdir(cwd / "runs" / "run-latest") == ["keep.txt"]


def _forbid_sweep(monkeypatch, backend):
    if backend == "torch":
        from torch_ref.backend import TorchBackend as cls
    else:
        from mlx_lens.mlx.backend import MlxBackend as cls
    monkeypatch.setattr(cls, "sweep", lambda *a, **k: pytest.fail("swept an over-long prompt"))


def test_encode_prompt_refuses_more_than_the_context():
    class Words:  # one token per word
        def encode(self, text):
            return list(range(len(text.split())))

    assert encode_prompt(Words(), "a b c", n_ctx=3) == [0, 1, 2]
    assert encode_prompt(Words(), "a b c d") == [0, 1, 2, 3]  # no n_ctx: no limit
    with pytest.raises(LensError) as err:
        encode_prompt(Words(), "a b c d", n_ctx=3)
    assert str(err.value) == "the prompt is 4 tokens, longer than the model's context of 3 tokens"


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("model", ["llama", "gpt2"])  # max_position_embeddings / n_positions 128
def test_over_long_prompt_is_refused_before_the_sweep(tiny_model_dirs, tmp_path, capsys,
                                                      monkeypatch, model, backend):
    path = tiny_model_dirs[model]
    n_tokens = len(AutoTokenizer.from_pretrained(path).encode(LONG_PROMPT))
    _forbid_sweep(monkeypatch, backend)
    _previous_run(tmp_path)
    code, _, err = run_main(["run", str(path), "--backend", backend, "--prompt", LONG_PROMPT],
                        tmp_path, capsys)
    assert code == 2
    assert err.splitlines() == [f"mlx-lens: error: the prompt is {n_tokens} tokens, longer than "
                                "the model's context of 128 tokens"]
    _assert_nothing_written(tmp_path)


def test_probe_prompt_longer_than_the_context_is_refused_before_the_sweep(
        tiny_model_dirs, tmp_path, capsys, monkeypatch):
    path = shutil.copytree(tiny_model_dirs["llama"], tmp_path / "short-context")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 20}))
    _forbid_sweep(monkeypatch, "torch")
    _previous_run(tmp_path)
    # the main prompt fits (6 tokens), the original's last probe (24 tokens), given, does not
    code, _, err = run_main(["run", str(path), "--backend", "torch", "--prompt",
                             "The capital of Germany is", "--probe", TEST_PROMPTS[-1]],
                            tmp_path, capsys)
    assert code == 2
    assert err.splitlines() == ["mlx-lens: error: the prompt is 24 tokens, longer than the "
                                "model's context of 20 tokens"]
    _assert_nothing_written(tmp_path)


@pytest.mark.parametrize("extra", [["--backend", "torch"], ["--backend", "mlx", "--no-probes"]])
def test_same_command_writes_the_same_csv_bytes(tiny_model_dirs, tmp_path, extra):
    """Two runs of one command, each in its own process as a user runs them, on the CPU."""
    for out_dir in ("A", "B"):
        proc = subprocess.run([sys.executable, "-m", "mlx_lens.cli.main", "run",
                               str(tiny_model_dirs["llama"]), "--out_dir", out_dir, *extra],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    csvs = sorted(p.name for p in (tmp_path / "A").glob("*.csv"))
    assert csvs == ["output-llama-pure-next-token.csv", "output-llama-records.csv"]
    for name in csvs:
        assert (tmp_path / "A" / name).read_bytes() == (tmp_path / "B" / name).read_bytes(), name


def test_parity_refuses_an_over_long_prompt(tiny_model_dirs, capsys):
    path = tiny_model_dirs["llama"]
    n_tokens = len(AutoTokenizer.from_pretrained(path).encode(LONG_PROMPT))
    code = main(["parity", str(path), "--lens", "raw", "--prompt", "Berlin", "--prompt",
                 LONG_PROMPT])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"mlx-lens: error: the prompt is {n_tokens} tokens, longer than the model's context of "
        "128 tokens"]


def test_debug_shows_the_cause_of_a_one_line_error(tmp_path, capsys, monkeypatch):
    """A load failure is one line for users; with MLX_LENS_DEBUG=1 the whole chain surfaces,
    down to the loader's own exception."""
    from mlx_lens.core.errors import LensError

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')  # no weights, no tokenizer
    args = ["run", str(broken), "--backend", "torch", "--out_dir", str(tmp_path / "out")]
    assert main(args) == 2
    assert capsys.readouterr().err.count("\n") == 1
    monkeypatch.setenv("MLX_LENS_DEBUG", "1")
    with pytest.raises(LensError, match="cannot load") as caught:
        main(args)
    assert caught.value.__cause__ is not None and not isinstance(caught.value.__cause__, LensError)
