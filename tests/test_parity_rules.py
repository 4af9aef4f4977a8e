"""Backend parity's rule for the thresholded summaries (L_copy, L_copy_H, L_semantic): as for
the top-1, a difference between backends counts only where the derived bound cannot explain it,
and the layers it cannot decide are named."""
from __future__ import annotations

import numpy as np

from mlx_lens.checks.parity import ParityReport, compare_prompt
from mlx_lens.core.contract import ModelInfo
from mlx_lens.core.lens import FINAL_NORM

V = 400  # with p1 near 0.9, the entropy stays above 1 bit (no entropy-rule copy)


class Fixed:
    """A backend that decodes to fixed logits [R, 1, V]; its lens inputs have norm `x_norm`,
    which with unit head rows sets the parity bound's size."""

    def __init__(self, logits: np.ndarray, x_norm: float):
        self.logits, self.x_norm = logits.astype(np.float32), x_norm
        self.info = ModelInfo("fixed", "llama", len(logits) - 1, 64, 1, V, None, "fake", "cpu",
                              "float32", "float32")

    def layer_logits(self, ids, lens, site="resid"):
        return self.logits

    def lens_inputs(self, ids, lens, site="resid"):
        x = np.zeros((len(self.logits), 1, 64), np.float32)
        x[..., 0] = self.x_norm
        return x


def _rows(p1: float) -> np.ndarray:
    """Two rows at one position: row 0 with top-1 probability p1 on token 5 (not the answer,
    token 7), row 1 (the output) decisive on the answer."""
    z = np.full((2, 1, V), 0.0)
    rest = (1 - p1) / (V - 1)
    z[0, 0] = np.log(rest)
    z[0, 0, 5] = np.log(p1)
    z[1, 0] = -10.0
    z[1, 0, 7] = 10.0
    return z


def test_a_copy_threshold_within_the_bound_is_undecidable_not_a_failure():
    """p1 0.9000 vs 0.9001 around the 0.90 threshold: L_copy 0 on one backend, 1 on the other;
    the bound can move p1 by more than that, so the layer is named undecidable."""
    a, b = Fixed(_rows(0.90002), 100.0), Fixed(_rows(0.89998), 100.0)
    p = compare_prompt(a, b, [5], FINAL_NORM, 7, np.ones(V))
    assert p.summaries[0]["L_copy"] == 0 and p.summaries[1]["L_copy"] == 1
    assert p.summary_rows("L_copy") == ([0], [])
    report = ParityReport("llama", FINAL_NORM, [p])
    assert report.failures() == []
    assert report.undecided() == ["prompt 0: L_copy 0 vs 1, undecidable within the bound at "
                                  "layers 0"]


def test_a_difference_beyond_the_bound_fails():
    """The same two summaries, but p1 0.95 vs 0.85 with a tiny bound: decided differently."""
    a, b = Fixed(_rows(0.95), 1e-6), Fixed(_rows(0.85), 1e-6)
    p = compare_prompt(a, b, [5], FINAL_NORM, 7, np.ones(V))
    assert p.summaries[0]["L_copy"] == 0 and p.summaries[1]["L_copy"] == 1
    assert p.summary_rows("L_copy") == ([], [0])
    failures = ParityReport("llama", FINAL_NORM, [p]).failures()
    assert "prompt 0: L_copy 0 vs 1, decided differently at layers 0" in failures


def _with_zero_head_row(z: np.ndarray) -> np.ndarray:
    z = z.copy()
    z[..., 0] = 0.0  # token 0's head row is zeros: an exact logit of 0 on every backend
    return z


def test_a_zero_head_row_does_not_switch_the_logit_check_off():
    """Token 0's head row of zeros: bound 0 and discrepancy 0 there (0/0). Token 3 differs by
    1e-3 at row 0, ~300x its bound (x_norm 1e-6 leaves the elementwise part, 8 u |z| with
    z = log(0.5 / 399): 3.2e-6): the logit criterion must still fail at row 0, and the exact
    0 = 0 must read as within its bound (0), not NaN."""
    za = _with_zero_head_row(_rows(0.5))
    zb = za.copy()
    zb[0, 0, 3] += 1e-3
    head = np.ones(V)
    head[0] = 0.0
    p = compare_prompt(Fixed(za, 1e-6), Fixed(zb, 1e-6), [5], FINAL_NORM, 7, head)
    assert p.logit_use[0] > 1 and p.logit_use[1] == 0.0
    failures = ParityReport("llama", FINAL_NORM, [p]).failures()
    assert any(f.startswith("logit discrepancy") and f.endswith("(layer 0)") for f in failures)


def test_a_zero_bound_admits_only_exact_agreement():
    """Where the bound is 0, any difference is infinitely over it, and a NaN is no pass."""
    from mlx_lens.core.bounds import over_bound

    use = over_bound(np.array([0.0, 1e-30, np.nan, 2.0, 0.0]), np.array([0.0, 0.0, 1.0, 4.0, 1.0]))
    assert use.tolist() == [0.0, np.inf, np.inf, 0.5, 0.0]
