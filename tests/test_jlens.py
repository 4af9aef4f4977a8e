"""The Jacobian lens (docs/jlens.md): files in the reference layout, built here with torch.save
(not by our writer), read on both backends; refusals; the fit against finite differences of
the model's own forward."""
from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from mlx_lens.api import load, resolve_lens, resolve_lenses
from mlx_lens.checks.parity import compare
from mlx_lens.core import bounds
from mlx_lens.core.errors import LensError
from mlx_lens.core.lens import FINAL_NORM, Lens
from mlx_lens.tuned import jlens_file, jlens_fit
from mlx_lens.tuned.corpus import load_corpus
from mlx_lens.tuned.jlens_file import JLens
from mlx_lens.tuned.jlens_fit import JLensOptions
from parity_tests.test_parity import PROMPTS, pair  # noqa: F401 (a fixture)
from tests.test_cli import run_main
from tests.tiny_models import corpus_file


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


# -- the fit's gradients against finite differences of the model's own forward ------------------
# Both sides in float64 (the models cast), so the comparison tests the estimator, not rounding.
# Central differences D(e) = g + c e^2 + O(e^4): D(e) is within |D(2e) - D(e)| / 3 of g up to the
# O(e^4) term, and |D(2e) - D(e)| allows 3x that. f, a sum of T entries of the last block's
# output, is computed to within C u sum|entries|, which moves D(e) by that over e:
# - transformers in float64 (its RMSNorm's fp32 cast replaced by its formula): u = u64 and
#   C = 1e3 (3 blocks of products of length <= 384: L gamma_384 ~ 1.2e3 u64 relative);
# - mlx-lm in float64: mlx's fast kernels (norm, rope, attention) compute in fp32 whatever the
#   dtype, one rounding each per block: u = u32 and C = 3 L = 9; e = 0.1 keeps C u F / e small.
# The gradients' own rounding (float64 products, the same fp32 kernels once) is ~1e-4 of these.
FD_CASES = [(0, 3, 5), (1, 4, 17)]  # (block output l, source position t, output direction i)
TORCH_FD = (1e-3, 1e3 * np.finfo(np.float64).eps / 2)  # (e, C u)
MLX_FD = (1e-1, 9 * np.finfo(np.float32).eps / 2)


def _fd(f, eps: float, cu: float) -> tuple[float, float]:
    """D(eps) and its bound: |D(2 eps) - D(eps)| plus the rounding of f over eps."""
    (lo, lo_abs), (hi, hi_abs) = f(-eps), f(eps)
    (lo2, _), (hi2, _) = f(-2 * eps), f(2 * eps)
    d1, d2 = (hi - lo) / (2 * eps), (hi2 - lo2) / (4 * eps)
    return d1, abs(d2 - d1) + cu * max(lo_abs, hi_abs) / eps


def _torch_f(model, ids, layer, positions, direction, u):
    """e -> (sum_t' h_L,t'[direction], sum of |entries|) by transformers' own forward, float64,
    block `layer`'s output moved by e u at `positions` (a hook on transformers' layer list)."""
    base = model.base_model
    layers = base.layers if hasattr(base, "layers") else base.h

    def f(e):
        seen = []

        def move(_m, _a, out):
            h = (out[0] if isinstance(out, tuple) else out).clone()
            h[0, positions] += e * torch.from_numpy(u)
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handles = [layers[layer].register_forward_hook(move), layers[-1].register_forward_hook(
            lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))]
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]))
        finally:
            for h in handles:
                h.remove()
        column = seen[0][0, :, direction]
        return float(column.sum()), float(column.abs().sum())
    return f


def _mlx_f(model, ids, layer, positions, direction, u):
    """The same by mlx-lm's own forward of the loaded model (the mlx-lm Model object, called
    as a whole: not the lens's loop), the layer wrapped in a callable."""
    import mlx.core as mx

    inner = model.model
    layers = inner.layers if hasattr(inner, "layers") else inner.h
    at = np.zeros((1, len(ids), 1))
    at[0, positions] = 1
    seen = []

    class Wrapped:
        def __init__(self, block, shift):
            self.block, self.shift = block, shift

        def __getattr__(self, name):  # what the model's forward reads of its blocks
            return getattr(self.block, name)

        def __call__(self, *args, **kwargs):
            out = self.block(*args, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
            h = h + self.shift
            seen.append(h)
            return (h, *out[1:]) if isinstance(out, tuple) else h

    original = (layers[layer], layers[-1])

    def f(e):
        shift = mx.array(at * e * u[None, None, :]).astype(mx.float64)
        layers[layer] = Wrapped(original[0], shift)
        layers[-1] = Wrapped(original[1], mx.zeros(1, mx.float64))
        try:
            seen.clear()
            model(mx.array([ids]))
            column = np.array(seen[-1][0, :, direction])
        finally:
            layers[layer], layers[-1] = original
        return float(column.sum()), float(np.abs(column).sum())
    return f


def _float64_backends(tiny_model_dirs, name):
    import mlx.core as mx
    from mlx_lens.loading.sources import resolve
    from mlx_lens.mlx.backend import MlxBackend
    from torch_ref.backend import TorchBackend

    source = resolve(str(tiny_model_dirs[name]))
    torch_backend, mlx_backend = TorchBackend(source), MlxBackend(source)
    torch_backend.model.double()
    for module in torch_backend.model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            # transformers' RMSNorm computes in fp32 whatever its input: here its formula in
            # the input's dtype (Llama's and Qwen's: w x / sqrt(mean x^2 + eps))
            def forward(x, m=module):
                eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
                return m.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            module.forward = forward
    mlx_backend.model.set_dtype(mx.float64)
    return torch_backend, mlx_backend


# Architectures whose transformers forward runs in float64 once its RMSNorm does (Gemma's
# eager attention takes its softmax in fp32).
@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen3"])
def test_the_gradients_are_finite_differences_of_the_models_own_forward(tiny_model_dirs, name):
    """At (layer, position, direction) triples, each backend's row dotted with a random unit u
    against d/de of sum_t' h_L,t'[i] with h_l,t moved by e u; the prompt cut after t + 1 and
    skip = t, so t is the only source position. And once over all source positions of a
    prompt (skip 2): the sum of the per-position gradients."""
    torch_backend, mlx_backend = _float64_backends(tiny_model_dirs, name)
    ids = torch_backend.tokenizer.encode(PROMPTS[0])
    d = torch_backend.info.d_model
    rng = np.random.default_rng(1)
    cases = [(layer, ids[:t + 2], [t], t, i) for layer, t, i in FD_CASES]
    cases.append((1, ids, list(range(2, len(ids) - 1)), 2, 9))
    for layer, prompt, positions, skip, i in cases:
        u = rng.standard_normal(d)
        u /= np.linalg.norm(u)
        wants = {torch_backend: _fd(_torch_f(torch_backend.model, prompt, layer, positions, i, u),
                                    *TORCH_FD),
                 mlx_backend: _fd(_mlx_f(mlx_backend.model, prompt, layer, positions, i, u),
                                  *MLX_FD)}
        for backend, (want, bound) in wants.items():
            got = backend.jacobian_rows(prompt, [i], skip)[layer, 0] @ u
            assert abs(got - want) <= bound, (backend.info.backend, layer, positions, got, want)
            assert abs(want) > 10 * bound  # the comparison has teeth


def test_a_batch_of_directions_is_each_direction_alone(tiny_model_dirs):
    """One backward pass of B copies equals B passes of one (float64: the copies are independent
    computations, whose only difference is the kernels' blocking, within 1e-12 relative)."""
    for backend in _float64_backends(tiny_model_dirs, "llama"):
        ids = backend.tokenizer.encode(PROMPTS[0])
        directions = [0, 5, 17, 31]
        batched = backend.jacobian_rows(ids, directions, 2)
        alone = np.stack([backend.jacobian_rows(ids, [i], 2)[:, 0] for i in directions], 1)
        assert batched.shape == (backend.info.n_layers - 1, len(directions), backend.info.d_model)
        scale = np.abs(alone).max()
        assert np.abs(batched - alone).max() <= 1e-12 * scale, backend.info.backend


# -- the fit ---------------------------------------------------------------------------------------
FIT = JLensOptions(windows=2, seq_len=16, skip=2, cotangents=40, checkpoint_every=1)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return corpus_file(tmp_path_factory.mktemp("corpus"))


def test_a_fit_is_the_mean_of_finite_differences_over_its_windows(tiny_model_dirs, text, tmp_path):
    """J_l[i] . u of a fit (float64 model) against the mean over its windows of 1/|V| d/de of
    sum_t' h_L,t'[i] with h_l moved by e u at every source position (transformers' forward);
    the bound: the windows' finite-difference bounds over |V|, and the file's fp32 rounding of
    J, u32 sum_j |J_ij u_j|."""
    torch_backend, _ = _float64_backends(tiny_model_dirs, "llama")
    data = load_corpus(str(text), torch_backend.tokenizer, FIT.seq_len)
    lens = jlens_fit.fit(torch_backend, data, FIT, tmp_path / "j.pt")
    assert lens.n_prompts == 2 and sorted(lens.J) == list(range(torch_backend.info.n_layers - 1))
    rng = np.random.default_rng(2)
    for layer, i in ((0, 3), (1, 40)):
        u = rng.standard_normal(torch_backend.info.d_model)
        u /= np.linalg.norm(u)
        fds = [_fd(_torch_f(torch_backend.model, w.tolist(), layer, list(range(2, 15)), i, u),
                   *TORCH_FD) for w in data.train[:2]]
        want = np.mean([f[0] for f in fds]) / FIT.sources
        bound = np.mean([f[1] for f in fds]) / FIT.sources \
            + np.finfo(np.float32).eps / 2 * np.abs(lens.J[layer][i] * u).sum()
        assert abs(lens.J[layer][i] @ u - want) <= bound, (layer, i)
        assert abs(want) > 10 * bound


def _fit_bound(info, seq_len: int) -> float:
    """MLX against torch, relative (Frobenius) on each J_l. No a-priori bound holds for a
    backward pass; the model, stated like the tuned lens's training bound
    (parity_tests/test_tuned.py): each backend's gradient carries the relative error of the
    forward it differentiates (the deepest row's parity bound, (L + 1) gamma_d, §4), its own
    backward roundings (one product of length max(d, ffn) back through each of the L blocks)
    and the sum over positions (gamma_T); two backends, twice that."""
    n, d = info.n_layers, info.d_model
    return 2 * ((n + 1) * bounds.gamma(d) + n * bounds.gamma(4 * d) + bounds.gamma(seq_len))


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma2"])
def test_the_mlx_fit_is_the_torch_fit(pair, name, text, tmp_path):  # noqa: F811
    torch_backend, mlx_backend = pair(name)
    data = load_corpus(str(text), torch_backend.tokenizer, FIT.seq_len)
    a, b = (jlens_fit.fit(backend, data, FIT, tmp_path / f"{backend.info.backend}.pt")
            for backend in (torch_backend, mlx_backend))
    bound = _fit_bound(torch_backend.info, FIT.seq_len)
    for layer in a.J:
        ja, jb = a.J[layer].astype(np.float64), b.J[layer].astype(np.float64)
        assert np.linalg.norm(ja - jb) <= bound * np.linalg.norm(ja), layer
        assert np.linalg.norm(ja - np.eye(len(ja))) > 0.1 * np.linalg.norm(ja)  # not the identity


def test_two_shards_merge_to_one_fit_on_both(pair, text, tmp_path):  # noqa: F811
    """Windows 0 and 1 merged against one fit of 0..1, entry by entry: each shard's mean
    is rounded to fp32 once (u32 (n1 |J1| + n2 |J2|) / n after weighting), the merged and the
    joint mean once more each (2 u32 |J|); the float64 sums' order adds ~1e-16."""
    torch_backend, _ = pair("llama")
    data = load_corpus(str(text), torch_backend.tokenizer, FIT.seq_len)
    shards = [jlens_fit.fit(torch_backend, data, replace(FIT, windows=1, first=first),
                            tmp_path / f"{first}.pt") for first in (0, 1)]
    joint = jlens_fit.fit(torch_backend, data, FIT, tmp_path / "joint.pt")
    merged = jlens_fit.merge([s.path for s in shards], tmp_path / "merged.pt")
    assert merged.n_prompts == 2 and merged.config["fit"]["windows"] == [[0, 1], [1, 2]]
    u = np.finfo(np.float32).eps / 2
    for layer in joint.J:
        weighted = sum(s.n_prompts * np.abs(s.J[layer].astype(np.float64)) for s in shards) / 2
        bound = u * weighted + 2 * u * np.abs(joint.J[layer]) + 1e-12 * np.abs(joint.J[layer]).max()
        assert np.all(np.abs(merged.J[layer] - joint.J[layer]) <= bound), layer
    with pytest.raises(LensError, match="overlap"):
        jlens_fit.merge([shards[0].path, shards[0].path], tmp_path / "twice.pt")
    other = jlens_fit.fit(torch_backend, data, replace(FIT, windows=1, skip=3, first=2),
                          tmp_path / "o.pt")
    with pytest.raises(LensError, match="not shards of one fit"):
        jlens_fit.merge([shards[0].path, other.path], tmp_path / "mixed.pt")


class _Killed:
    """A backend whose n-th backward pass is interrupted (as SIGINT does), once."""

    def __init__(self, backend, at: int):
        self.backend, self.at, self.calls = backend, at, 0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def jacobian_rows(self, *args):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.backend.jacobian_rows(*args)


def test_a_killed_fit_resumes_to_the_uninterrupted_result(pair, text, tmp_path):  # noqa: F811
    torch_backend, _ = pair("llama")
    data = load_corpus(str(text), torch_backend.tokenizer, FIT.seq_len)
    opts = FIT
    whole = jlens_fit.fit(torch_backend, data, opts, tmp_path / "whole.pt")
    with pytest.raises(KeyboardInterrupt):  # killed in window 1's second backward pass
        jlens_fit.fit(_Killed(torch_backend, 3 + 2), data, opts, tmp_path / "resumed.pt")
    ckpt = jlens_file.read(tmp_path / "resumed.pt.checkpoint")
    assert ckpt.n_prompts == 1 and not (tmp_path / "resumed.pt").exists()
    resumed = jlens_fit.fit(torch_backend, data, opts, tmp_path / "resumed.pt")
    assert all(np.array_equal(resumed.J[k], whole.J[k]) for k in whole.J)
    assert not (tmp_path / "resumed.pt.checkpoint").exists()
    with pytest.raises(KeyboardInterrupt):
        jlens_fit.fit(_Killed(torch_backend, 4), data, opts, tmp_path / "other.pt")
    with pytest.raises(LensError, match="checkpoint of another fit"):
        jlens_fit.fit(torch_backend, data, replace(opts, skip=3), tmp_path / "other.pt")
    with pytest.raises(LensError, match="never overwritten"):
        jlens_fit.fit(torch_backend, data, opts, tmp_path / "whole.pt")


def test_the_command_fits_and_run_reads_it(tiny_model_dirs, text, tmp_path, capsys):
    model = str(tiny_model_dirs["llama"])
    out = tmp_path / "j.pt"
    code, stdout, err = run_main(["jlens", model, "--backend", "torch", "--corpus", str(text),
                                  "--windows", "2", "--seq-len", "16", "--skip", "2", "--out",
                                  str(out)], tmp_path, capsys)
    assert code == 0, err
    meta = torch.load(out, weights_only=True)["metadata"]
    assert meta["fit"]["skip"] == 2 and meta["fit"]["corpus"] == str(text)
    for backend in ("torch", "mlx"):
        code, stdout, err = run_main(["run", model, "--backend", backend, "--no-probes",
                                      "--lenses", f"final-norm,raw,jlens:{out}", "--out_dir",
                                      str(tmp_path / f"run-{backend}")], tmp_path, capsys)
        assert code == 0, err
    code, stdout, err = run_main(["jlens", model, "--seq-len", "4", "--skip", "3"], tmp_path,
                                 capsys)
    assert code == 2 and err.count("\n") == 1 and "leaves no source position" in err


def test_jlens_vectors_are_J_transposed_times_the_head_rows(tiny_model_dirs, tmp_path):
    """v_t = J_l^T W_U[t] against float64 from the file's J and transformers' head; the bound:
    A = J - I held in fp32 (u32 |J_ii - 1| on the diagonal) and v rounded to fp32 once, within
    2 u32 (|J|^T |w|). Row 0 has no J: the head row itself. The vectors steer a run."""
    model = tiny_model_dirs["llama_untied"]
    lens = load(str(model), "torch")
    info = lens.backend.info
    J = reference_file(tmp_path / "j.pt", info.n_layers, info.d_model)
    head = lens.backend.model.get_output_embeddings().weight.detach().double().numpy()
    tokens = [5, 17, lens.backend.tokenizer.decode([40])]
    ids = [5, 17, lens.backend.tokenizer.encode(tokens[2], add_special_tokens=False)[0]]
    got = lens.jlens_vectors(tokens, 2, tmp_path / "j.pt")
    want = head[ids] @ J[1]
    bound = 2 * np.finfo(np.float32).eps / 2 * (np.abs(head[ids]) @ np.abs(J[1]))
    assert got.shape == (3, info.d_model) and np.all(np.abs(got - want) <= bound)
    assert np.array_equal(lens.jlens_vectors([5], 0, tmp_path / "j.pt")[0], head[5].astype(np.float32))
    with pytest.raises(LensError, match="needs a J-lens"):
        lens.jlens_vectors([5], 2)
    with pytest.raises(LensError, match="tokens, not one"):
        lens.jlens_vectors(["the capital of"], 2, tmp_path / "j.pt")
    steered = lens.run(PROMPTS[0], probes=False, steer={2: 4 * got[0]})
    plain = lens.run(PROMPTS[0], probes=False)
    assert not steered.pure["entropy"].equals(plain.pure["entropy"])


def test_tune_eval_reports_the_jlens_beside_the_tuned_lens(tiny_model_dirs, text, tmp_path, capsys):
    """An identity J evaluates as the logit lens bit for bit; a fitted one differs from it at the
    rows it translates only (row 0 has no J), in the table, eval.csv and the console."""
    from mlx_lens.tuned import lens_file, training
    from mlx_lens.tuned.lens_file import TunedLens

    model = str(tiny_model_dirs["llama"])
    lens = load(model, "torch")
    info = lens.backend.info
    data = load_corpus(str(text), lens.backend.tokenizer, FIT.seq_len)
    tuned = lens_file.save(TunedLens.identity(info.n_layers, info.d_model), tmp_path / "tuned")
    reference_file(tmp_path / "i.pt", info.n_layers, info.d_model, identity=True)
    frame = training.evaluate(lens.backend, tuned, data.held_out, 256,
                              jlens_file.read(tmp_path / "i.pt"))
    assert frame.kl_jlens_bits.equals(frame.kl_logit_bits)
    assert frame.ce_jlens_bits.equals(frame.ce_logit_bits)
    fitted = jlens_fit.fit(lens.backend, data, FIT, tmp_path / "j.pt")
    code, out, err = run_main(["tune", model, "--backend", "torch", "--corpus", str(text),
                               "--seq-len", str(FIT.seq_len), "--eval", str(tuned.path),
                               "--eval-tokens", "256", "--jlens", str(fitted.path)], tmp_path, capsys)
    assert code == 0, err
    assert f"and J-lens {fitted.path}" in out and "KL(" in out
    csv = pd.read_csv(tuned.path / "eval.csv")
    assert csv.kl_jlens_bits[0] == csv.kl_logit_bits[0]
    assert (csv.kl_jlens_bits[1:-1] != csv.kl_logit_bits[1:-1]).all()
    assert csv.kl_jlens_bits.iloc[-1] == 0 and (tuned.path / "eval.png").is_file()
    code, out, err = run_main(["tune", model, "--jlens", str(fitted.path)], tmp_path, capsys)
    assert code == 2 and "--jlens goes with --eval" in err
