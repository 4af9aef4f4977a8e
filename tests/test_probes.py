"""The JSON's probes against a direct transformers forward pass (float64 softmax)."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from mlx_lens.core.lens import FINAL_NORM
from mlx_lens.core import bounds
from mlx_lens.cli.main import main
from mlx_lens.experiment.probes import TEMPERATURES, TEST_PROMPTS
from torch_ref.backend import TorchBackend
from mlx_lens.loading.sources import resolve
from tests.lens_checks import NORM_AND_HEAD, gemm_bound


@pytest.fixture(scope="module")
def run_payload(tiny_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("probes")
    assert main(["run", str(tiny_model_dirs["llama_untied"]), "--backend", "torch",
                 "--out_dir", str(out)]) == 0
    return json.loads((out / "output-llama_untied.json").read_text())


@pytest.fixture(scope="module")
def direct(tiny_model_dirs):
    backend = TorchBackend(resolve(str(tiny_model_dirs["llama_untied"])))

    def last_logits(prompt):
        ids = backend.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            return backend.model(ids).logits[0, -1].double().numpy()

    return backend, last_logits


def check(entry, prompt, k, backend, direct_logits, temperature=1.0, depth=None):
    """A JSON distribution (float64 softmax of the lens's last row) against the model's own
    logits. The two differ by NORM_AND_HEAD dot products' worth of fp32 rounding (b), which
    moves entropy and probabilities by at most what docs/numerics.md §3 allows; top-k tokens are
    exact except among tokens whose logits b may reorder. depth: the distribution comes from a
    sweep's reductions of that summation depth (§2), not from a float64 softmax."""
    ids = backend.tokenizer.encode(prompt)
    logits = direct_logits(prompt)
    lens = backend.layer_logits(ids, FINAL_NORM)
    b = gemm_bound(backend, ids, FINAL_NORM, lens, NORM_AND_HEAD)[-1, -1] / temperature
    z = logits / temperature
    logp = z - np.logaddexp.reduce(z)
    p = np.exp(logp)
    entropy = -(p * logp).sum() / np.log(2)
    tol = bounds.logit_shift_bounds(logp[None], b[None])
    reduction = bounds.reduction_bounds(z[None], depth) if depth else {"entropy": 0, "logp": 0}
    entropy_tol = bounds.nats_to_bits(tol["entropy"][0] + reduction["entropy"])
    assert abs(entry["entropy"] - entropy) <= entropy_tol
    top = np.argsort(-logp, kind="stable")[:k]
    prob_tol = bounds.probability_bound(p, b + b.max() + np.ravel(reduction["logp"]))
    got = np.array([q for _, q in entry["topk"]])
    assert np.all(np.abs(got - p[top]) <= prob_tol[top] + prob_tol[top].max())
    for (token, _), i in zip(entry["topk"], top):
        if not bounds.may_swap(z, b, np.array(i)).any():
            assert token == backend.tokenizer.decode([int(i)])


def test_test_prompts(run_payload, direct):
    backend, last_logits = direct
    entries = run_payload["test_prompts"]
    assert [e["prompt"] for e in entries] == list(TEST_PROMPTS) and len(entries) == 14
    for entry in entries:
        assert len(entry["topk"]) == 10
        check(entry, entry["prompt"], 10, backend, last_logits)


def test_temperature_exploration(run_payload, direct):
    backend, last_logits = direct
    entries = run_payload["temperature_exploration"]
    assert [e["temperature"] for e in entries] == list(TEMPERATURES)
    prompt = run_payload["prompt"]["context_prompt"]
    for entry in entries:
        assert len(entry["topk"]) == 15
        check(entry, prompt, 15, backend, last_logits, entry["temperature"])


def test_final_prediction_model_stats_and_diagnostics(run_payload, direct):
    backend, last_logits = direct
    check(run_payload["final_prediction"], run_payload["prompt"]["context_prompt"], 20, backend,
          last_logits, depth=run_payload["diagnostics"]["summation_depth"])
    assert run_payload["model_stats"] == {"num_layers": 3, "d_model": 96, "n_heads": 4,
                                          "d_vocab": 512, "n_ctx": 128, "architecture": "llama"}
    d = run_payload["diagnostics"]
    assert d["lens"] == "final-norm" and d["compute_dtype"] == "float32"
    assert d["unembed_dtype"] == "float32" and d["device"] == "cpu"
    assert d["norm_types"] == {"first_block": "LlamaRMSNorm", "final": "LlamaRMSNorm"}
    assert (d["copy_threshold"], d["copy_margin"], d["entropy_bits"]) == (0.9, 0.05, 1.0)


OTHER_PROMPT = "The capital of France is called simply"  # holds two of the original's words


def _run(model_dir, out, *extra):
    code = main(["run", str(model_dir), "--backend", "torch", "--no-plots", "--out_dir", str(out),
                 *extra])
    return code, out / "output-llama_untied.json", out / "output-llama_untied-records.csv"


def test_the_original_prompt_keeps_the_originals_probes(run_payload):
    d = run_payload["diagnostics"]
    assert d["test_prompts_source"] == "original"
    assert d["verbose_words"] == ["Germany", "Berlin", "capital", "Answer", "word", "simply"]


def test_another_prompt_runs_no_germany_probes(tiny_model_dirs, tmp_path, direct):
    """A Paris run reports no Germany probes and says why; its top-20 positions are its last
    one only, not those whose tokens hold the original's words; its temperatures are its own."""
    code, json_path, records_path = _run(tiny_model_dirs["llama_untied"], tmp_path / "run",
                                         "--prompt", OTHER_PROMPT, "--answer", "Paris")
    assert code == 0
    payload = json.loads(json_path.read_text())
    d = payload["diagnostics"]
    assert payload["test_prompts"] == [] and d["verbose_words"] == []
    assert d["test_prompts_source"].startswith("none: the original's test prompts")
    backend, last_logits = direct
    tokens = [backend.tokenizer.decode([i]) for i in backend.tokenizer.encode(OTHER_PROMPT)]
    assert any("capital" in t for t in tokens)  # the original's rule would widen that position
    records = pd.read_csv(records_path, keep_default_na=False, na_values=[""])
    wide = sorted(records.loc[records["prob20"].notna(), "pos"].unique())
    assert wide == [len(tokens) - 1]
    for entry in payload["temperature_exploration"]:
        check(entry, OTHER_PROMPT, 15, backend, last_logits, entry["temperature"])
    assert main(["report", str(tmp_path / "run")]) == 0
    assert "none: the original&#x27;s test prompts" in (tmp_path / "run" / "report.html").read_text()


def test_given_probes_are_run(tiny_model_dirs, tmp_path, direct):
    given = ["Paris is the capital of", "France's capital city is called"]
    code, json_path, _ = _run(tiny_model_dirs["llama_untied"], tmp_path / "run",
                              "--prompt", OTHER_PROMPT, "--answer", "Paris",
                              "--probe", given[0], "--probe", given[1])
    assert code == 0
    payload = json.loads(json_path.read_text())
    assert payload["diagnostics"]["test_prompts_source"] == "given"
    assert [e["prompt"] for e in payload["test_prompts"]] == given
    backend, last_logits = direct
    for entry in payload["test_prompts"]:
        check(entry, entry["prompt"], 10, backend, last_logits)


@pytest.mark.parametrize("extra, message", [
    (["--probe", "Paris is", "--no-probes"], "test prompts given with the probes off"),
    (["--probe", " "], "empty test prompt"),
])
def test_bad_probes_are_one_line(tiny_model_dirs, tmp_path, capsys, extra, message):
    code, _, _ = _run(tiny_model_dirs["llama_untied"], tmp_path / "run", *extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
