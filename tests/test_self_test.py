"""--self-test: the norm's learned scale is applied as the architecture defines it."""
import os

import pytest

from mlx_lens import backend_choice
from mlx_lens.cli.main import main
from mlx_lens.loading.sources import resolve
from mlx_lens.checks.norm_scale import run_self_test, self_test_layers


def test_layers_tested():
    assert self_test_layers(32) == [0, 8, 16, 24]
    assert self_test_layers(3) == [0, 1, 2]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])  # RMS, Gemma's 1+w, LayerNorm
def test_self_test_passes(tiny_model_dirs, backend, name):
    rows = run_self_test(backend_choice.load(backend, resolve(str(tiny_model_dirs[name]))))
    assert rows and all(r.passed for r in rows)
    assert all(r.kl_learned > 0.01 for r in rows)  # the scale matters, so the check has teeth


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_self_test_fails_with_a_wrong_norm(tiny_model_dirs, backend):
    """Gemma's norm read as a plain RMSNorm (scale w instead of 1 + w): the lens's modules
    no longer scale as the architecture defines, and the self-test must say so."""
    b = backend_choice.load(backend, resolve(str(tiny_model_dirs["gemma2"])))
    spec_of = b.norm_spec

    def plain_rms(ref):
        spec = spec_of(ref)
        return type(spec)(spec.kind, spec.scale - 1.0, spec.bias, spec.eps)

    b.norm_spec = plain_rms
    assert not any(r.passed for r in run_self_test(b))


def test_cli_self_test_writes_nothing(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(tiny_model_dirs["qwen3"]), "--self-test"]) == 0
    assert "self-test: PASS" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_cli_self_test_fails_with_exit_1(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    real_load = backend_choice.load

    def broken_load(*args, **kwargs):
        b = real_load(*args, **kwargs)
        b.final_norm.weight.data *= 1.5  # a lens whose final norm no longer matches the model
        return b

    monkeypatch.setattr(backend_choice, "load", broken_load)
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(tiny_model_dirs["llama"]), "--self-test", "--backend", "torch"]) == 1
    assert "self-test: FAIL" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_self_test_script(smollm2_dir, tmp_path):
    """scripts/self_test.sh [MODEL] [DEVICE] on the default model, as docs/parity.md shows."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "self_test.sh"
    env = {**os.environ, "MLX_LENS_PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(script), "", "cpu"], cwd=tmp_path, capture_output=True,
                          text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "self-test: PASS" in proc.stdout and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_self_test_holds_the_logits_not_only_the_kl(tiny_model_dirs, backend):
    """A lens whose normed rows give every logit the same offset has the right softmax, so the
    KL check alone passes; the logits themselves are held to their bound and fail."""
    b = backend_choice.load(backend, resolve(str(tiny_model_dirs["llama"])))
    decode = b.decode_rows

    def shifted(x, ref):
        z = decode(x, ref)
        return z + 1.0 if ref is not None else z  # the learned-norm path only

    b.decode_rows = shifted
    rows = run_self_test(b)
    assert all(abs(r.kl_learned - r.kl_manual) <= r.bound for r in rows)  # KL cannot see it
    assert not any(r.passed for r in rows) and min(r.logit_use for r in rows) > 1.0


def test_cli_self_test_tests_every_model_named(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    """Several models: each is tested (not only the first), and one failing fails the run."""
    real_load = backend_choice.load

    def load_gpt2_broken(*args, **kwargs):
        b = real_load(*args, **kwargs)
        if b.info.name == "gpt2":  # its final norm no longer matches the model
            b.final_norm.weight.data *= 1.5
        return b

    monkeypatch.setattr(backend_choice, "load", load_gpt2_broken)
    monkeypatch.chdir(tmp_path)
    models = [str(tiny_model_dirs["llama"]), str(tiny_model_dirs["gpt2"])]
    assert main(["run", *models, "--self-test", "--backend", "torch"]) == 1
    out = capsys.readouterr().out.splitlines()
    verdicts = [line for line in out if line.startswith("self-test")]
    assert [v.split()[1] for v in verdicts[:-1:2]] == ["llama", "gpt2"]
    assert verdicts[1::2][:2] == ["self-test: PASS", "self-test: FAIL"]
    assert verdicts[-1] == f"self-test: 1 of 2 models passed; FAIL: {models[1]}"
    assert list(tmp_path.iterdir()) == []
