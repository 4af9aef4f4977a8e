"""What training a tuned lens needs from a backend (mlx_lens/tuned/training.py drives it; each
backend's tune.py implements it): a `Tuner` per lens, made by a `TrainableBackend`, working on
the rows a `RowDecoder` captures and decodes; and what a J-lens fit needs (`jacobian_rows`,
mlx_lens/tuned/jlens_fit.py drives it; each backend's jlens.py implements it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from mlx_lens.core.contract import InspectableBackend, ModelInfo
from mlx_lens.core.lens import Translators

# fp32 logits a backend's micro-batch may hold per row: [tokens, V], a few copies live in backward.
MICRO_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Recipe:
    """How translators are trained: the tuned-lens package's defaults (SGD with Nesterov
    momentum, lr = lr_scale (1 - momentum), L2 weight decay, global gradient clipping)."""

    lr_scale: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 1e-3
    clip: float = 1.0

    @property
    def lr(self) -> float:
        return self.lr_scale * (1 - self.momentum)


class Tuner(Protocol):
    """A backend's training of one tuned lens. Batches are token ids [S, T], all of length T."""

    def gradients(self, batch: np.ndarray) -> float:
        """Accumulate the gradient of the loss on `batch` (sum over translated rows of the mean
        over positions of KL(model || lens), nats); returns that loss. Interruptible."""

    def update(self, lr: float) -> None:
        """Clip the accumulated gradient, take one optimizer step with `lr`, zero it."""

    def losses(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """No training: per row, the mean over positions of KL(model || lens) [L] and of the
        next-token cross-entropy [L + 1] (the last row: the model's own), nats, float64."""

    def state(self) -> dict[str, np.ndarray]:
        """weight, bias and the optimizer's momentum buffers (a checkpoint)."""

    def load_state(self, state: dict[str, np.ndarray]) -> None: ...


class RowDecoder(Protocol):
    """The public row decoder a tuner trains on, in the backend's own arrays (mx.array or
    torch.Tensor): the rows of a batch, the final norm and the fp32 head."""

    info: ModelInfo

    def capture(self, batch: Sequence[Sequence[int]], last: int = 0) -> list[Any]:
        """Residual rows h_0..h_L of a batch of equal-length prompts, [B, T, d] each."""

    def final_norm(self, h: Any) -> Any:
        """The model's final norm, fp32."""

    def head_logits(self, x: Any, start: int, stop: int) -> Any:
        """fp32 logits of vocabulary slice [start, stop) of normalised states x (head transform
        applied)."""


@runtime_checkable
class TrainableBackend(InspectableBackend, Protocol):
    def tuner(self, lens: Translators, recipe: Recipe) -> Tuner:
        """Training of `lens`'s translators on this model (frozen) with `recipe`; a lens made
        for another model is refused with a LensError."""

    def jacobian_rows(self, ids: Sequence[int], directions: Sequence[int], skip: int) -> np.ndarray:
        """A J-lens fit's gradients on one prompt (docs/jlens.md), from one backward pass of
        len(directions) copies of it: [L - 1, len(directions), d], entry [l, b] the sum over
        source positions t in [skip, T - 1) of d (sum_t' h_L,t'[directions[b]]) / d h_{l+1},t,
        in fp32 (or the compute dtype, where wider)."""


def micro_batches(batch: np.ndarray, vocab: int):
    """A step's sequences in groups of at most MICRO_BYTES of logits per row, each with its share
    of the step's tokens (so that a loss is the mean over every position of the step)."""
    per = max(1, MICRO_BYTES // (4 * vocab * batch.shape[1]))
    for i in range(0, len(batch), per):
        yield batch[i:i + per], len(batch[i:i + per]) / len(batch)
