"""A backend's running reductions -> LayerStats: the one layout both reducers
(mlx_lens/mlx/reduce.py, torch_ref/reduce.py) hand over, in numpy.

The reducers work on groups of rows (one group per position of a prompt, or per scored position
of a batch's prompts); a scored group's rows are compared with its last row (the model's output
at that position) and report the scored tokens. A prompt's scored positions are its last n: the
next-token position (the original's statistics) and, where a whole answer is scored, one per
teacher-forced piece."""
from __future__ import annotations

from typing import Callable, Sequence

from mlx_lens.core.contract import LayerStats, LensPairs, LensSweep
from mlx_lens.core.lens import Lens, Site

# The scored groups' arrays, [G, R, ...]
_SCORED = ("kl_to_final", "kl_bound", "cos_to_final", "x_norm", "p_scored", "rank_scored",
           "logp_scored", "lead_scored")


def last_positions(lengths: list[int], n: int) -> tuple[list[int], list[int]]:
    """(prompt, position) indices of each prompt's last n tokens, prompt-major: the rows a
    batch's capture keeps for its scored positions."""
    pairs = [(b, length - n + j) for b, length in enumerate(lengths) for j in range(n)]
    return [b for b, _ in pairs], [t for _, t in pairs]


def _pieces(scored: dict) -> dict:
    """The original's next-token fields from the first scored position, the pieces' from all:
    scored [n, R, ...] of one prompt."""
    out = {key: scored[key][0] for key in ("kl_to_final", "kl_bound", "cos_to_final")}
    if "p_scored" in scored:
        out |= {"p_answer": scored["p_scored"][0, :, 0],
                "answer_rank": scored["rank_scored"][0, :, 0],
                "p_scored": scored["p_scored"][0],
                "piece_log2p": scored["logp_scored"][..., 0].T,
                "piece_rank": scored["rank_scored"][..., 0].T,
                "piece_lead": scored["lead_scored"][..., 0].T,
                "piece_x_norm": scored["x_norm"].T}
    return out


def prompt_stats(out: dict, n_scored: int = 1) -> LayerStats:
    """One prompt from groups = positions: entropy, topk_ids, topk_probs [T', R, ...] over the
    prompt and its teacher-forced pieces, the last n_scored scored ([n_scored, R, ...]). The
    per-position statistics keep the prompt's positions only."""
    prompt = len(out["entropy"]) - n_scored + 1
    stats = {key: out[key][:prompt].swapaxes(0, 1) for key in ("entropy", "topk_ids",
                                                              "topk_probs")}
    stats |= _pieces({k: out[k] for k in _SCORED if k in out})
    if "p_scored" in out and out["p_scored"].shape[-1] == 1:
        del stats["p_scored"]  # only the answer: p_answer holds it
    return LayerStats.from_arrays({**stats, "summation_depth": out["summation_depth"]})


def batch_stats(out: dict, n_scored: int = 1) -> list[LayerStats]:
    """One LayerStats (T = 1) per prompt from groups = (prompt, scored position), every group
    scored, each prompt's n_scored positions consecutive: entropy [G, R], topk_ids, topk_probs
    [G, R, K], the scored arrays [G, R, ...] (the answer's piece first among the ids)."""
    result = []
    for first in range(0, len(out["entropy"]), n_scored):
        groups = slice(first, first + n_scored)
        stats = {key: out[key][first][:, None] for key in ("entropy", "topk_ids", "topk_probs")}
        stats |= _pieces({k: out[k][groups] for k in _SCORED if k in out})
        result.append(LayerStats.from_arrays({**stats,
                                              "summation_depth": out["summation_depth"]}))
    return result


def site_rows(rows: list, mids: list | None) -> dict[Site, list]:
    """The rows of each site a capture kept: the middle rows end with the model's output row."""
    return {"resid": rows} | ({"mid": [*mids, rows[-1]]} if mids is not None else {})


def lens_sweeps(sites: dict[Site, list], lenses: Sequence[Lens], n_prompts: int,
                mid_kind: str | None, decode: Callable, next_rows: Callable,
                pairs: Callable | None) -> list[LensSweep]:
    """Several lenses over one capture, per prompt: at each site (its captured rows), every lens
    that reads it decodes the rows (decode(rows, lens, site) -> a LayerStats per prompt: the
    backend's own single-lens sweep), and where two or more do, their decoded next-token rows
    (next_rows(rows, lens, site): [R, B, d] on the device) are compared
    (pairs([per lens]) -> LensPairs over rows (row, prompt)-major; None: not compared)."""
    per = [LensSweep(tuple(lens.name for lens in lenses), {}, {}, mid_kind)
           for _ in range(n_prompts)]
    for site, rows in sites.items():
        readers = [lens for lens in lenses if site == "resid" or lens.reads_mid]
        decoded = []
        for lens in readers:
            for sweep, stats in zip(per, decode(rows, lens, site)):
                sweep.stats[lens.name, site] = stats
            if pairs is not None:
                decoded.append(next_rows(rows, lens, site))
        if pairs is not None and len(readers) > 1:
            compared: LensPairs = pairs(decoded)
            for b, sweep in enumerate(per):
                sweep.pairs[site] = compared.of_prompt(b, n_prompts)
    return per
