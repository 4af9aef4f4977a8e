"""`mlx-lens run --facts`: a fact suite through one or several models, its tables, bad files."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mlx_lens.core.lens import FINAL_NORM
from mlx_lens.core import bounds
from mlx_lens.cli.main import main
from mlx_lens.experiment.facts import load_facts
from mlx_lens.loading.sources import resolve
from mlx_lens.checks.parity import logit_bound
from mlx_lens.experiment.suite import run_suite
from mlx_lens.output.suite_tables import read_suite_table
from mlx_lens.core.numerics import log_softmax64
from torch_ref.backend import TorchBackend

FACTS = [
    {"id": "de", "prompt": "The capital of Germany is called simply", "answer": "Berlin",
     "group": "short", "control_prompt": "The capital of France is called simply",
     "control_answer": "Paris"},
    {"id": "fr", "prompt": "Give the city name only, plain text. The capital of France is "
     "called simply", "answer": "Paris", "group": "long"},
    {"id": "de2", "prompt": "Berlin is the capital city of", "answer": "Germany",
     "group": "short"},
    {"prompt": "Give the city name only, plain text. The capital of Germany is called simply",
     "answer": "Berlin", "group": "long", "control_prompt": "Paris is the capital city of",
     "control_answer": "France"},
]


def write_facts(path, facts=FACTS):
    path.write_text("".join(json.dumps(f) + "\n" for f in facts), encoding="utf-8")
    return path


def _p(logits, token):
    """[R] float64 probability of token at the last position of lens logits [R, T, V]."""
    return np.exp(log_softmax64(logits[:, -1])[:, token])


def test_suite_rows_are_each_facts_own_lens(tiny_model_dirs, tmp_path):
    """Every long-table row belongs to its fact (batches are sorted by length, then put back):
    p_answer, entropy and the control's probabilities against each prompt's own unbatched lens,
    within the derived bound of a batched vs an unbatched forward pass (docs/numerics.md §4)."""
    backend = TorchBackend(resolve(str(tiny_model_dirs["llama"])))
    facts = load_facts(str(write_facts(tmp_path / "facts.jsonl")))
    suite = run_suite(backend, facts, batch=3)  # two batches, lengths mixed
    n_rows = backend.info.n_layers + 1
    assert len(suite.long) == len(facts) * n_rows and len(suite.per_fact) == len(facts)
    norms = backend.head_row_norms()
    tok = backend.tokenizer
    depth = bounds.summation_depth(backend.info.vocab, backend.info.vocab)  # one 512-token tile
    for fact in facts:
        rows = suite.long[suite.long["fact_id"] == fact.id]
        ids = tok.encode(fact.prompt)
        answer = tok.encode(f"{fact.prompt} {fact.answer}")[len(ids)]
        logits = backend.layer_logits(ids, FINAL_NORM)
        b = logit_bound(backend, ids, FINAL_NORM, logits, norms)[:, -1:]
        tol = bounds.sweep_tolerances(logits[:, -1:], b, depth)
        p = _p(logits, answer)
        assert np.all(np.abs(rows["p_answer"].to_numpy() - p) <= tol["prob"][:, 0, answer])
        entropy = -(np.exp(log_softmax64(logits[:, -1])) * log_softmax64(logits[:, -1])).sum(-1)
        assert np.all(np.abs(rows["entropy"].to_numpy() - entropy / np.log(2))
                      <= tol["entropy"][:, 0])
        if fact.control_prompt is None:
            assert rows["control_margin"].isna().all()
            continue
        c_ids = tok.encode(fact.control_prompt)
        c_logits = backend.layer_logits(c_ids, FINAL_NORM)
        c_answer = tok.encode(f"{fact.control_prompt} {fact.control_answer}")[len(c_ids)]
        own = tok.encode(f"{fact.control_prompt} {fact.answer}")[len(c_ids)]
        cb = logit_bound(backend, c_ids, FINAL_NORM, c_logits, norms)[:, -1:]
        c_tol = bounds.sweep_tolerances(c_logits[:, -1:], cb, depth)["prob"][:, 0]
        assert np.all(np.abs(rows["control_p"].to_numpy() - _p(c_logits, c_answer))
                      <= c_tol[:, c_answer])
        assert np.all(np.abs(rows["control_p_answer"].to_numpy() - _p(c_logits, own))
                      <= c_tol[:, own])
        np.testing.assert_allclose(rows["control_margin"],
                                   rows["control_p"] - rows["control_p_answer"])


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_run_with_facts_writes_the_suite_tables(tiny_model_dirs, tmp_path, capsys, backend):
    facts = write_facts(tmp_path / "facts.jsonl")
    out = tmp_path / "out"
    code = main(["run", str(tiny_model_dirs["qwen3"]), "--backend", backend, "--facts",
                 str(facts), "--out_dir", str(out), "--no-probes"])
    assert code == 0, capsys.readouterr().err
    assert "suite: 4 facts" in capsys.readouterr().out
    assert (out / "output-qwen3.json").is_file()  # the single-prompt artifacts stay
    for kind in ("layers", "facts", "aggregates"):
        parquet = read_suite_table(out / f"suite-qwen3-{kind}.parquet")
        csv = read_suite_table(out / f"suite-qwen3-{kind}.csv")
        assert list(parquet.columns) == list(csv.columns) and len(parquet) == len(csv) > 0
    long = read_suite_table(out / "suite-qwen3-layers.parquet")
    assert sorted(long["fact_id"].unique()) == ["de", "de2", "fact-4", "fr"]
    assert (long.groupby("fact_id").size() == 4).all()  # layers 0..3
    per_fact = read_suite_table(out / "suite-qwen3-facts.parquet")
    controlled = long.groupby("fact_id")["control_margin"].apply(lambda m: m.notna().all())
    assert controlled.to_dict() == {"de": True, "de2": False, "fact-4": True, "fr": False}
    # the paired gain of the fact's own prompt over the control's, for the same answer
    gain = long["p_answer"] - long["control_p_answer"]
    assert long["p_answer_gain"].equals(gain) and gain.notna().sum() == 2 * 4
    no_control = per_fact["fact_id"].isin(["de2", "fr"])
    assert per_fact.loc[no_control, "first_control_margin_positive"].isna().all()
    aggregates = read_suite_table(out / "suite-qwen3-aggregates.parquet")
    assert set(aggregates["group"]) == {"all", "short", "long"}
    assert set(aggregates["metric"]) >= {"p_answer", "log10_rank", "entropy", "kl_to_final_bits",
                                          "control_margin"}


def test_default_suite_on_the_default_model(smollm2_dir, tmp_path, capsys):
    """`mlx-lens run --facts default`, as docs/running.md has it (torch: MLX on a Linux CPU runs
    the 786 prompts' decode about 60x slower, docs/performance.md; its batched lens is tested
    per architecture)."""
    code = main(["run", "--facts", "default", "--backend", "torch", "--out_dir",
                 str(tmp_path), "--no-probes"])
    assert code == 0, capsys.readouterr().err
    per_fact = read_suite_table(tmp_path / "suite-SmolLM2-135M-Instruct-facts.parquet")
    assert len(per_fact) == len(load_facts("default")) >= 300
    assert set(per_fact["group"]) == {"original", "capital_city_named", "country_has_capital"}
    germany = per_fact.set_index("fact_id").loc["original/Germany"]
    # regression pins: the default model's known answer and layer
    assert germany["correct"] and germany["final_top1"] == " Berlin" and germany["L_semantic"] == 30


def test_bad_facts_file_is_one_line_and_writes_nothing(tiny_model_dirs, tmp_path, capsys,
                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "answer": "b"}\n{"prompt": \n')
    code = main(["run", str(tiny_model_dirs["llama"]), "--facts", "bad.jsonl"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["mlx-lens: error: bad.jsonl:2: bad JSON (Expecting value)"]
    assert not (tmp_path / "runs").exists()


def test_fact_the_model_cannot_take_is_named_and_nothing_is_written(tiny_model_dirs, tmp_path,
                                                                    capsys, monkeypatch):
    """A control prompt longer than the tiny model's 128-token context: found once the
    tokenizer is loaded, before anything is written; the previous run stays."""
    monkeypatch.chdir(tmp_path)
    previous = tmp_path / "runs" / "run-latest"
    previous.mkdir(parents=True)
    (previous / "keep.txt").write_text("old run")
    long = dict(FACTS[0], control_prompt="Berlin " * 200)
    write_facts(tmp_path / "facts.jsonl", [FACTS[1], long])
    code = main(["run", str(tiny_model_dirs["llama"]), "--facts", "facts.jsonl"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == ("mlx-lens: error: facts.jsonl:2: the prompt is 202 tokens, longer than the "
                      "model's context of 128 tokens")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["run-latest"]
    assert sorted(p.name for p in previous.iterdir()) == ["keep.txt"]


def test_several_models_each_write_their_suite(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    facts = write_facts(tmp_path / "facts.jsonl")
    models = [str(tiny_model_dirs["llama"]), str(tiny_model_dirs["gpt2"])]
    assert main(["run", *models, "--facts", str(facts), "--backend", "torch",
                 "--no-probes"]) == 0
    latest = tmp_path / "runs" / "run-latest"
    for name in ("llama", "gpt2"):
        assert len(read_suite_table(latest / f"suite-{name}-facts.csv")) == len(FACTS)
