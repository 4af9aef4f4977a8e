"""A tuned lens (Belrose et al. 2023): one affine translator per row before the last,

    row r -> h + A_r h + b_r -> the model's final norm -> the fp32 head,

held as plain numpy, so both backends apply the same file. A and b zero: exactly the logit lens
(final-norm). Two folder layouts are read (docs/tuned-lens.md):

- mlx-lens's: `config.json` (model identity, d_model, rows, unembedding hash, training settings)
  and `translators.safetensors` (`weight` [L, d, d], `bias` [L, d], float32);
- the tuned-lens package's: `config.json` (TunedLensConfig) and `params.pt`, a torch.save of the
  translators' ModuleList state dict (`{i}.weight`, `{i}.bias`), read with weights_only=True (no
  pickled code runs).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from mlx_lens.core.contract import ModelInfo
from mlx_lens.core.errors import LensError, one_line
from mlx_lens.core.files import atomic_folder, json_safe, umask

OURS = "translators.safetensors"
THEIRS = "params.pt"  # the tuned-lens package's
PREFIX = "tuned:"  # --lens tuned:DIR
HASH_ROWS = 4096  # the unembedding is hashed in slices: an fp32 copy of a head can be GBs


@dataclass(frozen=True, eq=False)
class TunedLens:
    weight: np.ndarray  # [L, d, d] float32: translator r acts on row r (row 0: embeddings)
    bias: np.ndarray  # [L, d] float32
    config: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def name(self) -> str:
        """How artifacts record the lens (the --lens value)."""
        return f"{PREFIX}{self.path}" if self.path is not None else "tuned"

    @property
    def n_rows(self) -> int:
        return len(self.weight)

    @property
    def d_model(self) -> int:
        return self.weight.shape[-1]

    @classmethod
    def identity(cls, n_layers: int, d_model: int, config: dict | None = None) -> "TunedLens":
        """Zero translators: the logit lens, and the tuned lens's starting point."""
        return cls(np.zeros((n_layers, d_model, d_model), np.float32),
                   np.zeros((n_layers, d_model), np.float32), config or {})


def unembedding_hash(rows: Callable[[int, int], np.ndarray], vocab: int) -> str:
    """sha256 of the fp32 unembedding's bytes (row-major, little-endian), read in slices."""
    digest = hashlib.sha256()
    for start in range(0, vocab, HASH_ROWS):
        digest.update(np.ascontiguousarray(rows(start, min(start + HASH_ROWS, vocab)), "<f4").tobytes())
    return digest.hexdigest()


# numpy's default print options, under which the tuned-lens package's process (which sets none)
# prints the head for its hash; a notebook's own np.set_printoptions must not change ours.
_NUMPY_PRINT_DEFAULTS = dict(precision=8, threshold=1000, edgeitems=3, linewidth=75,
                             suppress=False, nanstr="nan", infstr="inf", sign="-",
                             floatmode="maxprec", legacy=False)


def their_hash(rows: Callable[[int, int], np.ndarray], vocab: int, d: int) -> str:
    """tuned-lens's unembed_hash: sha256 of np.array_str(W, precision=1), W the fp32 head,
    under numpy's default print options. numpy summarises an array of more than `threshold`
    elements to its first and last `edgeitems` rows and columns, so only those rows are read
    (np.zeros maps the rest lazily, without touching memory); a smaller head is read whole."""
    opts = _NUMPY_PRINT_DEFAULTS
    with np.printoptions(**opts):
        if vocab * d <= opts["threshold"]:
            w = np.ascontiguousarray(rows(0, vocab), np.float32)
        else:
            w = np.zeros((vocab, d), np.float32)
            edge = min(opts["edgeitems"], vocab)
            w[:edge] = rows(0, edge)
            w[vocab - edge:] = rows(vocab - edge, vocab)
        return hashlib.sha256(str.encode(np.array_str(w, precision=1))).hexdigest()


def read(path: str | Path) -> TunedLens:
    """A lens folder in either layout; a missing or broken file is a LensError naming it."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise LensError(f"no tuned lens in {path}: config.json is missing")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise LensError(f"unreadable {path / 'config.json'}: {exc}") from exc
    _check_config(path / "config.json", config)
    if (path / OURS).is_file():
        weight, bias = _read_ours(path / OURS)
    elif (path / THEIRS).is_file():
        weight, bias = _read_theirs(path / THEIRS, config)
    else:
        raise LensError(f"no tuned lens in {path}: neither {OURS} nor {THEIRS} is there")
    if weight.ndim != 3 or weight.shape[1:] != (weight.shape[2],) * 2 or bias.shape != weight.shape[:2]:
        raise LensError(f"tuned lens {path}: translators of shapes {weight.shape} and {bias.shape} "
                        "are not [L, d, d] and [L, d]")
    bad = sorted({*np.flatnonzero(~np.isfinite(weight).all((1, 2))),
                  *np.flatnonzero(~np.isfinite(bias).all(1))})
    if bad:  # a training run that diverged: every row it touches would decode to garbage
        raise LensError(f"tuned lens {path}: the translators of rows {', '.join(map(str, bad))} "
                        "hold NaN or inf")
    return TunedLens(weight, bias, config, path)


# config.json fields this tool reads, and the JSON types they must have
_CONFIG_TYPES = {"unembed_sha256": str, "unembed_hash": str, "training": dict,
                 "num_hidden_layers": int, "d_model": int}


def _check_config(file: Path, config) -> None:
    if not isinstance(config, dict):
        raise LensError(f"{file}: not a JSON object")
    for key, kind in _CONFIG_TYPES.items():
        value = config.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise LensError(f"{file}: {key} is {type(value).__name__} {value!r}, not "
                            f"{kind.__name__}")


def _read_ours(file: Path) -> tuple[np.ndarray, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(file))
        return tensors["weight"].astype(np.float32), tensors["bias"].astype(np.float32)
    except Exception as exc:
        raise LensError(f"unreadable tuned lens {file}: {type(exc).__name__}: {exc}") from exc


def _read_theirs(file: Path, config: dict) -> tuple[np.ndarray, np.ndarray]:
    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LensError(f"unreadable tuned lens {file}: {one_line(exc)}") from exc
    n = config.get("num_hidden_layers")
    d = config.get("d_model")
    if not isinstance(n, int) or not isinstance(d, int):
        raise LensError(f"{file.parent / 'config.json'} lacks num_hidden_layers or d_model")
    try:
        weight = np.stack([state[f"{i}.weight"].float().numpy() for i in range(n)])
        bias = np.stack([state[f"{i}.bias"].float().numpy() if f"{i}.bias" in state
                         else np.zeros(d, np.float32) for i in range(n)])
    except (KeyError, AttributeError) as exc:
        raise LensError(f"tuned lens {file}: no translator {exc} in the state dict") from exc
    return weight, bias


def save(lens: TunedLens, path: Path, extra: dict[str, dict[str, np.ndarray]] | None = None,
         replace: bool = False) -> TunedLens:
    """Write `lens` to the folder `path` in mlx-lens's layout (and `extra` safetensors files, e.g.
    a checkpoint's optimizer state), whole or not at all: the files go into a temporary folder
    beside it, renamed into place. An existing `path` is replaced only when `replace` (a
    checkpoint); the old one is removed after the new one is in place."""
    from safetensors.numpy import save_file

    path = Path(path)
    if path.exists() and not replace:
        raise LensError(f"{path} already exists; a lens is never overwritten (choose another --out)")

    def build(tmp: Path) -> None:
        files = {OURS: {"weight": lens.weight, "bias": lens.bias}, **(extra or {})}
        for name, tensors in files.items():
            save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
                      str(tmp / name))
        (tmp / "config.json").write_text(json.dumps(json_safe(lens.config), indent=2) + "\n")
        for file in tmp.iterdir():  # safetensors writes 0600; results are for colleagues too
            os.chmod(file, 0o666 & ~umask())

    atomic_folder(path, build)
    return TunedLens(lens.weight, lens.bias, lens.config, path)


def read_extra(path: Path, name: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(Path(path) / name))


class HeadHashes:
    """A loaded model's unembedding hashes, ours and the tuned-lens package's, each computed at
    most once: ours reads the whole fp32 head (gigabytes for a 7B model)."""

    def __init__(self, rows: Callable[[int, int], np.ndarray], vocab: int, d_model: int):
        self._rows, self._vocab, self._d = rows, vocab, d_model

    @functools.cached_property
    def ours(self) -> str:
        return unembedding_hash(self._rows, self._vocab)

    @functools.cached_property
    def theirs(self) -> str:
        return their_hash(self._rows, self._vocab, self._d)


def check_matches(lens: TunedLens, info: ModelInfo, hashes: HeadHashes) -> None:
    """Refuse, in one line, a lens made for another model: other width, rows or unembedding."""
    where = lens.path or "the tuned lens"
    if lens.d_model != info.d_model or lens.n_rows != info.n_layers:
        raise LensError(f"{where} was made for a model with d_model {lens.d_model} and "
                        f"{lens.n_rows} translated rows, not {info.name} (d_model {info.d_model}, "
                        f"{info.n_layers} layers)")
    recorded = getattr(lens, "model_name", None)  # a J-lens file's metadata
    if recorded and _short(recorded) != _short(info.name):
        raise LensError(f"{where} was made for {recorded}, not {info.name}")
    ours = lens.config.get("unembed_sha256")
    theirs = lens.config.get("unembed_hash")
    if ours and ours != hashes.ours:
        raise LensError(f"{where} was made for another unembedding than {info.name}'s "
                        "(unembed_sha256 differs)")
    if not ours and theirs and theirs != hashes.theirs:
        raise LensError(f"{where} was made for another unembedding than {info.name}'s "
                        "(tuned-lens unembed_hash differs)")


def _short(name: str) -> str:
    """A model's name without its hub owner, case-insensitively: a folder or GGUF copy keeps it."""
    return name.rsplit("/", 1)[-1].lower().removesuffix(".gguf")
