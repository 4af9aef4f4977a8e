"""Training a tuned lens on torch: the model frozen, its rows captured without gradients, each
translator trained on KL(model || lens) at every position (docs/tuned-lens.md). Mirrors
mlx_lens/mlx/tune.py."""
from __future__ import annotations

import numpy as np
import torch

from mlx_lens.core.lens import Translators
from mlx_lens.core.training import Recipe, RowDecoder, micro_batches


def translate(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """h + A h + b (fp32): the tuned lens's translator of one row."""
    return h + torch.matmul(h, weight.T) + bias


class TorchTuner:
    def __init__(self, backend: RowDecoder, lens: Translators, recipe: Recipe, device: str):
        self.backend, self.recipe = backend, recipe
        self.weight = torch.nn.Parameter(torch.from_numpy(lens.weight.copy()).to(device))
        self.bias = torch.nn.Parameter(torch.from_numpy(lens.bias.copy()).to(device))
        self.opt = torch.optim.SGD([self.weight, self.bias], lr=recipe.lr, momentum=recipe.momentum,
                                   nesterov=True, weight_decay=recipe.weight_decay)

    def _row_logits(self, rows: list[torch.Tensor], r: int) -> torch.Tensor:
        b = self.backend
        h = rows[r].float()
        if r < len(self.weight):
            h = translate(h, self.weight[r], self.bias[r])
        return b.head_logits(b.final_norm(h), 0, b.info.vocab)

    def _target(self, rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            logp = torch.log_softmax(self._row_logits(rows, len(rows) - 1), -1)
        return logp, logp.exp()

    def gradients(self, batch: np.ndarray) -> float:
        total = 0.0
        for micro, share in micro_batches(batch, self.backend.info.vocab):
            rows = self.backend.capture(micro.tolist())
            logp, p = self._target(rows)
            for r in range(len(self.weight)):  # one row at a time: one row's logits in memory
                logq = torch.log_softmax(self._row_logits(rows, r), -1)
                loss = (p * (logp - logq)).sum(-1).mean() * share
                loss.backward()
                total += float(loss.detach())
        return total

    def update(self, lr: float) -> None:
        torch.nn.utils.clip_grad_norm_([self.weight, self.bias], self.recipe.clip)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)

    @torch.no_grad()
    def losses(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.weight)
        kl, ce = np.zeros(n), np.zeros(n + 1)
        for micro, share in micro_batches(batch, self.backend.info.vocab):
            rows = self.backend.capture(micro.tolist())
            logp, p = self._target(rows)
            nxt = torch.from_numpy(micro[:, 1:]).to(logp.device)
            for r in range(n + 1):
                logq = torch.log_softmax(self._row_logits(rows, r), -1) if r < n else logp
                if r < n:
                    kl[r] += float((p * (logp - logq)).sum(-1).double().mean()) * share
                picked = logq[:, :-1].gather(-1, nxt[..., None])[..., 0]
                ce[r] -= float(picked.double().mean()) * share
        return kl, ce

    def state(self) -> dict[str, np.ndarray]:
        # No buffer before the first step is a zero buffer: both give v = g at the first step.
        out = {}
        for key, p in (("weight", self.weight), ("bias", self.bias)):
            out[key] = p.detach().cpu().numpy().copy()
            v = self.opt.state[p].get("momentum_buffer")
            out[f"momentum_{key}"] = np.zeros_like(out[key]) if v is None else v.cpu().numpy().copy()
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for key, p in (("weight", self.weight), ("bias", self.bias)):
            with torch.no_grad():
                p.copy_(torch.from_numpy(state[key]))
            self.opt.state[p]["momentum_buffer"] = torch.from_numpy(
                state[f"momentum_{key}"].copy()).to(p.device)
