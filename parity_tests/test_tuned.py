"""The tuned lens on both backends, every architecture's tiny model (docs/tuned-lens.md).

One random tuned lens per model (translators of spectral scale ~0.3, so rows move visibly): both
backends give the same distributions within the parity bound extended to the translators
(bounds.translated_products); each backend's sweep matches its own full logits (the lens tests'
bounds); zero translators are exactly the logit lens; and the same training run stays close
across backends over its first steps.
"""
from __future__ import annotations

import numpy as np
import pytest

from mlx_lens.core.lens import FINAL_NORM, Lens
from mlx_lens.core import bounds
from mlx_lens.core.training import Recipe
from mlx_lens.tuned.corpus import load_corpus
from mlx_lens.checks.parity import compare
from mlx_lens.tuned.lens_file import TunedLens
from mlx_lens.tuned.training import TuneOptions, batch_at
from parity_tests.test_parity import PROMPTS, pair  # noqa: F401 (a fixture)
from tests.lens_checks import assert_sweep_matches_logits
from tests.tiny_models import CONFIGS, corpus_file

STEPS = 3


def random_lens(n_layers: int, d: int, seed: int = 0) -> TunedLens:
    """Translators A ~ N(0, 0.3^2 / d) (spectral norm ~0.6) and b ~ N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)
    return TunedLens((rng.standard_normal((n_layers, d, d)) * 0.3 / np.sqrt(d)).astype(np.float32),
                     (rng.standard_normal((n_layers, d)) * 0.1).astype(np.float32))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_backends_agree_on_a_tuned_lens(pair, name):  # noqa: F811
    torch_backend, mlx_backend = pair(name)
    lens = Lens.tuned(random_lens(torch_backend.info.n_layers, torch_backend.info.d_model))
    report = compare(torch_backend, mlx_backend, PROMPTS, lens, answer=None)
    assert not report.failures(), report.table()
    cells = sum(len(torch_backend.tokenizer.encode(p)) for p in PROMPTS) * report.max_kl.size
    assert report.decisive.sum() > 0.8 * cells  # a sensitivity floor: top-1 checked at most cells
    ids = torch_backend.tokenizer.encode(PROMPTS[0])
    for backend in (torch_backend, mlx_backend):
        # The translators act: every translated row differs from the logit lens's.
        tuned, plain = backend.layer_logits(ids, lens), backend.layer_logits(ids, FINAL_NORM)
        assert np.all(np.abs(tuned[:-1] - plain[:-1]).max(axis=(1, 2)) > 0.1)
        assert np.array_equal(tuned[-1], plain[-1])  # the last row has no translator
        assert_sweep_matches_logits(backend, ids, lens, answer_id=int(plain[-1, -1].argmax()))


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
def test_zero_translators_are_the_logit_lens_bit_for_bit(pair, name):  # noqa: F811
    for backend in pair(name):
        ids = backend.tokenizer.encode(PROMPTS[1])
        zero = Lens.tuned(TunedLens.identity(backend.info.n_layers, backend.info.d_model))
        assert np.array_equal(backend.layer_logits(ids, zero), backend.layer_logits(ids, FINAL_NORM))


# Training parity: the same run (zero translators, the same batches) on both backends. No a-priori
# bound holds for an iteration; the model, stated: each step's gradient carries the relative error
# of the logits it comes from (the deepest row's parity bound, 2 (R + 1) gamma_d, §4) plus its own
# roundings (one length-V dot product back through the head, one length-N sum over the step's
# tokens: gamma_V + gamma_N for each backend), and step k's translators carry the errors of the k
# updates before them, each applied with lr (1 + momentum) at most (Nesterov's first step).
def training_bound(info, step_tokens: int, steps: int) -> float:
    rows = info.n_layers + 1
    per_step = 2 * (rows * bounds.gamma(info.d_model) + bounds.gamma(info.vocab)
                    + bounds.gamma(step_tokens))
    return steps * per_step * (1 + Recipe().momentum)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_same_training_run_stays_close_across_backends(pair, name, tmp_path):  # noqa: F811
    torch_backend, mlx_backend = pair(name)
    info = torch_backend.info
    opts = TuneOptions(steps=STEPS, tokens_per_step=256, seq_len=32)
    corpus = load_corpus(str(corpus_file(tmp_path)), torch_backend.tokenizer, opts.seq_len)
    tuners = [b.tuner(TunedLens.identity(info.n_layers, info.d_model), Recipe())
              for b in (torch_backend, mlx_backend)]
    first = None
    for step in range(STEPS):
        batch = batch_at(corpus.train, step, opts.sequences_per_step, opts.seed)
        losses = [t.gradients(batch) for t in tuners]
        first = first or losses
        for t in tuners:
            t.update(opts.lr(step))
        bound = training_bound(info, opts.step_tokens, step + 1)
        assert losses[1] == pytest.approx(losses[0], rel=bound)
    # Training does something on both backends (else two unmoved lenses agree vacuously): the
    # loss on step 0's batch falls from zero translators to the trained ones.
    batch = batch_at(corpus.train, 0, opts.sequences_per_step, opts.seed)
    for tuner, before in zip(tuners, first):
        assert tuner.losses(batch)[0].sum() < before
    a, b = (t.state() for t in tuners)
    for key in ("weight", "bias"):
        size = np.linalg.norm(a[key].astype(np.float64))
        diff = np.linalg.norm(a[key].astype(np.float64) - b[key])
        assert diff <= training_bound(info, opts.step_tokens, STEPS) * size, (key, diff / size)
