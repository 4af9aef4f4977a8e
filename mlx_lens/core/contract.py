"""The one contract between backends and everything else (docs/design.md).

A backend turns (model, token ids, options) into a `LayerStats` of plain numpy arrays. The
contract is split by who needs it: `Backend` produces results (every backend), an
`InspectableBackend` also shows the lens's intermediate values (one process), and training's
part is in mlx_lens/core/training.py. The core never imports a framework, nor do the experiment,
checks, output and view (pyproject.toml's import-linter contracts): the backends do, and loading/
(GGUF conversion) and tuned/ (the tuned-lens package's params.pt) where they must.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence, TypeVar, runtime_checkable

import numpy as np

from mlx_lens.core.errors import LensError
from mlx_lens.core.lens import FINAL_NORM, Lens, NormRef, Site

B = TypeVar("B")
TOP_K = 20  # the widest top-k any artifact shows (verbose positions, final prediction)
PAIR_TOP_K = 50  # the widest top-k overlap between two lenses that artifacts report
# Two KLs of opposite direction, each named by it wherever it is printed: kl_to_final (the
# original's, every run) and a tuned lens's training and evaluation (tuned-lens's).
KL_TO_FINAL = "KL(layer || final)"  # KL(P_row || P_last_row)
KL_TUNED = "KL(model output || lens)"  # KL(P_model || P_lens)


@dataclass(frozen=True)
class SweepOptions:
    lens: Lens = FINAL_NORM
    # The gold answer's token ids (its pieces after the prompt). The backend runs the prompt
    # followed by answer_ids[:-1] (teacher forcing) and scores piece j at the position before
    # it; causal attention leaves the prompt's own rows as without them. Empty: no answer.
    answer_ids: tuple[int, ...] = ()
    top_k: int = TOP_K
    # Positions that need only narrow_k candidates (False) may get just those: the remaining
    # top-k columns then hold id -1 and probability 0. None: every position gets top_k.
    wide: tuple[bool, ...] | None = None
    narrow_k: int = 5

    @property
    def n_scored(self) -> int:
        """The scored positions: one per piece, or the next token's alone without an answer."""
        return max(1, len(self.answer_ids))

    def forward_ids(self, prompt: Sequence[int]) -> list[int]:
        """The tokens the forward pass runs: the prompt, then the teacher-forced pieces."""
        return [*prompt, *self.answer_ids[:-1]]


@dataclass
class LayerStats:
    """Per row (layer) r and position t of one prompt; probabilities from the fp32 lens.
    The comparisons with the final distribution and the answer are taken at the next-token
    (last) position, where the experiment reports them: per row only."""

    entropy: np.ndarray  # [R, T] bits
    topk_ids: np.ndarray  # [R, T, K] int64, most probable first
    topk_probs: np.ndarray  # [R, T, K]
    kl_to_final: np.ndarray  # [R] bits, KL(P_row || P_last_row) at the last position
    cos_to_final: np.ndarray  # [R] cosine between the row's logits and the last row's
    p_answer: np.ndarray | None = None  # [R]
    answer_rank: np.ndarray | None = None  # [R], 1 = top-1
    # [R, A]: every scored token's probability (the answer first), where more than the answer
    # is scored (a control prompt: its own answer and the fact's)
    p_scored: np.ndarray | None = None
    # Roundings a term of the vocabulary sums went through: fixes the reductions' error bound
    # (mlx_lens.core.bounds.reduction_bounds); None when not computed by a running reduction.
    summation_depth: int | None = None
    finite_residual: np.ndarray | None = None  # [R] bool: the captured residual row is finite
    # [R] bits: the reductions' error bound of kl_to_final (docs/numerics.md §2); a value below
    # minus it is a numeric-health finding (mlx_lens/experiment/health.py), not a zero
    kl_bound: np.ndarray | None = None
    # The whole answer, piece j scored at its own position (the prompt's next token for j = 0,
    # then teacher-forced): [R, k] each. log2 p of the piece, its rank, its lead over the best
    # other token in bits (z_piece - z_other: > 0 exactly when it is the top-1), and the norm of
    # the decoded row there (for the decode's error bound, mlx_lens/core/bounds.py).
    piece_log2p: np.ndarray | None = None
    piece_rank: np.ndarray | None = None
    piece_lead: np.ndarray | None = None
    piece_x_norm: np.ndarray | None = None

    @classmethod
    def from_arrays(cls, out: dict) -> "LayerStats":
        """From a backend's reductions (any array-likes numpy can read), in float64 / int64."""
        f64 = {k: np.asarray(out[k], np.float64) for k in
               ("entropy", "topk_probs", "kl_to_final", "cos_to_final", "p_answer", "p_scored",
                "kl_bound", "piece_log2p", "piece_lead", "piece_x_norm")
               if k in out}
        i64 = {k: np.asarray(out[k], np.int64) for k in ("topk_ids", "answer_rank", "piece_rank")
               if k in out}
        depth = out.get("summation_depth")
        return cls(**f64, **i64, summation_depth=None if depth is None else int(depth))


@dataclass
class LensPairs:
    """Every lens against every other at the same rows of one site, at the next-token position
    (one prompt): KL and Jensen-Shannon divergence from running reductions over the vocabulary,
    and each lens's own top-k there (for overlaps, mlx_lens/experiment/lenses.py)."""

    kl: np.ndarray  # [P, P, R] bits: KL(P_a || P_b) at row r, lenses in LensSweep.lenses order
    js: np.ndarray  # [P, P, R] bits, symmetric
    top_ids: np.ndarray  # [P, R, PAIR_TOP_K] int64, most probable first
    summation_depth: int  # of the vocabulary sums (mlx_lens/core/bounds.py, pair_reduction_bounds)

    def of_prompt(self, b: int, n_prompts: int) -> "LensPairs":
        """Prompt b's rows, where the rows were (row, prompt)-major over n_prompts prompts."""
        def pick(a: np.ndarray, axis: int) -> np.ndarray:
            shape = (*a.shape[:axis], -1, n_prompts, *a.shape[axis + 1:])
            return np.take(a.reshape(shape), b, axis + 1)

        return LensPairs(pick(self.kl, 2), pick(self.js, 2), pick(self.top_ids, 1),
                         self.summation_depth)


@dataclass
class LensSweep:
    """One prompt under several lenses from one forward pass: each lens's statistics at each
    site it reads, and every pair of lenses compared."""

    lenses: tuple[str, ...]  # lens names, the primary first
    stats: dict[tuple[str, Site], LayerStats]  # (lens, site); "mid" rows: the middle of each block,
    # then the model's output row (for the comparisons with it)
    pairs: dict[Site, LensPairs]  # where two or more lenses read the site
    # how the middle of each block is formed: "sequential" (the MLP's input, after attention),
    # "parallel" (a parallel-residual block: its input plus the attention's output), None: not read
    mid: str | None = None


@dataclass(frozen=True)
class NormSpec:
    """A norm as the architecture defines it, for checks made outside the backend:
    y = normalise(x) * scale + bias, with normalise an RMS ("rms") or mean/variance ("layer")
    normalisation and eps inside the square root. Gemma's 1+w is already folded into scale."""

    kind: Literal["rms", "layer"]
    scale: np.ndarray
    bias: np.ndarray | None
    eps: float

    def normalise(self, x: np.ndarray) -> np.ndarray:
        """The unit-scale part, in float64."""
        x = x.astype(np.float64)
        if self.kind == "layer":
            x = x - x.mean(-1, keepdims=True)
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = self.normalise(x) * self.scale
        return y + self.bias if self.bias is not None else y

    @classmethod
    def read(cls, apply, weight: np.ndarray | None, bias: np.ndarray | None, eps: float,
             d: int) -> "NormSpec":
        """The semantics of a norm module, read from what it computes: of RMS or mean/variance
        normalisation, scaled by w or 1 + w, the one candidate that reproduces `apply` (fp32 in,
        out) on a probe with a non-zero mean. The candidates differ by O(1) where the probe's
        mean and w are O(1); the winner must be 100x closer than the runner-up, or the module
        is none of them."""
        x = np.random.default_rng(0).standard_normal((4, d)) * 3 + 1.5
        y = np.asarray(apply(x.astype(np.float32)), np.float64)
        weight = np.ones(d) if weight is None else np.asarray(weight, np.float64)
        found = [cls(kind, weight + offset, bias, eps)
                 for kind in ("rms", "layer") for offset in (0.0, 1.0)]
        errors = np.array([np.abs(spec(x) - y).max() for spec in found])
        best, second = np.sort(errors)[:2]
        if not best * 100 < second:
            raise LensError("a norm that is neither RMSNorm nor LayerNorm with scale w or 1 + w")
        return found[int(errors.argmin())]


@dataclass(frozen=True)
class ModelInfo:
    name: str  # short name used in artifact file names
    architecture: str  # config model_type
    n_layers: int
    d_model: int
    n_heads: int | None  # None: a model without attention heads (state-space)
    vocab: int
    n_ctx: int | None
    backend: str
    device: str
    compute_dtype: str
    unembed_dtype: str
    norm_types: dict = field(default_factory=dict)  # e.g. {"first_block": "LlamaRMSNorm", ...}
    softcap: float | None = None  # the head's final logit soft-cap (Gemma-2/3), if any


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer the rest of the tool uses."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@runtime_checkable
class Backend(Protocol):
    """What the experiment and the suites need: results. Every backend, the pipeline over
    several processes included (mlx_lens/mlx/pipeline.py), implements this."""

    info: ModelInfo
    tokenizer: Tokenizer

    def sweep(self, ids: Sequence[int], opts: SweepOptions) -> LayerStats:
        """Decode every row at every position; reductions happen on the device."""

    def sweep_next_token(self, prompts: Sequence[Sequence[int]],
                         scored: Sequence[Sequence[tuple[int, ...]]], lens: Lens,
                         top_k: int = TOP_K) -> list[LayerStats]:
        """A batch of prompts in one forward pass and one decode, at each prompt's last n
        positions only (n = len(scored[b]), the same for every prompt): position j scores the
        ids scored[b][j] (as many at every position). One LayerStats per prompt with T = 1 (the
        first of its n positions: the next token of a prompt followed by n - 1 teacher-forced
        answer pieces): p_answer / answer_rank for scored[b][0][0], p_scored for every id of
        scored[b][0], and piece_* [R, n] for the first id of each position."""

    def final_logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """The model's output logits at each prompt's last position, [B, V] float32 (the lens's
        last row: fp32 head, head transform applied), one forward pass for the batch."""

    def check_lens(self, lens: Lens) -> None:
        """Refuse, with a LensError, a lens made for another model (width, rows, unembedding
        hash); its translators are kept on the device for the next calls."""

    def run_diagnostics(self) -> dict:
        """What the JSON records about how the model was placed (a split model's devices, a
        pipeline's blocks per rank and traffic); read after the run."""

    def run_report(self) -> str | None:
        """A line a run prints about this process's part (a pipeline rank's blocks, memory and
        traffic), or None."""

    def head_row_norms(self) -> np.ndarray:
        """|w_i| of every row of the fp32 unembedding, [V] float64 (for error bounds)."""


@runtime_checkable
class InspectableBackend(Backend, Protocol):
    """What parity, the self-test, --keep-residuals, chat and the tests need: the lens's
    intermediate values on small inputs. A model in one process only."""

    def layer_logits(self, ids: Sequence[int], lens: Lens, site: Site = "resid") -> np.ndarray:
        """Full lens logits [R, T, V] float32 of a site's rows; for tests and parity on small
        inputs only."""

    def lens_inputs(self, ids: Sequence[int], lens: Lens, site: Site = "resid") -> np.ndarray:
        """What the head multiplies: every row after its lens norm, [R, T, d] float32."""

    def framework_logits(self, ids: Sequence[int]) -> np.ndarray:
        """The framework's own forward pass (mlx-lm's model, transformers' model with its head),
        not the lens code: its output logits at the last position, [V] float32."""

    def residuals(self, ids: Sequence[int], site: Site = "resid") -> np.ndarray:
        """The captured residual stream h_0..h_L, [R, T, d] float32; site "mid": the middle of
        each block, then h_L."""

    def decode_rows(self, x: np.ndarray, ref: NormRef) -> np.ndarray:
        """fp32 logits [N, V] of states x [N, d] through the lens's norm `ref` and the head."""

    def norm_spec(self, ref: NormRef) -> NormSpec:
        """The declared semantics of the norm `ref`, with this model's parameters."""

    def unembedding(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the head, as the lens multiplies them: [n, d] float32."""

    def generate(self, ids: Sequence[int], max_tokens: int) -> list[int]:
        """Greedy continuation token ids (no prompt, no EOS), for `mlx-lens chat`."""


@runtime_checkable
class ComparingBackend(Backend, Protocol):
    """Several lenses and the middle of each block from one forward pass (a model in one
    process). Each lens's statistics are those its own sweep gives (the same computation on the
    same captured rows); the comparisons come from a second set of reductions at the next-token
    position."""

    def sweep_lenses(self, ids: Sequence[int], opts: SweepOptions, lenses: Sequence[Lens],
                     mid: bool) -> LensSweep:
        """`sweep` under every lens (opts.lens is ignored), rows between blocks and, with mid,
        the middle of each block for the lenses that read it."""

    def sweep_next_token_lenses(self, prompts: Sequence[Sequence[int]],
                                scored: Sequence[Sequence[tuple[int, ...]]],
                                lenses: Sequence[Lens], mid: bool, top_k: int = TOP_K,
                                pairs: bool = True) -> list[LensSweep]:
        """`sweep_next_token` under every lens, one forward pass for the batch; the lens pairs
        only with `pairs` (a suite's tables do not use them: they cost two more decodes)."""


def require(backend: Backend, kind: type[B], what: str) -> B:
    """`backend` where `what` needs more than results (kind: InspectableBackend, or training's
    TrainableBackend); refused in one line for a model split across processes."""
    if not isinstance(backend, kind):
        raise LensError(f"{what} is not available when the model is split across processes "
                        "(runs, suites and probes are)")
    return backend
