"""A Jacobian lens (Gurnee et al. 2026): per block output l, the corpus mean J_l of the summed
Jacobians of the later last-block outputs with respect to h_l, read as

    row l + 1 -> J_l h -> the model's final norm -> the fp32 head

(row 0, the embeddings, and the last row have no J: the logit lens there). Held as a linear
translator, A = J - I and b = 0, so both backends decode it as they decode a tuned lens; J = I
gives exactly the logit lens. The file is the reference implementation's: a torch.save of
{"J": {layer: [d, d]} (fp16 or fp32), "n_prompts", "source_layers", "d_model", "metadata"},
read with weights_only=True (no pickled code runs). A fit's checkpoint and its shards are files
of the same layout: J the mean so far, n_prompts the prompts it averages, and `J_sum`, the
float64 running sums a fit resumes from exactly (a file of J_sum alone reads as J_sum /
n_prompts).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlx_lens.core.errors import LensError, one_line
from mlx_lens.core.files import atomic_write

PREFIX = "jlens:"  # --lens jlens:FILE


@dataclass(frozen=True, eq=False)
class JLens:
    J: dict[int, np.ndarray]  # block output l (row l + 1) -> [d, d] float32
    n_layers: int  # the model's blocks; J for 0..n_layers - 2
    n_prompts: int
    config: dict = field(default_factory=dict)  # the file's metadata
    path: Path | None = None
    sums: dict[int, np.ndarray] | None = None  # a checkpoint's float64 running sums of J

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.path}" if self.path is not None else "jlens"

    @property
    def d_model(self) -> int:
        return next(iter(self.J.values())).shape[-1]

    @property
    def n_rows(self) -> int:
        """Rows with a translator: 0..n_layers - 1 (the last row is the model's output)."""
        return self.n_layers

    @functools.cached_property
    def weight(self) -> np.ndarray:
        """[L, d, d] float32, A = J - I: row 0 (the embeddings) zero, row l + 1 J_l - I."""
        d = self.d_model
        out = np.zeros((self.n_layers, d, d), np.float32)
        for layer, j in self.J.items():
            out[layer + 1] = j - np.eye(d, dtype=np.float32)
        return out

    @functools.cached_property
    def bias(self) -> np.ndarray:
        return np.zeros((self.n_layers, self.d_model), np.float32)

    @property
    def model_name(self) -> str | None:
        name = self.config.get("model_name", self.config.get("model"))
        return name if isinstance(name, str) else None


def read(path: str | Path) -> JLens:
    """A J-lens file; a missing, broken, inconsistent or non-finite one is a LensError naming it."""
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise LensError(f"no J-lens file at {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LensError(f"unreadable J-lens {path}: {one_line(exc)}") from exc
    if isinstance(data, dict) and "J" not in data and isinstance(data.get("J_sum"), dict):
        data = {**data, "J": {k: v / max(1, data.get("n_prompts") or 1)
                              for k, v in data["J_sum"].items()}}
    if not isinstance(data, dict) or not isinstance(data.get("J"), dict) or not data["J"]:
        raise LensError(f"J-lens {path}: not a dict with a non-empty 'J' dict of matrices")
    metadata = data.get("metadata") or {}
    d, n_prompts = data.get("d_model"), data.get("n_prompts")
    if not isinstance(metadata, dict) or not _is_int(d) or not _is_int(n_prompts) or n_prompts < 1:
        raise LensError(f"J-lens {path}: d_model and n_prompts must be positive integers and "
                        "metadata a dict")
    try:
        J = {int(k): v.float().numpy() for k, v in data["J"].items()}
        sums = {int(k): v.double().numpy() for k, v in data["J_sum"].items()} \
            if isinstance(data.get("J_sum"), dict) else None
    except (TypeError, ValueError, AttributeError) as exc:
        raise LensError(f"J-lens {path}: J is not {{layer: tensor}} ({one_line(exc)})") from exc
    layers = sorted(J)
    if list(data.get("source_layers", layers)) != layers:
        raise LensError(f"J-lens {path}: source_layers {data.get('source_layers')} are not J's "
                        f"layers {layers}")
    n_layers = layers[-1] + 2
    if layers != list(range(n_layers - 1)):
        raise LensError(f"J-lens {path}: J covers layers {layers}, not every block output "
                        f"0..{n_layers - 2}")
    bad = [k for k in layers if J[k].shape != (d, d)]
    if bad:
        raise LensError(f"J-lens {path}: J of layers {bad} is not [{d}, {d}] (d_model)")
    bad = [k for k in layers if not np.isfinite(J[k]).all()]
    if bad:
        raise LensError(f"J-lens {path}: J of layers {', '.join(map(str, bad))} holds NaN or inf")
    return JLens(J, n_layers, n_prompts, metadata, path, sums)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def save(lens: JLens, path: Path, replace: bool = False) -> JLens:
    """Write `lens` in the reference layout (fp32; its float64 sums too, where it has them: a
    checkpoint), whole or not at all; an existing file is replaced only when `replace`."""
    import torch

    path = Path(path)
    if path.exists() and not replace:
        raise LensError(f"{path} already exists; a lens is never overwritten (choose another --out)")
    layers = sorted(lens.J)
    data = {"J": {k: torch.from_numpy(np.ascontiguousarray(lens.J[k], np.float32)) for k in layers},
            "n_prompts": int(lens.n_prompts), "source_layers": layers, "d_model": lens.d_model,
            "metadata": dict(lens.config)}
    if lens.sums is not None:
        data["J_sum"] = {k: torch.from_numpy(np.ascontiguousarray(lens.sums[k], np.float64))
                         for k in layers}
    atomic_write(path, lambda tmp: torch.save(data, tmp))
    return JLens(lens.J, lens.n_layers, lens.n_prompts, lens.config, path, lens.sums)


def sums_of(lens: JLens) -> dict[int, np.ndarray]:
    """float64 sums of J over the lens's prompts: a checkpoint's own, or n_prompts x J."""
    if lens.sums is not None:
        return lens.sums
    return {k: lens.n_prompts * v.astype(np.float64) for k, v in lens.J.items()}


def from_sums(sums: dict[int, np.ndarray], n_prompts: int, n_layers: int, config: dict,
              keep_sums: bool = False) -> JLens:
    """The mean J of n_prompts prompts from its float64 sums (kept with it: a checkpoint)."""
    J = {k: (v / n_prompts).astype(np.float32) for k, v in sums.items()}
    return JLens(J, n_layers, n_prompts, config, sums=sums if keep_sums else None)
