"""The JSON's probes against a direct transformers forward pass (float64 softmax)."""
import json

import numpy as np
import pytest
import torch

from mlx_lens.cli import main
from mlx_lens.probes import TEMPERATURES, TEST_PROMPTS
from torch_ref.backend import TorchBackend
from mlx_lens.models import resolve


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


def _expected(logits, k, names, temperature=1.0):
    z = logits / temperature
    logp = z - np.logaddexp.reduce(z)
    top = np.argsort(-logp)[:k]
    return -(np.exp(logp) * logp).sum() / np.log(2), [[names(i), np.exp(logp[i])] for i in top]


def check(entry, logits, k, backend, temperature=1.0):
    entropy, topk = _expected(logits, k, lambda i: backend.tokenizer.decode([i]), temperature)
    assert entry["entropy"] == pytest.approx(entropy, abs=1e-5)
    assert [t for t, _ in entry["topk"]] == [t for t, _ in topk]
    np.testing.assert_allclose([p for _, p in entry["topk"]], [p for _, p in topk], atol=1e-6)


def test_test_prompts(run_payload, direct):
    backend, last_logits = direct
    entries = run_payload["test_prompts"]
    assert [e["prompt"] for e in entries] == list(TEST_PROMPTS) and len(entries) == 14
    for entry in entries:
        assert len(entry["topk"]) == 10
        check(entry, last_logits(entry["prompt"]), 10, backend)


def test_temperature_exploration(run_payload, direct):
    backend, last_logits = direct
    entries = run_payload["temperature_exploration"]
    assert [e["temperature"] for e in entries] == list(TEMPERATURES)
    logits = last_logits(run_payload["prompt"]["context_prompt"])
    for entry in entries:
        assert len(entry["topk"]) == 15
        check(entry, logits, 15, backend, entry["temperature"])


def test_final_prediction_model_stats_and_diagnostics(run_payload, direct):
    backend, last_logits = direct
    check(run_payload["final_prediction"], last_logits(run_payload["prompt"]["context_prompt"]),
          20, backend)
    assert run_payload["model_stats"] == {"num_layers": 3, "d_model": 64, "n_heads": 4,
                                          "d_vocab": 512, "n_ctx": 128, "architecture": "llama"}
    d = run_payload["diagnostics"]
    assert d["lens"] == "final-norm" and d["compute_dtype"] == "float32"
    assert d["unembed_dtype"] == "float32" and d["device"] == "cpu"
    assert d["norm_types"] == {"first_block": "LlamaRMSNorm", "final": "LlamaRMSNorm"}
    assert (d["copy_threshold"], d["copy_margin"], d["entropy_bits"]) == (0.9, 0.05, 1.0)
