"""A fact suite's summaries: per-layer means with bootstrap CIs over clusters of facts, and per fact
the first layer where the answer beats its control."""
from __future__ import annotations

import numpy as np
import pandas as pd

from mlx_lens.core.bounds import FP32_TINY
from mlx_lens.output.suite_tables import ALL
AGGREGATE_COLUMNS = ["group", "layer", "metric", "n", "mean", "median", "ci_low", "ci_high",
                     "n_clusters", "ci_unit"]
# p(answer | control prompt): the target's probability where it is not the answer; a lens that
# says the target everywhere shows it as high as p_answer (p_answer_gain: the difference).
# answer_log2p: the whole answer's log2 p (teacher-forced), control_log2p: the control's.
METRICS = sorted(["p_answer", "log10_rank", "entropy", "kl_to_final_bits", "control_p",
                  "control_p_answer", "control_margin", "p_answer_gain", "answer_log2p",
                  "control_log2p"])  # sorted: the table's row order


def control_summary(long: pd.DataFrame) -> pd.DataFrame:
    """Per fact with a control: fact_id, first_control_margin_positive (Int64, NA if never)."""
    margin = long["control_margin"]
    # A fact without a control has NaN margins on every row.
    with_control = pd.unique(long.loc[margin.notna(), "fact_id"])
    # Positive means above fp32's smallest normal number: below it a probability may read as 0
    # on one device and as a subnormal on another (docs/numerics.md §2).
    first = long.loc[margin > FP32_TINY].groupby("fact_id")["layer"].min()
    return pd.DataFrame({
        "fact_id": with_control,
        "first_control_margin_positive": first.reindex(with_control).to_numpy(),
    }).astype({"first_control_margin_positive": "Int64"})


def add_control_columns(per_fact: pd.DataFrame, long: pd.DataFrame) -> pd.DataFrame:
    """per_fact with first_control_margin_positive added (NA for facts without a control)."""
    first = control_summary(long).set_index("fact_id")["first_control_margin_positive"]
    return per_fact.assign(first_control_margin_positive=per_fact["fact_id"].map(first)
                           .astype("Int64"))


def _metric_values(long: pd.DataFrame) -> dict[str, np.ndarray]:
    def column(name):
        return long[name].to_numpy(dtype=float, na_value=np.nan)

    with np.errstate(divide="ignore", invalid="ignore"):  # a rank < 1 is no rank: dropped below
        log10_rank = np.log10(column("answer_rank"))
    values = {name: column(name) for name in METRICS if name != "log10_rank"}
    return {**values, "log10_rank": log10_rank}


def _fact_layer_cube(long: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """values [fact, metric, layer] (NaN where missing or non-finite), each fact's group, layers."""
    fact_codes, _ = pd.factorize(long["fact_id"], sort=True)
    layer_codes, layers = pd.factorize(long["layer"], sort=True)
    if len(np.unique(fact_codes * len(layers) + layer_codes)) < len(long):
        raise ValueError("the long table has more than one row for a (fact_id, layer)")
    if not long[["fact_id", "group"]].drop_duplicates()["fact_id"].is_unique:
        raise ValueError("a fact_id belongs to more than one group")
    n_facts = fact_codes.max() + 1
    cube = np.full((n_facts, len(METRICS), len(layers)), np.nan)
    for m, values in enumerate(_metric_values(long)[name] for name in METRICS):
        cube[fact_codes, m, layer_codes] = values
    cube[~np.isfinite(cube)] = np.nan
    groups = np.empty(n_facts, dtype=object)
    groups[fact_codes] = long["group"].to_numpy()
    return cube, groups, np.asarray(layers, dtype=np.int64)


def summarise(values: np.ndarray, seed: int = 0, n_boot: int = 2000, level: float = 0.95,
              clusters: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """n, mean, median and the percentile-bootstrap CI of the mean for each column of [facts, K];
    the bootstrap draws clusters (clusters [facts]: each fact's key; None: each fact its own),
    and n_clusters counts those with a value in the column."""
    n_facts, k = values.shape
    valid = np.isfinite(values)
    n = valid.sum(0)
    median = np.full(k, np.nan)
    median[n > 0] = np.nanmedian(values[:, n > 0], axis=0)
    # Deviations from the median: a constant metric resamples to exactly itself (a point CI),
    # and the sums below add small numbers. Missing values deviate by 0 and are not counted.
    dev = np.where(valid, values - median, 0.0)
    mean = median + np.divide(dev.sum(0), n, out=np.full(k, np.nan), where=n > 0)

    # A fact missing at some (layer, metric) is still drawn but adds nothing there, so each
    # resample's mean is the nanmean over the facts it drew (its size varies around n); a
    # resample that drew none is NaN and left out of the percentiles.
    codes = _codes(clusters, n_facts)
    times = _resamples(codes, seed, n_boot)
    counts = times @ valid
    boot = median + np.divide(times @ dev, counts, out=np.full((n_boot, k), np.nan),
                              where=counts > 0)
    ci = _percentiles(boot, level)
    members = np.zeros((n_facts, codes.max(initial=-1) + 1))
    members[np.arange(n_facts), codes] = 1.0
    n_clusters = ((members.T @ valid) > 0).sum(0)
    return {"n": n, "mean": mean, "median": median, "ci_low": ci[0], "ci_high": ci[1],
            "n_clusters": n_clusters}


def pooled_ratio(numerator: np.ndarray, denominator: np.ndarray, seed: int = 0,
                 n_boot: int = 2000, level: float = 0.95,
                 clusters: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """sum(numerator) / sum(denominator) over the facts of each column of [facts, K] (a fact
    missing either left out), with the percentile-bootstrap CI over clusters of facts
    (summarise's resamples). A normalised metric pooled so, as TransformerLens normalises a
    patching metric by baselines averaged over the batch, weighs each fact by its denominator:
    a fact whose two baselines nearly agree cannot dominate, as its own ratio would in a mean of
    ratios. The denominators must be positive (the caller leaves the others out, as missing):
    then the pool and every resample is a denominator-weighted mean of the facts' ratios, where
    one of the other sign would shrink the denominator, even to 0, instead of counting against
    it."""
    n_facts, k = numerator.shape
    valid = np.isfinite(numerator) & np.isfinite(denominator)
    if np.any(denominator[valid] <= 0):
        raise ValueError("pooled_ratio needs positive denominators")
    num, den = np.where(valid, numerator, 0.0), np.where(valid, denominator, 0.0)
    pooled = np.divide(num.sum(0), den.sum(0), out=np.full(k, np.nan), where=den.sum(0) > 0)
    times = _resamples(_codes(clusters, n_facts), seed, n_boot)
    boot_den = times @ den
    boot = np.divide(times @ num, boot_den, out=np.full((n_boot, k), np.nan),
                     where=boot_den > 0)
    ci = _percentiles(boot, level)
    return {"pooled": pooled, "pooled_ci_low": ci[0], "pooled_ci_high": ci[1]}


def _codes(clusters: np.ndarray | None, n_facts: int) -> np.ndarray:
    """Each fact's cluster as 0 .. C - 1 (each fact its own without clusters)."""
    if clusters is None:
        return np.arange(n_facts)
    return np.unique(np.asarray(clusters), return_inverse=True)[1].reshape(-1)


def _resamples(codes: np.ndarray, seed: int, n_boot: int) -> np.ndarray:
    """times[b, j]: how often bootstrap resample b drew fact j's cluster (codes: each fact's,
    0 .. C - 1): C clusters drawn with replacement, one draw shared by every layer and metric.
    With every fact its own cluster, the plain bootstrap over facts."""
    n_clusters = codes.max(initial=-1) + 1
    draws = np.random.default_rng(seed).integers(0, n_clusters, size=(n_boot, n_clusters))
    flat = (np.arange(n_boot)[:, None] * n_clusters + draws).ravel()
    counts = np.bincount(flat, minlength=n_boot * n_clusters).reshape(n_boot, n_clusters)
    return counts[:, codes].astype(float)


def fact_clusters(long: pd.DataFrame) -> pd.Series:
    """Each fact's cluster, by fact_id in sorted order: the table's `cluster` column (a fact's
    own id without one)."""
    if "cluster" not in long:
        ids = np.sort(pd.unique(long["fact_id"]))
        return pd.Series(ids, index=ids)
    pairs = long[["fact_id", "cluster"]].drop_duplicates()
    if not pairs["fact_id"].is_unique:
        raise ValueError("a fact_id belongs to more than one cluster")
    return pairs.set_index("fact_id")["cluster"].sort_index()


def ci_unit(clusters: pd.Series) -> str:
    """What the bootstrap drew: "cluster" where some facts share one, else "fact"."""
    return "cluster" if clusters.nunique() < len(clusters) else "fact"


def _percentiles(boot: np.ndarray, level: float) -> np.ndarray:
    """[2, K]: the central `level` interval of each column's resampled values (NaN ones left
    out; NaN where none is finite)."""
    ci = np.full((2, boot.shape[1]), np.nan)
    drawn = np.isfinite(boot).any(0)
    ci[:, drawn] = np.nanquantile(boot[:, drawn], [(1 - level) / 2, (1 + level) / 2], axis=0)
    return ci


def layer_aggregates(long: pd.DataFrame, seed: int = 0, n_boot: int = 2000,
                     level: float = 0.95) -> pd.DataFrame:
    """Per group and layer, for each metric in METRICS: n finite values, their mean and median,
    and the percentile-bootstrap CI of the mean, drawing the long table's clusters of facts
    (n_clusters of them; ci_unit "cluster", or "fact" where each is its own). Group "all"
    covers every fact; each
    non-empty group gets its own rows when there are at least two. Columns: AGGREGATE_COLUMNS,
    rows sorted by group ("all" first), metric, layer."""
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"need 0 < level < 1 and n_boot >= 1, got {level} and {n_boot}")
    if long.empty:
        raise ValueError("the long table has no rows")
    cube, groups, layers = _fact_layer_cube(long)
    clusters = fact_clusters(long)  # the cube's fact order: sorted ids
    if ALL in set(groups):
        raise ValueError(f'a group may not be called "{ALL}": that name is the overall rows\'')
    named = sorted(set(groups) - {""})
    parts = [(ALL, np.ones(len(groups), bool))]
    parts += [(g, groups == g) for g in named] if len(named) > 1 else []
    n_metrics, n_layers = cube.shape[1:]
    frames = []
    for group, facts in parts:
        # The same seed per group: a group's CIs do not depend on which other groups exist.
        stats = summarise(cube[facts].reshape(facts.sum(), -1), seed, n_boot, level,
                          clusters.to_numpy()[facts])
        frames.append(pd.DataFrame({"group": group, "layer": np.tile(layers, n_metrics),
                                    "metric": np.repeat(METRICS, n_layers), **stats,
                                    "ci_unit": ci_unit(clusters)}))
    out = pd.concat(frames, ignore_index=True)
    return out.astype({"layer": "int64", "n": "int64", "n_clusters": "int64"})[AGGREGATE_COLUMNS]
