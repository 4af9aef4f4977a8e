"""float64 reference arithmetic for checks made outside the backends (parity, the self-test,
the probes' distributions, the tests)."""
from __future__ import annotations

import numpy as np


def log_softmax64(z: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    z = z.astype(np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def log_prob64(z: np.ndarray, index: np.ndarray) -> np.ndarray:
    """log softmax(z)[..., index] over the last axis, in float64: log_softmax64's values at
    index [...] (broadcast to z's leading shape), without writing the whole distribution."""
    z = z.astype(np.float64)
    m = z.max(-1, keepdims=True)
    log_sum = m[..., 0] + np.log(np.exp(z - m).sum(-1))
    at = np.broadcast_to(index, z.shape[:-1])[..., None]
    return np.take_along_axis(z, at, -1)[..., 0] - log_sum


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest of a 1-d array, largest first, ties in index order: exactly
    np.argsort(-values, kind="stable")[:k], in O(n) rather than a sort of the whole vocabulary
    (a probe's 152k logits: 15 ms a sort here)."""
    k = min(k, values.size)
    if k == 0 or not np.isfinite(values).all():  # NaN's place in an order: leave it to argsort
        return np.argsort(-values, kind="stable")[:k]
    kth = np.partition(values, values.size - k)[values.size - k]  # the k-th largest
    tied_or_above = np.flatnonzero(values >= kth)  # in index order, every tie with it included
    return tied_or_above[np.argsort(-values[tied_or_above], kind="stable")][:k]
