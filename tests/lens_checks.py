"""Backend-independent checks of one backend's lens, shared by the tests of both backends.

Every comparison is made in float64 against a direct, unchunked computation.
"""
from __future__ import annotations

import numpy as np

from mlx_lens.core import bounds
from mlx_lens.core.contract import SweepOptions
from mlx_lens.core.lens import FINAL_NORM, RULES, Lens
from mlx_lens.core.numerics import log_softmax64
from mlx_lens.loading.sources import resolve

PROMPT = "Give the city name only, plain text. The capital of Germany is called simply"
# Rounding between the lens's decode and the model's own: two head GEMMs (one length-d dot
# product each) and two norms (a length-d mean of squares, half a dot product each).
NORM_AND_HEAD = 3
LENSES = tuple(Lens(rule) for rule in RULES)  # the norm rules, as backends take them


def backend_cache(backend_class, model_dirs):
    """name -> loaded backend, each tiny model loaded once per test module."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = backend_class(resolve(str(model_dirs[name])))
        return cache[name]

    return get


def assert_chunked_sweep_matches_logits(backend, lens: Lens) -> None:
    """Call with the backend's tiles made small (several vocabulary chunks, and row slices where
    the backend has them), so that the running merges are exercised."""
    ids = backend.tokenizer.encode(PROMPT)
    answer = backend.tokenizer.encode(" Berlin", add_special_tokens=False)[0]
    assert_sweep_matches_logits(backend, ids, lens, answer)


def gemm_bound(backend, ids: list[int], lens: Lens, logits: np.ndarray, gemms: int) -> np.ndarray:
    """[R, T, V]: how far `gemms` independent fp32 evaluations of the head may each be from exact
    logits (docs/numerics.md §1): one length-d dot product per logit, then the element-wise
    roundings after it (bias, soft-cap, base change)."""
    x_norm = np.linalg.norm(backend.lens_inputs(ids, lens).astype(np.float64), axis=-1)
    per_gemm = (bounds.dot_bound(x_norm, backend.head_row_norms(), backend.info.d_model, 1)
                + bounds.elementwise_bound(logits, backend.softcap))
    return gemms * per_gemm


def assert_sweep_matches_logits(backend, ids: list[int], lens: Lens, answer_id: int) -> None:
    """The chunked on-device reductions equal the same statistics from full float64 logits, within
    the derived bounds: the sweep's GEMM and layer_logits' GEMM each within one length-d dot
    product of exact logits (2 GEMMs), plus the reductions' own error at their summation depth."""
    logits = backend.layer_logits(ids, lens)
    stats = backend.sweep(ids, SweepOptions(lens=lens, answer_ids=(answer_id,)))
    assert_stats_match_logits(stats, logits, gemm_bound(backend, ids, lens, logits, 2), answer_id)


def assert_large_vocabulary_sweep(backend, lens: Lens) -> None:
    """The whole sweep, GEMM included, on a realistic vocabulary (>= 100k tokens)."""
    assert backend.info.vocab >= 100_000
    ids = backend.tokenizer.encode(PROMPT)
    assert_sweep_matches_logits(backend, ids, lens, ids[-2])


def assert_stats_match_logits(stats, logits: np.ndarray, b: np.ndarray, answer_id: int) -> None:
    """LayerStats of logits [R, T, V] (fp32) against their float64 statistics, when the
    statistics' own logits may differ from `logits` by at most b [R, T, V]."""
    tol = bounds.sweep_tolerances(logits, b, stats.summation_depth)
    z = logits.astype(np.float64)
    logp = log_softmax64(z)
    p = np.exp(logp)
    ln2 = np.log(2)

    assert np.all(np.abs(stats.entropy - -(p * logp).sum(-1) / ln2) <= tol["entropy"])
    kl = (p * (logp - logp[-1:])).sum(-1)[:, -1] / ln2
    assert np.all(np.abs(stats.kl_to_final - kl) <= tol["kl"])
    assert stats.kl_to_final[-1] == 0
    # The reducers' own KL bound (from their sums) is the float64 one of these logits, up to
    # its own fp32 evaluation: sums of non-negative terms, each within gamma_D of itself, and
    # G_x = m G - sum e |gap| z, off by gamma_D |m| G, i.e. 2 u |m| of the bound's gamma_D G
    # term (docs/numerics.md §2); the base-2 logits' rounding adds u to each logit.
    depth = stats.summation_depth
    want = bounds.nats_to_bits(bounds.kl_reduction_bound(z[:, -1], z[-1, -1], depth))
    m = np.abs(z[:, -1]).max()
    rtol = 4 * bounds.gamma(depth) + 4 * bounds.U32 * (1 + m) * np.log2(np.e)
    assert np.all(np.abs(stats.kl_bound - want) <= rtol * want)
    assert np.all(stats.kl_to_final >= -stats.kl_bound)  # never a health finding on exact input
    zl = z[:, -1]
    cos = (zl * zl[-1:]).sum(-1) / np.linalg.norm(zl, axis=-1) / np.linalg.norm(zl[-1:], axis=-1)
    assert np.all(np.abs(stats.cos_to_final - cos) <= tol["cos"])

    ids = stats.topk_ids
    # Each probability belongs to its id ...
    got = np.take_along_axis(p, ids, -1)
    assert np.all(np.abs(stats.topk_probs - got) <= np.take_along_axis(tol["prob"], ids, -1))
    # ... and they are the k largest: sorted, each within its bound of the exact k-th largest.
    order = np.argsort(-z, axis=-1, kind="stable")[..., :ids.shape[-1]]
    want = np.take_along_axis(p, order, -1)
    slack = np.take_along_axis(tol["prob"], order, -1) + np.take_along_axis(tol["prob"], ids, -1)
    assert np.all(np.abs(stats.topk_probs - want) <= slack)
    assert np.all(np.diff(stats.topk_probs, axis=-1) <= slack[..., 1:])  # most probable first

    pa = p[:, -1, answer_id]
    assert np.all(np.abs(stats.p_answer - pa) <= tol["prob"][:, -1, answer_id])
    za = z[:, -1, answer_id:answer_id + 1]
    above = (z[:, -1] > za).sum(-1)
    # Exact, except for tokens whose logits the perturbation may order either way.
    ties = bounds.may_swap(z[:, -1], b[:, -1], np.full(len(z), answer_id)).sum(-1)
    assert np.all(np.abs(stats.answer_rank - (above + 1)) <= ties)


def assert_reductions_match_float64(sweep_logits, logits: np.ndarray, base2: bool) -> None:
    """A backend's reductions alone, fed fixed fp32 logits [R, T, V] (no GEMM): only their own
    rounding is left, at its derived bound. `sweep_logits(logits, opts)` runs the backend's
    reduction code; base2: it converts the logits to base 2 first (one rounding each)."""
    answer = int(np.argsort(-logits[-1, -1])[3])  # a token of the final top-5
    stats = sweep_logits(logits, SweepOptions(answer_ids=(answer,)))
    b = (2 * bounds.U32 * np.abs(logits.astype(np.float64)) if base2
         else np.zeros(logits.shape))
    assert_stats_match_logits(stats, logits, b, answer)


def assert_softcap_applied(backend) -> None:
    """Every lens row goes through the model's final soft-cap, and the cap matters: the
    probabilities it gives differ from the uncapped ones (so the check has teeth)."""
    cap = backend.softcap
    assert cap, "the model must have a final logit soft-cap"
    ids = backend.tokenizer.encode(PROMPT)
    capped = backend.layer_logits(ids, FINAL_NORM)
    assert np.abs(capped).max() <= cap * (1 + 6 * bounds.U32)  # |tanh| <= 1, then two roundings
    backend.softcap = None
    try:
        uncapped = backend.layer_logits(ids, FINAL_NORM)
    finally:
        backend.softcap = cap
    # The same GEMM both times; only the soft-cap's own roundings differ (docs/numerics.md §1).
    want = np.tanh(uncapped.astype(np.float64) / cap) * cap
    assert np.all(np.abs(capped - want) <= bounds.elementwise_bound(uncapped, cap))
    assert np.abs(np.exp(log_softmax64(capped)) - np.exp(log_softmax64(uncapped))).max() > 0.05


def piece_log2p(logits: np.ndarray, pieces: list[int]) -> np.ndarray:
    """log2 p of each piece [..., n] from logits [..., n, V], piece j at row j (float64)."""
    logp = log_softmax64(np.asarray(logits, np.float64)) / np.log(2)
    index = np.broadcast_to(np.asarray(pieces)[:, None], (*logp.shape[:-1], 1))
    return np.take_along_axis(logp, index, -1)[..., 0]


def patch_bound_bits(backend, x_norm: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """How far two fp32 evaluations of the model (its blocks, final norm and head) may put a
    piece's log2 p apart: each within L + 1 length-d products of exact arithmetic (the parity
    model of docs/numerics.md §4, a patched run included: its recorded start is within r
    products, its blocks add L - r), so every logit within b and each log p within 2 max b
    (§3)."""
    info = backend.info
    b = (bounds.dot_bound(x_norm, backend.head_row_norms(), info.d_model, 2 * (info.n_layers + 1))
         + 2 * bounds.elementwise_bound(logits, backend.softcap))
    return bounds.nats_to_bits(2 * b.max(-1))


class WordTokenizer:
    """A tokenizer of whitespace-separated words, one id each (ids handed out as met)."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [self.ids.setdefault(w, len(self.ids)) for w in text.split()]

    def decode(self, ids) -> str:
        words = {i: w for w, i in self.ids.items()}
        return " ".join(words[int(i)] for i in ids)


class HandBuilt:
    """A patching backend whose numbers a test sets by hand (its record and patched_logits):
    a word tokenizer, a model's description, and the rest of the Backend protocol refused."""

    VOCAB = 64

    def __init__(self, n_layers: int, d_model: int):
        from mlx_lens.core.contract import ModelInfo

        self.tokenizer = WordTokenizer()
        self.info = ModelInfo("hand", "hand", n_layers, d_model, 2, self.VOCAB, None, "hand",
                              "cpu", "float32", "float32")

    def sweep(self, *a): raise NotImplementedError
    def sweep_next_token(self, *a): raise NotImplementedError
    def final_logits(self, *a): raise NotImplementedError
    def check_lens(self, *a): raise NotImplementedError
    def run_diagnostics(self): return {}
    def run_report(self): return None
    def head_row_norms(self): raise NotImplementedError
