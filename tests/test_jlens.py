"""The Jacobian lens (docs/jlens.md): files in the reference layout, built here with torch.save
(not by our writer), read on both backends; refusals; the fit against finite differences of
the model's own forward."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from mlx_lens.api import load, resolve_lens, resolve_lenses
from mlx_lens.checks.parity import compare
from mlx_lens.core import bounds
from mlx_lens.core.errors import LensError
from mlx_lens.core.lens import FINAL_NORM, Lens
from mlx_lens.tuned import jlens_file
from mlx_lens.tuned.jlens_file import JLens
from parity_tests.test_parity import PROMPTS, pair  # noqa: F401 (a fixture)
from tests.test_cli import run_main


def reference_file(path, n_layers: int, d: int, seed: int = 0, dtype=torch.float16,
                   identity: bool = False, **extra):
    """A J-lens as the reference implementation writes it: torch.save of J {layer: [d, d]}
    (fp16) for block outputs 0..n_layers - 2, n_prompts, source_layers, d_model, metadata.
    J = I + noise of spectral norm ~0.6, so translated rows move visibly."""
    rng = np.random.default_rng(seed)
    J = {}
    for layer in range(n_layers - 1):
        noise = 0 if identity else rng.standard_normal((d, d)) * 0.3 / np.sqrt(d)
        J[layer] = torch.from_numpy(np.eye(d) + noise).to(dtype)
    data = {"J": J, "n_prompts": 7, "source_layers": list(range(n_layers - 1)), "d_model": d,
            "metadata": {"skip_first": 16}, **extra}
    torch.save(data, path)
    return {k: v.double().numpy() for k, v in J.items()}


def _norm64(backend, x: np.ndarray) -> np.ndarray:
    """The tiny models' final norm in float64, written out from its weights (transformers'
    RMSNorm computes in fp32 whatever its input)."""
    norm = backend.model.base_model.norm if hasattr(backend.model.base_model, "norm") \
        else backend.model.base_model.ln_f
    w = norm.weight.detach().double().numpy()
    if isinstance(norm, torch.nn.LayerNorm):
        x = x - x.mean(-1, keepdims=True)
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + norm.eps) * w \
            + norm.bias.detach().double().numpy()
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + norm.variance_epsilon) * w


@pytest.mark.parametrize("name", ["llama_untied", "gpt2"])
def test_a_reference_file_reads_to_J_h_through_the_final_norm_and_head(pair, name,  # noqa: F811
                                                                       tmp_path):
    """Each row l + 1 decodes to head(final_norm(J_l h_{l+1})), against float64 from
    transformers' hidden states and the file's J; row 0 (no J) and the last row are the logit
    lens's."""
    torch_backend, mlx_backend = pair(name)
    n, d = torch_backend.info.n_layers, torch_backend.info.d_model
    J = reference_file(tmp_path / "j.pt", n, d)
    lens = Lens.tuned(jlens_file.read(tmp_path / "j.pt"))
    assert lens.name == f"jlens:{tmp_path / 'j.pt'}"
    ids = torch_backend.tokenizer.encode(PROMPTS[0])
    with torch.no_grad():
        hidden = torch_backend.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    h = [x[0].double().numpy() for x in hidden.hidden_states]
    head = torch_backend.model.get_output_embeddings().weight.detach().double().numpy()
    y = [h[0], *(h[r] @ J[r - 1].T for r in range(1, n)), None]
    got = torch_backend.layer_logits(ids, lens)
    weight, bias = lens.translators.weight, lens.translators.bias
    x_norm = np.linalg.norm(torch_backend.lens_inputs(ids, lens).astype(np.float64), axis=-1)
    for r in range(n):
        want = _norm64(torch_backend, y[r]) @ head.T
        # One fp32 evaluation of y = h + (J - I) h (the residual is transformers' own:
        # translated_products of that row alone, r = 0), its norm (half a dot product, counted
        # as one) and the head's products (docs/numerics.md §4).
        products = bounds.translated_products(h[r][None], weight[r:r + 1], bias[r:r + 1])[0] + 1
        bound = bounds.dot_bound(x_norm[r], torch_backend.head_row_norms(), d, products[:, None])
        assert np.all(np.abs(got[r] - want) <= bound), r
    plain = torch_backend.layer_logits(ids, FINAL_NORM)
    assert np.array_equal(got[0], plain[0]) and np.array_equal(got[-1], plain[-1])
    assert np.all(np.abs(got[1:-1] - plain[1:-1]).max(axis=(1, 2)) > 0.1)  # J acts
    # MLX reads the same file to the same distributions, within the parity bound extended to
    # the translators (docs/tuned-lens.md "Two backends").
    report = compare(torch_backend, mlx_backend, PROMPTS, lens, answer=None)
    assert not report.failures(), report.table()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_identity_J_is_the_logit_lens_bit_for_bit(pair, name, tmp_path):  # noqa: F811
    for backend in pair(name):
        n, d = backend.info.n_layers, backend.info.d_model
        reference_file(tmp_path / "i.pt", n, d, identity=True)
        lens = Lens.tuned(jlens_file.read(tmp_path / "i.pt"))
        ids = backend.tokenizer.encode(PROMPTS[1])
        assert np.array_equal(backend.layer_logits(ids, lens), backend.layer_logits(ids, FINAL_NORM))


def test_fp32_files_and_our_writer_round_trip(pair, tmp_path):  # noqa: F811
    torch_backend, _ = pair("llama")
    n, d = torch_backend.info.n_layers, torch_backend.info.d_model
    J = reference_file(tmp_path / "a.pt", n, d, dtype=torch.float32)
    lens = jlens_file.read(tmp_path / "a.pt")
    assert all(np.array_equal(lens.J[k], J[k].astype(np.float32)) for k in J)
    saved = jlens_file.save(lens, tmp_path / "b.pt")
    back = torch.load(tmp_path / "b.pt", weights_only=True)  # the reference layout, as it reads it
    assert sorted(back) == ["J", "d_model", "metadata", "n_prompts", "source_layers"]
    assert back["source_layers"] == list(range(n - 1)) and back["n_prompts"] == 7
    assert all(np.array_equal(back["J"][k].numpy(), lens.J[k]) for k in J)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]  # no temporary left
    with pytest.raises(LensError, match="never overwritten"):
        jlens_file.save(saved, tmp_path / "b.pt")


def test_jlens_in_lenses_names(tmp_path, pair):  # noqa: F811
    torch_backend, _ = pair("llama")
    reference_file(tmp_path / "j.pt", torch_backend.info.n_layers, torch_backend.info.d_model)
    lenses = resolve_lenses(f"final-norm,raw,jlens:{tmp_path / 'j.pt'}", FINAL_NORM)
    assert [lens.name for lens in lenses] == ["final-norm", "raw", f"jlens:{tmp_path / 'j.pt'}"]
    assert isinstance(resolve_lens(f"jlens:{tmp_path / 'j.pt'}").translators, JLens)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_run_reads_a_jlens_beside_other_lenses(tiny_model_dirs, tmp_path, capsys, backend):
    model = tiny_model_dirs["llama"]
    config = json.loads((model / "config.json").read_text())
    reference_file(tmp_path / "j.pt", config["num_hidden_layers"], config["hidden_size"])
    code, out, err = run_main(["run", str(model), "--backend", backend, "--no-probes", "--lenses",
                               f"final-norm,raw,jlens:{tmp_path / 'j.pt'}", "--out_dir",
                               str(tmp_path / "run")], tmp_path, capsys)
    assert code == 0, err
    payload = json.loads(next((tmp_path / "run").rglob("output-*.json")).read_text())
    assert f"jlens:{tmp_path / 'j.pt'}" in json.dumps(payload["lenses"])


def test_a_jlens_for_another_model_is_refused_in_one_line(tiny_model_dirs, tmp_path, capsys):
    model = tiny_model_dirs["llama_untied"]
    config = json.loads((model / "config.json").read_text())
    n, d = config["num_hidden_layers"], config["hidden_size"]
    cases = {"wide": (n, d + 32, {}), "deep": (n + 1, d, {}),
             "named": (n, d, {"metadata": {"model_name": "google/gemma-2-2b"}}),
             "hashed": (n, d, {"metadata": {"unembed_sha256": "0" * 64}})}
    for name, (layers, width, extra) in cases.items():
        reference_file(tmp_path / f"{name}.pt", layers, width, **extra)
        with pytest.raises(LensError, match="was made for"):
            load(str(model), "torch", f"jlens:{tmp_path / name}.pt")
    reference_file(tmp_path / "same.pt", n, d, metadata={"model_name": f"someone/{model.name}"})
    load(str(model), "torch", f"jlens:{tmp_path / 'same.pt'}")  # its name, from the hub: read
    code, out, err = run_main(["run", str(model), "--backend", "torch", "--lens",
                               f"jlens:{tmp_path / 'named.pt'}", "--out_dir", str(tmp_path / "run")],
                              tmp_path, capsys)
    assert code == 2 and err.count("\n") == 1 and "made for google/gemma-2-2b" in err
    assert not (tmp_path / "run").exists()


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_broken_jlens_files_are_one_line_errors(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = 8
    cases = {
        "missing": None,
        "garbage": b"not a torch file",
        "pickle": {"J": {0: _Payload()}, "d_model": d, "n_prompts": 1},
        "no J": {"n_prompts": 1, "d_model": d},
        "shape": {"J": {0: torch.eye(d + 1)}, "d_model": d, "n_prompts": 1},
        "gap": {"J": {0: torch.eye(d), 2: torch.eye(d)}, "d_model": d, "n_prompts": 1},
        "layers": {"J": {0: torch.eye(d)}, "source_layers": [1], "d_model": d, "n_prompts": 1},
        "nan": {"J": {0: torch.eye(d), 1: torch.full((d, d), float("nan"))}, "d_model": d,
                "n_prompts": 1},
    }
    messages = {"missing": "no J-lens file", "garbage": "unreadable J-lens", "pickle": "unreadable",
                "no J": "non-empty 'J'", "shape": r"not \[8, 8\]", "gap": "not every block output",
                "layers": "are not J's layers", "nan": "layers 1 holds NaN or inf"}
    for name, content in cases.items():
        path = tmp_path / f"{name}.pt"
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            torch.save(content, path)
        with pytest.raises(LensError, match=messages[name]):
            jlens_file.read(path)
    assert not (tmp_path / "PWNED").exists()
    code, out, err = run_main(["run", str(tiny_model_dirs["llama"]), "--backend", "torch",
                               "--lens", f"jlens:{tmp_path / 'nan.pt'}", "--out_dir",
                               str(tmp_path / "run")], tmp_path, capsys)
    assert code == 2 and err.count("\n") == 1 and "NaN or inf" in err
    assert not (tmp_path / "run").exists()
