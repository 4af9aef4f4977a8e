"""Where the torch lens runs: one device as the policy picks it (mlx_lens/loading/placement.py),
or a model placed by accelerate over several devices (a device map, or "auto" over GPUs that
only together hold it, CPU and disk offload included), and the lens's own copies of a placed
model's modules."""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass

import torch

from mlx_lens.loading.placement import (DoesNotFit, auto_dtype, available_ram, pick_device, footprint,
                                        split_across)
from mlx_lens.core.errors import LensError
from mlx_lens.loading.sources import ModelSource


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def checkpoint_dtype(config) -> str:
    """The dtype --dtype auto computes in on CUDA: the checkpoint's own (its config's `dtype`,
    which transformers' own dtype="auto" reads), so that a bf16-trained model is not computed
    in fp16, whose range its activations overflow; where the config names none (a GGUF), the
    original's half precision (Gemma bf16, the others fp16)."""
    named = {v: k for k, v in DTYPES.items()}.get(config.dtype)
    return named or ("bf16" if config.model_type.startswith("gemma") else "fp16")


@dataclass
class Placement:
    kwargs: dict  # from_pretrained's placement arguments ({}: one device, moved there after)
    dtype: str
    device: str | None = None  # the one device; None when accelerate places the model
    offload: tempfile.TemporaryDirectory | None = None  # "disk" entries, kept while the model lives


def candidates(device: str) -> list[tuple[str, int]]:
    """(device, free bytes) to try, in preference order: cuda, mps, cpu for "auto"."""
    def free(d: str) -> int:
        if d.startswith("cuda"):
            return torch.cuda.mem_get_info(torch.device(d))[0]
        return available_ram()  # CPU, and MPS's unified memory

    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise LensError(f"device {device} requested but torch sees no CUDA GPU")
        return [(device, free(device))]
    found = ["cuda"] if torch.cuda.is_available() else []
    found += ["mps"] if torch.backends.mps.is_available() else []
    return [(d, free(d)) for d in [*found, "cpu"]]


def gpus() -> list[tuple[str, int]]:
    """Every CUDA GPU with its free bytes, for a model that only they together hold."""
    return [(f"cuda:{i}", torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())]


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where a module runs: accelerate's hook says so for a dispatched (split) model."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return next(module.parameters()).device


def owned(module: torch.nn.Module, device: torch.device, fp32: bool = True) -> torch.nn.Module:
    """A copy of module for the lens, on `device` (fp32 unless told): real tensors where
    accelerate offloaded the module's (they live in its hook's weights_map), no hooks."""
    clone = copy.deepcopy(module)
    hook = getattr(module, "_hf_hook", None)
    if hook is not None:
        from accelerate.hooks import remove_hook_from_module
        from accelerate.utils import set_module_tensor_to_device

        remove_hook_from_module(clone)
        for name, p in list(clone.named_parameters()):
            if p.device.type == "meta":
                set_module_tensor_to_device(clone, name, "cpu", value=hook.weights_map[name])
    clone = clone.to(device)
    return clone.float() if fp32 else clone



def place(source: ModelSource, gpu: str, device: str, dtype: str, device_map: dict | None,
          config=None) -> Placement:
    """One device as the policy picks it, the given device map (which must place every
    parameter of the model `config` describes), or accelerate's "auto" over GPUs that only
    together hold it. gpu: the dtype --dtype auto computes in on CUDA (checkpoint_dtype)."""
    fp = footprint(source)
    if device_map is not None:
        if config is not None:
            check_covers(device_map, config)
        gpu = any(str(v).startswith("cuda") or isinstance(v, int) for v in device_map.values())
        chosen = dtype if dtype != "auto" else auto_dtype("cuda" if gpu else "cpu",
                                                           fp.n_params if fp else 0, gpu)
        return _dispatched(device_map, chosen)
    found = candidates(device)
    on_gpu = [c for c in found if c[0].startswith("cuda")]
    if device == "auto" and on_gpu:  # GPUs first: one, or all of them together
        try:
            one, chosen = pick_device(fp, on_gpu, dtype, gpu)
            return Placement({}, chosen, one)
        except DoesNotFit:
            split = split_across(fp, gpus(), dtype, gpu)
            if split is not None:
                return _dispatched("auto", split[0], max_memory=split[1])
    one, chosen = pick_device(fp, found, dtype, gpu)
    return Placement({}, chosen, one)


def unplaced(device_map: dict, config) -> tuple[list[str], int]:
    """The parameters and buffers of the model `config` describes that no entry of the map
    places (an entry places a module and everything inside it; "" places all), and how many
    there are in all. Read from an empty (meta) model: nothing is loaded."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()  # a tied head is the embeddings' tensor, placed with them
    names = [n for n, _ in skeleton.named_parameters()]  # tied weights once
    names += [n for n, _ in skeleton.named_buffers()]
    keys = [str(k) for k in device_map]
    missing = [n for n in names if not any(k == "" or n == k or n.startswith(f"{k}.") for k in keys)]
    return missing, len(names)


def check_covers(device_map: dict, config) -> None:
    """Refuse, in one line, a map that leaves part of the model unplaced."""
    missing, total = unplaced(device_map, config)
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise LensError(f"the device map places {len(missing)} of the model's {total} tensors "
                        f"nowhere ({shown}): name every module, or \"\" for the rest")


def _dispatched(device_map, dtype: str, **extra) -> Placement:
    offload = tempfile.TemporaryDirectory(prefix="mlx-lens-offload-")  # "disk" entries
    return Placement({"device_map": device_map, "offload_folder": offload.name, **extra}, dtype,
                     offload=offload)
