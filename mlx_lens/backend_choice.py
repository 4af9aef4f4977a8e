"""Choosing and loading a backend. Heavy frameworks are imported only once chosen."""
from __future__ import annotations

import importlib.metadata
import os
import platform

from mlx_lens.core.contract import Backend
from mlx_lens.core.errors import LensError
from mlx_lens.loading.hub import reachable_or_cached
from mlx_lens.loading.sources import ModelSource

BACKENDS = ("auto", "mlx", "torch")


def mlx_gpu() -> str | None:
    """The GPU MLX would run on here (Metal, or mlx's CUDA build), or None."""
    if platform.system() == "Linux" and not _mlx_cuda_installed():
        return None  # mlx-cpu only: known without importing mlx (a torch run never loads it)
    try:
        import mlx.core as mx
    except ImportError:
        return None
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    return "cuda" if cuda is not None and cuda.is_available() else None


def _mlx_cuda_installed() -> bool:
    """Whether mlx's CUDA build is installed (`mlx[cuda]`: the mlx-cuda-12 or mlx-cuda-13 wheel,
    mlx-cuda in older releases): on Linux, the only way MLX has a GPU."""
    for name in ("mlx-cuda-12", "mlx-cuda-13", "mlx-cuda"):
        try:
            importlib.metadata.distribution(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


def pick(name: str) -> tuple[str, str]:
    """(backend, reason) for --backend NAME."""
    if "MLX_RANK" in os.environ:  # started by mlx.launch: the model is split across processes
        if name == "torch":
            raise LensError("a run under mlx.launch splits the model with mx.distributed: "
                            "use --backend mlx (or auto)")
        return "mlx", "a pipeline over the processes mlx.launch started"
    if name != "auto":
        return name, "requested with --backend"
    gpu = mlx_gpu()
    if gpu:
        return "mlx", f"auto: MLX has a {gpu} GPU here"
    # mlx on a Linux CPU uses a reference BLAS ~50x slower than torch (docs/stack.md).
    return "torch", f"auto: no MLX GPU on this host ({platform.system()} {platform.machine()})"


def load(name: str, source: ModelSource, device: str = "auto", dtype: str = "auto",
         device_map: dict | None = None) -> Backend:
    """device_map (torch only): module name -> device or "disk", placed by accelerate. A hub id
    the hub cannot serve now is read from the hub client's cache (mlx_lens/loading/hub.py)."""
    source = reachable_or_cached(source)
    if name == "torch":
        from torch_ref.backend import TorchBackend

        return TorchBackend(source, device=device, dtype=dtype, device_map=device_map)
    if device_map is not None:
        raise LensError("--device-map places a model for the torch backend (MLX splits a model "
                        "across processes with mlx.launch)")
    if name == "mlx":
        from mlx_lens.mlx.backend import MlxBackend
        from mlx_lens.mlx.pipeline import PipelineBackend, distributed_group

        group = distributed_group()
        if group is not None:
            return PipelineBackend(source, group, device=device, dtype=dtype)
        return MlxBackend(source, device=device, dtype=dtype)
    raise LensError(f"unknown backend {name!r} (choose one of {', '.join(BACKENDS)})")
