"""Several models in one run (one process each), and --keep-residuals."""
import json

import numpy as np
from safetensors.numpy import load_file

from mlx_lens.cli.main import main
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
    """README "Running": exit 1 when any model failed, all of them included; nothing is
    published and no staging folder is left."""
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

    def one_process(model, out_dir, child_args):
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
