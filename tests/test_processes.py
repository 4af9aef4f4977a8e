"""Several models in one run (one process each), and --keep-residuals."""
import io
import json
import shutil
import sys
import threading
import time

import numpy as np
from safetensors.numpy import load_file

from mlx_lens.cli.main import main
from mlx_lens.cli.processes import ModelOutcome, artifact_names, run_child
from mlx_lens.core.progress import RELAYED_TO_TERMINAL
from mlx_lens.experiment.single import final_answer
from mlx_lens.loading.sources import resolve
from torch_ref.backend import TorchBackend


def test_several_models_share_one_run_and_survive_a_failure(tiny_model_dirs, tmp_path, capsys,
                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')  # no weights
    models = [str(tiny_model_dirs["llama"]), str(broken), "/no/such/model",
              str(tiny_model_dirs["gpt2"])]
    code = main(["run", *models, "--no-probes"])
    out = capsys.readouterr().out
    assert code == 1  # one model failed
    latest = tmp_path / "runs" / "run-latest"
    names = sorted(p.name for p in latest.glob("output-*"))
    assert names == sorted(f"output-{m}{s}" for m in ("llama", "gpt2")
                           for s in (".json", "-records.csv", "-pure-next-token.csv"))
    table = out[out.index("model  "):]
    rows = {line.split()[0]: line for line in table.splitlines()[1:] if line.strip()}
    assert " ok " in rows[models[0]] and " ok " in rows[models[3]]
    assert "failed: cannot load" in rows[str(broken)]
    assert "failed: model not found" in rows["/no/such/model"]
    header = table.splitlines()[0]
    for column in ("device", "dtype", "status", "L_copy_strict_k1", "L_copy_soft_k1",
                   "L_semantic", "final answer"):
        assert column in header
    assert "L_copy" not in header.split()  # the original's, from row 0: in the JSON only


def test_keep_residuals_round_trip(tiny_model_dirs, tmp_path):
    path = tiny_model_dirs["gpt2"]
    assert main(["run", str(path), "--backend", "torch", "--out_dir", str(tmp_path),
                 "--keep-residuals", "--no-probes"]) == 0
    saved = load_file(tmp_path / "output-gpt2-residuals.safetensors")
    backend = TorchBackend(resolve(str(path)))
    ids = json.loads((tmp_path / "output-gpt2.json").read_text())["diagnostics"]["prompt_token_ids"]
    want = backend.residuals(ids)
    assert sorted(saved) == [f"layer_{i:03d}" for i in range(4)]
    for i, row in enumerate(want):
        np.testing.assert_array_equal(saved[f"layer_{i:03d}"], row)
    from safetensors import safe_open

    with safe_open(tmp_path / "output-gpt2-residuals.safetensors", "np") as f:
        assert json.loads(f.metadata()["token_ids"]) == ids


def test_a_run_of_several_models_exits_1_when_every_model_failed(tmp_path, capsys, monkeypatch):
    """docs/running.md "What a run prints": exit 1 when any model failed, all of them included;
    nothing is published and no staging folder is left."""
    monkeypatch.chdir(tmp_path)
    code = main(["run", "/no/such/model", "/nor/this/one", "--no-probes"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1] == "mlx-lens: error: none of the 2 models produced artifacts"
    assert list((tmp_path / "runs").iterdir()) == []


def test_each_model_of_several_gets_the_given_probes(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    """--probe reaches every model's own process (one starting with "-" included)."""
    from mlx_lens.cli import main as cli
    from mlx_lens.cli.processes import ModelOutcome

    children = []

    def one_process(model, name, out_dir, child_args):
        children.append(child_args)
        return ModelOutcome(model, "failed: not run here")

    monkeypatch.setattr(cli, "run_one_process", one_process)
    given = ["Paris is the capital of", "-- a probe with dashes"]
    models = [str(tiny_model_dirs["llama"]), str(tiny_model_dirs["gpt2"])]
    assert main(["run", *models, "--probe", given[0], f"--probe={given[1]}",
                 "--out_dir", str(tmp_path / "out")]) == 1
    assert len(children) == 2
    for child in children:
        assert cli._parser().parse_args(["run", "model", *child]).test_prompts == given


def test_models_of_one_name_keep_their_own_files(tiny_model_dirs, tmp_path, capsys):
    """A/final and B/final (two snapshot folders of one name): each its own set of files, named
    apart by the folder above, and each row of the table its own model's numbers."""
    a, b = tmp_path / "A" / "final", tmp_path / "B" / "final"
    shutil.copytree(tiny_model_dirs["llama"], a)
    shutil.copytree(tiny_model_dirs["gpt2"], b)
    out = tmp_path / "out"
    assert main(["run", str(a), str(b), "--backend", "torch", "--no-probes", "--no-plots",
                 "--out_dir", str(out)]) == 0
    table = capsys.readouterr().out.split("final answer", 1)[1]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"output-{m}{s}" for m in ("A-final", "B-final")
        for s in (".json", "-records.csv", "-pure-next-token.csv"))
    for model, name, arch in ((a, "A-final", "llama"), (b, "B-final", "gpt2")):
        payload = json.loads((out / f"output-{name}.json").read_text())
        assert payload["diagnostics"]["architecture"] == arch
        answer = final_answer(payload)
        row = next(line for line in table.splitlines() if line.startswith(str(model)))
        assert f"{answer[0]!r} ({answer[1]:.2f})" in row


def test_artifact_names_tell_models_of_one_name_apart(tmp_path):
    for folder in ("A/final", "B/final", "org1-Y"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "config.json").write_text("{}")
    assert artifact_names([str(tmp_path / "A/final"), str(tmp_path / "B/final"), "org/X"]) == [
        "A-final", "B-final", "X"]
    assert artifact_names(["org1/Y", "org2/Y", str(tmp_path / "org1-Y")]) == [
        "org1-Y", "org2-Y", "org1-Y-2"]
    assert artifact_names(["org/X", "org/X", "/no/such/model"]) == ["org-X", "org-X-2", None]


def test_a_models_process_shows_its_output_as_it_comes(tmp_path, monkeypatch):
    """The child's stderr (its progress bars: a "\\r" and no newline) reaches this process's
    stderr while the child still runs; the paths it wrote (its own folder) are left out; its
    last stderr line is its status; the child knows when that stderr is a terminal."""
    go = tmp_path / "go"
    child = (f"import os, pathlib, sys, time\n"
             f"print('backend: x'); print('  wrote /child/folder/output-x.json')\n"
             f"sys.stderr.write('bar ' + os.environ.get({RELAYED_TO_TERMINAL!r}, '-') + '\\r')\n"
             f"sys.stderr.flush()\n"
             f"deadline = time.time() + 60\n"
             f"while not pathlib.Path({str(go)!r}).exists() and time.time() < deadline:\n"
             f"    time.sleep(0.05)\n"
             f"sys.stderr.write('mlx-lens: error: boom\\n')\n"
             f"sys.exit(3)\n")
    err, out = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(err, "isatty", lambda: True, raising=False)
    result = []
    worker = threading.Thread(target=lambda: result.append(run_child([sys.executable, "-c", child])))
    worker.start()
    deadline = time.time() + 30
    while "bar" not in err.getvalue() and time.time() < deadline:
        time.sleep(0.05)
    seen = err.getvalue()
    go.touch()
    worker.join()
    assert seen == "bar 1\r"  # before the child ended
    assert result == [(3, "mlx-lens: error: boom")]
    assert out.getvalue() == "backend: x\n"


def test_the_table_says_never_where_the_json_has_null():
    summary = {"device": "cpu", "dtype": "float32", "L_copy_strict_k1": 1,
               "L_copy_soft_k1": None, "L_semantic": None, "answer": "ag", "p": 0.2}
    assert ModelOutcome("m", "ok", summary).row() == ["m", "cpu", "float32", "ok", "1", "never",
                                                      "never", "'ag' (0.20)"]
    assert ModelOutcome("x", "failed: no").row() == ["x", "", "", "failed: no", "", "", "", ""]
