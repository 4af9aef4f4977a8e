"""The torch reference lens on tiny random models of every supported architecture."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mlx_lens.core import bounds
from mlx_lens.core.contract import LENSES, SweepOptions, norm_plan
from mlx_lens.loading.sources import resolve
from tests.lens_checks import (NORM_AND_HEAD, PROMPT, assert_chunked_sweep_matches_logits,
                               assert_large_vocabulary_sweep, assert_reductions_match_float64,
                               assert_softcap_applied, backend_cache, gemm_bound)
from tests.tiny_models import CONFIGS
from torch_ref import reduce
from torch_ref.backend import TorchBackend


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs):
    return backend_cache(TorchBackend, tiny_model_dirs)


def _ids(backend):
    return backend.tokenizer.encode(PROMPT)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_last_row_is_the_models_own_logits(loaded, name):
    """fp32: the lens repeats the model's last norm and head in its own order of operations and
    GEMM. Bound: NORM_AND_HEAD length-d dot products' worth of rounding (gemm_bound), far below
    any real lens error (a wrong norm moves logits by O(1))."""
    backend = loaded(name)
    ids = _ids(backend)
    own = backend.model(input_ids=torch.tensor([ids])).logits[0].detach().numpy()
    for lens in LENSES:
        logits = backend.layer_logits(ids, lens)
        bound = gemm_bound(backend, ids, lens, logits, NORM_AND_HEAD)[-1]
        assert np.all(np.abs(logits[-1] - own) <= bound), lens
    assert np.all(np.abs(backend.final_logits([ids])[0] - own[-1]) <= bound[-1])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_row_uses_its_lens_norm(loaded, name):
    """Rows 0..L-1 against transformers' own hidden_states (captured independently of our hooks),
    normalised by the norm module each lens names."""
    backend = loaded(name)
    ids = _ids(backend)
    out = backend.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    hidden = [h[0] for h in out.hidden_states[:-1]]  # the last one is already post-norm
    weight = backend.model.get_output_embeddings().weight
    n = len(hidden)
    for lens in LENSES:
        got = backend.layer_logits(ids, lens)
        bound = gemm_bound(backend, ids, lens, got, NORM_AND_HEAD)
        for row, ref in enumerate(norm_plan(lens, n)[:-1]):
            if ref == "final":
                x = backend.final_norm(hidden[row])
            elif ref is None:
                x = hidden[row]
            else:
                x = backend.input_norms[ref](hidden[row])
            want = (x @ weight.T).detach()
            if backend.softcap:
                want = torch.tanh(want / backend.softcap) * backend.softcap
            assert np.all(np.abs(got[row] - want.numpy()) <= bound[row]), (lens, row)


def test_lens_rules():
    assert norm_plan("final-norm", 3) == ["final"] * 4
    assert norm_plan("next-norm", 3) == [0, 1, 2, "final"]
    assert norm_plan("raw", 3) == [None, None, None, "final"]


def test_gemma2_softcap_is_applied(loaded):
    assert_softcap_applied(loaded("gemma2"))


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
@pytest.mark.parametrize("lens", LENSES)
def test_chunked_sweep_equals_float64(loaded, name, lens, monkeypatch):
    monkeypatch.setattr(reduce, "cpu_tile", lambda: (20 * 100, 20))  # 100-token chunks, 20 rows
    assert_chunked_sweep_matches_logits(loaded(name), lens)


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(Exception, match=r"unsupported architecture 'bert'.*llama"):
        TorchBackend(resolve(str(tmp_path)))


def test_narrow_positions_get_only_narrow_k(loaded, monkeypatch):
    """Positions marked narrow keep their top-5 exactly; their other columns are empty."""
    monkeypatch.setattr(reduce, "cpu_tile", lambda: (20 * 100, 20))
    backend = loaded("llama")
    ids = backend.tokenizer.encode(PROMPT)
    wide = tuple(t % 3 == 0 for t in range(len(ids)))
    full = backend.sweep(ids, SweepOptions())
    part = backend.sweep(ids, SweepOptions(wide=wide))
    narrow = ~np.array(wide)
    narrow[-1] = False  # the next-token position is always wide
    np.testing.assert_array_equal(part.topk_ids[:, ~narrow], full.topk_ids[:, ~narrow])
    np.testing.assert_array_equal(part.topk_ids[:, narrow, :5], full.topk_ids[:, narrow, :5])
    assert (part.topk_ids[:, narrow, 5:] == -1).all() and (part.topk_probs[:, narrow, 5:] == 0).all()
    # Two tilings: each within its derived bound of float64, so within twice it of each other.
    logits = backend.layer_logits(ids, "final-norm")
    b = gemm_bound(backend, ids, "final-norm", logits, 2)
    tol = bounds.sweep_tolerances(logits, b, max(part.summation_depth, full.summation_depth))
    assert np.all(np.abs(part.entropy - full.entropy) <= 2 * tol["entropy"])


def _torch_reductions(logits, opts):
    """torch_ref's reductions on fixed logits: the head is the identity (to base 2)."""
    def head_chunk(start, stop):
        return lambda x, out=None: torch.mul(x[:, start:stop], reduce.LOG2E, out=out)

    x = torch.from_numpy(np.ascontiguousarray(logits))
    return reduce.sweep_states(x, opts, head_chunk, logits.shape[-1])


def test_reductions_are_exact_to_their_bound_on_real_vocabularies(real_vocab_logits):
    """>= 100k tokens and real weights: only the reductions' own rounding, at its bound."""
    for logits in real_vocab_logits:
        assert_reductions_match_float64(_torch_reductions, logits, base2=True)


@pytest.mark.parametrize("lens", ["final-norm", "raw"])
def test_sweep_equals_float64_on_a_large_vocabulary(large_vocab_dir, lens):
    assert_large_vocabulary_sweep(TorchBackend(resolve(str(large_vocab_dir))), lens)
