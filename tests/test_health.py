"""NaN or inf in a residual or a lens row: reported by layer, written as empty cells."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mlx_lens.output.artifacts import read_csv
from mlx_lens.cli.main import main


def _edit_weights(src, dst, edit):
    folder = shutil.copytree(src, dst)
    path = folder / "model.safetensors"
    weights = load_file(path)
    edit(weights)
    save_file(weights, path, metadata={"format": "pt"})
    return folder


def _run(model, out_dir, backend, capsys, *extra):
    code = main(["run", str(model), "--backend", backend, "--out_dir", str(out_dir),
                 "--no-probes", *extra])
    err = capsys.readouterr().err
    assert code == 0, err
    diagnostics = json.loads((out_dir / f"output-{model.name}.json").read_text())["diagnostics"]
    return err, diagnostics, read_csv(out_dir / f"output-{model.name}-pure-next-token.csv"), \
        read_csv(out_dir / f"output-{model.name}-records.csv")


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_nan_in_a_block_is_reported_by_layer_and_blanked(tiny_model_dirs, tmp_path, capsys,
                                                         backend):
    """A NaN weight in block 1 makes the residual after it (row 2) and every later row NaN."""
    def poison(w):
        w["model.layers.1.mlp.down_proj.weight"][0, 0] = np.nan

    model = _edit_weights(tiny_model_dirs["llama"], tmp_path / "nan_model", poison)
    err, d, pure, records = _run(model, tmp_path / "out", backend, capsys)
    assert d["nonfinite_residual_layers"] == [2, 3] and d["nonfinite_lens_layers"] == [2, 3]
    lines = err.strip().splitlines()
    assert lines == ["mlx-lens: warning: non-finite values (NaN/inf) in the residual stream at "
                     "layers 2, 3 and in the lens at layers 2, 3; those rows are written as "
                     "empty cells"]
    for frame in (pure, records):
        bad = frame["layer"] >= 2
        for col in ("entropy", "prob1", "rest_mass"):
            assert frame.loc[bad, col].isna().all() and frame.loc[~bad, col].notna().all(), col
        assert (frame.loc[bad, "top1"] == "").all() and (frame.loc[~bad, "top1"] != "").all()
    blanked = pure.loc[pure["layer"] >= 2, ["p_answer", "answer_rank", "kl_to_final_bits"]]
    assert blanked.isna().all().all()
    # no first row by rank on a blanked row (its rank of -1 is no rank <= k)
    assert all(d[f"first_rank_le_{k}"] in (None, 0, 1) for k in (1, 5, 10))


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_overflowing_lens_row_with_a_finite_residual(tiny_model_dirs, tmp_path, capsys, backend):
    """An embedding of 1e30 for BOS is a finite residual whose raw-lens logits overflow."""
    def huge(w):
        w["model.embed_tokens.weight"][0] = 1e30  # BOS, the first token of every prompt

    model = _edit_weights(tiny_model_dirs["llama"], tmp_path / "huge_model", huge)
    err, d, _, records = _run(model, tmp_path / "out", backend, capsys, "--lens", "raw")
    assert d["nonfinite_residual_layers"] == [] and 0 in d["nonfinite_lens_layers"]
    assert "in the lens at layers 0" in err and "residual" not in err
    assert records.loc[records["layer"] == 0, "entropy"].isna().all()


def test_healthy_run_reports_nothing(tiny_model_dirs, tmp_path, capsys):
    err, d, pure, _ = _run(tiny_model_dirs["llama"], tmp_path / "out", "torch", capsys)
    assert d["nonfinite_residual_layers"] == [] == d["nonfinite_lens_layers"]
    assert d["kl_below_bound_layers"] == []
    assert "warning" not in err and pure["entropy"].notna().all()


def test_a_suite_warns_of_and_records_the_facts_it_blanked(tiny_model_dirs, tmp_path, capsys):
    """As a single run does: one warning line for the suite, and the JSON names each fact (and
    control) whose rows were blanked, with their layers; the aggregates count only the rest."""
    from mlx_lens.output.suite_tables import read_suite_table
    from tests.test_suite import FACTS, write_facts

    def poison(w):
        w["model.layers.1.mlp.down_proj.weight"][0, 0] = np.nan

    model = _edit_weights(tiny_model_dirs["llama"], tmp_path / "nan_model", poison)
    facts = write_facts(tmp_path / "facts.jsonl", FACTS[:2])
    err, d, _, _ = _run(model, tmp_path / "out", "torch", capsys, "--facts", str(facts))
    lines = err.strip().splitlines()
    assert lines[1] == ("mlx-lens: warning: numeric-health findings in 2 facts of the suite: "
                        "de (fact non-finite at layers 2, 3, control non-finite at layers 2, 3); "
                        "fr (fact non-finite at layers 2, 3); non-finite rows are empty cells")
    every = {"nonfinite_residual_layers": [2, 3], "nonfinite_lens_layers": [2, 3],
             "kl_below_bound_layers": []}
    assert d["suite_numeric_health"] == {"de": {"fact": every, "control": every},
                                         "fr": {"fact": every}}
    agg = read_suite_table(tmp_path / "out" / f"suite-{model.name}-aggregates.parquet")
    n = agg[(agg["group"] == "all") & (agg["metric"] == "p_answer")].set_index("layer")["n"]
    assert n.tolist() == [2, 2, 0, 0]


def test_a_kl_below_its_bound_is_a_finding_and_kept():
    """A negative KL within its bound is rounding (kept, no finding); one below minus its
    bound is a cancellation the bound does not cover: reported by layer, the value kept."""
    from mlx_lens.core.contract import LayerStats
    from mlx_lens.experiment import health

    n = 4
    stats = LayerStats(entropy=np.ones((n, 1)), topk_ids=np.zeros((n, 1, 2), np.int64),
                       topk_probs=np.full((n, 1, 2), 0.5), cos_to_final=np.ones(n),
                       kl_to_final=np.array([0.5, -1e-6, -1e-3, 0.0]), kl_bound=np.full(n, 1e-5))
    kept, report = health.checked(stats)
    assert report["kl_below_bound_layers"] == [2]
    assert np.array_equal(kept.kl_to_final, stats.kl_to_final)  # no clamp, no blank
    # named by its direction (#31 item 9): the layer's distribution against the final one
    assert health.warning(report) == ("KL(layer || final) below minus its error bound at "
                                      "layers 2 (docs/numerics.md §2)")
    assert health.brief(report) == "KL(layer || final) below its bound at layers 2"


@pytest.mark.parametrize("kind", ["mlx", "torch"])
def test_a_nonfinite_logit_makes_its_row_nonfinite(kind):
    """-inf, +inf or NaN among a row's logits: that row's statistics are non-finite in both
    reducers (so the health check blanks it, never a finite wrong number), the other rows'
    are untouched."""
    from mlx_lens.core.contract import SweepOptions
    from tests.test_backends import _mlx_reductions, _torch_reductions
    from mlx_lens.experiment import health

    reduce = {"mlx": _mlx_reductions, "torch": _torch_reductions}[kind]
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 2, 64)).astype(np.float32)
    clean = reduce(logits, SweepOptions(answer_ids=(3,)))
    for bad in (-np.inf, np.inf, np.nan):
        z = logits.copy()
        z[1, 0, 7] = bad  # row 1, position 0 (not the next-token position)
        stats = reduce(z, SweepOptions(answer_ids=(3,)))
        assert health.nonfinite_layers(stats)["nonfinite_lens_layers"] == [1], bad
        others = [0, 2, 3]
        assert np.array_equal(stats.entropy[others], clean.entropy[others])
        assert np.array_equal(stats.kl_to_final, clean.kl_to_final)


@pytest.mark.parametrize("kind", ["mlx", "torch"])
def test_kl_is_reported_as_computed(kind):
    """Rows that are the final row shifted by a constant have KL 0 exactly; their computed KL
    is fp32 rounding of either sign, reported as it is (no clamp at 0) and within its bound.
    32 shifts that are not powers of two: a clamp (or a bias) would make every value >= 0."""
    from mlx_lens.core.contract import SweepOptions
    from tests.test_backends import _mlx_reductions, _torch_reductions

    reduce = {"mlx": _mlx_reductions, "torch": _torch_reductions}[kind]
    final = (np.random.default_rng(1).standard_normal(500) * 4).astype(np.float32)
    shifts = (0.37 * np.arange(1, 33)).astype(np.float32)
    logits = np.concatenate([final[None] + shifts[:, None], final[None]])[:, None, :]
    stats = reduce(np.ascontiguousarray(logits, np.float32), SweepOptions())
    assert np.all(np.abs(stats.kl_to_final) <= stats.kl_bound)
    assert (stats.kl_to_final < 0).any()
