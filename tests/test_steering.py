"""Steering: vectors added to the residual at chosen rows, the steered run decoded by the lens.
A zero vector changes nothing, bit for bit; a vector at row r leaves the rows before it as they
were and is in row r exactly; MLX agrees with torch within the parity bound; and the command's
bad input is one line."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mlx_lens.checks.parity import logit_bound
from mlx_lens.core import steering
from mlx_lens.core.contract import SweepOptions
from mlx_lens.core.lens import FINAL_NORM
from mlx_lens.core.steering import Steering
from mlx_lens.mlx.backend import MlxBackend
from tests.lens_checks import PROMPT, backend_cache
from torch_ref.backend import TorchBackend

BACKENDS = {"torch": TorchBackend, "mlx": MlxBackend}
FIELDS = ("entropy", "topk_ids", "topk_probs", "kl_to_final", "p_answer", "answer_rank",
          "piece_log2p")


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs):
    caches = {kind: backend_cache(cls, tiny_model_dirs) for kind, cls in BACKENDS.items()}
    return lambda kind, name: caches[kind](name)


def _vector(backend, seed=0):
    return np.random.default_rng(seed).normal(size=backend.info.d_model).astype(np.float32)


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2", "gpt_neox"])
def test_steering(loaded, kind, name):
    backend = loaded(kind, name)
    ids = backend.tokenizer.encode(PROMPT)
    opts = SweepOptions(answer_ids=(ids[2],))
    plain, rows = backend.sweep(ids, opts), backend.residuals(ids)
    for row in (0, 2, backend.info.n_layers):
        with backend.steered(Steering({row: np.zeros(backend.info.d_model, np.float32)})):
            zero = backend.sweep(ids, opts)
        for f in FIELDS:
            assert np.array_equal(getattr(plain, f), getattr(zero, f)), (row, f)
        v = _vector(backend)
        with backend.steered(Steering({row: v})):
            steered = backend.residuals(ids)
        assert np.array_equal(steered[:row], rows[:row])
        assert np.array_equal(steered[row], rows[row] + v)  # fp32 models: the same addition
        if row < backend.info.n_layers:
            assert not np.array_equal(steered[row + 1], rows[row + 1])
    with backend.steered(Steering({1: _vector(backend)}, positions=(0,))):
        steered = backend.residuals(ids)
    assert np.array_equal(steered[1, 1:], rows[1, 1:]) and not np.array_equal(steered[1], rows[1])


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3_text"])
def test_steered_mlx_against_torch(loaded, name):
    ref, cand = loaded("torch", name), loaded("mlx", name)
    ids = ref.tokenizer.encode(PROMPT)
    spec = Steering({1: _vector(ref, 1), 2: _vector(ref, 2)}, scale=0.5)
    with ref.steered(spec), cand.steered(spec):
        za, zb = ref.layer_logits(ids, FINAL_NORM), cand.layer_logits(ids, FINAL_NORM)
        bound = logit_bound(ref, ids, FINAL_NORM, za, ref.head_row_norms())
    assert np.all(np.abs(zb.astype(np.float64) - za) <= bound)
    assert np.abs(za - ref.layer_logits(ids, FINAL_NORM)).max() > 0.1  # the steering bites


def test_difference_and_bad_vectors(tiny_model_dirs):
    import mlx_lens
    from mlx_lens.core.errors import LensError

    lens = mlx_lens.load(str(tiny_model_dirs["llama"]), backend="torch")
    backend = lens.backend
    v = lens.difference("The capital of Germany is", "The capital of France is", 2)
    a, b = (backend.residuals(backend.tokenizer.encode(p))[2].astype(np.float64).mean(0)
            for p in ("The capital of Germany is", "The capital of France is"))
    assert v.dtype == np.float32 and np.array_equal(v, (a - b).astype(np.float32))
    d, n = backend.info.d_model, backend.info.n_layers
    for vectors, message in (({n + 1: np.zeros(d)}, "out of range"),
                             ({1: np.zeros(d + 1)}, "width"),
                             ({1: np.zeros(d, np.int32)}, "not floating"),
                             ({1: np.full(d, np.nan)}, "not finite")):
        with pytest.raises(LensError, match=message):
            lens.run(probes=False, steer=vectors)


def test_the_command_steers(tiny_model_dirs, tmp_path, capsys):
    from mlx_lens.cli.main import main

    model = str(tiny_model_dirs["llama"])
    vectors = steering.save(tmp_path / "v.safetensors", {1: np.ones(96, np.float32)},
                            {"made_by": "test"})
    out = tmp_path / "out"
    assert main(["run", model, "--backend", "torch", "--no-probes", "--no-plots",
                 "--steer", str(vectors), "--steer-scale", "2", "--out_dir", str(out)]) == 0
    d = json.loads((out / "output-llama.json").read_text())["diagnostics"]
    assert d["steering"]["rows"] == [1] and d["steering"]["made_by"] == "test"
    assert d["steering"]["norms"]["1"] == pytest.approx(2 * np.sqrt(96))
    assert d["framework_check"]["available"] is False
    capsys.readouterr()
    wide = steering.save(tmp_path / "wide.safetensors", {1: np.ones(97, np.float32)})
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors")
    for extra, message in ((["--steer", str(wide)], "width"),
                           (["--steer", str(broken)], "cannot read steering"),
                           (["--steer", str(vectors), "--facts", "default"], "not steered")):
        target = tmp_path / "bad"
        code = main(["run", model, "--backend", "torch", "--no-probes", *extra,
                     "--out_dir", str(target)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and len(err) == 1 and message in err[0], (extra, err)
        assert not target.exists()
