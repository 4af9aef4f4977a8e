"""The Python API: what `mlx-lens run` does, for a notebook or a script.

    import mlx_lens

    lens = mlx_lens.load()                 # the packaged SmolLM2, backend chosen as the CLI does
    result = lens.run("Give the city name only, plain text. The capital of France is called "
                      "simply", "Paris")
    result.pure                            # per layer at the next-token position (pandas)
    result.summary["L_semantic"]
    both = lens.run(lenses="all")          # every lens and the middle of each block, one pass
    both.lenses, both.lens_pairs           # per (lens, site, layer); per pair of lenses
    suite = lens.run_suite("default")      # or a facts file, or a list of Fact
    suite.aggregates
    tuned = lens.tune("lenses/mine")       # a tuned lens (docs/tuned-lens.md)
    lens.evaluate(tuned)                   # per layer: logit vs tuned lens on held-out text
    mlx_lens.load(lens="tuned:lenses/mine").run()

The CLI is a thin layer over these calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from mlx_lens import backend_choice
from mlx_lens.tuned import jlens_file, jlens_fit, lens_file
from mlx_lens.tuned import training
from mlx_lens.core.contract import Backend, InspectableBackend, require
from mlx_lens.core.steering import Steering
from mlx_lens.core.lens import FINAL_NORM, RULES, Lens
from mlx_lens.core.training import TrainableBackend
from mlx_lens.tuned.corpus import load_corpus
from mlx_lens.core.errors import LensError
from mlx_lens.experiment.single import (ExperimentOptions, ModelResult, encode_prompt,
                                        run_experiment)
from mlx_lens.experiment.facts import Fact, load_facts
from mlx_lens.experiment.metrics import CollapseSettings
from mlx_lens.experiment.patching import (KINDS, PatchOptions, PatchResult, PatchSuiteResult,
                                          run_patch_suite, run_patching)
from mlx_lens.experiment.milestones import MilestoneSettings
from mlx_lens.experiment.tracing import (NoiseOptions, TraceResult, TraceSuiteResult, run_trace,
                                         run_trace_suite)
from mlx_lens.loading.sources import ModelSource, resolve
from mlx_lens.experiment.probes import ANSWER, PROMPT
from mlx_lens.experiment.suite import SuiteResult, run_suite
from mlx_lens.tuned.jlens_file import JLens
from mlx_lens.tuned.jlens_fit import JLensOptions
from mlx_lens.tuned.lens_file import TunedLens
from mlx_lens.tuned.training import TuneOptions


@dataclass
class ModelLens:
    """A loaded model and the lens to decode it with."""

    backend: Backend
    source: ModelSource
    lens: Lens = FINAL_NORM  # a norm rule, or a tuned lens's translators before the final norm
    backend_reason: str = ""  # why this backend (recorded in the JSON)

    def run(self, prompt: str = PROMPT, answer: str = ANSWER, probes: bool = True,
            collapse: CollapseSettings | None = None, keep_residuals: bool = False,
            milestones: MilestoneSettings | None = None,
            lenses: str | Sequence[str | Lens] = (), mid: bool = True,
            steer: Steering | dict | None = None,
            test_prompts: Sequence[str] | None = None) -> ModelResult:
        """The logit-lens experiment on one prompt: every layer at every position, and the
        whole answer teacher-forced after it. With `lenses` ("all", "raw,next-norm", or a
        list), those lenses too, from the same forward pass, and with `mid` the middle of each
        block (mlx_lens/experiment/lenses.py). `steer` ({row: vector}, or a Steering with
        positions and a scale) adds vectors to the residual at those rows, and the steered run
        is what the lens decodes (mlx_lens/core/steering.py). `test_prompts`: the final-layer
        probes (None: the original's 14 with its own prompt, none with another, as the JSON
        says)."""
        readable, omitted = self._readable(lenses)
        opts = ExperimentOptions(prompt=prompt, answer=answer, lens=self.lens,
                                 collapse=collapse or CollapseSettings(), probes=probes,
                                 test_prompts=None if test_prompts is None else tuple(test_prompts),
                                 keep_residuals=keep_residuals,
                                 milestones=milestones or MilestoneSettings(),
                                 lenses=readable, mid=mid,
                                 steering=steer if isinstance(steer, Steering) or steer is None
                                 else Steering(dict(steer)))
        result = run_experiment(self.backend, opts, {"backend_reason": self.backend_reason})
        if omitted:
            result.payload["lenses"]["omitted"] = omitted
        # After the run: a pipeline's traffic is only known once the run has sent it.
        result.payload["diagnostics"].update(self.backend.run_diagnostics())
        return result

    def run_suite(self, facts: str | Path | Sequence[Fact],
                  collapse: CollapseSettings | None = None,
                  milestones: MilestoneSettings | None = None,
                  lenses: str | Sequence[str | Lens] = (), mid: bool = True) -> SuiteResult:
        """A fact suite (a JSONL/CSV file, "default", or Fact objects) at the next-token
        position and each answer's teacher-forced positions, batched; `lenses` and `mid` as in
        `run`."""
        if isinstance(facts, (str, Path)):
            facts = load_facts(str(facts))
        compared = ExperimentOptions(lens=self.lens, lenses=self._readable(lenses)[0]).compared
        return run_suite(self.backend, list(facts), self.lens, collapse, milestones=milestones,
                         compared=compared, mid=mid)

    def _readable(self, lenses: str | Sequence[str | Lens]) -> tuple[tuple[Lens, ...], dict]:
        """The lenses of a `lenses` value, and those "all" leaves out because this model cannot
        be read with them (next-norm on post-norm blocks: lens name -> the one-line reason). A
        lens named explicitly is never left out: the run refuses it instead."""
        chosen = resolve_lenses(lenses, self.lens)
        if not (isinstance(lenses, str) and lenses.strip() == "all"):
            return chosen, {}
        omitted = {}
        for lens in chosen:
            try:
                self.backend.check_lens(lens)
            except LensError as exc:
                omitted[lens.name] = str(exc)
        return tuple(lens for lens in chosen if lens.name not in omitted), omitted

    def difference(self, prompt_a: str, prompt_b: str, row: int) -> np.ndarray:
        """The mean-difference steering vector at `row`: the mean over positions of row's
        residual for prompt_a, minus prompt_b's, [d] float32."""
        backend = require(self.backend, InspectableBackend, "difference")
        if not 0 <= row <= backend.info.n_layers:
            raise LensError(f"row {row} is out of range (rows 0..{backend.info.n_layers})")
        mean = [backend.residuals(encode_prompt(backend.tokenizer, p))[row].astype(np.float64)
                .mean(0) for p in (prompt_a, prompt_b)]
        return (mean[0] - mean[1]).astype(np.float32)

    def jlens_vectors(self, tokens: Sequence[int | str], row: int,
                      jlens: str | Path | JLens | None = None) -> np.ndarray:
        """Per token t, v_t = J^T W_U[t] at `row` [len(tokens), d] float32: the residual
        direction whose dot product with h is the J-lens's logit of t before the final norm,
        usable as a steering vector at that row (`run(steer={row: v})`). J is the J-lens of
        block row - 1 (`jlens`, or this ModelLens's lens; rows 0 and L: the identity); a token
        is an id or a string of one token."""
        backend = require(self.backend, InspectableBackend, "jlens_vectors")
        info = backend.info
        if jlens is None and not isinstance(self.lens.translators, JLens):
            raise LensError("jlens_vectors needs a J-lens: load(lens='jlens:FILE') or jlens=FILE")
        lens = self.lens.translators if jlens is None else \
            jlens if isinstance(jlens, JLens) else jlens_file.read(jlens)
        backend.check_lens(Lens.tuned(lens))  # a lens for another model is refused
        if not 0 <= row <= info.n_layers:
            raise LensError(f"row {row} is out of range (rows 0..{info.n_layers})")
        ids = [self._token_id(t) for t in tokens]
        heads = np.stack([backend.unembedding(i, i + 1)[0] for i in ids]).astype(np.float64)
        if row < info.n_layers:
            heads = heads @ (np.eye(info.d_model) + lens.weight[row].astype(np.float64))
        return heads.astype(np.float32)

    def _token_id(self, token: int | str) -> int:
        if isinstance(token, (int, np.integer)):
            if not 0 <= token < self.backend.info.vocab:
                raise LensError(f"token id {token} is out of range (0..{self.backend.info.vocab - 1})")
            return int(token)
        ids = self.backend.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise LensError(f"{token!r} is {len(ids)} tokens, not one")
        return ids[0]

    def patch(self, clean: str, corrupt: str, answer: str, corrupt_answer: str | None = None,
              window: int = 1, kinds: Sequence[str] = KINDS) -> PatchResult:
        """An activation-patching trace: the clean run's activations restored into the
        corrupted run per kind, layer and position (mlx_lens/experiment/patching.py); its
        `frame` and `plot()`."""
        return run_patching(self.backend, PatchOptions(clean, corrupt, answer, corrupt_answer,
                                                       window, tuple(kinds)))

    def patch_suite(self, facts: str | Path | Sequence[Fact], window: int = 1,
                    kinds: Sequence[str] = KINDS) -> PatchSuiteResult:
        """Every fact patched against its control prompt, at the last position and at the
        subject, per kind and layer; facts that cannot be aligned are listed in `skipped`."""
        if isinstance(facts, (str, Path)):
            facts = load_facts(str(facts))
        return run_patch_suite(self.backend, list(facts), window, tuple(kinds))

    def trace(self, prompt: str, answer: str, subject: str,
              options: NoiseOptions | None = None) -> TraceResult:
        """ROME's causal trace: the subject's embeddings noised, the clean run restored per
        kind, layer and position (mlx_lens/experiment/tracing.py); its `frame`, `noise` and
        `plot()`."""
        return run_trace(self.backend, prompt, answer, subject, options or NoiseOptions())

    def trace_suite(self, facts: str | Path | Sequence[Fact],
                    options: NoiseOptions | None = None) -> TraceSuiteResult:
        """ROME's causal trace of every fact that names its subject, aggregated per kind, layer
        and place (the subject's first, middle and last tokens, the tokens after it)."""
        if isinstance(facts, (str, Path)):
            facts = load_facts(str(facts))
        return run_trace_suite(self.backend, list(facts), options or NoiseOptions())

    def tune(self, out: str | Path, corpus: str | None = None,
             options: TuneOptions | None = None) -> TunedLens:
        """Train a tuned lens for this model on `corpus` (a text or JSONL file; None: Python's
        pydoc topics) and write it to the new folder `out` (docs/tuned-lens.md)."""
        options = options or TuneOptions(corpus=corpus)
        text = load_corpus(corpus, self.backend.tokenizer, options.seq_len)
        return training.train(require(self.backend, TrainableBackend, "tune"), text, options,
                              Path(out))

    def jlens(self, out: str | Path, corpus: str | None = None,
              options: JLensOptions | None = None) -> JLens:
        """Fit a Jacobian lens for this model on `corpus` (as `tune`'s) and write it to the new
        file `out` in the reference layout (docs/jlens.md)."""
        options = options or JLensOptions(corpus=corpus)
        text = load_corpus(corpus, self.backend.tokenizer, options.seq_len)
        return jlens_fit.fit(require(self.backend, TrainableBackend, "jlens"), text, options,
                             Path(out))

    def evaluate(self, tuned: str | Path | TunedLens, corpus: str | None = None,
                 seq_len: int | None = None, max_tokens: int = training.EVAL_TOKENS,
                 jlens: str | Path | JLens | None = None) -> pd.DataFrame:
        """Per layer on held-out text: KL(model output || lens) and cross-entropy (bits), logit
        lens vs the tuned lens (and a J-lens, given one); corpus and seq_len default to the
        tuned lens's training ones."""
        lens = tuned if isinstance(tuned, TunedLens) else lens_file.read(tuned)
        if jlens is not None and not isinstance(jlens, JLens):
            jlens = jlens_file.read(jlens)
        trained = lens.config.get("training", {})
        text = load_corpus(corpus or trained.get("corpus"), self.backend.tokenizer,
                           seq_len or trained.get("seq_len", TuneOptions.seq_len))
        return training.evaluate(require(self.backend, TrainableBackend, "tune --eval"), lens,
                                 text.held_out, max_tokens, jlens)


def resolve_lens(lens: str | Lens | TunedLens | JLens) -> Lens:
    """A --lens value: a norm rule, "tuned:DIR" (a tuned lens folder, either layout),
    "jlens:FILE" (a Jacobian lens, docs/jlens.md), a Lens, a TunedLens or a JLens."""
    if isinstance(lens, Lens):
        return lens
    if isinstance(lens, (TunedLens, JLens)):
        return Lens.tuned(lens)
    if lens in RULES:
        return Lens(lens)
    if str(lens).startswith(lens_file.PREFIX):
        return Lens.tuned(lens_file.read(str(lens).removeprefix(lens_file.PREFIX)))
    if str(lens).startswith(jlens_file.PREFIX):
        return Lens.tuned(jlens_file.read(str(lens).removeprefix(jlens_file.PREFIX)))
    raise LensError(f"unknown lens {lens!r}; choose one of {', '.join(RULES)}, tuned:DIR or "
                    "jlens:FILE")


def resolve_lenses(spec: str | Sequence[str | Lens], primary: Lens) -> tuple[Lens, ...]:
    """A --lenses value: "all" (the three norm rules, and the primary lens where it is tuned),
    comma-separated lens names, or a list of them."""
    if isinstance(spec, str):
        if spec.strip() == "all":
            return tuple(Lens(r) for r in RULES) + ((primary,) if primary.translators else ())
        spec = [part.strip() for part in spec.split(",") if part.strip()]
    lenses = tuple(resolve_lens(item) for item in spec)
    names = [lens.name for lens in lenses]
    if len(set(names)) < len(names):
        raise LensError(f"a lens is named twice in --lenses: {', '.join(names)}")
    return lenses


def load(model: str | None = None, backend: str = "auto", lens: str | Lens | TunedLens = "final-norm",
         device: str = "auto", dtype: str = "auto",
         announce: Callable[[str, str], None] | None = None,
         device_map: dict | None = None) -> ModelLens:
    """Load `model` (a local folder, a .gguf file, a hub id; None: the packaged SmolLM2) on
    `backend` ("auto", "mlx", "torch"), to be decoded with `lens` ("final-norm", "next-norm",
    "raw", "tuned:DIR", "jlens:FILE", a TunedLens, a JLens or a Lens). announce(backend, reason)
    is called once the backend is chosen, before the (slow) load. device_map (torch): module
    name -> device or "disk", for accelerate to place the model so (docs/distributed.md "Across
    devices")."""
    spec = resolve_lens(lens)
    source = resolve(model)
    name, reason = backend_choice.pick(backend)
    if announce:
        announce(name, reason)
    loaded = backend_choice.load(name, source, device=device, dtype=dtype, device_map=device_map)
    loaded.check_lens(spec)  # a lens made for another model is refused here, not later
    return ModelLens(loaded, source, spec, reason)
