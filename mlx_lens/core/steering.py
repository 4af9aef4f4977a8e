"""Steering: vectors added to the residual stream at chosen rows (every position, or given
ones), the steered run then decoded by the lens as usual. Vectors travel as safetensors files
(`save`, `load`: one float32 [d] tensor per row, named row_NNN)."""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlx_lens.core.errors import LensError
from mlx_lens.core.files import atomic_write


@dataclass(frozen=True)
class Steering:
    vectors: dict[int, np.ndarray]  # row -> [d] float32 (row 0: the embeddings)
    positions: tuple[int, ...] | None = None  # None: every position
    scale: float = 1.0
    meta: dict = field(default_factory=dict)  # where the vectors came from (recorded)

    def checked(self, n_layers: int, d_model: int) -> "Steering":
        """The vectors scaled, as float32; refused in one line where a row is out of range or
        a vector is not a finite float vector of the model's width."""
        out = {}
        for row, v in self.vectors.items():
            if not 0 <= int(row) <= n_layers:
                raise LensError(f"steering row {row} is out of range (rows 0..{n_layers})")
            v = np.asarray(v)
            if v.dtype.kind != "f":
                raise LensError(f"the steering vector of row {row} is {v.dtype}, not floating")
            if v.shape != (d_model,):
                raise LensError(f"the steering vector of row {row} has shape {v.shape}; the "
                                f"model's width is {d_model}")
            if not np.isfinite(v).all():
                raise LensError(f"the steering vector of row {row} is not finite")
            out[int(row)] = (v.astype(np.float64) * self.scale).astype(np.float32)
        return Steering(out, self.positions, 1.0, self.meta)

    def describe(self) -> dict:
        """What the JSON records."""
        return {"rows": sorted(self.vectors), "positions": self.positions, "scale": self.scale,
                "norms": {r: float(np.linalg.norm(np.asarray(v, np.float64) * self.scale))
                          for r, v in sorted(self.vectors.items())},  # of the scaled vectors
                **self.meta}


def save(path: str | Path, vectors: dict[int, np.ndarray], meta: dict | None = None) -> Path:
    """Steering vectors to a safetensors file (written whole)."""
    from safetensors.numpy import save_file

    tensors = {f"row_{int(r):03d}": np.ascontiguousarray(v, np.float32) for r, v in vectors.items()}
    path = Path(path)
    atomic_write(path, lambda p: save_file(tensors, str(p),
                                           metadata={"mlx_lens": json.dumps(meta or {})}))
    return path


def load(path: str | Path, scale: float = 1.0) -> Steering:
    """The vectors of a file `save` wrote; one line naming the file where it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {}).get("mlx_lens", "{}"))
            vectors = {}
            for key in f.keys():
                if not (key.startswith("row_") and key[4:].isdigit()):
                    raise ValueError(f"tensor {key!r} is not named row_NNN")
                vectors[int(key[4:])] = f.get_tensor(key)
    except Exception as exc:  # a missing or broken file, safetensors' own errors included
        raise LensError(f"cannot read steering vectors from {path}: {exc}") from exc
    if not vectors:
        raise LensError(f"{path} holds no steering vectors")
    return Steering(vectors, None, scale, {"file": str(path), **meta})


class Steerable:
    """A backend's steering state (both backends' capture reads `_steering`): `steered` holds it
    for the block."""

    _steering: Steering | None = None

    @contextmanager
    def steered(self, steering: Steering):
        """Within the block every capture adds the steering vectors to their rows (and the
        blocks after them see the steered residual)."""
        self._steering = steering.checked(self.info.n_layers, self.info.d_model)
        try:
            yield
        finally:
            self._steering = None
