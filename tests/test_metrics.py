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
                      p_answer=np.zeros(n), answer_rank=np.array([50, 12, 6, 1, 1, 1, 1][:n]))


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


def test_copy_milestones_on_a_worked_example():
    """Copies from row 1, worked by hand. Prompt ' The capital of Germany is' (ids 10-14);
    per row the top-1 and p1, p2:
      row 0: ' is' 0.99  - the embedding echoing the last token: embedding_echo, no copy
      row 1: ','   0.99  - punctuation: never a copy
      row 2: ' of' 0.40  - in the prompt; soft only (p1 > 0.33, not > 0.95)
      row 3: ' Germany' 0.97, p2 0.01 - strict; ' of Germany' contiguous: k2 too; k3 would
             take in row 1's ','
      row 4: ' The' 0.97, p2 0.90 - in the prompt, margin 0.07 < 0.10: soft only;
             ' of Germany The' is not contiguous in the prompt: no k2, k3
      row 5: ' capital' 0.97, p2 0.01 - strict k1; ' The capital' contiguous: k2 (strict);
             ' Germany The capital' not: no k3
    The original's L_copy (from row 0, entropy 3 bits everywhere) is 0: row 0's echo."""
    from mlx_lens.experiment.milestones import MilestoneSettings, copy_flags, copy_milestones

    names = {10: " The", 11: " capital", 12: " of", 13: " Germany", 14: " is", 20: ","}
    rows = [(14, 0.99, 0.001), (20, 0.99, 0.001), (12, 0.40, 0.30), (13, 0.97, 0.01),
            (10, 0.97, 0.90), (11, 0.97, 0.01)]
    prompt = [10, 11, 12, 13, 14]
    stats = stats_for([(t, p1, p2, 3.0) for t, p1, p2 in rows])
    flags = copy_flags(stats, prompt, names.get, MilestoneSettings())
    want = {"copy_strict_k1": [0, 0, 0, 1, 0, 1], "copy_strict_k2": [0, 0, 0, 1, 0, 1],
            "copy_strict_k3": [0, 0, 0, 0, 0, 0], "copy_soft_k1": [0, 0, 1, 1, 1, 1],
            "copy_soft_k2": [0, 0, 0, 1, 0, 1], "copy_soft_k3": [0, 0, 0, 0, 0, 0]}
    assert {k: v.astype(int).tolist() for k, v in flags.items()} == want
    m = copy_milestones(stats, prompt, flags)
    assert m["embedding_echo"] and m["embedding_echo_p"] == 0.99
    assert (m["L_copy_strict_k1"], m["L_copy_strict_k2"], m["L_copy_soft_k1"]) == (3, 3, 2)
    assert m["L_copy_strict_k3"] is None and m["L_copy_soft_k3"] is None
    s = layer_summary(stats, next_token_flags(stats, prompt, None, CollapseSettings()))
    assert s["L_copy"] == 0


def test_collapse_flags_at_their_thresholds():
    """The original's rules at their edges, by hand: p1 exactly 0.90 is not above 0.90; a
    margin 0.90 - 0.86 = 0.04 is not above 0.05; a token of the prompt anywhere (id 1, the
    first) counts; a margin 0.91 - 0.85 = 0.06 is above it; entropy 0.999 bits is a copy by
    the fallback whatever the top-1 (here the answer); entropy exactly 1.0 is an entropy
    collapse but no copy."""
    rows = [(9, 0.90, 0.0, 3.0), (9, 0.90, 0.86, 3.0), (1, 0.91, 0.5, 3.0), (9, 0.91, 0.85, 3.0),
            (ANSWER, 0.3, 0.2, 0.999), (5, 0.3, 0.2, 1.0)]
    flags = next_token_flags(stats_for(rows), PROMPT_IDS, ANSWER, CollapseSettings())
    assert flags["copy_collapse"].astype(int).tolist() == [0, 0, 1, 1, 1, 0]
    assert flags["entropy_collapse"].astype(int).tolist() == [0, 0, 0, 0, 1, 1]
    assert flags["is_answer"].astype(int).tolist() == [0, 0, 0, 0, 1, 0]
