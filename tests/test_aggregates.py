"""Fact-suite aggregates (bootstrap CIs, control layers) and the suite tables on disk."""
import numpy as np
import pandas as pd
import pytest

from mlx_lens.experiment.aggregates import (AGGREGATE_COLUMNS, METRICS, add_control_columns,
                                            control_summary, layer_aggregates)
from mlx_lens.output.suite_tables import read_suite_table, write_suite_tables

AWKWARD = ["nan", "", "NULL", "a,b", "line\nbreak", " Berlin", 'say "hi"', "cr\rlf", "Grüße", "NA"]
N_LAYERS = 5


def long_table(n_facts=40, seed=0, groups=("capitals", "elements")):
    """n_facts x N_LAYERS rows; every 4th fact has a control; fact 1's layer 2 is all NaN."""
    rng = np.random.default_rng(seed)
    fact = np.repeat(np.arange(n_facts), N_LAYERS)
    layer = np.tile(np.arange(N_LAYERS), n_facts)
    n = len(fact)
    has_control = fact % 4 == 0
    control_p = np.where(has_control, rng.uniform(0, 1, n), np.nan)
    control_p_answer = np.where(has_control, rng.uniform(0, 1, n), np.nan)
    rank = rng.integers(1, 5000, n)
    frame = pd.DataFrame({
        "fact_id": [f"fact-{i:03d}" for i in fact],
        "group": np.asarray(groups)[fact % len(groups)],
        "layer": layer,
        "entropy": rng.uniform(0, 15, n),
        "top1": np.asarray(AWKWARD)[rng.integers(0, len(AWKWARD), n)],
        "top1_id": pd.array(rng.integers(0, 50000, n), dtype="Int64"),
        "p1": rng.uniform(0, 1, n),
        "p_answer": rng.uniform(0, 1, n),
        "answer_rank": pd.array(rank, dtype="Int64"),
        "kl_to_final_bits": rng.exponential(2.0, n),
        "cos_to_final": rng.uniform(-1, 1, n),
        "copy_collapse": rng.random(n) < 0.3,
        "entropy_collapse": rng.random(n) < 0.3,
        "is_answer": rank == 1,
        "control_p": control_p,
        "control_p_answer": control_p_answer,
        "control_margin": control_p - control_p_answer,
        "p_answer_gain": np.nan,  # set below, from p_answer
        "answer_log2p": -rng.exponential(5.0, n),
        "control_log2p": np.where(has_control, -rng.exponential(5.0, n), np.nan),
    })
    frame["p_answer_gain"] = frame["p_answer"] - frame["control_p_answer"]
    broken = (fact == 1) & (layer == 2)
    numeric = ["entropy", "p1", "p_answer", "kl_to_final_bits", "cos_to_final", "answer_log2p",
               "p_answer_gain"]
    frame.loc[broken, numeric] = np.nan
    frame.loc[broken, ["answer_rank", "top1_id"]] = pd.NA
    return frame


def per_fact_table(long):
    facts = long.drop_duplicates("fact_id")[["fact_id", "group"]].reset_index(drop=True)
    n = len(facts)
    layers = pd.array(np.arange(n) % N_LAYERS, dtype="Int64")
    missing = pd.array(np.where(np.arange(n) % 3 == 0, None, np.arange(n) % N_LAYERS), dtype="Int64")
    token = np.asarray(AWKWARD)[np.arange(n) % len(AWKWARD)]
    columns = {"L_copy": missing, "L_copy_H": layers, "L_semantic": missing,
               "delta_layers": missing, "first_rank_le_1": missing, "first_rank_le_5": layers,
               "first_rank_le_10": layers, "first_kl_below_0.5": missing,
               "first_kl_below_1.0": layers}
    frame = facts.assign(prompt=[f"The {t} prompt, with a comma" for t in token],
                         answer=token, answer_token=token, **columns, final_top1=token[::-1],
                         final_p1=np.linspace(0, 1, n), correct=np.arange(n) % 2 == 0)
    return add_control_columns(frame, long)


def with_log10_rank(long):
    return long.assign(log10_rank=np.log10(long["answer_rank"].astype(float)))


def rows(aggregates, group, metric):
    return aggregates[(aggregates["group"] == group) & (aggregates["metric"] == metric)]


def test_means_and_medians_match_a_pandas_groupby():
    long = long_table()
    agg = layer_aggregates(long, n_boot=200)
    assert list(agg.columns) == AGGREGATE_COLUMNS
    ref = with_log10_rank(long)
    for group, part in [("all", ref), *ref.groupby("group")]:
        for metric in METRICS:
            want = part.groupby("layer")[metric].agg(["count", "mean", "median"])
            got = rows(agg, group, metric).set_index("layer")
            assert (got["n"] == want["count"]).all()
            np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-12)
            np.testing.assert_allclose(got["median"], want["median"], rtol=1e-12)


def test_nan_rows_and_facts_without_a_control_are_left_out():
    agg = layer_aggregates(long_table(), n_boot=200).set_index(["group", "metric", "layer"])
    assert agg.loc[("all", "entropy", 2), "n"] == 39  # fact 1's broken layer
    assert agg.loc[("all", "entropy", 3), "n"] == 40
    assert (agg.loc[("all", "control_p"), "n"] == 10).all()
    assert (agg.loc[("capitals", "control_margin"), "n"] == 10).all()  # facts 0, 4, ... are even
    assert (agg.loc[("elements", "control_margin"), "n"] == 0).all()
    assert agg.loc[("elements", "control_margin"), ["mean", "ci_low"]].isna().all().all()


def test_rows_sorted_by_group_all_first_then_metric_then_layer():
    agg = layer_aggregates(long_table(groups=("zeta", "alpha")), n_boot=50)
    assert list(pd.unique(agg["group"])) == ["all", "alpha", "zeta"]
    block = rows(agg, "all", METRICS[0])
    assert list(block["layer"]) == list(range(N_LAYERS))
    assert list(pd.unique(agg.loc[agg["group"] == "all", "metric"])) == sorted(METRICS)
    assert len(agg) == 3 * len(METRICS) * N_LAYERS


def test_ci_contains_the_mean_and_narrows_with_more_facts():
    small, large = (layer_aggregates(long_table(n, seed=n), n_boot=500).query("n > 0")
                    for n in (40, 400))
    for agg in (small, large):
        assert (agg["ci_low"] <= agg["mean"]).all() and (agg["mean"] <= agg["ci_high"]).all()
    width = [(a["ci_high"] - a["ci_low"]).to_numpy() for a in (small, large)]
    assert (width[1] < width[0]).all()
    # The mean of 10x as many facts: sqrt(10) narrower, up to what follows (derived). Per column
    # of n facts (n >= 10: the controls), the width ratio is sqrt(10) a (s_n / s_10n) (Q_n / Q_10n):
    # - a = sqrt(((n - 1) / n) / ((10n - 1) / 10n)) in [sqrt(.9 / .99), 1]: the bootstrap
    #   resamples the plug-in variance;
    # - s, a sample's standard deviation: var(log s) = (kurtosis - 1) / 4n, kurtosis <= 9 (the
    #   exponential metrics; the uniform ones 1.8);
    # - Q, a 2.5-97.5% percentile width of B = 500 resamples over its expectation: var(log Q)
    #   <= 2 p (1 - p) / (B (2 z phi(z))^2), p = 0.025, z = 1.96 (each sample quantile's
    #   variance, their covariance left out);
    # - the mean's excess kurtosis (kurtosis - 3) / n widens the percentile interval by at most
    #   (z^3 - 3z) (kurtosis - 3) / (24 n z) (Cornish-Fisher).
    # The median of K >= 45 independent columns (the "all" group's metric x layer; the other
    # groups' columns are its subsets) has a standard deviation 1.2533 sigma / sqrt(K) with the
    # worst column's sigma (n = 10); five of those either side: a false failure below 1e-6.
    p, z, n, kurtosis, boot = 0.025, 1.959964, 10, 9.0, 500
    phi = np.exp(-z * z / 2) / np.sqrt(2 * np.pi)
    sigma = np.sqrt((kurtosis - 1) / 4 * (1 / n + 1 / (10 * n))
                    + 2 * 2 * p * (1 - p) / (boot * (2 * z * phi) ** 2))
    slack = 5 * 1.2533 * sigma / np.sqrt(45)
    shape = (z**3 - 3 * z) * (kurtosis - 3) / (24 * n * z)
    low = np.sqrt(10) * np.sqrt(0.9 / 0.99) * np.exp(-slack - shape)
    high = np.sqrt(10) * np.exp(slack + shape)
    assert low < np.median(width[0] / width[1]) < high  # [1.9, 5.0]: neither n^0 (1) nor n^1 (10)


def test_a_constant_metric_has_a_point_ci():
    long = long_table().assign(p_answer=0.1)
    p = rows(layer_aggregates(long), "all", "p_answer")
    assert (p["ci_low"] == 0.1).all() and (p["ci_high"] == 0.1).all()
    assert (p["mean"] == 0.1).all() and (p["median"] == 0.1).all()


def test_same_seed_same_table_other_seed_other_ci():
    long = long_table()
    first = layer_aggregates(long, seed=7, n_boot=300)
    pd.testing.assert_frame_equal(first, layer_aggregates(long, seed=7, n_boot=300),
                                  check_exact=True)
    other = layer_aggregates(long, seed=8, n_boot=300)
    pd.testing.assert_frame_equal(first.drop(columns=["ci_low", "ci_high"]),
                                  other.drop(columns=["ci_low", "ci_high"]), check_exact=True)
    assert (first["ci_low"] != other["ci_low"]).mean() > 0.9


@pytest.mark.parametrize("groups", [("",), ("capitals",), ("capitals", "")])
def test_group_rows_only_with_more_than_one_group(groups):
    agg = layer_aggregates(long_table(groups=groups), n_boot=50)
    assert set(agg["group"]) == {"all"}
    assert (rows(agg, "all", "entropy")["n"] == [40, 40, 39, 40, 40]).all()


def test_a_group_named_all_is_refused():
    with pytest.raises(ValueError, match="all"):
        layer_aggregates(long_table(groups=("all", "other")), n_boot=10)


def margins_table():
    """Hand-made control margins: f-late turns positive at layer 2 (layer 0's subnormal margin,
    which another device flushes to 0, does not count), f-early at 0, f-never never, f-dip goes
    positive at 1 (then back), f-none has no control; f-nan's layer 0 is NaN."""
    margins = {"f-late": [2.8e-40, -0.1, 0.2, 0.4], "f-early": [0.1, 0.3, 0.5, 0.9],
               "f-never": [-0.3, -0.2, 0.0, -0.1], "f-dip": [-0.1, 0.05, -0.2, 0.3],
               "f-none": [np.nan] * 4, "f-nan": [np.nan, -0.2, 0.1, 0.2]}
    return pd.DataFrame([{"fact_id": f, "layer": layer, "control_margin": m}
                         for f, ms in margins.items() for layer, m in enumerate(ms)])


def test_first_layer_where_the_control_margin_is_positive():
    got = control_summary(margins_table())
    assert list(got.columns) == ["fact_id", "first_control_margin_positive"]
    assert got["first_control_margin_positive"].dtype == "Int64"
    first = dict(zip(got["fact_id"], got["first_control_margin_positive"]))
    assert {f: first[f] for f in ["f-late", "f-early", "f-dip", "f-nan"]} == {
        "f-late": 2, "f-early": 0, "f-dip": 1, "f-nan": 2}
    assert first["f-never"] is pd.NA  # 0.0 is not positive
    assert "f-none" not in first


def test_add_control_columns_keeps_per_fact_order_and_marks_no_control_na():
    per_fact = pd.DataFrame({"fact_id": ["f-none", "f-late", "f-never", "f-absent"],
                             "correct": [True, False, True, True]})
    got = add_control_columns(per_fact, margins_table())
    pd.testing.assert_frame_equal(got[per_fact.columns], per_fact)
    assert got["first_control_margin_positive"].dtype == "Int64"
    assert got["first_control_margin_positive"].tolist() == [pd.NA, 2, pd.NA, pd.NA]


def suite_tables():
    long = long_table()
    return long, per_fact_table(long), layer_aggregates(long, n_boot=100)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_suite_tables_round_trip_dtype_for_dtype(tmp_path, suffix):
    tables = suite_tables()
    paths = write_suite_tables(tmp_path, "tiny-model", *tables)
    written = [p for p in paths if p.suffix == suffix]
    assert [p.name for p in written] == [f"suite-tiny-model-{kind}{suffix}"
                                         for kind in ("layers", "facts", "aggregates")]
    for path, frame in zip(written, tables):
        back = read_suite_table(path)
        pd.testing.assert_frame_equal(back, frame, check_exact=True)
    assert set(tables[0]["top1"]) == set(AWKWARD)  # every awkward token made the trip
    assert tables[1]["L_copy"].isna().any() and tables[0]["answer_rank"].isna().any()


def test_write_suite_tables_leaves_no_temporary_files(tmp_path):
    out = tmp_path / "suite"
    paths = write_suite_tables(out, "m", *suite_tables())
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)
    assert len(paths) == 6


def test_read_suite_table_refuses_other_formats(tmp_path):
    with pytest.raises(ValueError, match="suite table"):
        read_suite_table(tmp_path / "suite-m-layers.json")


def test_pooled_ratio_weighs_facts_by_their_denominator():
    """The patching suite's pooled recovery: sum of numerators over sum of denominators per
    column, a fact missing either left out; a fact whose baselines nearly agree moves it as
    little as its denominator weighs, while it dominates a mean of ratios; a constant ratio is
    a point, its CI included; each resample is a denominator-weighted mean of the facts'
    ratios, so with positive denominators the CI lies within their range."""
    from mlx_lens.experiment.aggregates import pooled_ratio, summarise

    rng = np.random.default_rng(0)
    den = rng.uniform(5, 20, (30, 3))
    num = den * rng.uniform(0.8, 1.0, (30, 3))
    num[0, 0], den[0, 0] = 4.0, 0.1  # ratio 40
    num[1, 1] = np.nan
    out = pooled_ratio(num, den)
    keep = np.isfinite(num)
    want = [num[keep[:, k], k].sum() / den[keep[:, k], k].sum() for k in range(3)]
    np.testing.assert_allclose(out["pooled"], want, rtol=1e-12)
    ratios = num / den
    assert summarise(ratios)["mean"][0] > 2 and out["pooled"][0] < 1.2
    assert np.all(out["pooled_ci_low"] >= np.nanmin(ratios, 0))
    assert np.all(out["pooled_ci_high"] <= np.nanmax(ratios, 0))
    constant = pooled_ratio(0.5 * den, den)
    for key in ("pooled", "pooled_ci_low", "pooled_ci_high"):
        np.testing.assert_allclose(constant[key], 0.5, rtol=1e-12)


def test_pooled_ratio_refuses_a_denominator_that_is_not_positive():
    """Issue #31's case: A (denominator 2, numerator 1) and B (-1, 0) would pool to 1/1 = 1,
    B shrinking the denominator instead of counting against it; A alone is 1/2. The pool takes
    positive denominators only (the patching suite leaves such facts out, named apart)."""
    from mlx_lens.experiment.aggregates import pooled_ratio

    with pytest.raises(ValueError, match="positive"):
        pooled_ratio(np.array([[1.0], [0.0]]), np.array([[2.0], [-1.0]]))
    alone = pooled_ratio(np.array([[1.0], [np.nan]]), np.array([[2.0], [np.nan]]))
    assert [alone[k][0] for k in ("pooled", "pooled_ci_low", "pooled_ci_high")] == [0.5] * 3


def test_the_bootstrap_draws_clusters():
    """10 clusters of 3 facts with one value each (one subject asked three ways): the mean's
    bootstrap CI is the textbook bootstrap of the 10 clusters' values, computed here with plain
    numpy from the same seed (10 draws from 10 per resample), not the 30 facts' (narrower, as
    if they were independent). Tolerance: a resample's mean sums at most 30 terms of |x| <= 1
    (float64: <= 29 eps each, relative to the 30 draws' total 30) against 10 terms here (<= 9
    eps); a percentile interpolates two of them: 40 eps."""
    from mlx_lens.experiment.aggregates import summarise

    values = np.random.default_rng(1).uniform(0, 1, 10)
    facts = np.repeat(values, 3)[:, None]
    keys = np.repeat([f"c{j}" for j in range(10)], 3)  # sorted as the values
    n_boot = 500
    draws = np.random.default_rng(0).integers(0, 10, size=(n_boot, 10))
    want = np.quantile(values[draws].mean(1), [0.025, 0.975])
    got = summarise(facts, n_boot=n_boot, clusters=keys)
    np.testing.assert_allclose([got["ci_low"][0], got["ci_high"][0]], want, rtol=0,
                               atol=40 * np.finfo(float).eps)
    assert got["n"][0] == 30 and got["n_clusters"][0] == 10
    plain = summarise(facts, n_boot=n_boot)
    assert plain["n_clusters"][0] == 30
    assert plain["ci_high"][0] - plain["ci_low"][0] < want[1] - want[0]


def test_layer_aggregates_name_what_the_bootstrap_drew():
    """A long table with a cluster column: n_clusters per row (those with a value), ci_unit
    "cluster"; without one every fact is its own ("fact", n_clusters = n, the CIs as before)."""
    long = long_table()
    plain = layer_aggregates(long, n_boot=100)
    assert (plain["ci_unit"] == "fact").all() and (plain["n_clusters"] == plain["n"]).all()
    clustered = layer_aggregates(long.assign(cluster=long["fact_id"].str[-1]), n_boot=100)
    assert (clustered["ci_unit"] == "cluster").all()
    got = rows(clustered, "all", "entropy").set_index("layer")["n_clusters"]
    assert list(got) == [10] * N_LAYERS  # fact-000 .. fact-039 by their last digit
    assert (rows(clustered, "all", "control_p")["n_clusters"] == 5).all()  # facts 0, 4, 8, ...
    same = long.assign(cluster=long["fact_id"])  # each its own: the same table as without
    pd.testing.assert_frame_equal(layer_aggregates(same, n_boot=100), plain)
