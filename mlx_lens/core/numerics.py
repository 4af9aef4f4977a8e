"""float64 reference arithmetic for checks made outside the backends (parity, the self-test,
the probes' distributions, the tests)."""
from __future__ import annotations

import numpy as np


def log_softmax64(z: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    z = z.astype(np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))
