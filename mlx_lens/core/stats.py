"""A backend's running reductions -> LayerStats: the one layout both reducers
(mlx_lens/mlx/reduce.py, torch_ref/reduce.py) hand over, in numpy.

The reducers work on groups of rows (one group per position of a prompt, or per prompt of a
batch); a scored group's rows are compared with its last row (the model's output) and report
the scored tokens."""
from __future__ import annotations

from mlx_lens.core.contract import LayerStats


def prompt_stats(out: dict) -> LayerStats:
    """One prompt from groups = positions: entropy, topk_ids, topk_probs [T, R, ...]; the
    next-token group scored: kl_to_final, cos_to_final [1, R], and where an answer is scored
    p_scored, rank_scored [1, R, 1]."""
    out = dict(out)
    for key in ("entropy", "topk_ids", "topk_probs"):  # to [R, T, ...]
        out[key] = out[key].swapaxes(0, 1)
    for key in ("kl_to_final", "kl_bound", "cos_to_final"):
        out[key] = out[key][0]
    if "p_scored" in out:
        out["p_answer"], out["answer_rank"] = out["p_scored"][0, :, 0], out["rank_scored"][0, :, 0]
        del out["p_scored"]
    return LayerStats.from_arrays(out)


def batch_stats(out: dict) -> list[LayerStats]:
    """One LayerStats (T = 1) per prompt from groups = prompts, every group scored: entropy
    [B, R], topk_ids, topk_probs [B, R, K], kl_to_final, cos_to_final [B, R], p_scored,
    rank_scored [B, R, A] (the answer first)."""
    return [LayerStats.from_arrays({
        "entropy": out["entropy"][b][:, None], "topk_ids": out["topk_ids"][b][:, None],
        "topk_probs": out["topk_probs"][b][:, None], "kl_to_final": out["kl_to_final"][b],
        "cos_to_final": out["cos_to_final"][b], "kl_bound": out["kl_bound"][b],
        "p_answer": out["p_scored"][b, :, 0],
        "answer_rank": out["rank_scored"][b, :, 0], "p_scored": out["p_scored"][b],
        "summation_depth": out["summation_depth"]}) for b in range(len(out["entropy"]))]
