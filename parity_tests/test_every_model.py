"""Every model type both mlx-lm and transformers implement (tests/zoo.py), on both backends.

For each type a tiny random model is built from transformers' own config class and loaded by
both backends. A backend either runs it or refuses it in one line (LensError, never another
exception). Where both run it: the torch lens's last row is transformers' own logits (the
`gemm_bound` of tests/test_backends.py), and the MLX lens agrees with the torch lens layer by
layer within the derived parity bounds (mlx_lens/checks/parity.py), which holds MLX to
transformers, not to mlx-lm's own forward. The outcome of every type is the row docs/models.md
publishes (scripts/support_matrix.py writes it from `examine`); a test fails where they differ.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mlx_lens.checks.parity import compare, logit_bound
from mlx_lens.core import bounds
from mlx_lens.core.errors import LensError
from mlx_lens.core.lens import FINAL_NORM, Lens
from mlx_lens.core.steering import Steering
from mlx_lens.experiment.patching import KINDS, one_at_a_time
from mlx_lens.loading.sources import resolve
from mlx_lens.mlx.backend import MlxBackend
from tests.lens_checks import NORM_AND_HEAD, gemm_bound
from tests.zoo import UNBUILDABLE, ZOO_CONFIGS, build
from torch_ref.backend import TorchBackend

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"
PROMPTS = ["Give the city name only, plain text. The capital of Germany is called simply",
           "The capital of France is called simply"]
BUILDABLE = sorted(set(ZOO_CONFIGS) - set(UNBUILDABLE))
COLUMNS = ("torch", "mlx", "last row = transformers", "MLX = torch", "next-norm", "middles",
           "patching", "steering", "tuned lens")


def _load(kind, folder):
    """The backend, or the one line it refused the model with."""
    try:
        return (MlxBackend if kind == "mlx" else TorchBackend)(resolve(str(folder))), None
    except LensError as exc:
        return None, str(exc)


def _reason(message: str) -> str:
    """A refusal's kind, stable across machines (the message's numbers are not)."""
    for key, kind in (("unsupported architecture", "not implemented"),
                      ("scales its logits", "logit scale"), ("head path", "head path"),
                      ("layer types", "layer types"), ("cannot read its layout", "layout"),
                      ("cannot read the layout", "layout"), ("no final norm", "layout"),
                      ("no separate attention", "layout"), ("no list of", "layout"),
                      ("no token embedding", "layout"), ("is untied", "layout"),
                      ("cannot be mapped", "config"), ("is refused on MLX", "mlx-lm differs"),
                      ("cannot load", "load")):
        if key in message:
            return f"refused ({kind})"
    return "refused"


def examine(folder) -> tuple[dict[str, str], dict[str, str]]:
    """(status per column, the full refusal lines): what each backend does with the model."""
    row, why = {c: "-" for c in COLUMNS}, {}
    loaded = {}
    for kind in ("torch", "mlx"):
        loaded[kind], refusal = _load(kind, folder)
        row[kind] = "runs" if refusal is None else _reason(refusal)
        if refusal:
            why[kind] = refusal
    t, m = loaded["torch"], loaded["mlx"]
    if t is not None:
        ids = t.tokenizer.encode(PROMPTS[0])
        with torch.no_grad():
            own = t.model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        logits = t.layer_logits(ids, FINAL_NORM)
        bound = gemm_bound(t, ids, FINAL_NORM, logits, NORM_AND_HEAD)[-1]
        row["last row = transformers"] = "ok" if np.all(np.abs(logits[-1] - own) <= bound) \
            else "FAILS"
        try:
            t.check_lens(Lens("next-norm"))
            row["next-norm"] = "ok"
        except LensError:
            row["next-norm"] = "refused (no input norm)"
    if t is not None:
        for column, of in (("middles", lambda b: b.mid_kind()), ("patching", patching_identities),
                           ("steering", steering_identities)):
            found = {kind: of(b) for kind, b in loaded.items() if b is not None}
            row[column] = found["torch"] if len(set(found.values())) == 1 else \
                "; ".join(f"{k}: {v}" for k, v in found.items())
            if column == "middles" and t.mid_kind() != "none":  # torch's, against hooks
                row[column] = row[column].replace(t.mid_kind(), t.mid_kind() + middles_by_name(t),
                                                  1)
    if t is not None and m is not None:
        report = compare(t, m, PROMPTS, FINAL_NORM, answer=None)
        row["MLX = torch"] = "ok" if not report.failures() else "FAILS"
        if report.failures():
            why["parity"] = report.failures()[0]
    if t is not None and m is not None:
        if t.mid_kind() == m.mid_kind() != "none" and not middles_agree(t, m):
            row["middles"] += " (MLX FAILS)"
        if row["steering"] == "ok" and not steered_agree(t, m):
            row["steering"] = "MLX FAILS"
    if t is not None:
        row["tuned lens"] = tuned_lens(t, m, Path(folder).parent)
    return row, why


def _vector(backend, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=backend.info.d_model).astype(np.float32)


def steering_identities(backend) -> str:
    """Steering's identities (tests/test_steering.py's) at rows 0 and 1: the rows before the
    steered one unchanged bit for bit, the steered row its plain value plus the vector exactly
    (fp32 rows: one fp32 addition on either side), and the next row moved; "FAILS" else."""
    ids = backend.tokenizer.encode(PROMPTS[1])
    plain = backend.residuals(ids)
    for row in (0, 1):
        v = _vector(backend, row)
        with backend.steered(Steering({row: v})):
            steered = backend.residuals(ids)
        if not (np.array_equal(steered[:row], plain[:row])
                and np.array_equal(steered[row], plain[row] + v)
                and not np.array_equal(steered[row + 1], plain[row + 1])):
            return "FAILS"
    return "ok"


def steered_agree(t, m) -> bool:
    """A steered run (vectors at rows 0 and 1) decoded by both backends, within the parity
    bounds: steering adds one exact-input addition per row, which the bounds' products cover."""
    spec = Steering({0: _vector(t, 0), 1: _vector(t, 1)})
    with t.steered(spec), m.steered(spec):
        return not compare(t, m, PROMPTS[1:], FINAL_NORM, answer=None).failures()


def tuned_lens(t, m, root: Path) -> str:
    """The tuned lens (parity_tests/test_tuned.py's checks): random translators decoded by both
    backends within the parity bound extended to them; three steps of the same training run on
    each backend that runs the type, whose loss on step 0's batch falls, and (both) whose losses
    agree within the training bound; "FAILS" where one does not."""
    from mlx_lens.core.training import Recipe
    from mlx_lens.tuned.corpus import load_corpus
    from mlx_lens.tuned.lens_file import TunedLens
    from mlx_lens.tuned.training import TuneOptions, batch_at
    from parity_tests.test_tuned import random_lens, training_bound
    from tests.tiny_models import corpus_file

    info, backends = t.info, [b for b in (t, m) if b is not None]
    if m is not None:
        lens = Lens.tuned(random_lens(info.n_layers, info.d_model))
        if compare(t, m, PROMPTS[1:], lens, answer=None).failures():
            return "MLX FAILS"
    opts = TuneOptions(steps=3, tokens_per_step=128, seq_len=32)
    corpus = load_corpus(str(corpus_file(root)), t.tokenizer, opts.seq_len)
    tuners = [b.tuner(TunedLens.identity(info.n_layers, info.d_model), Recipe()) for b in backends]
    first = None
    for step in range(opts.steps):
        batch = batch_at(corpus.train, step, opts.sequences_per_step, opts.seed)
        losses = [tuner.gradients(batch) for tuner in tuners]
        first = first or losses
        for tuner in tuners:
            tuner.update(opts.lr(step))
        if len(losses) == 2 and abs(losses[1] - losses[0]) > \
                training_bound(info, opts.step_tokens, step + 1) * abs(losses[0]):
            return "MLX FAILS"
    batch = batch_at(corpus.train, 0, opts.sequences_per_step, opts.seed)
    falls = all(tuner.losses(batch)[0].sum() < before for tuner, before in zip(tuners, first))
    return "ok" if falls else "FAILS"


def patching_identities(backend) -> str:
    """The kinds a backend patches on the model, where patching's identities hold (those of
    tests/test_patching.py, on a 6-token pair): restoring every position at row 0 gives the
    clean run's own computation, and restoring the corrupted run's own values at one position
    changes nothing, each within two fp32 evaluations' bound (tests/test_patching.py's
    `_bound_bits` model, on the logits): a variant is another row of one batch, which a CPU
    GEMM may round otherwise, and a mixture of experts groups a batch's tokens by expert, so
    even the same row of two batches that differ elsewhere may round otherwise; "FAILS" where
    one does not."""
    if backend.per_layer_inputs:
        return "refused (per-layer inputs)"
    clean = backend.tokenizer.encode(PROMPTS[0])[:6]
    corrupt = clean[:-2] + [clean[-1], clean[-2]]
    layout, info = backend.layout, backend.info
    kinds = [k for k in KINDS if k == "resid" or (layout.attention if k == "attn"
                                                  else layout.mlp) is not None]
    c, x = backend.record([clean]), backend.record([corrupt])
    everything = np.ones((2, 1, len(clean)), bool)
    everything[0] = False
    def within(z, norms, want):
        bound = (bounds.dot_bound(norms, backend.head_row_norms(), info.d_model,
                                  2 * (info.n_layers + 1))
                 + 2 * bounds.elementwise_bound(z, backend.softcap))
        return bool(np.all(np.abs(z - want) <= bound))

    restored, norms = backend.patched_logits(x, c, "resid", range(1), everything, 1)
    own, _ = backend.patched_logits(c, c, "resid", range(1), everything, 1)
    holds = within(restored[1], norms[1], own[1])
    for kind in kinds:
        z, norms = backend.patched_logits(x, x, kind, range(1, 3),
                                          one_at_a_time(range(len(clean)), len(clean)), 1)
        holds &= within(z, norms, z[:1])
    return ", ".join(kinds) if holds else "FAILS"


# The module in front of a block's MLP under the names transformers' model files give it (the
# test's own list, not the lens's reading of the layout): a pre-MLP norm, else, in a post-norm
# block (a norm after the MLP, none in front of the attention), the MLP itself, else the norm
# after the attention; and a parallel block's attention.
PRE_MLP_NORMS = ("pre_feedforward_layernorm", "pre_mlp_layernorm", "pre_ff_layernorm",
                 "feedforward_layernorm", "ffn_norm", "channel_pre_norm")
POST_MLP_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm")
OTHER_MLP_NORMS = ("post_attention_layernorm", "ln_2", "post_attention_norm", "norm2")
ATTENTIONS = ("self_attn", "attention", "attn", "self_attention")


def _in_front_of_mlp(block):
    post_norm = any(hasattr(block, n) for n in POST_MLP_NORMS) and \
        not hasattr(block, "input_layernorm")
    for names in (PRE_MLP_NORMS, ("mlp",) if post_norm else (), OTHER_MLP_NORMS):
        found = next((getattr(block, n) for n in names if hasattr(block, n)), None)
        if found is not None:
            return found
    return None


def middles_by_name(t) -> str:
    """The torch lens's middle of each block against what transformers' own forward hands the
    module in front of the MLP (found by its name, above), or, in a parallel block, the block's
    input plus its attention's output: "= hooks" where they are equal bit for bit, " (torch
    FAILS)" where not, "" where the blocks have none of these names (the MLX middles are then
    held to torch's, and torch's to the patching identities)."""
    ids = t.tokenizer.encode(PROMPTS[1])
    blocks = next((m for m in t.model.get_decoder().modules()
                   if isinstance(m, torch.nn.ModuleList) and len(m) == t.info.n_layers), [])
    parallel = t.mid_kind() == "parallel"
    found = [(next((getattr(b, n) for n in ATTENTIONS if hasattr(b, n)), None) if parallel
              else _in_front_of_mlp(b)) for b in blocks]
    if len(blocks) != t.info.n_layers or any(f is None for f in found):
        return ""
    seen: list = [[] for _ in blocks]
    hooks = []
    for block, module, sink in zip(blocks, found, seen):
        if parallel:
            hooks.append(block.register_forward_pre_hook(
                lambda m, args, kw, sink=sink: sink.append(args[0] if args
                                                           else kw["hidden_states"]),
                with_kwargs=True))
            hooks.append(module.register_forward_hook(
                lambda m, a, out, sink=sink: sink.append(out[0] if isinstance(out, tuple) else out)))
        else:
            hooks.append(module.register_forward_pre_hook(lambda m, args, sink=sink:
                                                          sink.append(args[0])))
    try:
        with torch.no_grad():
            t.model(input_ids=torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()
    want = np.stack([(s[0] + s[1] if parallel else s[0])[0].float().numpy() for s in seen])
    return " = hooks" if np.array_equal(t.residuals(ids, "mid")[:-1], want) else " (torch FAILS)"


def middles_agree(t, m) -> bool:
    """The middle of each block decoded by both backends, within the parity bound of that site
    (mlx_lens/checks/parity.py `logit_bound`: i + 2 products for block i's middle)."""
    ids = t.tokenizer.encode(PROMPTS[0])
    za, zb = t.layer_logits(ids, FINAL_NORM, "mid"), m.layer_logits(ids, FINAL_NORM, "mid")
    bound = logit_bound(t, ids, FINAL_NORM, za, t.head_row_norms(), "mid")
    return bool(np.all(np.abs(za.astype(np.float64) - zb) <= bound))


def published() -> dict[str, dict[str, str]]:
    """docs/models.md's matrix: model type -> status per column."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(COLUMNS) + 2 and re.fullmatch(r"`[\w-]+`", cells[0]):
            rows[cells[0].strip("`")] = dict(zip(COLUMNS, cells[1:-1]))
    return rows


@pytest.fixture(scope="module")
def matrix():
    return published()


@pytest.mark.parametrize("model_type", BUILDABLE)
def test_every_model_type_runs_or_is_refused_as_published(model_type, matrix, tmp_path):
    row, why = examine(build(model_type, tmp_path / model_type))
    assert row == matrix.get(model_type), why
    # a backend that runs a type decodes it right, or the matrix could publish a wrong lens
    if row["torch"] == "runs":
        assert row["last row = transformers"] == "ok"
    if row["torch"] == row["mlx"] == "runs":
        assert row["MLX = torch"] == "ok", why
    for column in ("patching", "middles", "steering", "tuned lens"):
        assert "FAILS" not in row[column], (column, row[column])


def test_the_matrix_names_every_type_and_why():
    """Every type both libraries implement is in the matrix: built and tested, or named as
    unbuildable with its reason."""
    rows = published()
    text = DOC.read_text()
    assert set(rows) == set(BUILDABLE)
    for model_type in UNBUILDABLE:
        assert f"`{model_type}`" in text


@pytest.mark.parametrize("model_type, args, message", [
    ("olmo2", ["run", "--lens", "next-norm"], "olmo2's blocks have no norm in front of their "
                                              "attention that the lens can read"),
    # the random tiny mamba favours "Berlin" after France's prompt: that one is the clean one
    ("mamba", ["patch", "--clean", "The capital of France is", "--corrupt",
               "The capital of Germany is", "--answer", "Berlin", "--kinds", "mlp"],
     "mamba's blocks have no separable MLP to patch"),
    ("gemma4_text", ["patch", "--clean", "The capital of Germany is", "--corrupt",
                     "The capital of France is", "--answer", "Berlin"],
     "gemma4_text's blocks also read a per-layer input made from the tokens"),
])
def test_a_feature_a_type_lacks_is_refused_in_one_line(model_type, args, message, tmp_path,
                                                       capsys):
    """From the command line, as a user meets it: one line naming what the blocks lack, exit 2,
    nothing written."""
    from tests.test_cli import run_main

    folder = build(model_type, tmp_path / model_type)
    out = tmp_path / "out"
    code, _, err = run_main([args[0], str(folder), "--backend", "torch", *args[1:],
                             "--out_dir", str(out)], tmp_path, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_state_space_model_runs_every_lens_without_middles(tmp_path, capsys):
    """A model of one-mixer blocks (mamba) through `--lenses all`: the rows between blocks under
    every lens, no middle of a block (the JSON says so), and resid patching."""
    import json

    from tests.test_cli import run_main

    folder = build("mamba", tmp_path / "mamba")
    code, _, err = run_main(["run", str(folder), "--backend", "torch", "--lenses", "all",
                             "--no-plots", "--out_dir", str(tmp_path / "run")], tmp_path, capsys)
    assert code == 0, err
    payload = json.loads((tmp_path / "run" / "output-mamba.json").read_text())
    assert payload["lenses"]["mid_rows"] is None
    code, _, err = run_main(["patch", str(folder), "--backend", "torch", "--clean",
                             "The capital of France is", "--corrupt", "The capital of Germany is",
                             "--answer", "Berlin", "--kinds", "resid,attn",
                             "--out_dir", str(tmp_path / "patch")], tmp_path, capsys)
    assert code == 0, err


def test_all_lenses_on_post_norm_blocks_leave_next_norm_out_by_name(tmp_path, capsys):
    """`--lenses all` means every lens the model can be read with: on post-norm blocks (olmo2)
    next-norm is left out, and the JSON and the console say why (named alone, it is refused)."""
    import json

    from tests.test_cli import run_main

    folder = build("olmo2", tmp_path / "olmo2")
    code, out, err = run_main(["run", str(folder), "--backend", "torch", "--lenses", "all",
                               "--no-probes", "--no-plots", "--out_dir", str(tmp_path / "run")],
                              tmp_path, capsys)
    assert code == 0, err
    section = json.loads((tmp_path / "run" / "output-olmo2.json").read_text())["lenses"]
    assert section["lenses"] == ["final-norm", "raw"]
    reason = "olmo2's blocks have no norm in front of their attention that the lens can read"
    assert list(section["omitted"]) == ["next-norm"] and reason in section["omitted"]["next-norm"]
    assert f"not read: {section['omitted']['next-norm']}" in out
