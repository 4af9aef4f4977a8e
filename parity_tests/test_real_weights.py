"""Parity on real weights: the packaged SmolLM2-135M on both backends, every lens.

A short prompt: mlx on a Linux CPU runs a reference BLAS (docs/stack.md), ~10 s per lens here.
Same assertions and derived bounds as the tiny models (docs/numerics.md §4).
"""
import pytest

from mlx_lens.contract import LENSES
from mlx_lens.mlx_backend import MlxBackend
from mlx_lens.models import resolve
from mlx_lens.parity import compare
from torch_ref.backend import TorchBackend


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_dir):
    source = resolve(str(smollm2_dir))
    return TorchBackend(source), MlxBackend(source)


@pytest.mark.parametrize("lens", LENSES)
def test_smollm2_backends_agree(smollm2_pair, lens):
    report = compare(*smollm2_pair, ["The capital of Germany is called simply"], lens, "Berlin")
    assert not report.failures(), report.table()
    assert report.prompts[0].summaries[0]["L_semantic"] == 30  # Berlin at the last layer
