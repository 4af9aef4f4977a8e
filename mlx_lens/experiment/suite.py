"""A fact suite through one model: batched next-token sweeps -> the long, per-fact and
per-layer tables (columns: mlx_lens/experiment/aggregates.py, docs/artifacts.md "Fact suites").

Every fact's prompt, and its control prompt, is one item of a batch; items are sorted by length
(less padding) and swept B at a time, B chosen from the memory the forward pass of the longest
prompt needs, so that memory stays O(B) and never holds [facts, L+1, T, V].
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mlx_lens.experiment import aggregates
from mlx_lens.experiment import health
from mlx_lens.experiment import lenses as side_by_side
from mlx_lens.experiment.frames import TokenNames, rank_column
from mlx_lens.core.contract import Backend, ComparingBackend, LayerStats, LensSweep, require
from mlx_lens.core.lens import FINAL_NORM, Lens
from mlx_lens.loading.placement import available_ram
from mlx_lens.experiment.facts import EncodedFact, Fact, encode_facts
from mlx_lens.experiment.milestones import (DECIDED_BY_BOUND, UNDECIDED, AnswerRows,
                                            MilestoneSettings,
                                            answer_milestones, copy_flags, copy_milestones)
from mlx_lens.experiment.metrics import CollapseSettings, layer_summary, next_token_flags
from mlx_lens.core.progress import progress

MAX_BATCH = 64  # beyond this a CPU's GEMMs are as efficient as they get; GPUs gain little more
NEXT_TOKEN_K = 2  # top-1 and top-2 (the copy-collapse margin) are all the tables need


@dataclass
class SuiteResult:
    long: pd.DataFrame  # one row per (fact, layer)
    per_fact: pd.DataFrame  # one row per fact
    aggregates: pd.DataFrame  # per group, layer and metric
    # fact id -> {"fact" / "control": {"nonfinite_residual_layers": [...], ...}}, for the facts
    # with a numeric-health finding: a non-finite row (blanked: empty cells, left out of the
    # aggregates' n) or a KL below minus its bound (kept)
    numeric_health: dict = field(default_factory=dict)
    # with several lenses: the three tables per (lens, site) (the middle of each block:
    # site "mid", layer i the middle of block i), each with lens and site columns
    lens_long: pd.DataFrame | None = None
    lens_per_fact: pd.DataFrame | None = None
    lens_aggregates: pd.DataFrame | None = None

    def plot(self) -> dict:
        """matplotlib Figures: per layer the mean and 95% band of p(answer) under the fact's
        prompt and under its control prompt, their paired gain, and the entropy, per group
        (mlx_lens/view/suite.py)."""
        from mlx_lens.view.suite import suite_bands  # matplotlib is imported only to draw

        return {"suite": suite_bands(self.aggregates)}

    def health_warning(self) -> str | None:
        """One line for the console, or None when no fact had a numeric-health finding."""
        if not self.numeric_health:
            return None
        shown = "; ".join(
            f"{fact_id} (" + ", ".join(f"{part} {health.brief(report)}"
                                       for part, report in parts.items()) + ")"
            for fact_id, parts in list(self.numeric_health.items())[:3])
        more = len(self.numeric_health) - 3
        blanked = any(report["nonfinite_residual_layers"] or report["nonfinite_lens_layers"]
                      for parts in self.numeric_health.values() for report in parts.values())
        return (f"numeric-health findings in {len(self.numeric_health)} facts of the suite: "
                f"{shown}{f'; {more} more' if more > 0 else ''}"
                + ("; non-finite rows are empty cells" if blanked else ""))

    def summary_line(self) -> str:
        f = self.per_fact
        semantic = f["L_semantic"].dropna()
        controls = f["first_control_margin_positive"].notna().sum()
        confirmed = f["L_answer_confirmed"].dropna()
        return (f"suite: {len(f)} facts, final top-1 correct for {int(f['correct'].sum())}; "
                f"L_semantic median {semantic.median() if len(semantic) else 'n/a'} "
                f"({len(semantic)} facts reach it); whole answer confirmed for {len(confirmed)} "
                f"(median layer {confirmed.median() if len(confirmed) else 'n/a'}), undecided for "
                f"{int(f['L_answer_confirmed_undecided'].sum())}; control margin turns positive "
                f"for {controls}")


def batch_size(backend: Backend, longest: int, free_bytes: int | None = None) -> int:
    """Prompts per forward pass: a sixteenth of free memory over what one prompt's forward pass
    holds at once (a block's activations, ~16 d per token in fp32, and its attention scores),
    between 1 and MAX_BATCH."""
    info = backend.info
    per_prompt = 4 * longest * (16 * info.d_model + (info.n_heads or 0) * longest)
    free = available_ram() if free_bytes is None else free_bytes
    return int(max(1, min(MAX_BATCH, free // 16 // per_prompt)))


def _sweep(backend: Backend, items: list[tuple[list[int], tuple[tuple[int, ...], ...]]],
           lens: Lens, batch: int | None, compared: tuple[Lens, ...] = (),
           mid: bool = True) -> list[LayerStats] | list[LensSweep]:
    """LayerStats (T = 1) of every (ids, scored) item, in the items' order: scored holds, for
    each of the item's last positions, the ids scored there; with `compared` lenses, a
    LensSweep of each. A batch holds items of one shape (as many positions, as many ids at
    each: a fact's answer pieces, a control's two ids), in order of length."""
    if compared:
        comparing = require(backend, ComparingBackend, "--lenses")

        def call(prompts, scored):
            return comparing.sweep_next_token_lenses(prompts, scored, compared, mid, NEXT_TOKEN_K,
                                                     pairs=False)  # the tables use no pairs
    else:
        def call(prompts, scored):
            return backend.sweep_next_token(prompts, scored, lens, NEXT_TOKEN_K)

    def shape(i: int) -> tuple[int, int]:
        return len(items[i][1]), len(items[i][1][0])

    b = batch or batch_size(backend, max(len(ids) for ids, _ in items))
    by_shape: dict[tuple[int, int], list[int]] = {}  # a batch may not mix shapes
    for i in sorted(range(len(items)), key=lambda i: (shape(i), len(items[i][0]))):
        by_shape.setdefault(shape(i), []).append(i)
    batches = [same[first:first + b] for same in by_shape.values()
               for first in range(0, len(same), b)]
    out: list = [None] * len(items)
    for chunk in progress(batches, "fact batches"):
        stats = call([items[i][0] for i in chunk], [items[i][1] for i in chunk])
        for i, s in zip(chunk, stats):
            out[i] = s
    return out


def _milestone_columns(milestones: dict) -> dict:
    """A per-fact row's milestones: a layer (Int64, NA when never reached or undecided) and,
    for the decided-or-not ones, a `<name>_undecided` flag."""
    out = {}
    for key, value in milestones.items():
        out[key] = None if value == UNDECIDED else value
        if key in DECIDED_BY_BOUND:
            out[f"{key}_undecided"] = value == UNDECIDED
    return out


def _fact_rows(fact: EncodedFact, stats: LayerStats, control: LayerStats | None,
               names: TokenNames, collapse: CollapseSettings, settings: MilestoneSettings,
               info, w_max: float) -> tuple[dict, dict, dict]:
    """The fact's per-fact row, its columns of the long table (plain arrays: one DataFrame is
    made for all facts at the end) and the numeric-health findings of the fact and its
    control."""
    stats, report = health.checked(stats)
    found = {"fact": report} if any(report.values()) else {}
    flags = next_token_flags(stats, fact.ids, fact.answer_id, collapse)
    answer = AnswerRows.of(stats, info, w_max)
    copies = copy_flags(stats, fact.ids, names, settings)
    top1 = stats.topk_ids[:, 0, 0]
    n = len(top1)
    p_control, control_log2p = np.full((2, n), np.nan), np.full(n, np.nan)
    if control is not None:
        control, report = health.checked(control)
        p_control = control.p_scored.T
        control_log2p = control.piece_log2p.sum(-1)  # its own answer, whole
        found |= {"control": report} if any(report.values()) else {}
    layers = {
        "fact_id": [fact.fact.id] * n, "group": [fact.fact.group] * n,
        "cluster": [fact.fact.cluster_key] * n, "layer": np.arange(n),
        "entropy": stats.entropy[:, 0], "top1": [names(i) if i >= 0 else "" for i in top1],
        "top1_id": top1, "p1": stats.topk_probs[:, 0, 0], "p_answer": stats.p_answer,
        "answer_rank": stats.answer_rank, "kl_to_final_bits": stats.kl_to_final,
        "cos_to_final": stats.cos_to_final, **flags,
        "control_p": p_control[0], "control_p_answer": p_control[1],
        "control_margin": p_control[0] - p_control[1],
        # how much the fact's own prompt raises its answer over the control prompt (paired)
        "p_answer_gain": stats.p_answer - p_control[1],
        **answer.columns(), "control_log2p": control_log2p, **copies}
    final = int(top1[-1])
    summary = layer_summary(stats, flags)
    per_fact = {"fact_id": fact.fact.id, "group": fact.fact.group,
                "cluster": fact.fact.cluster_key, "prompt": fact.fact.prompt,
                "answer": fact.fact.answer, "answer_token": names(fact.answer_id),
                "answer_pieces": len(fact.answer_ids), **summary,
                **_milestone_columns(answer_milestones(answer, summary["L_semantic"], settings)),
                **copy_milestones(stats, fact.ids, copies),
                "final_top1": names(final) if final >= 0 else "",
                "final_p1": float(stats.topk_probs[-1, 0, 0]),
                "correct": final == fact.answer_id,
                # where they do, the first-piece margin (both on the control prompt) cannot
                # tell the two answers apart
                "control_shares_first_piece": (fact.control_answer_id == fact.answer_in_control_id
                                               if fact.control_answer_ids else None)}
    return per_fact, layers, found


def _items(encoded: list[EncodedFact]) -> tuple[list, dict[int, int]]:
    """The sweep's items: each fact's prompt with its answer teacher-forced, one position per
    piece; each control's likewise with its own answer, its first position also scoring the
    fact's answer (its other positions repeat their own piece: one shape per batch); and the
    item of each fact's control."""
    items = [([*f.ids, *f.answer_ids[:-1]], tuple((a,) for a in f.answer_ids)) for f in encoded]
    controls = {}
    for i, f in enumerate(encoded):
        if f.control_ids is None:
            continue
        controls[i] = len(items)
        own = f.control_answer_ids
        scored = ((own[0], f.answer_in_control_id),) + tuple((c, c) for c in own[1:])
        items.append(([*f.control_ids, *own[:-1]], scored))
    return items, controls


def _tables(rows: list[tuple[dict, dict, dict]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The long and per-fact tables of _fact_rows' results."""
    long = pd.DataFrame({key: np.concatenate([layers[key] for _, layers, _ in rows])
                         for key in rows[0][1]})
    long["answer_rank"] = rank_column(long["answer_rank"].to_numpy(), long.index)
    per_fact = pd.DataFrame([fact for fact, _, _ in rows])
    for column in per_fact.columns:
        if column.startswith(("L_", "first_", "delta_")) and not column.endswith(
                ("_bits", "_undecided")):
            per_fact[column] = per_fact[column].astype("Int64")
    return long, aggregates.add_control_columns(per_fact, long)


def run_suite(backend: Backend, facts: list[Fact], lens: Lens = FINAL_NORM,
              collapse: CollapseSettings | None = None, batch: int | None = None,
              milestones: MilestoneSettings | None = None, compared: tuple[Lens, ...] = (),
              mid: bool = True) -> SuiteResult:
    """Every fact (and its control) through the lens at the next-token position and at its
    answer's teacher-forced positions; with `compared` lenses (the primary first), each of
    them too, and with mid the middle of each block, from the same forward passes."""
    collapse, milestones = collapse or CollapseSettings(), milestones or MilestoneSettings()
    encoded = encode_facts(facts, backend.tokenizer, backend.info.n_ctx)
    items, controls = _items(encoded)
    swept = _sweep(backend, items, lens, batch, compared, mid)
    stats = [s.stats[lens.name, "resid"] for s in swept] if compared else swept
    names = TokenNames(backend.tokenizer.decode)
    w_max = float(backend.head_row_norms().max())

    def fact_rows(of: list[LayerStats]) -> list[tuple[dict, dict, dict]]:
        return [_fact_rows(f, of[i], of[controls[i]] if i in controls else None, names,
                           collapse, milestones, backend.info, w_max)
                for i, f in enumerate(encoded)]

    rows = fact_rows(stats)
    long, per_fact = _tables(rows)
    unhealthy = {f.fact.id: found for f, (_, _, found) in zip(encoded, rows) if found}
    result = SuiteResult(long, per_fact, aggregates.layer_aggregates(long), unhealthy)
    if compared:
        _add_lens_tables(result, swept, encoded, fact_rows, backend, w_max, milestones,
                         lens.name)
    return result


def _add_lens_tables(result: SuiteResult, swept: list[LensSweep], encoded: list[EncodedFact],
                     fact_rows, backend: Backend, w_max: float, settings: MilestoneSettings,
                     primary: str) -> None:
    """The suite's tables per (lens, site) and, per fact, the cross-lens findings."""
    longs, facts, aggs = [], [], []
    for key in swept[0].stats:
        lens, site = key
        long, per_fact = _tables(fact_rows([s.stats[key] for s in swept]))
        if site == "mid":  # the middle rows end with the model's output row
            long = long[long["layer"] < long["layer"].max()].reset_index(drop=True)
        tag = {"lens": lens, "site": site}
        longs.append(long.assign(**tag, depth=long["layer"] + 0.5 * (site == "mid")))
        facts.append(per_fact.assign(**tag))
        aggs.append(aggregates.layer_aggregates(long).assign(**tag))
    found = [side_by_side.findings(swept[i], backend.info, w_max, settings, primary)
             for i in range(len(encoded))]
    lens_facts = pd.concat(facts, ignore_index=True)
    primary_rows = (lens_facts["lens"] == primary) & (lens_facts["site"] == "resid")
    onset = [f["lens_agreement_onset"] for f in found]
    lens_facts.loc[primary_rows, "lens_agreement_onset"] = pd.array(
        [o if isinstance(o, int) else None for o in onset], "Int64")
    lens_facts.loc[primary_rows, "lens_agreement_onset_undecided"] = [o == UNDECIDED for o in onset]
    if "norm_flip_layers" in found[0]:
        for lens in found[0]["norm_flip_layers"]:
            rows = (lens_facts["lens"] == lens) & (lens_facts["site"] == "resid")
            lens_facts.loc[rows, "norm_flip_layers"] = [
                " ".join(map(str, f["norm_flip_layers"][lens])) for f in found]
    result.lens_long = pd.concat(longs, ignore_index=True)
    result.lens_per_fact = lens_facts
    result.lens_aggregates = pd.concat(aggs, ignore_index=True)
