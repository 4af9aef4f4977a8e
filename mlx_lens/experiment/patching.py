"""Is the layer the cause? Activation patching of a prompt pair, as TransformerLens's
`get_act_patch_block_every` does it: run a clean prompt and a corrupted one of the same length;
for every kind, layer and position, rerun the corrupted prompt with the clean value restored
there, and see how much of the clean answer comes back. (ROME's causal tracing corrupts the
prompt itself, with noise on the subject: mlx_lens/experiment/tracing.py, on this module's
backend protocol.)

Kinds: "resid" the residual stream at the start of each block (rows 0..L: row L is the last
block's output, which only the head reads), "attn" and "mlp" each block's attention and MLP
output (with `window` K, the K blocks centred on r restored at once, as ROME's windowed trace:
`restored_blocks`). The
answer is scored whole, teacher-forced on both prompts: log2 p(answer) = sum over its pieces,
each at its own position. With a corrupt answer, the metric is the difference
log2 p(answer) - log2 p(corrupt answer), else log2 p(answer); recovery is
(patched - corrupt) / (clean - corrupt) of the metric: 0 nothing restored, 1 the clean run's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import pandas as pd

from mlx_lens.core.contract import Backend
from mlx_lens.core.errors import LensError
from mlx_lens.core.numerics import log_prob64
from mlx_lens.core.progress import progress
from mlx_lens.experiment.aggregates import ci_unit, fact_clusters, pooled_ratio, summarise
from mlx_lens.experiment.facts import encode_facts
from mlx_lens.experiment.frames import TokenNames
from mlx_lens.experiment.single import answer_token_ids, encode_prompt
from mlx_lens.experiment.suite import batch_size

KINDS = ("resid", "attn", "mlp")


@runtime_checkable
class PatchingBackend(Backend, Protocol):
    """Interventions on the model's own modules (one process): torch_ref/patch.py,
    mlx_lens/mlx/patch.py."""

    def record(self, batch: Sequence[Sequence[int]], noise: np.ndarray | None = None):
        """One forward pass over sequences of one length, every block's input, attention and
        MLP outputs kept on the device (an opaque `Recorded`); with noise [B, T, d] (float32)
        added to row 0, the input of block 0, in the compute dtype."""

    def patched_logits(self, base, clean, kind: str, blocks: range,
                       restore: np.ndarray, n_scored: int) -> tuple[np.ndarray, np.ndarray]:
        """fp32 output logits [V, B, n_scored, vocab] at the last n_scored positions of base's
        B sequences, run from block blocks.start on, variant v with clean's values restored at
        `blocks` (resid: the input of blocks.start) where restore [V, B, T] (bool) is set,
        sequence b's from clean's sequence b; and the decoded rows' norms [V, B, n_scored]."""


# What the artifacts say of a window (recorded beside its width).
WINDOW_RULE = "centred on the layer (ROME): blocks r - K//2 .. r + ceil(K/2) - 1, cut at the ends"


def restored_blocks(kind: str, r: int, window: int, n_layers: int) -> range:
    """The blocks restored for (kind, r): row r's block for "resid" (r = L: the last row); for
    "attn" and "mlp" the `window` blocks centred on r, cut at the model's ends, as ROME's
    trace_important_window takes them (r - K // 2 .. r + ceil(K / 2) - 1)."""
    if kind == "resid":
        return range(r, r + 1)
    return range(max(0, r - window // 2), min(n_layers, r - (-window // 2)))


@dataclass(frozen=True)
class PatchOptions:
    clean: str
    corrupt: str
    answer: str
    corrupt_answer: str | None = None
    window: int = 1
    kinds: tuple[str, ...] = KINDS

    def __post_init__(self):
        if not self.clean.strip() or not self.corrupt.strip():
            raise LensError("empty prompt: give both a clean and a corrupted prompt")
        if not self.answer.strip():
            raise LensError("empty answer: give the clean prompt's answer")
        if self.window < 1:
            raise LensError("--window must be at least 1")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise LensError(f"unknown kind {unknown[0]!r}; choose from {', '.join(KINDS)}")


@dataclass
class PatchResult:
    frame: pd.DataFrame  # one row per (kind, layer, position)
    summary: dict  # baselines, settings, tokens, the strongest restorations

    def plot(self):
        """The three-panel heatmap (kind x layer x position), a matplotlib Figure."""
        from mlx_lens.view.patching import heatmap  # matplotlib is imported only to draw

        return heatmap(self.frame, self.summary)


def one_at_a_time(positions: Sequence[int], length: int, n_seq: int = 1) -> np.ndarray:
    """The restore mask [1 + P, n_seq, length] of a trace's batch: first the unpatched run,
    then one variant per position, restoring it in every sequence."""
    mask = np.zeros((1 + len(positions), n_seq, length), bool)
    for v, t in enumerate(positions, 1):
        mask[v, :, t] = True
    return mask


def log2p_each(logits: np.ndarray, pieces) -> np.ndarray:
    """[...] the whole answer's log2 p from fp32 logits [..., n, V] at its n positions and its
    pieces (broadcast to [..., n]: one answer, or each sequence's [B, n]), float64 softmax."""
    return log_prob64(logits, np.asarray(pieces)).sum(-1) / math.log(2)


def _baselines(backend: PatchingBackend, clean_ids: list[int], corrupt_ids: list[int],
               pieces: list[int]) -> tuple:
    """The recorded clean and corrupted runs with `pieces` teacher-forced, and log2 p of
    `pieces` on each: its own last row through the head."""
    clean = backend.record([clean_ids + pieces[:-1]])
    corrupt = backend.record([corrupt_ids + pieces[:-1]])
    full, n = len(clean_ids) + len(pieces) - 1, len(pieces)
    last = range(backend.info.n_layers, backend.info.n_layers + 1)
    base = {name: float(log2p_each(backend.patched_logits(
        run, run, "resid", last, one_at_a_time([], full), n)[0][0, 0], pieces))
        for name, run in (("clean", clean), ("corrupt", corrupt))}
    return clean, corrupt, base


def _trace(backend: PatchingBackend, runs: tuple, length: int, pieces: list[int],
           opts: PatchOptions, what: str) -> tuple[dict, dict]:
    """log2 p of `pieces` per (kind, layer, position) of the trace, and the baselines."""
    clean, corrupt, base = runs
    n, layers = len(pieces), backend.info.n_layers
    full = length + n - 1
    per_batch = max(1, batch_size(backend, length + n) - 1)
    values, drift = {}, 0.0
    steps = [(kind, r) for kind in opts.kinds
             for r in range(layers + 1 if kind == "resid" else layers)]
    for kind, r in progress(steps, f"patching ({what})"):
        out = np.empty(length)
        for first in range(0, length, per_batch):
            positions = range(first, min(first + per_batch, length))
            z, _ = backend.patched_logits(corrupt, clean, kind,
                                          restored_blocks(kind, r, opts.window, layers),
                                          one_at_a_time(positions, full), n)
            lp = log2p_each(z[:, 0], pieces)
            out[first:first + len(positions)] = lp[1:]
            drift = max(drift, abs(lp[0] - base["corrupt"]))  # the batch's own baseline
        values[kind, r] = out
    return values, {**base, "batch_baseline_max_delta_log2p": drift}


def run_patching(backend: Backend, opts: PatchOptions) -> PatchResult:
    if not isinstance(backend, PatchingBackend):
        raise LensError("patching needs the whole model in one process")
    tok, info = backend.tokenizer, backend.info
    clean_ids = encode_prompt(tok, opts.clean, info.n_ctx)
    corrupt_ids = encode_prompt(tok, opts.corrupt, info.n_ctx)
    if len(clean_ids) != len(corrupt_ids):
        raise LensError(f"the clean prompt is {len(clean_ids)} tokens and the corrupted one "
                        f"{len(corrupt_ids)}: patching restores position by position, so they "
                        "must be as long (no alignment is guessed)")
    if clean_ids == corrupt_ids:
        raise LensError("the corrupted prompt is the clean one, token for token: there is "
                        "nothing to restore")
    answers = {"answer": answer_token_ids(tok, clean_ids, opts.clean, opts.answer)}
    if opts.corrupt_answer:
        answers["corrupt_answer"] = answer_token_ids(tok, corrupt_ids, opts.corrupt,
                                                     opts.corrupt_answer)
    runs = {what: _baselines(backend, clean_ids, corrupt_ids, pieces)
            for what, pieces in answers.items()}
    base = {what: b for what, (_, _, b) in runs.items()}

    def metric(a, b):
        return a - b if opts.corrupt_answer else a

    clean_m = metric(base["answer"]["clean"], base.get("corrupt_answer", {}).get("clean", 0.0))
    corrupt_m = metric(base["answer"]["corrupt"],
                       base.get("corrupt_answer", {}).get("corrupt", 0.0))
    what_metric = ("log2 p(answer) - log2 p(corrupt answer)" if opts.corrupt_answer
                   else "log2 p(answer)")
    if not clean_m > corrupt_m:  # recovery divides by the gap; it would read the wrong way round
        raise LensError(f"{what_metric} is {clean_m:.2f} on the clean prompt and {corrupt_m:.2f} "
                        "on the corrupted one: the clean prompt must favour its answer more "
                        "for a recovery to be read (swap the prompts or the answers)")
    traces = {what: _trace(backend, runs[what], len(clean_ids), pieces, opts, what)
              for what, pieces in answers.items()}
    names = TokenNames(tok.decode)
    tokens = [names(i) for i in clean_ids]
    rows = []
    for (kind, r), lp in traces["answer"][0].items():
        other = traces.get("corrupt_answer", ({(kind, r): np.full(len(lp), np.nan)},))[0]
        rows.append(pd.DataFrame({"kind": kind, "layer": r, "pos": np.arange(len(lp)),
                                  "token": tokens, "answer_log2p": lp,
                                  "corrupt_answer_log2p": other[kind, r]}))
    frame = pd.concat(rows, ignore_index=True)
    base = {what: b for what, (_, b) in traces.items()}
    frame["metric"] = metric(frame["answer_log2p"],
                             frame["corrupt_answer_log2p"] if opts.corrupt_answer else 0.0)
    frame["recovery"] = (frame["metric"] - corrupt_m) / (clean_m - corrupt_m)
    differ = [t for t, (a, b) in enumerate(zip(clean_ids, corrupt_ids)) if a != b]
    best = {kind: frame[frame["kind"] == kind].nlargest(1, "recovery")[["layer", "pos", "recovery"]]
            .iloc[0].to_dict() for kind in opts.kinds}
    summary = {"model": info.name, "backend": info.backend, "clean": opts.clean,
               "corrupt": opts.corrupt, "answer": opts.answer,
               "corrupt_answer": opts.corrupt_answer, "window": opts.window,
               "window_rule": WINDOW_RULE,
               "kinds": list(opts.kinds), "tokens": tokens,
               "clean_token_ids": clean_ids, "corrupt_token_ids": corrupt_ids,
               "answer_pieces": [names(i) for i in answers["answer"]],
               "first_difference_position": differ[0],
               "metric": what_metric,
               "baselines": base, "clean_metric": clean_m, "corrupt_metric": corrupt_m,
               "strongest": {k: {"layer": int(v["layer"]), "pos": int(v["pos"]),
                                 "recovery": float(v["recovery"])} for k, v in best.items()}}
    return PatchResult(frame, summary)


@dataclass
class PatchSuiteResult:
    long: pd.DataFrame  # per fact, kind, layer and where ("last" position, or the "subject")
    # per kind, where and layer: recovery's n, mean, median, 95% CI; pooled over facts, its
    # CI; over the facts with a positive gap only (summary's gap_not_positive: the others)
    aggregates: pd.DataFrame
    skipped: list[str]  # one line per fact left out, and why
    summary: dict

    def plot(self):
        """The suite's recovery pooled over facts per kind, layer and where, a matplotlib
        Figure."""
        from mlx_lens.view.patching import suite_heatmap  # matplotlib is imported only to draw

        return suite_heatmap(self.aggregates, self.summary)


WHERE = ("last", "subject")  # the prompt's last position; the first token the prompts differ at


def _usable(encoded) -> tuple[list, list[str]]:
    """The facts a position-by-position trace can take, and a line for each other one."""
    usable, skipped = [], []
    for f in encoded:
        if f.control_ids is None:
            skipped.append(f"{f.fact.id}: no control prompt to corrupt with")
        elif len(f.control_ids) != len(f.ids):
            skipped.append(f"{f.fact.id}: the prompt is {len(f.ids)} tokens and its control "
                           f"{len(f.control_ids)}")
        elif f.control_ids == f.ids:
            skipped.append(f"{f.fact.id}: the control prompt is the prompt")
        else:
            usable.append(f)
    return usable, skipped


def _suite_batch(backend: PatchingBackend, facts: list, kinds: tuple[str, ...],
                 window: int) -> dict:
    """log2 p per (answer, kind, layer) [3 variants, B facts] of facts of one shape, and the
    baselines [B]: variant 0 unpatched, 1 the last position, 2 the subject restored."""
    length, layers = len(facts[0].ids), backend.info.n_layers
    subject = [next(t for t, (a, b) in enumerate(zip(f.ids, f.control_ids)) if a != b)
               for f in facts]
    out = {}
    for what in ("answer", "corrupt_answer"):
        pieces = np.array([f.answer_ids if what == "answer" else f.control_answer_ids
                           for f in facts])
        n = pieces.shape[1]
        full = length + n - 1
        clean = backend.record([f.ids + list(p[:-1]) for f, p in zip(facts, pieces)])
        corrupt = backend.record([f.control_ids + list(p[:-1]) for f, p in zip(facts, pieces)])
        restore = np.zeros((3, len(facts), full), bool)
        restore[1, :, length - 1] = True
        restore[2, np.arange(len(facts)), subject] = True
        for name, run in (("clean", clean), ("corrupt", corrupt)):
            z, _ = backend.patched_logits(run, run, "resid", range(layers, layers + 1),
                                          restore[:1], n)
            out[what, name] = log2p_each(z[0], pieces)
        for kind in kinds:
            for r in range(layers + 1 if kind == "resid" else layers):
                z, _ = backend.patched_logits(corrupt, clean, kind,
                                              restored_blocks(kind, r, window, layers), restore, n)
                out[what, kind, r] = log2p_each(z, pieces)
    out["subject"] = subject
    return out


def run_patch_suite(backend: Backend, facts: list, window: int = 1,
                    kinds: tuple[str, ...] = KINDS, batch: int | None = None) -> PatchSuiteResult:
    """Every fact with its control prompt as the corruption (its control answer as the corrupt
    answer), restored at the prompt's last position and at the subject (the first token
    where the two prompts differ), per kind and layer; facts of one shape batched."""
    if not isinstance(backend, PatchingBackend):
        raise LensError("patching needs the whole model in one process")
    PatchOptions("x", "x", "x", window=window, kinds=kinds)  # the settings' checks
    usable, skipped = _usable(encode_facts(facts, backend.tokenizer, backend.info.n_ctx))
    if not usable:
        raise LensError(f"no fact can be patched ({len(skipped)} skipped: {skipped[0]})"
                        if skipped else "no facts")
    by_shape: dict = {}
    for f in usable:
        by_shape.setdefault((len(f.ids), len(f.answer_ids), len(f.control_answer_ids)),
                            []).append(f)
    frames, inverted = [], []
    for same in progress(list(by_shape.values()), "fact batches"):
        b = batch or max(1, batch_size(backend, len(same[0].ids) + 4) // 3)
        for first in range(0, len(same), b):
            chunk = same[first:first + b]
            got = _suite_batch(backend, chunk, kinds, window)
            clean = got["answer", "clean"] - got["corrupt_answer", "clean"]
            corrupt = got["answer", "corrupt"] - got["corrupt_answer", "corrupt"]
            gap = clean - corrupt  # recovery's denominator: NaN where there is none
            inverted += [f.fact.id for f, g in zip(chunk, gap) if g <= 0]
            for kind in kinds:
                for r in range(backend.info.n_layers + 1 if kind == "resid" else
                               backend.info.n_layers):
                    a, c = got["answer", kind, r], got["corrupt_answer", kind, r]
                    for v, where in ((1, "last"), (2, "subject")):
                        metric = a[v] - c[v]
                        frames.append(pd.DataFrame({
                            "fact_id": [f.fact.id for f in chunk],
                            "group": [f.fact.group for f in chunk],
                            "cluster": [f.fact.cluster_key for f in chunk], "kind": kind,
                            "layer": r,
                            "where": where,
                            "pos": [len(f.ids) - 1 for f in chunk] if v == 1 else got["subject"],
                            "answer_log2p": a[v], "corrupt_answer_log2p": c[v], "metric": metric,
                            "recovery": np.divide(metric - corrupt, gap, where=gap != 0,
                                                  out=np.full(len(chunk), np.nan)),
                            "batch_baseline_delta": np.abs(a[0] - got["answer", "corrupt"]),
                            "clean_metric": clean, "corrupt_metric": corrupt}))
    long = pd.concat(frames, ignore_index=True)
    clusters = fact_clusters(long)  # the cubes' fact order: sorted ids
    rows = []
    for (kind, where), part in long.groupby(["kind", "where"], sort=False):
        # A fact whose gap is not positive has no recovery to read (the clean prompt does not
        # favour its answer more than the corrupted one): left out of every aggregate, named
        # apart in the summary.
        gap = part["clean_metric"] - part["corrupt_metric"]

        def cube(values: pd.Series) -> np.ndarray:  # [facts, layers], NaN where left out
            return part.assign(v=values.where(gap > 0)).pivot(
                index="fact_id", columns="layer", values="v").to_numpy(dtype=float)

        keys = clusters.to_numpy()
        pooled = pooled_ratio(cube(part["metric"] - part["corrupt_metric"]), cube(gap),
                              clusters=keys)
        layers = np.sort(part["layer"].unique())
        rows.append(pd.DataFrame({"kind": kind, "where": where, "layer": layers,
                                  **summarise(cube(part["recovery"]), clusters=keys), **pooled,
                                  "ci_unit": ci_unit(clusters)}))
    aggregates = pd.concat(rows, ignore_index=True)
    summary = {"model": backend.info.name, "backend": backend.info.backend, "window": window,
               "window_rule": WINDOW_RULE,
               "kinds": list(kinds), "facts": len(facts), "patched": len(usable),
               "skipped": skipped,
               # the clean prompt does not favour its answer more than the corrupted one: these
               # facts' recoveries would read the wrong way round, and are left out of the
               # aggregates (n, mean, median and the pooled recovery)
               "gap_not_positive": inverted,
               "aggregated": len(usable) - len(inverted),
               "metric": "log2 p(answer) - log2 p(control answer), both teacher-forced",
               "corruption": "each fact's control prompt"}
    return PatchSuiteResult(long, aggregates, skipped, summary)
