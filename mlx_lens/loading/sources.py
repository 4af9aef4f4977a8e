"""Resolving what the user named as a model: a local folder, a GGUF file, a hub id or the default."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from mlx_lens.core.errors import LensError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    name: str  # short name, used in artifact file names
    path: Path | None = None  # a local folder, or a .gguf file
    hub_id: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.path is not None and self.path.suffix == ".gguf"

    @property
    def location(self) -> str:
        """What from_pretrained-style loaders take: a folder or a hub id (GGUF: its folder)."""
        if self.path is None:
            return self.hub_id
        return str(self.path.parent if self.is_gguf else self.path)


def resolve(spec: str | None) -> ModelSource:
    """Turn a CLI model argument into a source; None means the embedded default model."""
    if spec is None:
        from mlx_lens.loading.default_model import MODEL_NAME, default_model_dir

        return ModelSource(MODEL_NAME, path=default_model_dir())
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LensError(f"model folder {spec} has no config.json")
        return ModelSource(path.resolve().name, path=path.resolve())
    if path.is_file():
        if path.suffix != ".gguf":
            raise LensError(f"model file {spec} is not a .gguf file (give a folder or a GGUF file)")
        return ModelSource(path.stem, path=path.resolve())
    if _HUB_ID.match(spec) and not spec.startswith("."):
        return ModelSource(spec.rsplit("/", 1)[1], hub_id=spec)
    raise LensError(f"model not found: {spec!r} is neither a local folder, a .gguf file nor a hub id")


def local_model_type(source: ModelSource) -> str | None:
    """model_type from a local folder's config.json, read before any heavy import."""
    if source.path is None or source.is_gguf:
        return None
    try:
        return json.loads((source.path / "config.json").read_text())["model_type"]
    except (OSError, ValueError, KeyError) as exc:
        raise LensError(f"unreadable config.json in {source.path}: {exc}") from exc


def implements(library: str, model_type: str | None) -> bool:
    """Whether transformers implements a model type as a causal LM (or an image-text-to-text
    model, whose text model the lens reads), or mlx-lm as a model file. Asking of mlx-lm imports
    it (and mlx): a torch run asks only where transformers does not."""
    import importlib.util

    if library == "transformers":
        from transformers.models.auto import modeling_auto

        return (model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                or model_type in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    if not model_type or importlib.util.find_spec("mlx_lm") is None:
        return False
    from mlx_lm.utils import MODEL_REMAPPING

    name = MODEL_REMAPPING.get(model_type, model_type)
    return name.isidentifier() and importlib.util.find_spec(f"mlx_lm.models.{name}") is not None


def check_supported(model_type: str | None, backend: str) -> None:
    """One line where the backend's library does not implement the type, naming the other
    backend where its library does."""
    library, other, other_backend = (("mlx-lm", "transformers", "torch") if backend == "mlx"
                                     else ("transformers", "mlx-lm", "mlx"))
    if implements(library, model_type):
        return
    elsewhere = (f"; {other} does: --backend {other_backend}" if implements(other, model_type)
                 else f", nor does {other}")
    raise LensError(f"unsupported architecture {model_type!r} for the {backend} backend: "
                    f"{library} does not implement it{elsewhere}")
