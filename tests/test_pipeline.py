"""The MLX lens over a model split across 2 processes (mlx.launch --backend ring, localhost
only, every launch under a timeout): the same statistics as one process, on every architecture's
tiny model and on the default model; a rank that dies fails the run on rank 0, writing nothing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_lens.core.lens import FINAL_NORM, Lens
from mlx_lens.core.contract import LayerStats
from mlx_lens.mlx.backend import MlxBackend
from mlx_lens.mlx.pipeline import block_slices
from mlx_lens.loading.sources import resolve
from tests.lens_checks import PROMPT, assert_stats_match_logits, gemm_bound
from tests.pipeline_worker import PROMPTS, steering
from tests.tiny_models import CONFIGS

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCH_TIMEOUT = 300  # seconds: a hung rank fails the test instead of hanging CI
# The ring listens on ports from --starting-port up, one per rank. Two test workers launching at
# once on one set of ports join each other's rings (seen in CI: a run whose rank dies wrote output,
# and a sound run wrote none),
# so each worker (pytest-xdist's gw0, gw1, ...) takes its own 2 ports above mlx.launch's default.
WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
STARTING_PORT = 32323 + 2 * WORKER


def launch(args: list[str], cwd: Path, timeout: int = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """2 processes on localhost. mlx.launch exits 0 whatever its ranks do: callers check what
    rank 0 printed and wrote."""
    return subprocess.run([str(BIN / "mlx.launch"), "--backend", "ring", "-n", "2",
                           "--starting-port", str(STARTING_PORT),
                           str(sys.executable), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _stats(saved, prefix: str) -> LayerStats:
    fields = {k[len(prefix):]: saved[k] for k in saved.files if k.startswith(prefix)}
    finite = fields.pop("finite_residual")
    fields["summation_depth"] = int(fields["summation_depth"])
    stats = LayerStats(**fields)
    stats.finite_residual = finite
    return stats


def test_blocks_are_split_contiguously():
    assert block_slices(30, 2) == [range(0, 15), range(15, 30)]
    assert block_slices(3, 2) == [range(0, 2), range(2, 3)]
    with pytest.raises(Exception, match="cannot be split over 4 processes"):
        block_slices(3, 4)


# Beyond the families the lens's own loop runs (CONFIGS): types whose blocks mlx-lm's forward
# drives, one of each kind of block call (tests/zoo.py): parallel blocks with a logit scale,
# experts, a hybrid with multipliers, a state-space mixer, per-layer inputs with a shared KV,
# a convolution hybrid, post-norm blocks.
DRIVEN = ("cohere", "qwen3_moe", "falcon_h1", "mamba", "gemma4_text", "lfm2", "olmo2")


@pytest.fixture(scope="module")
def pipelined(tiny_model_dirs, tmp_path_factory) -> dict[str, tuple]:
    """Every model through one two-rank launch: model name -> (its folder, its statistics as
    the worker saved them, the launch's stderr)."""
    from tests.zoo import build

    root = tmp_path_factory.mktemp("pipelined")
    models = {**tiny_model_dirs, **{t: build(t, root / t) for t in DRIVEN}}
    done = launch([str(ROOT / "tests" / "pipeline_worker.py"), str(root), *map(str, models.values())],
                  root, timeout=LAUNCH_TIMEOUT + 20 * len(models))
    return {name: (folder, root / f"{Path(folder).name}.npz", done.stderr)
            for name, folder in models.items()}


@pytest.mark.parametrize("name", [*sorted(CONFIGS), *DRIVEN])
def test_two_ranks_give_one_process_statistics(pipelined, name):
    """Against one process's full fp32 logits (layer_logits), within the lens tests' bound: two
    decodes (the pipeline's and layer_logits') each within one length-d product of exact, plus
    the reductions' own error. The residuals are the same computation (same kernels, same
    order), so the bound that holds for one process holds for the pipeline."""
    folder, saved, stderr = pipelined[name]
    model = str(folder)
    assert saved.is_file(), stderr[-2000:]
    saved = np.load(saved)
    single = MlxBackend(resolve(model))
    ids = single.tokenizer.encode(PROMPT)
    answer = single.tokenizer.encode(" Berlin", add_special_tokens=False)[0]
    logits = single.layer_logits(ids, FINAL_NORM)
    stats = _stats(saved, "sweep_")
    assert stats.entropy.shape == logits.shape[:2] and stats.finite_residual.all()
    assert_stats_match_logits(stats, logits, gemm_bound(single, ids, FINAL_NORM, logits, 2), answer)
    for b, prompt in enumerate(PROMPTS):
        ids_b = single.tokenizer.encode(prompt)
        z = single.layer_logits(ids_b, Lens("raw"))[:, -1:]
        raw = Lens("raw")
        bound = gemm_bound(single, ids_b, raw, single.layer_logits(ids_b, raw), 2)[:, -1:]
        assert_stats_match_logits(_stats(saved, f"batch{b}_"), z, bound, answer)
    final = single.final_logits([ids])
    bound = gemm_bound(single, ids, FINAL_NORM, logits, 2)[-1, -1]
    assert np.all(np.abs(saved["final"] - final) <= bound)
    with single.steered(steering(single.info.d_model)):  # each rank steers its own rows
        steered = single.layer_logits(ids, FINAL_NORM)
    assert np.abs(steered - logits).max() > 0.1  # the steering bites
    assert_stats_match_logits(_stats(saved, "steered_"), steered,
                              gemm_bound(single, ids, FINAL_NORM, steered, 2), answer)


_DYING_RANK = """
import os, sys
from mlx_lens.cli import main as cli
from mlx_lens.mlx import pipeline as mlx_pipeline
if os.environ["MLX_RANK"] == "1":  # dies before sending its residual on
    mlx_pipeline.PipelineBackend.capture = lambda *args, **kwargs: os._exit(1)
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_rank_that_dies_fails_the_run_on_rank_0(tiny_model_dirs, tmp_path):
    """Rank 0 waits for what rank 1 never sends: the ring reports the lost peer (or mlx.launch
    stops rank 0 first); either way rank 0 ends with one line, and nothing is written."""
    (tmp_path / "dying.py").write_text(_DYING_RANK)
    done = launch([str(tmp_path / "dying.py"), "run", str(tiny_model_dirs["llama"]),
                   "--no-probes", "--out_dir", "out"], tmp_path, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.startswith("mlx-lens:")]
    assert lines in (["mlx-lens: terminated"],
                     ["mlx-lens: error: rank 0 of 2: [ring] connection to a peer was lost "
                      "(another process of the run failed or was stopped)"]), done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("run-*/output-*"))


def test_the_default_model_over_two_ranks_writes_the_same_run(smollm2_dir, tmp_path):
    """`mlx-lens run` as docs/distributed.md starts it, against one process on the same backend."""
    facts = tmp_path / "facts.csv"
    facts.write_text("prompt,answer\n" + "".join(
        f'"Give the city name only, plain text. The capital of {c} is called simply",{a}\n'
        for c, a in (("Germany", "Berlin"), ("France", "Paris"), ("Italy", "Rome"))))
    # (no --backend under mlx.launch, which would take it as its own; auto is mlx there)
    args = ["-m", "mlx_lens.cli.main", "run", "--no-plots", "--no-probes", "--facts", str(facts)]
    done = launch([*args, "--out_dir", "two"], tmp_path, timeout=600)
    assert (tmp_path / "two" / "output-SmolLM2-135M-Instruct.json").is_file(), done.stderr[-2000:]
    one = subprocess.run([sys.executable, *args, "--backend", "mlx", "--out_dir", "one"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    a, b = (json.loads((tmp_path / d / "output-SmolLM2-135M-Instruct.json").read_text())
            for d in ("one", "two"))
    assert b["diagnostics"]["pipeline"]["blocks"] == [[0, 15], [15, 30]]
    for key in ("L_copy", "L_copy_H", "L_semantic", "answer_token_id"):
        assert a["diagnostics"][key] == b["diagnostics"][key], key
    assert [t[0] for t in a["final_prediction"]["topk"]] == [t[0] for t in b["final_prediction"]["topk"]]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one").iterdir())
    assert "rank 1/2: blocks 15-29" in done.stdout
    # The JSON's traffic is rank 0's own count, read after the run (not 0, read before it).
    sent = int(done.stdout.split("rank 0/2: blocks 0-14")[1].split(" sent ")[1].split()[0])
    assert sent > 0 and b["diagnostics"]["pipeline"]["bytes_sent_by_rank_0"] == sent


def test_a_tuned_lens_over_two_ranks(tiny_model_dirs, tmp_path):
    """Each rank applies the translators of its own rows: the next-token table equals one
    process's exactly (512 tokens: one vocabulary chunk either way, so the same operations on
    the same rows)."""
    from mlx_lens.tuned import lens_file
    from mlx_lens.output.artifacts import read_csv
    from parity_tests.test_tuned import random_lens

    model = str(tiny_model_dirs["qwen2"])
    single = MlxBackend(resolve(model))
    lens_file.save(random_lens(single.info.n_layers, single.info.d_model), tmp_path / "lens")
    args = ["-m", "mlx_lens.cli.main", "run", model, "--no-plots", "--no-probes", "--lens",
            f"tuned:{tmp_path / 'lens'}"]
    launch([*args, "--out_dir", "two"], tmp_path)
    one = subprocess.run([sys.executable, *args, "--backend", "mlx", "--out_dir", "one"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert one.returncode == 0, one.stderr
    a, b = (read_csv(tmp_path / d / "output-qwen2-pure-next-token.csv") for d in ("one", "two"))
    for column in ("top1", "prob1", "entropy", "kl_to_final_bits"):
        assert list(a[column]) == list(b[column]), column
