"""A batch of prompts (one forward pass, one decode) gives each prompt its unbatched lens.

Per architecture and backend, prompts of very different lengths and a batch of one: each
prompt's next-token statistics from `sweep_next_token` against float64 statistics of its own
unbatched `layer_logits`. The batched forward pass rounds differently from the unbatched one
(other GEMM shapes), so the logits may differ by the bound of two fp32 computations of the same
model (docs/numerics.md §4), which fixes every statistic's tolerance (§2, §3).
"""
from __future__ import annotations

import numpy as np
import pytest

from mlx_lens.core.lens import FINAL_NORM
from mlx_lens.core import bounds
from mlx_lens.mlx.backend import MlxBackend
from mlx_lens.loading.sources import resolve
from mlx_lens.checks.parity import logit_bound
from tests.lens_checks import assert_stats_match_logits
from tests.tiny_models import CONFIGS
from torch_ref.backend import TorchBackend

PROMPTS = [
    "Give the city name only, plain text. The capital of Germany is called simply Berlin. "
    "Give the city name only, plain text. The capital of France is called simply",
    "Berlin is",
    "The capital city of Germany is named",
]


def _check(backend, batch_ids, lens=FINAL_NORM):
    norms = backend.head_row_norms()
    # The prompt's own last token and another: two scored ids per prompt, as a control has.
    scored = [((ids[-1], ids[0]),) for ids in batch_ids]
    batched = backend.sweep_next_token(batch_ids, scored, lens)
    assert len(batched) == len(batch_ids)
    for ids, ((answer, other),), stats in zip(batch_ids, scored, batched):
        logits = backend.layer_logits(ids, lens)[:, -1:]
        b = logit_bound(backend, ids, lens, backend.layer_logits(ids, lens), norms)[:, -1:]
        assert stats.entropy.shape == (backend.info.n_layers + 1, 1)
        assert_stats_match_logits(stats, logits, b, answer)
        z = logits[:, 0].astype(np.float64)
        p_other = np.exp(z[:, other] - np.logaddexp.reduce(z, axis=-1))
        tol = bounds.sweep_tolerances(logits, b, stats.summation_depth)["prob"][:, 0, other]
        assert np.all(np.abs(stats.p_scored[:, 1] - p_other) <= tol)
        np.testing.assert_array_equal(stats.p_scored[:, 0], stats.p_answer)
        assert stats.finite_residual.all()


@pytest.mark.parametrize("backend_class", [TorchBackend, MlxBackend], ids=["torch", "mlx"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_batched_prompts_get_their_unbatched_lens(tiny_model_dirs, name, backend_class):
    backend = backend_class(resolve(str(tiny_model_dirs[name])))
    batch = [backend.tokenizer.encode(p) for p in PROMPTS]
    assert max(map(len, batch)) > 5 * min(map(len, batch))  # very different lengths
    _check(backend, batch)
    _check(backend, batch[:1])  # a batch of one


@pytest.mark.parametrize("backend_class", [TorchBackend, MlxBackend], ids=["torch", "mlx"])
def test_batched_final_logits_equal_unbatched(tiny_model_dirs, backend_class):
    """The probes' batched forward pass: each prompt's final logits within two fp32
    computations' bound of its own unbatched ones."""
    backend = backend_class(resolve(str(tiny_model_dirs["gemma3_sliding"])))
    batch = [backend.tokenizer.encode(p) for p in PROMPTS]
    together = backend.final_logits(batch)
    norms = backend.head_row_norms()
    for ids, got in zip(batch, together):
        alone = backend.final_logits([ids])[0]
        lens = backend.layer_logits(ids, FINAL_NORM)
        b = logit_bound(backend, ids, FINAL_NORM, lens, norms)[-1, -1]
        assert np.all(np.abs(got - alone) <= b)
