"""Backend-independent checks of one backend's lens, shared by the torch and MLX test files.

Every comparison is made in float64 against a direct, unchunked computation.
"""
from __future__ import annotations

import numpy as np

from mlx_lens.contract import SweepOptions
from mlx_lens.models import resolve

PROMPT = "Give the city name only, plain text. The capital of Germany is called simply"


def backend_cache(backend_class, model_dirs):
    """name -> loaded backend, each tiny model loaded once per test module."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = backend_class(resolve(str(model_dirs[name])))
        return cache[name]

    return get


def log_softmax64(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def assert_chunked_sweep_matches_logits(backend, lens: str) -> None:
    """Call with the backend's tiles made small (several vocabulary chunks, and row slices where
    the backend has them), so that the running merges are exercised."""
    ids = backend.tokenizer.encode(PROMPT)
    answer = backend.tokenizer.encode(" Berlin", add_special_tokens=False)[0]
    assert_sweep_matches_logits(backend, ids, lens, answer)


def assert_sweep_matches_logits(backend, ids: list[int], lens: str, answer_id: int) -> None:
    """The chunked on-device reductions equal the same statistics from full float64 logits.

    Tolerances: the sweep's chunk GEMMs and the full GEMM round differently in fp32, by up to a
    few ulps of the largest logit (dz below; raw-lens logits reach ~100, so dz ~ 1e-5). A
    probability moves by at most p*dz <= dz; entropy and KL (bits) by a few dz. The floors 2e-6 /
    2e-5 cover fp32 accumulation over the vocabulary when logits are small.
    """
    logits = backend.layer_logits(ids, lens)
    dz = 8 * np.finfo(np.float32).eps * np.abs(logits).max()
    prob_atol, bits_atol = max(2e-6, dz), max(2e-5, 4 * dz)
    logp = log_softmax64(logits)
    p = np.exp(logp)
    stats = backend.sweep(ids, SweepOptions(lens=lens, answer_id=answer_id))
    ln2 = np.log(2)

    np.testing.assert_allclose(stats.entropy, -(p * logp).sum(-1) / ln2, atol=bits_atol)
    kl = (p * (logp - logp[-1:])).sum(-1)[:, -1] / ln2
    np.testing.assert_allclose(stats.kl_to_final, kl, atol=bits_atol)
    assert stats.kl_to_final[-1] == 0
    z = logits.astype(np.float64)[:, -1]
    cos = (z * z[-1:]).sum(-1) / np.linalg.norm(z, axis=-1) / np.linalg.norm(z[-1:], axis=-1)
    np.testing.assert_allclose(stats.cos_to_final, cos, atol=1e-5)

    k = stats.topk_ids.shape[-1]
    got = np.take_along_axis(p, stats.topk_ids, -1)
    np.testing.assert_allclose(stats.topk_probs, got, atol=prob_atol)  # probs belong to the ids
    want = -np.sort(-p, axis=-1)[..., :k]
    np.testing.assert_allclose(stats.topk_probs, want, atol=prob_atol)  # and are the k largest
    assert np.all(np.diff(stats.topk_probs, axis=-1) <= prob_atol)  # most probable first

    np.testing.assert_allclose(stats.p_answer, p[:, -1, answer_id], atol=prob_atol)
    answer = z[:, answer_id:answer_id + 1]
    above = (z > answer).sum(-1)
    # Exact, except that another token whose logit ties the answer's within the fp32 GEMM
    # rounding (dz) may land on either side of it.
    ties = (np.abs(z - answer) <= dz).sum(-1) - 1
    assert np.all(np.abs(stats.answer_rank - (above + 1)) <= ties)


def assert_softcap_applied(backend) -> None:
    """Every lens row goes through the model's final soft-cap, and the cap matters: the
    probabilities it gives differ from the uncapped ones (so the check has teeth)."""
    cap = backend.softcap
    assert cap, "the model must have a final logit soft-cap"
    ids = backend.tokenizer.encode(PROMPT)
    capped = backend.layer_logits(ids, "final-norm")
    assert np.abs(capped).max() <= cap + 1e-5
    backend.softcap = None
    try:
        uncapped = backend.layer_logits(ids, "final-norm")
    finally:
        backend.softcap = cap
    np.testing.assert_allclose(capped, np.tanh(uncapped / cap) * cap, atol=1e-5)
    assert np.abs(np.exp(log_softmax64(capped)) - np.exp(log_softmax64(uncapped))).max() > 0.05

