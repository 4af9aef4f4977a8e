"""Does a finding survive a change of lens? Several lenses side by side, and the middle of each
block, from one LensSweep (mlx_lens/core/contract.py): its tables and the findings a run
reports.

Rows are addressed by site and layer: "resid" row r is the residual after block r - 1 (depth r),
"mid" layer i the middle of block i, after its attention sub-block (depth i + 0.5). A lens
"reads the answer" at a row where every piece of the whole answer is its top-1, decided by the
decode's derived bound (mlx_lens/experiment/milestones.py): certainly, certainly not, or
undecided. From these, per run:

- norm-flip layers: rows where a normed lens certainly reads the answer and `raw` certainly
  does not: the norm flips the top-1 to the answer. A positive scale keeps every top-1, so under
  RMSNorm (x / rms(x) * gamma) what flips it is the gain gamma alone; under LayerNorm also the
  centring and the bias;
- the lens-agreement onset: the first row where the primary lens reads the answer and at least
  one other lens reads it within +-ONSET_WINDOW rows, scanning all rows; UNDECIDED where an
  undecided row could change it. The lenses decode the same residual through the same head, so
  their agreement is no independent evidence, only that the onset does not hang on the norm
  rule. The other lens must read it before the last row: there every lens decodes the model's
  output through the final norm, the same distribution by construction;
- mid-block findings: per lens, the first block whose middle reads the answer, against the
  first block output that does, and the blocks whose middle reads it while their output does
  not.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from mlx_lens.core.contract import LayerStats, LensSweep, ModelInfo
from mlx_lens.experiment.frames import TokenNames
from mlx_lens.experiment.metrics import first_row
from mlx_lens.experiment.milestones import (UNDECIDED, AnswerRows, MilestoneSettings,
                                            answer_milestones, first_decided, layer_or_never)

ONSET_WINDOW = 2  # rows either side where another lens must agree
OVERLAPS = (10, 50)  # top-k Jaccard overlaps between two lenses
CELL_K = 5  # top tokens per grid cell in the report
MID_FORMS = {"sequential": "the residual after the block's attention sub-block, as its MLP's "
                           "norm reads it (Gemma: after the post-attention norm)",
             "parallel": "a parallel-residual block (attention and MLP both read the block's "
                         "input): the block's input plus its attention's output",
             "mixed": "per block as the block computes it: the MLP's input for a sequential "
                      "block, input plus attention output for a parallel one"}


def _layers(stats: LayerStats, site: str) -> int:
    """Rows a site reports: the middle rows leave out the model's output row at their end."""
    return len(stats.entropy) - (site == "mid")


def _depth(site: str, layers: np.ndarray) -> np.ndarray:
    return layers + (0.5 if site == "mid" else 0.0)


def lens_frame(sweep: LensSweep, info: ModelInfo, names: TokenNames,
               w_max: float) -> pd.DataFrame:
    """One row per (lens, site, layer) at the next-token position: entropy, top-1, the first
    piece's rank and probability, the whole answer's log2 p, whether it is the top-1 (and how
    sure: its weakest lead and that lead's bound), KL to the model's output."""
    frames = []
    for (lens, site), stats in sweep.stats.items():
        n = _layers(stats, site)
        answer = AnswerRows.of(stats, info, w_max)
        holds, fails = answer.states()
        top1 = stats.topk_ids[:n, -1, 0]
        frames.append(pd.DataFrame({
            "lens": lens, "site": site, "layer": np.arange(n),
            "depth": _depth(site, np.arange(n)),
            "entropy_bits": stats.entropy[:n, -1], "top1_id": top1,
            "top1": [names(int(i)) if i >= 0 else "" for i in top1],
            "p1": stats.topk_probs[:n, -1, 0], "answer_rank": stats.answer_rank[:n],
            "p_answer": stats.p_answer[:n],
            **{k: v[:n] for k, v in answer.columns().items()},
            "answer_lead_bound_bits": answer.bound.max(-1)[:n],
            "answer_top1_decided": (holds | fails)[:n],
            "kl_to_final_bits": stats.kl_to_final[:n], "kl_bound_bits": stats.kl_bound[:n]}))
    return pd.concat(frames, ignore_index=True)


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[R]: |A & B| / |A | B| of two rows' id sets [R, k] (ids < 0, a vocabulary smaller than k,
    left out)."""
    out = np.empty(len(a))
    for r, (x, y) in enumerate(zip(a, b)):
        x, y = set(x[x >= 0].tolist()), set(y[y >= 0].tolist())
        out[r] = len(x & y) / len(x | y)
    return out


def pair_frame(sweep: LensSweep) -> pd.DataFrame:
    """One row per (site, layer, pair of lenses): KL both ways and Jensen-Shannon (bits), top-1
    agreement and the top-10 / top-50 Jaccard overlaps, at the next-token position."""
    frames = []
    for site, pairs in sweep.pairs.items():
        readers = [lens for lens in sweep.lenses if (lens, site) in sweep.stats]
        n = pairs.kl.shape[-1] - (site == "mid")
        for a in range(len(readers)):
            for b in range(a + 1, len(readers)):
                ia, ib = pairs.top_ids[a, :n], pairs.top_ids[b, :n]
                frames.append(pd.DataFrame({
                    "site": site, "layer": np.arange(n), "depth": _depth(site, np.arange(n)),
                    "lens_a": readers[a], "lens_b": readers[b],
                    "kl_ab_bits": pairs.kl[a, b, :n], "kl_ba_bits": pairs.kl[b, a, :n],
                    "js_bits": pairs.js[a, b, :n], "top1_agree": ia[:, 0] == ib[:, 0],
                    **{f"jaccard_top{k}": jaccard(ia[:, :k], ib[:, :k]) for k in OVERLAPS}}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def cells_frame(sweep: LensSweep, names: TokenNames, prompt_tokens: list[str]) -> pd.DataFrame:
    """The report's grid: per (lens, site, layer, position) the top CELL_K tokens with their
    probabilities."""
    frames = []
    for (lens, site), stats in sweep.stats.items():
        n, t = _layers(stats, site), stats.topk_ids.shape[1]
        k = min(CELL_K, stats.topk_ids.shape[-1])
        layer, pos, rank = np.meshgrid(np.arange(n), np.arange(t), np.arange(k), indexing="ij")
        ids = stats.topk_ids[:n, :, :k].reshape(-1)
        frames.append(pd.DataFrame({
            "lens": lens, "site": site, "layer": layer.reshape(-1), "pos": pos.reshape(-1),
            "input_token": [prompt_tokens[p] for p in pos.reshape(-1)], "rank": rank.reshape(-1) + 1,
            "token": [names(int(i)) if i >= 0 else "" for i in ids], "token_id": ids,
            "p": stats.topk_probs[:n, :, :k].reshape(-1)}))
    cells = pd.concat(frames, ignore_index=True)
    return cells[cells["token_id"] >= 0].reset_index(drop=True)  # narrow positions' padding


def _listed(mask: np.ndarray) -> list[int]:
    return [int(r) for r in np.flatnonzero(mask)]


def lens_agreement_onset(primary: AnswerRows, others: list[AnswerRows],
                        window: int = ONSET_WINDOW):
    """The first row where the primary lens reads the answer and some other lens reads it
    within +-window rows (a row, UNDECIDED, or None). Another lens's last row is the model's
    output, the primary's own distribution there by construction: it confirms nothing."""
    holds, fails = primary.states()
    n = len(holds)
    near_holds, near_fails = np.zeros(n, bool), np.ones(n, bool)
    for other in others:
        o_holds, o_fails = other.states()
        o_holds, o_fails = o_holds.copy(), o_fails.copy()
        o_holds[-1], o_fails[-1] = False, True
        for r in range(n):
            near = slice(max(0, r - window), r + window + 1)
            near_holds[r] |= o_holds[near].any()
            near_fails[r] &= o_fails[near].all()
    yes, no = holds & near_holds, fails | near_fails
    return first_decided(yes, ~yes & ~no)


def _mid_findings(mid: AnswerRows, resid: AnswerRows) -> dict:
    """Where the middle of a block reads the answer, against the blocks' outputs."""
    n = len(mid.lead) - 1  # blocks: mid rows 0..L-1, then the output row
    mid = mid.first(n)
    m_holds, m_fails = mid.states()
    r_holds, r_fails = resid.states()
    m_onset, r_onset = mid.onset(0.0, 1), resid.onset(0.0, 1)
    # block i's middle reads it, its output (row i + 1) does not
    only_mid = m_holds & r_fails[1:n + 1]
    undecided = ~only_mid & ~m_fails & ~r_holds[1:n + 1]
    if m_onset is None:  # no middle reads it
        earlier = False
    elif m_onset == UNDECIDED or r_onset == UNDECIDED:
        earlier = None
    else:  # the middle of block i reads it before any block output does: i + 0.5 < r
        earlier = r_onset is None or m_onset + 1 <= r_onset
    return {"first_mid_block": m_onset,
            "first_block_output": r_onset,
            "mid_block_first": earlier,
            "mid_only_blocks": _listed(only_mid), "mid_only_undecided_blocks": _listed(undecided)}


def findings(sweep: LensSweep, info: ModelInfo, w_max: float, settings: MilestoneSettings,
             primary: str) -> dict:
    """The JSON's `lenses` section: each lens's milestones at each site, norm-flip layers, the
    lens-agreement onset and the mid-block findings."""
    rows = {key: AnswerRows.of(stats, info, w_max) for key, stats in sweep.stats.items()}
    milestones = {}
    for (lens, site), stats in sweep.stats.items():
        n = _layers(stats, site)  # a middle's milestone is a block's middle, never the output row
        l_semantic = first_row(stats.answer_rank[:n] == 1)
        milestones.setdefault(lens, {})[site] = {
            "L_semantic": l_semantic,
            **answer_milestones(rows[lens, site].first(n), l_semantic, settings)}
    out: dict = {"lenses": list(sweep.lenses), "primary": primary, "n_layers": info.n_layers,
                 "mid_rows": sweep.mid, "mid_rows_are": MID_FORMS.get(sweep.mid),
                 "not_read_mid_block": [lens for lens in sweep.lenses
                                        if sweep.mid and (lens, "mid") not in sweep.stats],
                 "milestones": milestones, "onset_window": ONSET_WINDOW}
    others = [rows[lens, "resid"] for lens in sweep.lenses if lens != primary]
    out["lens_agreement_onset"] = (lens_agreement_onset(rows[primary, "resid"], others)
                                  if others else None)
    if "raw" in sweep.lenses:
        r_holds, r_fails = rows["raw", "resid"].states()
        out["norm_flip_layers"], out["norm_flip_undecided_layers"] = {}, {}
        for lens in sweep.lenses:
            if lens == "raw":
                continue
            holds, fails = rows[lens, "resid"].states()
            only = holds & r_fails
            out["norm_flip_layers"][lens] = _listed(only)
            out["norm_flip_undecided_layers"][lens] = _listed(~only & ~fails & ~r_holds)
    if sweep.mid:
        out["mid_block"] = {lens: _mid_findings(rows[lens, "mid"], rows[lens, "resid"])
                            for lens in sweep.lenses if (lens, "mid") in rows}
    return out


def summary_line(section: dict) -> str:
    """One console line: each lens's onset, the lens-agreement one, norm-flip layers."""
    onsets = ", ".join(f"{lens} {layer_or_never(m['resid']['L_answer_top1'])}"
                       for lens, m in section["milestones"].items())
    if section.get("n_layers") in [m["resid"]["L_answer_top1"]
                                   for m in section["milestones"].values()]:
        onsets += f" (layer {section['n_layers']}: the model's output, the same under every lens)"
    line = (f"lenses: whole answer top-1 from layer: {onsets}; lens-agreement onset (primary "
            f"{section['primary']} and another lens within +-{section['onset_window']}; the "
            f"lenses share the residual and the head: agreement, not independent evidence) "
            f"{layer_or_never(section['lens_agreement_onset'])}")
    if "norm_flip_layers" in section:
        only = sorted({r for layers in section["norm_flip_layers"].values() for r in layers})
        line += (f"; norm-flip layers (a normed lens reads the answer, raw does not; under "
                 f"RMSNorm only the gain gamma can flip a top-1) {only or 'none'}")
    if "mid_block" in section:
        first = {lens: f["first_mid_block"] for lens, f in section["mid_block"].items()}
        line += "; first mid-block read " + ", ".join(f"{k} {layer_or_never(v)}"
                                                      for k, v in first.items())
    if section.get("omitted"):
        line += "; not read: " + "; ".join(section["omitted"].values())
    return line
