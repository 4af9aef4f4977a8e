"""Fitting a Jacobian lens (`mlx-lens jlens`, docs/jlens.md), on either backend:

    J_l = mean over corpus windows of 1/|V| sum_{t in V} sum_{t' >= t} d h_L,t' / d h_l,t

V the positions after the first `skip` and before the last. Row i of a window's term is the
gradient of sum_t' h_L,t'[i], so one backward pass per output direction gives that row for
every block output at once; the backend batches `cotangents` directions per pass
(TrainableBackend.jacobian_rows). Windows are the corpus's training split, in order, from
`first`: a shard fits a slice, and shards merge weighted by their prompt counts. Sums are float64
here. A checkpoint (every `checkpoint_every` windows, and on SIGINT or SIGTERM) is a J-lens file
with its running sums; the same command resumes from it to the very result of an uninterrupted
fit.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mlx_lens.core.errors import LensError
from mlx_lens.core.files import exclusive
from mlx_lens.core.progress import progress
from mlx_lens.core.training import TrainableBackend
from mlx_lens.tuned import jlens_file
from mlx_lens.tuned.corpus import Corpus
from mlx_lens.tuned.jlens_file import JLens
from mlx_lens.tuned.lens_file import unembedding_hash
from mlx_lens.tuned.training import deferred_signals, kept_when_interrupted

FORMAT = "mlx-lens jlens 1"


@dataclass(frozen=True)
class JLensOptions:
    windows: int = 100  # corpus windows (prompts) fitted
    first: int = 0  # the first window of the training split: shards fit disjoint slices
    seq_len: int = 128
    skip: int = 16  # the reference's: attention-sink positions are no source
    cotangents: int = 32  # output directions per backward pass (memory: that many copies)
    corpus: str | None = None
    checkpoint_every: int = 5  # windows

    def check(self) -> None:
        for name in ("windows", "cotangents", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise LensError(f"--{name} must be at least 1")
        if self.first < 0 or self.skip < 0:
            raise LensError("--first and --skip must not be negative")
        if self.seq_len < self.skip + 2:
            raise LensError(f"--seq-len {self.seq_len} leaves no source position after --skip "
                            f"{self.skip} and before the last (at least {self.skip + 2})")

    @property
    def sources(self) -> int:
        """|V|: the source positions of a window."""
        return self.seq_len - 1 - self.skip


def metadata(backend: TrainableBackend, corpus: Corpus, opts: JLensOptions) -> dict:
    """The file's metadata: the model's identity and how the lens was fitted."""
    info = backend.info
    return {"format": FORMAT, "model_name": info.name, "architecture": info.architecture,
            "d_model": info.d_model, "n_layers": info.n_layers,
            "unembed_sha256": unembedding_hash(backend.unembedding, info.vocab),
            "fit": {"backend": info.backend, "device": info.device, "corpus": corpus.name,
                    "seq_len": opts.seq_len, "skip": opts.skip, "cotangents": opts.cotangents,
                    "windows": [[opts.first, opts.first + opts.windows]]}}


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoint")


def fit(backend: TrainableBackend, corpus: Corpus, opts: JLensOptions, out: Path) -> JLens:
    """Fit a J-lens and write it to the new file `out`; one process at a time (`<out>.lock`)."""
    opts.check()
    out = Path(out)
    with exclusive(out.with_name(out.name + ".lock"), f"the J-lens file {out}"):
        if out.exists():
            raise LensError(f"{out} already exists; a lens is never overwritten (choose another --out)")
        return _fit(backend, corpus, opts, out)


def _fit(backend: TrainableBackend, corpus: Corpus, opts: JLensOptions, out: Path) -> JLens:
    windows = corpus.train[opts.first:opts.first + opts.windows]
    if len(windows) < opts.windows:
        raise LensError(f"corpus {corpus.name} has {len(corpus.train)} training windows of "
                        f"{opts.seq_len} tokens; --first {opts.first} --windows {opts.windows} "
                        "asks for more")
    info = backend.info
    n, d = info.n_layers, info.d_model
    config = metadata(backend, corpus, opts)
    ckpt = checkpoint_path(out)
    sums, done = _resume(ckpt, config, n, d)
    start = done
    print(f"  {corpus.name}: windows {opts.first}..{opts.first + opts.windows - 1} of "
          f"{len(corpus.train)} of {opts.seq_len} tokens, {opts.sources} source positions each"
          + (f"; resuming from {ckpt} at window {done}" if done else ""), flush=True)

    def keep() -> Path:
        lens = jlens_file.from_sums(sums, done, n, config, keep_sums=True)
        with deferred_signals():
            return jlens_file.save(lens, ckpt, replace=True).path

    chunks = [list(range(i, min(i + opts.cotangents, d))) for i in range(0, d, opts.cotangents)]
    bar = progress(range(start * len(chunks), opts.windows * len(chunks)), "jlens",
                   total=(opts.windows - start) * len(chunks))
    steps = iter(bar)
    began = time.perf_counter()
    with kept_when_interrupted("window", opts.windows, lambda: done,
                               lambda whole: keep() if whole > 0 else None):
        for w in range(start, opts.windows):
            term = np.zeros((n - 1, d, d))
            for chunk in chunks:
                term[:, chunk] = backend.jacobian_rows(windows[w].tolist(), chunk, opts.skip)
                next(steps, None)
            with deferred_signals():  # a window's sum and its count change together
                for layer in range(n - 1):
                    sums[layer] = sums[layer] + term[layer] / opts.sources
                done = w + 1
            if done % opts.checkpoint_every == 0 and done < opts.windows:
                if not sys.stderr.isatty():  # no bar: a line per checkpoint period
                    print(f"  window {done}/{opts.windows}", flush=True)
                keep()
    seconds = time.perf_counter() - began
    print(f"  {done - start} windows in {seconds:.0f} s: "
          f"{seconds / max(done - start, 1):.1f} s per window", flush=True)
    with deferred_signals():
        lens = jlens_file.save(jlens_file.from_sums(sums, done, n, config), out)
        ckpt.unlink(missing_ok=True)
    return lens


def _identity(config: dict) -> dict:
    """What must agree for two files to be parts of one fit (not the slice, nor the batch)."""
    fit = {k: v for k, v in config.get("fit", {}).items()
           if k not in ("windows", "cotangents", "backend", "device")}
    return {"unembed_sha256": config.get("unembed_sha256"), **fit}


def _resume(ckpt: Path, config: dict, n: int, d: int) -> tuple[dict[int, np.ndarray], int]:
    """The running sums and the windows done (zeros and 0 without a checkpoint); one made with
    other settings or for another model is refused, not silently mixed in."""
    if not ckpt.exists():
        return {k: np.zeros((d, d)) for k in range(n - 1)}, 0
    old = jlens_file.read(ckpt)
    if _identity(old.config) != _identity(config) or \
            old.config.get("fit", {}).get("windows") != config["fit"]["windows"]:
        raise LensError(f"{ckpt} is a checkpoint of another fit (other model or settings); "
                        "rerun with its settings, or remove it")
    return jlens_file.sums_of(old), old.n_prompts


def merge(paths: Sequence[Path], out: Path) -> JLens:
    """Shards of one fit (disjoint windows, the same model, corpus, length and skip) as one file:
    J weighted by the shards' prompt counts, summed in float64."""
    shards = [jlens_file.read(p) for p in paths]
    if len(shards) < 2:
        raise LensError("--merge takes at least two shards")
    first = shards[0]
    ranges: list[list[int]] = []
    for shard in shards:
        if _identity(shard.config) != _identity(first.config) or shard.n_layers != first.n_layers \
                or shard.d_model != first.d_model:
            raise LensError(f"{shard.path} and {first.path} are not shards of one fit "
                            "(other model, corpus, --seq-len or --skip)")
        ranges += shard.config.get("fit", {}).get("windows", [])
    ranges.sort()
    if any(a[1] > b[0] for a, b in zip(ranges, ranges[1:])):
        raise LensError(f"the shards' windows overlap: {ranges}")
    n_prompts = sum(s.n_prompts for s in shards)
    sums = {k: sum(jlens_file.sums_of(s)[k] for s in shards) for k in first.J}
    config = {**first.config, "fit": {**first.config.get("fit", {}), "windows": ranges}}
    return jlens_file.save(jlens_file.from_sums(sums, n_prompts, first.n_layers, config), out)


