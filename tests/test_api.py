"""The Python API: the README's example runs as written, and the calls match the CLI's."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import mlx_lens
from mlx_lens.core.errors import LensError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_as_written(smollm2_dir, capsys, tmp_path, monkeypatch):
    block = re.search(r"<!-- api-example -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert block, "the README's API example is missing"
    monkeypatch.chdir(tmp_path)  # it saves runs/suite.png, as from the repository's root
    (tmp_path / "runs").mkdir()
    namespace = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    assert (tmp_path / "runs" / "suite.png").stat().st_size > 10_000
    assert set(namespace["figures"]) == {"grid", "trajectory"}
    out = capsys.readouterr().out
    assert "L_semantic" in out and "p_answer" in out
    result, suite = namespace["result"], namespace["suite"]
    # regression pins: the default model's known answer and layer (docs/stack.md)
    assert result.summary["answer"] == " Berlin" and result.summary["L_semantic"] == 30
    # the whole answer ' Berlin' is one piece, the top-1 only at the last layer: never confirmed
    assert result.summary["L_answer_top1"] == 30 and result.summary["L_answer_confirmed"] is None
    assert len(result.pure) == 31 and len(suite.per_fact) == 20


def test_load_refuses_an_unknown_lens():
    with pytest.raises(LensError, match="unknown lens 'logit'"):
        mlx_lens.load(lens="logit")


def test_api_run_is_the_cli_run(tiny_model_dirs, tmp_path):
    """The same numbers as the CLI's artifacts (the CLI is a layer over the API)."""
    from mlx_lens.output.artifacts import read_csv
    from mlx_lens.cli.main import main

    model = str(tiny_model_dirs["llama"])
    assert main(["run", model, "--backend", "torch", "--out_dir", str(tmp_path)]) == 0
    result = mlx_lens.load(model, backend="torch").run()
    cli = read_csv(tmp_path / "output-llama-pure-next-token.csv")
    assert cli["top1"].tolist() == result.pure["top1"].tolist()
    assert (cli["entropy"] - result.pure["entropy"]).abs().max() == 0  # same process, same math
