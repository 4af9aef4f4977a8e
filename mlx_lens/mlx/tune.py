"""Training a tuned lens on MLX (mlx.nn's losses, mlx.optimizers' SGD): the model frozen, its rows
captured without gradients, each translator trained on KL(model || lens) at every position
(docs/tuned-lens.md). Mirrors torch_ref/tune.py."""
from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from mlx_lens.core.lens import Translators
from mlx_lens.core.training import Recipe, RowDecoder, micro_batches


def translate(h: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    """h + A h + b (fp32): the tuned lens's translator of one row."""
    return h + h @ weight.T + bias


def _log_softmax(z: mx.array) -> mx.array:
    return z - mx.logsumexp(z, axis=-1, keepdims=True)


class MlxTuner:
    def __init__(self, backend: RowDecoder, lens: Translators, recipe: Recipe):
        self.backend, self.recipe = backend, recipe
        self.params = {"weight": mx.array(lens.weight), "bias": mx.array(lens.bias)}
        self.opt = optim.SGD(recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                             nesterov=True)
        self.opt.init(self.params)
        self._grads: dict[str, list] | None = None
        # d loss_r / d (A_r, b_r) for one row: each row's graph is built and freed on its own.
        self._row_grad = mx.value_and_grad(self._row_loss, argnums=(0, 1))

    def _logits(self, h: mx.array) -> mx.array:
        b = self.backend
        return b.head_logits(b.final_norm(h), 0, b.info.vocab)

    def _row_loss(self, weight, bias, h, logp, p) -> mx.array:
        logq = _log_softmax(self._logits(translate(h, weight, bias)))
        return (p * (logp - logq)).sum(-1).mean()

    def _rows(self, micro: np.ndarray) -> tuple[list[mx.array], mx.array, mx.array]:
        rows = [h.astype(mx.float32) for h in self.backend.capture(micro.tolist())]
        logp = _log_softmax(self._logits(rows[-1]))
        p = mx.exp(logp)
        mx.eval(rows, logp, p)
        return rows, logp, p

    def gradients(self, batch: np.ndarray) -> float:
        n = len(self.params["weight"])
        if self._grads is None:
            self._grads = {"weight": [mx.zeros_like(self.params["weight"][0])] * n,
                           "bias": [mx.zeros_like(self.params["bias"][0])] * n}
        total = 0.0
        for micro, share in micro_batches(batch, self.backend.info.vocab):
            rows, logp, p = self._rows(micro)
            for r in range(n):  # one row at a time: one row's logits in memory
                loss, (ga, gb) = self._row_grad(self.params["weight"][r], self.params["bias"][r],
                                                rows[r], logp, p)
                self._grads["weight"][r] = self._grads["weight"][r] + share * ga
                self._grads["bias"][r] = self._grads["bias"][r] + share * gb
                mx.eval(loss, self._grads["weight"][r], self._grads["bias"][r])
                total += float(loss) * share
        return total

    def update(self, lr: float) -> None:
        grads = {k: mx.stack(v) for k, v in self._grads.items()}
        grads, _ = optim.clip_grad_norm(grads, self.recipe.clip)
        self.opt.learning_rate = lr
        self.params = self.opt.apply_gradients(grads, self.params)
        mx.eval(self.params, self.opt.state)
        self._grads = None

    def losses(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.params["weight"])
        kl, ce = np.zeros(n), np.zeros(n + 1)
        for micro, share in micro_batches(batch, self.backend.info.vocab):
            rows, logp, p = self._rows(micro)
            nxt = mx.array(micro[:, 1:])
            for r in range(n + 1):
                logq = logp
                if r < n:
                    logq = _log_softmax(self._logits(translate(rows[r], self.params["weight"][r],
                                                               self.params["bias"][r])))
                    kl[r] += float((p * (logp - logq)).sum(-1).mean()) * share
                picked = mx.take_along_axis(logq[:, :-1], nxt[..., None], -1)[..., 0]
                ce[r] -= float(picked.mean()) * share
        return kl, ce

    def state(self) -> dict[str, np.ndarray]:
        return {**{k: np.array(v) for k, v in self.params.items()},
                **{f"momentum_{k}": np.array(self.opt.state[k]["v"]) for k in self.params}}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.params = {k: mx.array(state[k]) for k in ("weight", "bias")}
        for k in self.params:
            self.opt.state[k]["v"] = mx.array(state[f"momentum_{k}"])
