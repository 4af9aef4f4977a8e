"""`mlx-lens parity MODEL`: a per-layer table, exit 0 within tolerance and 1 beyond it."""
from mlx_lens.cli.main import main


def test_parity_command_passes_on_a_good_model(tiny_model_dirs, capsys):
    assert main(["parity", str(tiny_model_dirs["qwen3"])]) == 0
    out = capsys.readouterr().out
    assert out.count("max KL (nats)") == 3 and out.strip().endswith("parity: OK")


def test_parity_command_fails_on_a_wrong_load(tiny_model_dirs, capsys, monkeypatch):
    from mlx_lens.mlx import backend as mlx_backend

    monkeypatch.setattr(mlx_backend, "config_fixes", lambda config: {})  # mlx-lm's rope default
    assert main(["parity", str(tiny_model_dirs["llama_rope5e5"]), "--lens", "final-norm"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: logit discrepancy" in out and out.strip().endswith("parity: FAILED")
