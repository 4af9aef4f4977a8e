"""Training and evaluating a tuned lens, on either backend (`mlx-lens tune`, docs/tuned-lens.md).

The loop is the tuned-lens package's: per step, tokens_per_step tokens of the corpus's training
split, the gradient of the sum over rows of the mean KL(model || lens), clipped, one SGD step at
a learning rate decaying linearly to 0. Batches are a function of (seed, step) alone, so a run
resumed from its checkpoint sees the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from mlx_lens.core.lens import Translators
from mlx_lens.core.training import Recipe, TrainableBackend
from mlx_lens.tuned.corpus import Corpus
from mlx_lens.core.errors import LensError
from mlx_lens.core.files import exclusive, sweep_dead_siblings
from mlx_lens.core.progress import progress
from mlx_lens.tuned.lens_file import TunedLens, read, read_extra, save, unembedding_hash

FORMAT = "mlx-lens tuned lens 1"
OPTIMIZER = "optimizer.safetensors"  # a checkpoint's momentum buffers
# The held-out evaluation reads at most this many tokens by default: ~3 minutes with SmolLM2 on
# a 2-core CPU (two lenses, every row, the whole vocabulary); --eval-tokens reads more.
EVAL_TOKENS = 4096


@dataclass(frozen=True)
class TuneOptions:
    # ~13 minutes on a 2-core CPU with SmolLM2 (25 tokens/s; docs/performance.md "Tuned lens")
    steps: int = 25
    tokens_per_step: int = 768
    seq_len: int = 128
    corpus: str | None = None  # mlx_lens.tuned.corpus: a file, or None for the default
    recipe: Recipe = field(default_factory=Recipe)
    seed: int = 0
    checkpoint_every: int = 5

    @property
    def sequences_per_step(self) -> int:
        return max(1, self.tokens_per_step // self.seq_len)

    @property
    def step_tokens(self) -> int:
        """Tokens per step as trained: tokens_per_step rounded down to whole sequences."""
        return self.sequences_per_step * self.seq_len

    def lr(self, step: int) -> float:
        """Linear decay from the recipe's rate to 0 (the package's schedule without warm-up)."""
        return self.recipe.lr * (self.steps - step) / self.steps


def batch_at(train: np.ndarray, step: int, per_step: int, seed: int) -> np.ndarray:
    """The sequences of step `step`: consecutive slices of a per-epoch permutation."""
    out = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, k = divmod(i, len(train))
        out.append(train[np.random.default_rng((seed, epoch)).permutation(len(train))[k]])
    return np.stack(out)


def lens_config(backend: TrainableBackend, corpus: Corpus, opts: TuneOptions) -> dict:
    """config.json: the model's identity (a superset of the tuned-lens package's
    TunedLensConfig) and how the lens was trained."""
    info = backend.info
    return {
        "format": FORMAT, "base_model_name_or_path": info.name, "architecture": info.architecture,
        "d_model": info.d_model, "num_hidden_layers": info.n_layers, "vocab": info.vocab,
        "bias": True, "lens_type": "linear_tuned_lens",
        "unembed_sha256": unembedding_hash(backend.unembedding, info.vocab),
        "training": {"backend": info.backend, "device": info.device, "corpus": corpus.name,
                     "seq_len": opts.seq_len, "steps": opts.steps,
                     "tokens_per_step": opts.step_tokens, "seed": opts.seed,
                     **asdict(opts.recipe)},
    }


@contextlib.contextmanager
def deferred_signals():
    """SIGINT and SIGTERM wait until the block is done: an optimizer step or a checkpoint is
    never left half-applied. Python-level handlers (a thread mask would not do: the kernel hands
    a process signal to any thread, e.g. one of torch's), re-raised after the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    names = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, _frame: pending.append(signum)) for s in names}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in pending:
            signal.raise_signal(s)


@contextlib.contextmanager
def kept_when_interrupted(unit: str, total: int, done: Callable[[], int],
                          keep: Callable[[int], Path | None]):
    """An interrupt (SIGINT, SIGTERM) inside the block keeps the whole units done so far,
    keep(done()) (None: nothing kept), says where in one line, and goes on; a failure leaves the
    last checkpoint as it stands."""
    try:
        yield
    except Exception:
        raise
    except BaseException:
        path = keep(done())
        if path is not None:
            print(f"mlx-lens: {unit} {done()} of {total} kept in {path}; the same command "
                  "resumes from it", file=sys.stderr)
        raise


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoint")


def train(backend: TrainableBackend, corpus: Corpus, opts: TuneOptions, out: Path) -> TunedLens:
    """Train a tuned lens and write it to `out` (a new folder). Every checkpoint_every steps,
    and when interrupted, the state goes to `<out>.checkpoint`, from which the same command
    resumes; it is removed once the lens is written. One process at a time trains into `out`
    (`<out>.lock`); a checkpoint is written whole or not at all, so one killed mid-write (even
    by SIGKILL) leaves the one before it to resume from."""
    out = Path(out)
    with exclusive(out.with_name(out.name + ".lock"), f"the lens folder {out}"):
        for folder in (out, checkpoint_path(out)):
            sweep_dead_siblings(folder)  # half-written folders of a process that was killed
        return _train(backend, corpus, opts, out)


def _train(backend: TrainableBackend, corpus: Corpus, opts: TuneOptions, out: Path) -> TunedLens:
    if out.exists():
        raise LensError(f"{out} already exists; a lens is never overwritten (choose another --out)")
    ckpt = checkpoint_path(out)
    config = _at_step(lens_config(backend, corpus, opts), opts, 0)
    tuner = backend.tuner(TunedLens.identity(backend.info.n_layers, backend.info.d_model), opts.recipe)
    start = _resume(tuner, ckpt, config)
    print(f"  {corpus.name}: {len(corpus.train)} training sequences of {opts.seq_len} tokens, "
          f"{len(corpus.held_out)} held out" + (f"; resuming from {ckpt} at step {start}"
                                                 if start else ""), flush=True)
    began = time.perf_counter()

    def keep(step: int) -> Path:
        state = tuner.state()
        lens = TunedLens(state.pop("weight"), state.pop("bias"), _at_step(config, opts, step))
        with deferred_signals():
            return save(lens, ckpt, {OPTIMIZER: state}, replace=True).path

    done = start  # whole steps: an update and this count change together
    bar = progress(range(start, opts.steps), "tune", total=opts.steps - start)
    with kept_when_interrupted("step", opts.steps, lambda: done, keep):
        for step in bar:
            loss = tuner.gradients(batch_at(corpus.train, step, opts.sequences_per_step, opts.seed))
            with deferred_signals():
                tuner.update(opts.lr(step))
                done = step + 1
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(kl_nats=f"{loss:.3f}")
            if done % opts.checkpoint_every == 0:
                if not sys.stderr.isatty():  # no bar: a line per checkpoint period
                    print(f"  step {done}/{opts.steps}: loss {loss:.4f} nats (sum over rows)",
                          flush=True)
                if done < opts.steps:
                    keep(done)
    seconds = time.perf_counter() - began
    print(f"  {done - start} steps in {seconds:.0f} s: "
          f"{(done - start) * opts.step_tokens / max(seconds, 1e-9):.1f} tokens/s", flush=True)
    state = tuner.state()
    with deferred_signals():
        lens = save(TunedLens(state["weight"], state["bias"], _at_step(config, opts, done)), out)
        shutil.rmtree(ckpt, ignore_errors=True)
    return lens


def _at_step(config: dict, opts: TuneOptions, step: int) -> dict:
    return {**config, "training": {**config["training"], "step": step,
                                   "tokens_seen": step * opts.step_tokens}}


def _resume(tuner, ckpt: Path, config: dict) -> int:
    """The step a checkpoint resumes from (0 without one); one made with other settings or for
    another model is refused, not silently mixed in."""
    if not ckpt.exists():
        return 0
    old = read(ckpt)
    same = {k: v for k, v in old.config.get("training", {}).items() if k not in ("step", "tokens_seen")}
    want = {k: v for k, v in config["training"].items() if k not in ("step", "tokens_seen")}
    if same != want or old.config.get("unembed_sha256") != config["unembed_sha256"]:
        raise LensError(f"{ckpt} is a checkpoint of another training run (other model or settings); "
                        "rerun with its settings, or remove it")
    tuner.load_state({"weight": old.weight, "bias": old.bias, **read_extra(ckpt, OPTIMIZER)})
    return int(old.config["training"]["step"])


def evaluate(backend: TrainableBackend, lens: TunedLens, held_out: np.ndarray,
             max_tokens: int = EVAL_TOKENS, jlens: Translators | None = None) -> pd.DataFrame:
    """Per row, on held-out text: KL(model || lens) and next-token cross-entropy, in bits, for
    the logit lens (final-norm), the tuned lens and, given one, a J-lens (docs/jlens.md). The
    last row is the model's own output."""
    seqs = held_out[:max(1, max_tokens // held_out.shape[1])]
    identity = TunedLens.identity(lens.n_rows, lens.d_model, lens.config)
    per_step = max(1, 1024 // held_out.shape[1])  # the trainer splits further when memory asks
    totals = {}
    lenses = (("logit", identity), ("tuned", lens)) + ((("jlens", jlens),) if jlens else ())
    for name, translators in lenses:
        tuner = backend.tuner(translators, Recipe())
        kl, ce = np.zeros(lens.n_rows), np.zeros(lens.n_rows + 1)
        for i in progress(range(0, len(seqs), per_step), f"eval {name}",
                          total=math.ceil(len(seqs) / per_step)):
            part = seqs[i:i + per_step]
            k, c = tuner.losses(part)
            kl += k * len(part) / len(seqs)
            ce += c * len(part) / len(seqs)
        totals[name] = np.append(kl, 0.0) / math.log(2), ce / math.log(2)
    return pd.DataFrame({
        "layer": np.arange(lens.n_rows + 1),
        **{f"kl_{name}_bits": kl for name, (kl, _) in totals.items()},
        **{f"ce_{name}_bits": ce for name, (_, ce) in totals.items()},
        "tokens": len(seqs) * held_out.shape[1]})
