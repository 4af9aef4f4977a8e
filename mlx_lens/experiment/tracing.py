"""Causal tracing as ROME defines it (Meng et al. 2022, "Locating and Editing Factual
Associations in GPT", kmeng01/rome experiments/causal_trace.py): the corrupted run is the prompt
itself with Gaussian noise added to the subject's embeddings, N noise samples at once; the clean
run's value is restored at one (kind, layer, position) of every noised sample, and the answer's
probability, averaged over the samples, says how much comes back.

- Noise: N(0, sd^2) per entry of row 0 (the residual entering block 0: the embeddings, with
  learned positions and Gemma's scale) at the subject's tokens, sd = scale x the standard
  deviation of row 0's entries at the subject tokens of what is traced (ROME's
  collect_embedding_std measures the subjects' token embeddings so, scale 3). One draw of N
  samples per prompt, reused by every restoration of it (ROME reseeds per trace), from a
  recorded seed; the noise itself is written out (artifacts).
- Metric: p(answer), the whole answer teacher-forced (the product of its pieces' probabilities),
  averaged over the N noised samples (ROME averages the samples' probabilities). Indirect effect
  = p(restored) - p(corrupted); total effect = p(clean) - p(corrupted); recovery = indirect /
  total.
- Kinds as activation patching's (mlx_lens/experiment/patching.py): "resid" row r restored
  (row r is ROME's hidden state of layer r - 1; row 0 the noised embeddings themselves), "attn"
  and "mlp" the `window` blocks centred on r (ROME: 10).
- Places (ROME's Figure 1 groups): the first, middle (mean over them), last subject token, the
  first token after it, further tokens (mean) and the last position; a one-token subject is
  both first and last, as ROME counts it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from mlx_lens.core.errors import LensError
from mlx_lens.core.progress import progress
from mlx_lens.experiment.aggregates import ci_unit, fact_clusters, pooled_ratio, summarise
from mlx_lens.experiment.facts import EncodedFact, encode_facts
from mlx_lens.experiment.frames import TokenNames
from mlx_lens.experiment.patching import (KINDS, WINDOW_RULE, PatchingBackend, log2p_each,
                                          restored_blocks)
from mlx_lens.experiment.single import answer_token_ids, encode_prompt, subject_span
from mlx_lens.experiment.suite import batch_size

PLACES = ("first_subject", "middle_subject", "last_subject", "first_after", "further", "last")
METRIC = "p(answer): the whole answer teacher-forced, averaged over the noise samples"
NOISE_STATISTIC = ("sample standard deviation (ddof 1) of every entry of row 0 (the input of "
                   "block 0) at the subject tokens traced")


@dataclass(frozen=True)
class NoiseOptions:
    scale: float = 3.0  # noise sd in units of the embeddings' standard deviation (ROME: 3)
    samples: int = 10  # noise samples averaged (ROME: 10)
    seed: int = 0
    window: int = 10  # attn / mlp blocks restored at once, centred on the layer (ROME: 10)
    kinds: tuple[str, ...] = KINDS

    def __post_init__(self):
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise LensError("--noise-scale must be a positive number")
        if self.samples < 1:
            raise LensError("--samples must be at least 1")
        if self.window < 1:
            raise LensError("--window must be at least 1")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise LensError(f"unknown kind {(unknown or [''])[0]!r}; choose from "
                            f"{', '.join(KINDS)}")


def places_of(pos: int, span: tuple[int, int], length: int) -> list[str]:
    """The Figure-1 places position `pos` of a prompt of `length` tokens counts in (ROME's
    grouping: one-token subjects are first and last; the first token after the subject may be
    the last position)."""
    start, stop = span
    holds = (pos == start, start < pos < stop - 1, pos == stop - 1, pos == stop,
             stop < pos < length - 1, pos == length - 1)
    return [place for place, true in zip(PLACES, holds) if true]


def embedding_std(backend, prompts: Sequence[tuple[list[int], tuple[int, int]]]) -> tuple[float, int]:
    """The standard deviation of row 0's entries at the subject tokens of the (ids, span)
    prompts, and how many entries it was taken over."""
    rows = [backend.residuals(ids)[0][a:b] for ids, (a, b) in prompts]
    values = np.concatenate([np.asarray(r, np.float64).ravel() for r in rows])
    return float(values.std(ddof=1)), int(values.size)


def draw_noise(rng: np.random.Generator, samples: int, span: tuple[int, int], d: int,
               sd: float) -> np.ndarray:
    """[N, subject tokens, d] float32: the noise one prompt's samples add to row 0."""
    return (rng.standard_normal((samples, span[1] - span[0], d)) * sd).astype(np.float32)


def _traced(backend: PatchingBackend, seqs: list[list[int]], pieces: np.ndarray,
            span: tuple[int, int], noise: np.ndarray, positions: Sequence[int],
            opts: NoiseOptions, what: str = "") -> dict:
    """p(answer) per noise sample of B prompts of one shape and one subject span (seqs: each
    prompt with its answer's pieces but the last; pieces [B, n]; noise [B, N, span, d]):
    "clean" and "corrupt" [B, N], and per (kind, layer) [P, B, N] with positions[i] restored."""
    n_facts, n_samples = noise.shape[:2]
    layers, n = backend.info.n_layers, pieces.shape[1]
    full = len(seqs[0])
    batch = [list(s) for s in seqs for _ in range(n_samples)]  # prompt-major, N copies each
    added = np.zeros((len(batch), full, backend.info.d_model), np.float32)
    added[:, span[0]:span[1]] = noise.reshape(len(batch), *noise.shape[2:])
    scored = np.repeat(pieces, n_samples, axis=0)
    clean, corrupt = backend.record(batch), backend.record(batch, added)

    def p(z: np.ndarray) -> np.ndarray:  # logits [V, B * N, n, vocab] -> [V, B, N]
        return np.exp2(log2p_each(z, scored)).reshape(len(z), n_facts, n_samples)

    last = range(layers, layers + 1)
    none = np.zeros((1, len(batch), full), bool)
    out = {name: p(backend.patched_logits(run, run, "resid", last, none, n)[0])[0]
           for name, run in (("clean", clean), ("corrupt", corrupt))}
    per_call = max(1, batch_size(backend, full) // len(batch) - 1)  # + the unpatched variant
    drift = 0.0
    steps = [(kind, r) for kind in opts.kinds
             for r in range(layers + 1 if kind == "resid" else layers)]
    for kind, r in progress(steps, f"tracing{what}") if what else steps:
        values = []
        for first in range(0, len(positions), per_call):
            chunk = positions[first:first + per_call]
            restore = np.zeros((1 + len(chunk), len(batch), full), bool)
            for v, t in enumerate(chunk, 1):
                restore[v, :, t] = True
            got = p(backend.patched_logits(corrupt, clean, kind,
                                           restored_blocks(kind, r, opts.window, layers),
                                           restore, n)[0])
            drift = max(drift, float(np.abs(got[0] - out["corrupt"]).max()))
            values.append(got[1:])
        out[kind, r] = np.concatenate(values)
    out["batch_baseline_max_delta_p"] = drift  # the unpatched variant against the baseline
    return out


@dataclass
class TraceResult:
    frame: pd.DataFrame  # per (kind, layer, position)
    summary: dict  # settings, noise, baselines, tokens, strongest effects
    noise: dict[str, np.ndarray] = field(repr=False)  # name -> [N, subject tokens, d]

    def plot(self):
        """The three-panel heatmap of p(answer) restored per kind, layer and position."""
        from mlx_lens.view.tracing import heatmap  # matplotlib is imported only to draw

        return heatmap(self.frame, self.summary)


def _noise_summary(opts: NoiseOptions, std: float, n_values: int) -> dict:
    return {"procedure": "causal tracing (ROME, Meng et al. 2022): Gaussian noise on the "
                         "subject's row 0", "scale": opts.scale, "samples": opts.samples,
            "seed": opts.seed, "rng": "numpy.random.default_rng(seed).standard_normal, "
                                      "prompts in order", "embedding_std": std,
            "embedding_std_statistic": NOISE_STATISTIC, "embedding_std_entries": n_values,
            "sd": opts.scale * std}


def run_trace(backend, prompt: str, answer: str, subject: str,
              opts: NoiseOptions = NoiseOptions()) -> TraceResult:
    """ROME's trace of one prompt: every (kind, layer, position) restored in turn."""
    if not isinstance(backend, PatchingBackend):
        raise LensError("causal tracing needs the whole model in one process")
    if not prompt.strip():
        raise LensError("empty prompt")
    if not answer.strip():
        raise LensError("empty answer: give the prompt's answer")
    tok, info = backend.tokenizer, backend.info
    ids = encode_prompt(tok, prompt, info.n_ctx)
    pieces = answer_token_ids(tok, ids, prompt, answer.strip())
    span = subject_span(tok, ids, subject.strip())
    std, n_values = embedding_std(backend, [(ids, span)])
    noise = draw_noise(np.random.default_rng(opts.seed), opts.samples, span, info.d_model,
                       opts.scale * std)
    got = _traced(backend, [ids + pieces[:-1]], np.array([pieces]), span, noise[None],
                  list(range(len(ids))), opts, " (noise)")
    clean, corrupt = float(got["clean"][0].mean()), float(got["corrupt"][0].mean())
    names = TokenNames(tok.decode)
    tokens = [names(i) for i in ids]
    rows = []
    for kind in opts.kinds:
        for r in range(info.n_layers + 1 if kind == "resid" else info.n_layers):
            blocks = restored_blocks(kind, r, opts.window, info.n_layers)
            p = got[kind, r][:, 0]  # [positions, N]
            rows.append(pd.DataFrame({
                "kind": kind, "layer": r, "first_block": blocks.start,
                "last_block": blocks.stop - 1, "pos": np.arange(len(ids)), "token": tokens,
                "place": ["+".join(places_of(t, span, len(ids))) for t in range(len(ids))],
                "p_answer": p.mean(1), "p_answer_sd": p.std(1, ddof=1) if opts.samples > 1
                else np.nan, "indirect_effect": p.mean(1) - corrupt}))
    frame = pd.concat(rows, ignore_index=True)
    total = clean - corrupt
    frame["recovery"] = frame["indirect_effect"] / total if total > 0 else np.nan
    best = {kind: frame[frame["kind"] == kind].nlargest(1, "indirect_effect")
            [["layer", "pos", "indirect_effect"]].iloc[0].to_dict() for kind in opts.kinds}
    summary = {"model": info.name, "backend": info.backend, "prompt": prompt,
               "answer": answer.strip(), "subject": subject.strip(),
               "subject_span": list(span), "tokens": tokens, "token_ids": ids,
               "answer_pieces": [names(i) for i in pieces], "kinds": list(opts.kinds),
               "window": opts.window, "window_rule": WINDOW_RULE, "metric": METRIC,
               "noise": _noise_summary(opts, std, n_values),
               "p_clean": clean, "p_corrupted": corrupt,
               "p_corrupted_sd": float(got["corrupt"][0].std(ddof=1)) if opts.samples > 1
               else None, "total_effect": total,
               "batch_baseline_max_delta_p": got["batch_baseline_max_delta_p"],
               "strongest": {k: {"layer": int(v["layer"]), "pos": int(v["pos"]),
                                 "indirect_effect": float(v["indirect_effect"])}
                             for k, v in best.items()}}
    if not total > 0:
        summary["no_recovery"] = ("the noised runs do not lower p(answer): the indirect "
                                  "effects stand, recovery has no denominator")
    return TraceResult(frame, summary, {"prompt": noise})


@dataclass
class TraceSuiteResult:
    long: pd.DataFrame  # per fact, kind, layer and place
    aggregates: pd.DataFrame  # per kind, place and layer, over facts (clusters)
    skipped: list[str]
    summary: dict
    noise: dict[str, np.ndarray] = field(repr=False)  # fact id -> [N, subject tokens, d]

    def plot(self):
        """Average indirect effect per kind and layer, by place, with its 95% band."""
        from mlx_lens.view.tracing import suite_plot  # matplotlib is imported only to draw

        return suite_plot(self.aggregates, self.summary)


def _fact_rows(f: EncodedFact, got: dict, b: int, opts: NoiseOptions, n_layers: int) -> list:
    """One fact's rows per (kind, layer, place): its traced positions run from the subject's
    first token to the last position."""
    span, length = f.subject_span, len(f.ids)
    clean, corrupt = float(got["clean"][b].mean()), float(got["corrupt"][b].mean())
    at: dict[str, list[int]] = {}
    for i, t in enumerate(range(span[0], length)):
        for place in places_of(t, span, length):
            at.setdefault(place, []).append(i)
    rows = []
    for kind in opts.kinds:
        for r in range(n_layers + 1 if kind == "resid" else n_layers):
            p = got[kind, r][:, b].mean(-1)  # [positions]: the samples' mean
            for place, index in at.items():
                rows.append((f.fact.id, f.fact.group, f.fact.cluster_key, kind, r, place,
                             len(index), float(p[index].mean()), clean, corrupt))
    return rows


def run_trace_suite(backend, facts: list, opts: NoiseOptions = NoiseOptions(),
                    batch: int | None = None) -> TraceSuiteResult:
    """ROME's trace of every fact with a subject, at each place of Figure 1; facts of one shape
    (prompt and answer lengths, subject span) batched."""
    if not isinstance(backend, PatchingBackend):
        raise LensError("causal tracing needs the whole model in one process")
    info = backend.info
    encoded = encode_facts(facts, backend.tokenizer, info.n_ctx)
    usable = [f for f in encoded if f.subject_span is not None]
    skipped = [f"{f.fact.id}: no subject to noise (the facts file's 'subject' field)"
               for f in encoded if f.subject_span is None]
    if not usable:
        raise LensError(f"no fact names its subject ({len(skipped)} facts): give each a "
                        "'subject' field")
    std, n_values = embedding_std(backend, [(f.ids, f.subject_span) for f in usable])
    rng = np.random.default_rng(opts.seed)
    noise = {f.fact.id: draw_noise(rng, opts.samples, f.subject_span, info.d_model,
                                   opts.scale * std) for f in usable}
    by_shape: dict = {}
    for f in usable:
        by_shape.setdefault((len(f.ids), len(f.answer_ids), f.subject_span), []).append(f)
    rows, drift = [], 0.0
    for (length, n, span), same in progress(list(by_shape.items()), "fact batches"):
        positions = list(range(span[0], length))
        per = batch or max(1, batch_size(backend, length + n - 1)
                           // (opts.samples * (1 + len(positions))))
        for first in range(0, len(same), per):
            chunk = same[first:first + per]
            got = _traced(backend, [f.ids + list(f.answer_ids[:-1]) for f in chunk],
                          np.array([f.answer_ids for f in chunk]), span,
                          np.stack([noise[f.fact.id] for f in chunk]), positions, opts)
            drift = max(drift, got["batch_baseline_max_delta_p"])
            for b, f in enumerate(chunk):
                rows += _fact_rows(f, got, b, opts, info.n_layers)
    long = pd.DataFrame(rows, columns=["fact_id", "group", "cluster", "kind", "layer", "place",
                                       "n_positions", "p_answer", "p_clean", "p_corrupted"])
    long["indirect_effect"] = long["p_answer"] - long["p_corrupted"]
    total = long["p_clean"] - long["p_corrupted"]
    long["recovery"] = long["indirect_effect"].where(total > 0) / total.where(total > 0)
    aggregates = _aggregates(long)
    no_drop = sorted(set(long.loc[total <= 0, "fact_id"]))
    summary = {"model": info.name, "backend": info.backend, "kinds": list(opts.kinds),
               "window": opts.window, "window_rule": WINDOW_RULE, "metric": METRIC,
               "places": list(PLACES), "noise": _noise_summary(opts, std, n_values),
               "facts": len(facts), "traced": len(usable), "skipped": skipped,
               # noise that does not lower p(answer) leaves nothing to restore: such facts
               # stay in the indirect effects, and out of the pooled recovery
               "total_effect_not_positive": no_drop,
               "batch_baseline_max_delta_p": drift,
               "spans": {f.fact.id: {"token_ids": f.ids, "subject_span": list(f.subject_span)}
                         for f in usable}}
    return TraceSuiteResult(long, aggregates, skipped, summary, noise)


def _aggregates(long: pd.DataFrame) -> pd.DataFrame:
    """Per (kind, place, layer): the indirect effect's n, mean (ROME's average indirect
    effect), median and 95% bootstrap interval, and the recovery pooled over the facts whose
    total effect is positive, sum(indirect) / sum(total), with its interval; both intervals
    draw clusters of facts, as the suite's."""
    clusters = fact_clusters(long)  # the cubes' fact order: sorted ids
    keys = clusters.to_numpy()
    out = []
    for (kind, place), part in long.groupby(["kind", "place"], sort=False):
        total = part["p_clean"] - part["p_corrupted"]

        def cube(values: pd.Series) -> np.ndarray:  # [facts, layers], NaN where missing
            return part.assign(v=values).pivot(index="fact_id", columns="layer", values="v") \
                .reindex(clusters.index).to_numpy(dtype=float)

        effect = summarise(cube(part["indirect_effect"]), clusters=keys)
        pooled = pooled_ratio(cube(part["indirect_effect"].where(total > 0)),
                              cube(total.where(total > 0)), clusters=keys)
        layers = np.sort(part["layer"].unique())
        out.append(pd.DataFrame({"kind": kind, "place": place, "layer": layers,
                                 **{f"effect_{k}" if k not in ("n", "n_clusters") else k: v
                                    for k, v in effect.items()},
                                 **{k.replace("pooled", "recovery_pooled"): v
                                    for k, v in pooled.items()},
                                 "ci_unit": ci_unit(clusters)}))
    return pd.concat(out, ignore_index=True)
