"""Collapse rules and L_* summaries on hand-made distributions."""
import numpy as np

from mlx_lens.core.contract import LayerStats
from mlx_lens.experiment.metrics import CollapseSettings, layer_summary, next_token_flags

PROMPT_IDS = [1, 7, 9]
ANSWER = 42


def stats_for(rows):
    """rows: (top-1 id, p1, p2, entropy bits) at the last position, one per layer."""
    n = len(rows)
    ids = np.zeros((n, 2, 2), np.int64)
    probs = np.zeros((n, 2, 2))
    entropy = np.full((n, 2), 5.0)
    for r, (top1, p1, p2, h) in enumerate(rows):
        ids[r, -1] = [top1, 3]
        probs[r, -1] = [p1, p2]
        entropy[r, -1] = h
    return LayerStats(entropy=entropy, topk_ids=ids, topk_probs=probs,
                      kl_to_final=np.linspace(3.0, 0.0, n), cos_to_final=np.ones(n),
                      p_answer=np.zeros(n), answer_rank=np.array([50, 12, 6, 1, 1][:n]))


ROWS = [
    (5, 0.99, 0.001, 3.0),  # confident but not a prompt token: no copy
    (7, 0.91, 0.87, 3.0),  # prompt token, p1 > 0.9 but margin 0.04 < 0.05: no copy
    (9, 0.95, 0.01, 2.0),  # prompt token, confident, clear margin: copy collapse
    (ANSWER, 0.5, 0.2, 0.8),  # answer; entropy < 1 bit: entropy collapse (and copy fallback)
    (ANSWER, 0.6, 0.1, 1.0),  # entropy exactly 1 bit: entropy collapse, not copy fallback
]


def test_collapse_flags_follow_the_original_rules():
    flags = next_token_flags(stats_for(ROWS), PROMPT_IDS, ANSWER, CollapseSettings())
    assert flags["copy_collapse"].tolist() == [False, False, True, True, False]
    assert flags["entropy_collapse"].tolist() == [False, False, False, True, True]
    assert flags["is_answer"].tolist() == [False, False, False, True, True]


def test_thresholds_are_configurable():
    loose = CollapseSettings(copy_threshold=0.9, copy_margin=0.01)
    flags = next_token_flags(stats_for(ROWS), PROMPT_IDS, ANSWER, loose)
    assert flags["copy_collapse"].tolist()[:3] == [False, True, True]


def test_layer_summary():
    stats = stats_for(ROWS)
    s = layer_summary(stats, next_token_flags(stats, PROMPT_IDS, ANSWER, CollapseSettings()))
    assert (s["L_copy"], s["L_copy_H"], s["L_semantic"], s["delta_layers"]) == (2, 3, 3, 1)
    # kl 3, 2.25, 1.5, .75, 0
    assert s["first_kl_below_1.0"] == 3 and s["first_kl_below_0.5"] == 4
    # ranks 50, 12, 6, 1, 1
    assert (s["first_rank_le_1"], s["first_rank_le_5"], s["first_rank_le_10"]) == (3, 3, 2)


def test_missing_collapse_gives_none():
    stats = stats_for([(5, 0.3, 0.2, 4.0)] * 3)
    s = layer_summary(stats, next_token_flags(stats, PROMPT_IDS, ANSWER, CollapseSettings()))
    assert s["L_copy"] is None and s["L_semantic"] is None and s["delta_layers"] is None


def test_blanked_rows_meet_no_rule():
    """Rows 3 and 4 made non-finite and blanked (rank -1, NaN values, no top-1): no first row
    may land on them. Rows 0-2 have ranks 50, 12, 6: rank <= 10 first at row 2, never <= 5."""
    from mlx_lens.experiment.health import checked

    stats = stats_for(ROWS)
    stats.entropy[3:, -1] = np.nan
    blanked, report = checked(stats)
    assert report["nonfinite_lens_layers"] == [3, 4] and blanked.answer_rank[3:].tolist() == [-1, -1]
    s = layer_summary(blanked, next_token_flags(blanked, PROMPT_IDS, ANSWER, CollapseSettings()))
    assert (s["first_rank_le_1"], s["first_rank_le_5"], s["first_rank_le_10"]) == (None, None, 2)
    assert (s["L_copy"], s["L_copy_H"], s["L_semantic"]) == (2, None, None)
