"""Parity on real weights: the packaged SmolLM2-135M on both backends, every lens.

A short prompt: mlx on a Linux CPU runs a reference BLAS (docs/stack.md), ~10 s per lens here.
Same assertions and derived bounds as the tiny models (docs/numerics.md §4).
"""
import pytest

from mlx_lens.core.lens import RULES
from tests.lens_checks import LENSES
from mlx_lens.mlx.backend import MlxBackend
from mlx_lens.loading.sources import resolve
from mlx_lens.checks.parity import compare
from torch_ref.backend import TorchBackend


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_dir):
    source = resolve(str(smollm2_dir))
    return TorchBackend(source), MlxBackend(source)


@pytest.mark.parametrize("lens", LENSES, ids=RULES)
def test_smollm2_backends_agree(smollm2_pair, lens):
    report = compare(*smollm2_pair, ["The capital of Germany is called simply"], lens, "Berlin")
    assert not report.failures(), report.table()
    assert report.prompts[0].summaries[0]["L_semantic"] == 30  # pin: Berlin, last layer


def test_smollm2_backends_agree_on_a_tuned_lens_in_the_packages_layout(smollm2_pair, tmp_path):
    """A random tuned lens written as the tuned-lens package writes it (params.pt, its
    unembed_hash of SmolLM2's real 49,152 x 576 head) loads on both backends and decodes alike."""
    from mlx_lens.api import resolve_lens
    from parity_tests.test_tuned import random_lens
    from tests.test_tuned import _theirs

    torch_backend, _ = smollm2_pair
    lens = random_lens(torch_backend.info.n_layers, torch_backend.info.d_model)
    _theirs(tmp_path / "lens", lens, torch_backend)
    tuned = resolve_lens(f"tuned:{tmp_path / 'lens'}")
    for backend in smollm2_pair:
        backend.check_lens(tuned)  # the hash and shapes match: not refused
    report = compare(*smollm2_pair, ["The capital of Germany is called simply"], tuned, "Berlin")
    assert not report.failures(), report.table()
