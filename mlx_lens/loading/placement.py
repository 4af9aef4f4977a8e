"""Where a model runs, and in which dtype: the original's device policy, the checkpoint's own
dtype on CUDA (docs/running.md "Device policy"), sized from the checkpoint itself.

The footprint comes from the checkpoint's own tensors (safetensors headers, GGUF tensor infos),
never from the model's name. Memory figures are queried from each backend's framework and can
be passed in (tests mock them).
"""
from __future__ import annotations

import json
import os
import resource
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from mlx_lens.core.errors import LensError
from mlx_lens.loading.sources import ModelSource

GIB = 2**30
CPU_FP32_MAX_PARAMS = 28e9  # the original: fp32 on CPU up to ~27B, bf16 from ~30B
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OVERHEAD = 1.2  # activations, KV of one prompt, allocator slack
LENS_BYTES = 2 * GIB  # fp32 unembedding chunk + logits chunk + reductions (CHUNK_BYTES x ~4)


class DoesNotFit(LensError):
    """No device has room for the model: a run of several models reports it as skipped."""

    exit_code = 3


@dataclass(frozen=True)
class Footprint:
    n_params: int  # elements of all stored tensors (quantised ones count packed)
    stored_bytes: int


def _safetensors_footprint(files: list[Path]) -> Footprint:
    n = size = 0
    for f in files:
        with open(f, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in t["shape"]:
                count *= dim
            n += count
            size += t["data_offsets"][1] - t["data_offsets"][0]
    return Footprint(n, size)


def footprint(source: ModelSource) -> Footprint | None:
    """None where nothing local says (a hub id before download)."""
    if source.path is None:
        return None
    try:
        if source.is_gguf:
            from gguf import GGUFReader

            tensors = GGUFReader(str(source.path)).tensors
            return Footprint(sum(int(t.n_elements) for t in tensors), source.path.stat().st_size)
        files = sorted(source.path.glob("*.safetensors"))
        return _safetensors_footprint(files) if files else None
    except (OSError, ValueError, KeyError, struct.error) as exc:
        raise LensError(f"unreadable weights in {source.path}: {exc}") from exc


def auto_dtype(device: str, n_params: int, gpu: str) -> str:
    """--dtype auto: `gpu` on CUDA (the checkpoint's own dtype, torch_ref/placement.py's
    checkpoint_dtype, as MLX keeps it: the original's fp16 overflows a bf16-trained model), and
    the original's policy elsewhere: fp16 on MPS, fp32 on CPU up to ~27B parameters, bf16 above."""
    if device.startswith("cuda"):
        return gpu
    if device == "mps":
        return "fp16"
    return "fp32" if n_params <= CPU_FP32_MAX_PARAMS else "bf16"


def need_bytes(fp: Footprint, dtype: str | None) -> int:
    """Memory to run the lens: weights in the compute dtype (None: as stored) plus lens buffers."""
    weights = fp.stored_bytes if dtype is None else fp.n_params * BYTES[dtype]
    return int(weights * OVERHEAD + LENS_BYTES)


def pick_device(fp: Footprint | None, candidates: list[tuple[str, int]], dtype: str,
                gpu: str = "fp16") -> tuple[str, str]:
    """(device, dtype): the first candidate (device, free bytes), in preference order, where the
    model fits. dtype "auto" follows the policy per device (`gpu`: auto_dtype's on CUDA);
    "stored" keeps the checkpoint's."""
    tried = []
    for device, free in candidates:
        chosen = dtype if dtype != "auto" else auto_dtype(device, fp.n_params if fp else 0, gpu)
        if fp is None:
            return device, chosen
        need = need_bytes(fp, None if chosen == "stored" else chosen)
        if need <= free:
            return device, chosen
        tried.append(f"{device} has {free / GIB:.1f} GiB, needs {need / GIB:.1f} GiB in {chosen}")
    raise DoesNotFit(f"model fits no device ({fp.n_params / 1e9:.2f}B parameters): "
                     + "; ".join(tried))


def split_across(fp: Footprint | None, gpus: list[tuple[str, int]], dtype: str,
                 gpu: str = "fp16") -> tuple[str, dict[int, int]] | None:
    """Where a model fits no single GPU: (dtype, max_memory per GPU index) when the GPUs hold it
    together, for accelerate's device_map="auto"; each GPU keeps the lens's buffers free, and
    the lens decodes on the head's GPU. None where they do not (or there is just one)."""
    if fp is None or len(gpus) < 2:
        return None
    chosen = dtype if dtype != "auto" else gpu
    need = need_bytes(fp, None if chosen == "stored" else chosen) - LENS_BYTES
    room = {int(d.split(":")[1]): free - LENS_BYTES for d, free in gpus if free > LENS_BYTES}
    return (chosen, room) if sum(room.values()) >= need else None


def peak_memory_mib() -> float:
    """This process's peak resident memory so far, MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def available_ram() -> int:
    """Free system memory in bytes (MemAvailable on Linux; total RAM elsewhere)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def read_device_map(path: str | Path) -> dict[str, str | int]:
    """A device map file: JSON, module name -> "cpu", "disk", "cuda:N", "mps" or a GPU index."""
    try:
        device_map = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise LensError(f"unreadable device map {path}: {exc}") from exc
    if not isinstance(device_map, dict) or not device_map:
        raise LensError(f"device map {path} is not a JSON object of module names and devices")
    return device_map
