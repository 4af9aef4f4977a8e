"""`mlx-lens run` end to end: tiny models, the packaged SmolLM2, and bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mlx_lens.core.lens import FINAL_NORM
from mlx_lens.core import bounds
from mlx_lens.experiment.frames import PURE_COLUMNS, RECORD_COLUMNS
from mlx_lens.output.artifacts import read_csv
from mlx_lens.cli.main import main
from mlx_lens.loading.sources import resolve
from mlx_lens.checks.parity import logit_bound
from torch_ref.backend import TorchBackend


def run_main(args, cwd, capsys):
    """`mlx-lens ARGS` in-process from folder cwd: (exit code, stdout, stderr)."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        code = main(args)
    finally:
        os.chdir(old)
    out = capsys.readouterr()
    return code, out.out, out.err


def run_cli(args, cwd, capsys):
    return run_main(["run", *args], cwd, capsys)


def check_artifacts(folder, name, n_layers, probes=True):
    payload = json.loads((folder / f"output-{name}.json").read_text())
    for key in ("diagnostics", "prompt", "final_prediction", "model_stats"):
        assert key in payload
    assert ("test_prompts" in payload) == ("temperature_exploration" in payload) == probes
    d = payload["diagnostics"]
    for key in ("L_copy", "L_copy_H", "L_semantic", "delta_layers", "lens", "copy_threshold",
                "copy_margin", "backend", "compute_dtype", "unembed_dtype"):
        assert key in d
    assert len(payload["final_prediction"]["topk"]) == 20
    records = read_csv(folder / f"output-{name}-records.csv")
    pure = read_csv(folder / f"output-{name}-pure-next-token.csv")
    assert list(records.columns) == RECORD_COLUMNS and list(pure.columns) == PURE_COLUMNS
    assert sorted(pure["layer"]) == list(range(n_layers + 1))
    assert records["layer"].max() == n_layers
    return payload, records, pure


def test_run_on_tiny_model_rotates(tiny_model_dirs, tmp_path, capsys):
    model = str(tiny_model_dirs["llama"])
    for _ in range(2):
        code, out, err = run_cli([model, "--backend", "torch"], tmp_path, capsys)
        assert code == 0, err
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs[-1] == "run-latest" and len(runs) == 2 and runs[0].startswith("run-2")
    payload, _, _ = check_artifacts(tmp_path / "runs" / "run-latest", "llama", 3)
    assert "final answer" in out and "L_semantic" in out and "run-latest" in out
    # a milestone never reached (JSON null) reads 'never', not Python's None (#31 item 12)
    d = payload["diagnostics"]
    assert d["L_semantic"] is None  # the tiny random model never ranks the answer first
    assert "L_semantic=never of 3 layers" in out and "None" not in out


def test_out_dir_and_lens_recorded(tiny_model_dirs, tmp_path, capsys):
    out_dir = tmp_path / "custom"
    code, _, err = run_cli([str(tiny_model_dirs["gpt2"]), "--out_dir", str(out_dir), "--lens",
                            "next-norm", "--copy-threshold", "0.8", "--no-probes"], tmp_path, capsys)
    assert code == 0, err
    d = json.loads((out_dir / "output-gpt2.json").read_text())["diagnostics"]
    assert d["lens"] == "next-norm" and d["copy_threshold"] == 0.8
    assert not (tmp_path / "runs").exists()


def test_console_script_end_to_end(tiny_model_dirs, tmp_path):
    """The installed entry point, as a user runs it."""
    exe = shutil.which("mlx-lens", path=os.path.dirname(sys.executable))
    assert exe, "mlx-lens console script is not installed next to this python"
    proc = subprocess.run([exe, "run", str(tiny_model_dirs["qwen3"]), "--no-probes"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "runs" / "run-latest" / "output-qwen3.json").is_file()


def test_a_run_imports_only_what_it_uses(tiny_model_dirs, tmp_path):
    """A torch run imports no mlx; matplotlib only to draw. The pictures are a phase of the
    run's time line, and the command freezes its objects before the interpreter exits."""
    code = ("import sys, gc; from mlx_lens.cli.main import command; "
            "rc = command(sys.argv[1:]); "
            "print('IMPORTED', *[m for m in ('mlx', 'mlx_lm', 'matplotlib') if m in sys.modules]); "
            "print('FROZEN', gc.get_freeze_count() > 0); sys.exit(rc)")
    model = str(tiny_model_dirs["llama"])
    for extra, drawn in ((["--no-plots"], ""), ([], " matplotlib")):
        proc = subprocess.run([sys.executable, "-c", code, "run", model, "--backend", "torch",
                               "--no-probes", "--out_dir", str(tmp_path / f"out{drawn}"), *extra],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert f"IMPORTED{drawn}\n" in proc.stdout and "FROZEN True" in proc.stdout
        time_line = next(x for x in proc.stdout.splitlines() if x.startswith("time:"))
        assert ("pictures" in time_line) == bool(drawn)


def test_auto_imports_no_mlx_without_a_gpu_build():
    """On Linux, MLX has a GPU only through mlx's CUDA wheels: without them, --backend auto
    picks torch without importing mlx."""
    from mlx_lens import backend_choice

    if sys.platform != "linux" or backend_choice._mlx_cuda_installed():
        pytest.skip("MLX may have a GPU here: auto must import mlx to ask it")
    code = ("import sys; from mlx_lens import backend_choice; "
            "print(backend_choice.pick('auto')[0], 'mlx' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["torch", "False"], proc.stderr


@pytest.mark.parametrize("args, message", [
    (["/no/such/model"], "model not found"),
    (["{unsupported}"], "unsupported architecture 'made_up'"),
    (["{llama}", "--prompt", "   "], "empty prompt"),
    (["{llama}", "--answer", ""], "empty answer"),
    (["{broken}"], "cannot load"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_model_dirs, tmp_path, capsys, args, message):
    (tmp_path / "unsupported").mkdir()
    (tmp_path / "unsupported" / "config.json").write_text('{"model_type": "made_up"}')
    broken = shutil.copytree(tiny_model_dirs["llama"], tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    previous = tmp_path / "runs" / "run-latest"
    previous.mkdir(parents=True)
    (previous / "keep.txt").write_text("old run")
    args = [a.format(llama=tiny_model_dirs["llama"], unsupported=tmp_path / "unsupported",
                     broken=broken) for a in args]
    code, _, err = run_cli(args, tmp_path, capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["run-latest"]
    assert sorted(p.name for p in previous.iterdir()) == ["keep.txt"]


def test_auto_backend_says_why(tiny_model_dirs, tmp_path, capsys):
    code, out, err = run_cli([str(tiny_model_dirs["llama"]), "--no-probes"], tmp_path, capsys)
    assert code == 0, err
    from mlx_lens.backend_choice import mlx_gpu

    expected = "backend: mlx (auto: MLX has a" if mlx_gpu() else "backend: torch (auto: no MLX GPU"
    assert expected in out
    d = json.loads((tmp_path / "runs/run-latest/output-llama.json").read_text())["diagnostics"]
    assert d["backend_reason"].startswith("auto:")


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_chat_without_template_is_refused(tiny_model_dirs, tmp_path, capsys, backend):
    code = main(["chat", str(tiny_model_dirs["llama"]), "--backend", backend])
    err = capsys.readouterr().err
    assert code != 0 and "no chat template" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_chat_on_default_model(smollm2_dir, capsys, backend):
    assert main(["chat", "--backend", backend, "--max-tokens", "12"]) == 0
    assert "Berlin" in capsys.readouterr().out.splitlines()[-1]


def test_default_model_answers_berlin_at_the_last_layer(smollm2_dir, tmp_path, capsys):
    """The packaged SmolLM2-135M (real weights), as `mlx-lens run` with no model runs it, on both
    backends: the same answer; entropies within the derived bound of two backends' sweeps (each
    sweep's reductions, docs/numerics.md §2, and the parity logit bound, §4, through §3); the
    same top-1 wherever that bound cannot reorder it. MLX runs without the extra probes: mlx on a
    Linux CPU is slow (docs/stack.md)."""
    frames, depths = {}, {}
    for backend, extra in (("torch", []), ("mlx", ["--no-probes"])):
        out_dir = tmp_path / backend
        code, out, err = run_cli(["--backend", backend, "--out_dir", str(out_dir), *extra],
                                 tmp_path, capsys)
        assert code == 0, err
        payload, records, pure = check_artifacts(out_dir, "SmolLM2-135M-Instruct", 30,
                                                 probes=not extra)
        top = payload["final_prediction"]["topk"][0]
        assert top[0] == " Berlin" and top[1] > 0.5
        assert payload["diagnostics"]["L_semantic"] == 30  # a regression pin (Berlin at the last layer)
        assert pure["is_answer"].tolist() == [False] * 30 + [True]
        frames[backend], depths[backend] = records, payload["diagnostics"]["summation_depth"]
        ids = payload["diagnostics"]["prompt_token_ids"]

    reference = TorchBackend(resolve(str(smollm2_dir)))
    z = reference.layer_logits(ids, FINAL_NORM).astype(np.float64)
    b = logit_bound(reference, ids, FINAL_NORM, z, reference.head_row_norms())
    logp = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
    tol = bounds.nats_to_bits(bounds.logit_shift_bounds(logp, b)["entropy"]
                              + sum(bounds.reduction_bounds(z, d)["entropy"] for d in depths.values()))
    torch_rec, mlx_rec = frames["torch"], frames["mlx"]
    gap = (torch_rec["entropy"] - mlx_rec["entropy"]).abs().to_numpy()
    assert np.all(gap <= tol.ravel())  # records are layer-major, like [R, T].ravel()
    top1 = np.argmax(z, -1)
    decisive = ~bounds.may_swap(z, b, top1).any(-1).ravel()
    assert (torch_rec["top1"] == mlx_rec["top1"])[decisive].all() and decisive.mean() > 0.5


def test_fp32_unembed_does_nothing_and_says_so(tiny_model_dirs, tmp_path, capsys):
    """Both backends always decode in fp32: the flag, kept for the original's command lines,
    changes no byte of the tables, and its --help says that it does nothing."""
    from mlx_lens.cli.main import _parser

    run = next(a for a in _parser()._subparsers._group_actions[0].choices["run"]._actions
               if "--fp32-unembed" in a.option_strings)
    assert run.help.startswith("does nothing: the lens always decodes in fp32")
    for name, extra in (("with", ["--fp32-unembed"]), ("without", [])):
        code, _, err = run_cli([str(tiny_model_dirs["llama"]), "--backend", "torch", "--no-plots",
                                "--no-probes", "--dtype", "bf16", "--out_dir",
                                str(tmp_path / name), *extra], tmp_path, capsys)
        assert code == 0, err
    for table in ("records", "pure-next-token"):
        assert ((tmp_path / "with" / f"output-llama-{table}.csv").read_bytes()
                == (tmp_path / "without" / f"output-llama-{table}.csv").read_bytes())
    d = json.loads((tmp_path / "without" / "output-llama.json").read_text())["diagnostics"]
    assert d["compute_dtype"] == "bfloat16" and d["unembed_dtype"] == "float32"
