"""Statistics of the evaluation standard (design 5b): paired differences, IQM, P(improvement), bootstrap CIs.

Method (after Agarwal et al., "Deep RL at the Edge of the Statistical Precipice", NeurIPS 2021;
our own code on numpy / scipy, not the rliable package):

- **Pairing.** Every controller is evaluated on the same held-out env seeds. The comparison of
  controller ``A`` with a baseline ``B`` is the per-seed difference ``d_s = A_s - B_s`` over the
  seeds both have; its mean equals the difference of the means, but its spread leaves out the
  seed-to-seed variation both share, so its interval is (much) narrower.
- **IQM** (interquartile mean): ``scipy.stats.trim_mean(x, 0.25)``, the mean of the middle half
  after cutting ``floor(n / 4)`` values at each end ([1..8] -> mean(3, 4, 5, 6) = 4.5). Robust to a
  few outlier episodes, less noisy than the median.
- **P(improvement)** ``P(X > Y) + 0.5 P(X = Y)``: unpaired, over all ``n x m`` pairs (the
  Mann-Whitney U statistic over ``n m``); paired, over the seed pairs (the share of seeds on which
  the controller beats the baseline, ties counted half).
- **Bootstrap CIs** (``bootstrap_ci``): ``scipy.stats.bootstrap``, percentile method by default
  (BCa on request). The percentile interval of a location statistic (mean, IQM, median, a share)
  lies within [min, max] of the data, so counts such as germinations never get impossible bounds;
  the bounds are also clipped there (``clip=True``) against round-off and BCa. Degenerate inputs
  are handled before scipy: one value or all values equal give ``[c, c]``.
- **Stratified bootstrap** (``stratified_bootstrap_ci``): with several training seeds, episodes are
  resampled *within* each training seed (each keeps its episode count), the strata are pooled and
  the statistic taken on the pool. The interval then covers the episode noise of every training
  run without letting one run's episodes stand in for another's.

``compare_controllers`` puts these together in one tidy table; ``summarize_differences`` is the
same for a table of paired differences (what ``plots.plot_paired_differences`` draws).
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats

DEFAULT_RESAMPLES = 5000
TRAIN_SEED = "train_seed"  # column naming the training run of a learned controller
AGGREGATE = "all"  # train_seed label of a row that pools every training seed

Statistic = Callable[..., Any]  # f(x, axis=-1) -> statistic along the axis


class Interval(NamedTuple):
    """A point estimate with its confidence interval."""

    estimate: float
    low: float
    high: float


# ------------------------------------------------------------------------------ statistics


def iqm(x: ArrayLike, axis: int | None = None) -> Any:
    """Interquartile mean: ``trim_mean(x, 0.25)`` (floor(n/4) values cut at each end)."""
    x = np.asarray(x, dtype=float)
    if axis is None:
        return float(stats.trim_mean(x.ravel(), 0.25))
    return stats.trim_mean(x, 0.25, axis=axis)


def probability_of_improvement(x: ArrayLike, y: ArrayLike, paired: bool = False, axis: int = -1) -> Any:
    """``P(X > Y) + 0.5 P(X = Y)``; paired: over the pairs ``(x_i, y_i)``, else over all ``x_i, y_j``.

    Works along ``axis`` (so it vectorises inside a bootstrap); a float for 1-d inputs.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape[axis] == 0 or y.shape[axis] == 0:
        raise ValueError("x and y must not be empty")
    if paired:
        if x.shape != y.shape:
            raise ValueError(f"paired x and y must have the same shape, got {x.shape} and {y.shape}")
        out = np.mean((x > y) + 0.5 * (x == y), axis=axis)
    else:
        x, y = np.moveaxis(x, axis, -1), np.moveaxis(y, axis, -1)
        xi, yj = x[..., :, None], y[..., None, :]
        out = np.mean((xi > yj) + 0.5 * (xi == yj), axis=(-2, -1))
    return float(out) if np.ndim(out) == 0 else out


def paired_improvement(d: ArrayLike, axis: int = -1) -> Any:
    """P(improvement) from paired differences ``d = x - y``: ``P(d > 0) + 0.5 P(d = 0)``."""
    d = np.asarray(d, dtype=float)
    out = np.mean((d > 0) + 0.5 * (d == 0), axis=axis)
    return float(out) if np.ndim(out) == 0 else out


# ------------------------------------------------------------------------------ bootstrap


def _check_ci_args(confidence: float, n_resamples: int) -> None:
    if not (isinstance(confidence, (float, int)) and 0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if not isinstance(n_resamples, (int, np.integer)) or isinstance(n_resamples, bool) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive int, got {n_resamples!r}")


def _as_values(values: ArrayLike, name: str = "values") -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    if x.size == 0:
        raise ValueError(f"{name} must not be empty")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite (drop NaN episodes first)")
    return x


def _vectorised(statistic: Statistic) -> Callable[..., np.ndarray]:
    """``statistic`` along ``axis`` (falls back to a loop for a statistic without an ``axis`` argument)."""

    def f(x: np.ndarray, axis: int = -1) -> np.ndarray:
        try:
            return np.asarray(statistic(x, axis=axis), dtype=float)
        except TypeError:
            return np.apply_along_axis(lambda row: float(statistic(row)), axis, x)

    return f


def _finish(estimate: float, low: float, high: float, lo_clip: float, hi_clip: float, clip: bool) -> Interval:
    if clip:
        low, high = float(np.clip(low, lo_clip, hi_clip)), float(np.clip(high, lo_clip, hi_clip))
    return Interval(float(estimate), float(low), float(high))


def bootstrap_ci(
    values: ArrayLike,
    statistic: Statistic = np.mean,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int | np.random.Generator | None = 0,
    method: str = "percentile",
    clip: bool = True,
) -> Interval:
    """Bootstrap confidence interval of ``statistic(values)`` (``scipy.stats.bootstrap``).

    :param values: one value per episode (or per paired difference); finite, non-empty.
    :param statistic: ``f(x, axis=-1)`` such as ``np.mean``, ``np.median``, ``iqm``.
    :param method: ``"percentile"`` (default) or ``"BCa"``; a BCa interval that comes out NaN
        (too few distinct values) falls back to the percentile interval.
    :param clip: clip the bounds to [min, max] of ``values``: right for location statistics; pass
        False for others (a standard deviation, a ratio).
    One value, or all values equal, gives ``[c, c]`` without resampling.
    """
    x = _as_values(values)
    _check_ci_args(confidence, n_resamples)
    if method not in ("percentile", "BCa"):
        raise ValueError(f"method must be 'percentile' or 'BCa', got {method!r}")
    f = _vectorised(statistic)
    estimate = float(f(x))
    if x.size == 1 or np.ptp(x) == 0.0:
        return Interval(estimate, estimate, estimate)
    rng = np.random.default_rng(seed)
    res = stats.bootstrap(
        (x,), f, vectorized=True, axis=-1, confidence_level=confidence, n_resamples=int(n_resamples),
        method=method, random_state=rng,
    )
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (np.isfinite(low) and np.isfinite(high)):  # BCa on nearly degenerate data
        dist = res.bootstrap_distribution
        alpha = (1.0 - confidence) / 2
        low, high = float(np.quantile(dist, alpha)), float(np.quantile(dist, 1 - alpha))
    return _finish(estimate, low, high, float(x.min()), float(x.max()), clip)


def probability_of_improvement_ci(
    x: ArrayLike,
    y: ArrayLike,
    paired: bool = False,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int | np.random.Generator | None = 0,
) -> Interval:
    """P(X > Y) + 0.5 P(X = Y) with a percentile bootstrap CI (pairs resampled together when paired)."""
    x, y = _as_values(x, "x"), _as_values(y, "y")
    _check_ci_args(confidence, n_resamples)
    if paired:
        if x.shape != y.shape:
            raise ValueError(f"paired x and y must have the same length, got {x.size} and {y.size}")
        return bootstrap_ci(x - y, paired_improvement, confidence, n_resamples, seed, clip=False)
    estimate = probability_of_improvement(x, y)
    if (x.size == 1 and y.size == 1) or (np.ptp(x) == 0.0 and np.ptp(y) == 0.0):
        return Interval(estimate, estimate, estimate)
    res = stats.bootstrap(
        (x, y), lambda a, b, axis=-1: probability_of_improvement(a, b, axis=axis), vectorized=True, paired=False,
        axis=-1, confidence_level=confidence, n_resamples=int(n_resamples), method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return _finish(estimate, res.confidence_interval.low, res.confidence_interval.high, 0.0, 1.0, True)


def stratified_bootstrap_ci(
    groups: Mapping[Hashable, ArrayLike],
    statistic: Statistic = np.mean,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int | np.random.Generator | None = 0,
    clip: bool = True,
    resample_groups: bool = False,
) -> Interval:
    """Percentile CI of ``statistic`` on the pooled episodes, resampling within each group.

    :param groups: training seed -> that run's per-episode values (the strata).
    Each bootstrap sample draws ``n_g`` episodes with replacement from every group ``g`` and pools
    them; the estimate is ``statistic`` of all episodes pooled (for the mean: every episode weighs
    the same, i.e. the mean of the group means when groups are equally large).

    This interval is conditional on the given training runs: it covers episode noise, not the
    spread between training seeds. ``resample_groups=True`` first draws the groups themselves
    with replacement (a two-level bootstrap), which is the interval for "a new training run" (wide
    and coarse with few groups: 3 groups have only 10 distinct multisets).
    """
    if not isinstance(groups, Mapping) or not groups:
        raise ValueError("groups must be a non-empty mapping of group -> values")
    arrays = [_as_values(v, f"groups[{k!r}]") for k, v in groups.items()]
    _check_ci_args(confidence, n_resamples)
    f = _vectorised(statistic)
    pooled = np.concatenate(arrays)
    estimate = float(f(pooled))
    if np.ptp(pooled) == 0.0:
        return Interval(estimate, estimate, estimate)
    rng = np.random.default_rng(seed)
    B, G = int(n_resamples), len(arrays)
    if not resample_groups:
        samples = np.concatenate([a[rng.integers(0, a.size, size=(B, a.size))] for a in arrays], axis=1)
        dist = f(samples)  # samples (B, sum n_g) -> (B,)
    else:
        picks = rng.integers(0, G, size=(B, G))  # which groups form each resample
        dist = np.array([
            float(f(np.concatenate([arrays[g][rng.integers(0, arrays[g].size, arrays[g].size)] for g in row])))
            for row in picks
        ])
    alpha = (1.0 - confidence) / 2
    low, high = float(np.quantile(dist, alpha)), float(np.quantile(dist, 1 - alpha))
    return _finish(estimate, low, high, float(pooled.min()), float(pooled.max()), clip)


# ------------------------------------------------------------------------------ tables


def _require(results: pd.DataFrame, columns: Sequence[str], what: str = "results") -> None:
    if not isinstance(results, pd.DataFrame):
        raise ValueError(f"{what} must be a pandas DataFrame, got {type(results).__name__}")
    missing = [c for c in columns if c not in results.columns]
    if missing:
        raise ValueError(f"{what} has no column(s) {missing}; columns: {list(results.columns)}")


def _keys(pair_on: str | Sequence[str]) -> list[str]:
    return [pair_on] if isinstance(pair_on, str) else list(pair_on)


def paired_differences(
    results: pd.DataFrame,
    metric: str,
    baseline: str,
    by: str = "controller",
    pair_on: str | Sequence[str] = "seed",
) -> pd.DataFrame:
    """Per-seed differences ``metric(controller) - metric(baseline)`` for every other controller.

    Only seeds present for both are kept. The baseline must have one row per ``pair_on`` key; a
    controller may have several (e.g. one per ``train_seed``), each paired with the same baseline
    episode. Columns: ``by``, the ``pair_on`` columns, ``train_seed`` when present, ``value``,
    ``baseline_value``, ``diff``.
    """
    keys = _keys(pair_on)
    _require(results, [by, metric, *keys])
    names = list(pd.unique(results[by]))
    if baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not in results[{by!r}]: {names}")
    base = results.loc[results[by] == baseline, [*keys, metric]]
    if base.duplicated(keys).any():
        raise ValueError(f"baseline {baseline!r} has several rows per {keys}; pass pair_on with more columns")
    base = base.rename(columns={metric: "baseline_value"})
    extra = [TRAIN_SEED] if TRAIN_SEED in results.columns and TRAIN_SEED not in keys else []
    frames = []
    for name in names:
        if name == baseline:
            continue
        rows = results.loc[results[by] == name, [by, *keys, *extra, metric]].rename(columns={metric: "value"})
        merged = rows.merge(base, on=keys, how="inner", validate="many_to_one")
        if merged.empty:
            raise ValueError(f"{by} {name!r} shares no {keys} with baseline {baseline!r}")
        frames.append(merged)
    if not frames:
        raise ValueError(f"results has no {by} other than the baseline {baseline!r}")
    out = pd.concat(frames, ignore_index=True)
    out["value"] = out["value"].astype(float)
    out["baseline_value"] = out["baseline_value"].astype(float)
    out["diff"] = out["value"] - out["baseline_value"]
    return out[[by, *keys, *extra, "value", "baseline_value", "diff"]]


def _label(train_seed: Any) -> Any:
    """A training seed as an int where it is one (a column with NaN rows holds floats)."""
    return int(train_seed) if isinstance(train_seed, float) and train_seed.is_integer() else train_seed


def _strata(frame: pd.DataFrame, column: str) -> dict[Hashable, np.ndarray]:
    """Values of ``column`` grouped by training seed (one group when there is none)."""
    if TRAIN_SEED in frame.columns and frame[TRAIN_SEED].notna().any():
        return {k: g[column].to_numpy(float) for k, g in frame.groupby(TRAIN_SEED, sort=True, dropna=False)}
    return {AGGREGATE: frame[column].to_numpy(float)}


def _interval(
    groups: dict[Hashable, np.ndarray], statistic: Statistic, clip: bool = True, resample_groups: bool = False, **ci: Any
) -> Interval:
    if len(groups) == 1:
        return bootstrap_ci(next(iter(groups.values())), statistic, clip=clip, **ci)
    return stratified_bootstrap_ci(groups, statistic, clip=clip, resample_groups=resample_groups, **ci)


def _diff_row(diffs: pd.DataFrame, resample_groups: bool = False, **ci: Any) -> dict[str, Any]:
    if diffs.empty:  # e.g. a training seed evaluated on none of the baseline's seeds
        return {"n_pairs": 0, **dict.fromkeys(_DIFF_COLUMNS[1:], np.nan)}
    groups = _strata(diffs, "diff")
    d = _interval(groups, np.mean, resample_groups=resample_groups, **ci)
    p = _interval(groups, paired_improvement, clip=False, resample_groups=resample_groups, **ci)
    return {
        "n_pairs": len(diffs),
        "diff_mean": d.estimate, "diff_ci_low": d.low, "diff_ci_high": d.high,
        "p_improvement": p.estimate, "p_improvement_ci_low": p.low, "p_improvement_ci_high": p.high,
    }


_DIFF_COLUMNS = (
    "n_pairs", "diff_mean", "diff_ci_low", "diff_ci_high", "p_improvement", "p_improvement_ci_low",
    "p_improvement_ci_high",
)


def _by_training_seed(frame: pd.DataFrame, enabled: bool | None) -> bool:
    has = TRAIN_SEED in frame.columns and frame[TRAIN_SEED].notna().any()
    if enabled and TRAIN_SEED not in frame.columns:
        raise ValueError(f"by_training_seed=True needs a {TRAIN_SEED!r} column")
    return has if enabled is None else bool(enabled and has)


def summarize_differences(
    diffs: pd.DataFrame,
    by: str = "controller",
    by_training_seed: bool | None = None,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int | np.random.Generator | None = 0,
    resample_training_seeds: bool = False,
) -> pd.DataFrame:
    """Mean paired difference with its CI and P(improvement) per controller, from ``paired_differences``.

    Columns: ``by``, [``train_seed``,] ``n_pairs``, ``diff_mean``, ``diff_ci_low``, ``diff_ci_high``,
    ``p_improvement``, ``p_improvement_ci_low``, ``p_improvement_ci_high``. With training seeds the
    ``train_seed = "all"`` row uses the stratified bootstrap (``resample_training_seeds``: see
    ``compare_controllers``), the per-seed rows the plain one.
    """
    _require(diffs, [by, "diff"], "diffs")
    ci = dict(confidence=confidence, n_resamples=n_resamples, seed=seed)
    per_seed = _by_training_seed(diffs, by_training_seed)
    rows = []
    for name, group in diffs.groupby(by, sort=False):
        if per_seed:
            for ts, g in group.groupby(TRAIN_SEED, sort=True):
                rows.append({by: name, TRAIN_SEED: _label(ts), **_diff_row(g.drop(columns=TRAIN_SEED), **ci)})
        pooled = _diff_row(group, resample_groups=resample_training_seeds, **ci)
        row = {by: name, **({TRAIN_SEED: AGGREGATE} if per_seed else {}), **pooled}
        rows.append(row)
    return pd.DataFrame(rows)


def compare_controllers(
    results: pd.DataFrame,
    metric: str,
    baseline: str,
    by: str = "controller",
    pair_on: str | Sequence[str] = "seed",
    by_training_seed: bool | None = None,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int | np.random.Generator | None = 0,
    resample_training_seeds: bool = False,
) -> pd.DataFrame:
    """One tidy table: every controller's aggregates and its paired difference with ``baseline``.

    Columns: ``by``, [``train_seed``,] ``n`` (episodes), ``mean``, ``iqm``, ``iqm_ci_low``,
    ``iqm_ci_high``, ``n_pairs``, ``diff_mean``, ``diff_ci_low``, ``diff_ci_high``,
    ``p_improvement`` (paired, share of seeds on which the controller beats the baseline, ties
    half), ``p_improvement_ci_low``, ``p_improvement_ci_high``. The baseline's difference columns are NaN.

    :param by_training_seed: with a ``train_seed`` column (None: whenever it has values), one row per
        (controller, training seed) plus a ``train_seed = "all"`` row whose CIs come from the
        stratified bootstrap over training seeds. Controllers without a training seed (baselines)
        get the ``"all"`` row only.
    :param resample_training_seeds: the ``"all"`` rows also resample the training seeds (two-level
        bootstrap, see ``stratified_bootstrap_ci``). False (default) gives the interval for these
        training runs; True the wider one for a new training run of the same algorithm.
    """
    _require(results, [by, metric, *_keys(pair_on)])
    ci = dict(confidence=confidence, n_resamples=n_resamples, seed=seed)
    diffs = paired_differences(results, metric, baseline, by=by, pair_on=pair_on)
    per_seed = _by_training_seed(results, by_training_seed)
    nan_diff = dict.fromkeys(_DIFF_COLUMNS, np.nan)

    def row(name: Hashable, episodes: pd.DataFrame, pairs: pd.DataFrame, label: Any) -> dict[str, Any]:
        x = episodes[metric].to_numpy(float)
        pooled = label == AGGREGATE and resample_training_seeds
        iq = _interval(_strata(episodes, metric), iqm, resample_groups=pooled, **ci)
        out: dict[str, Any] = {by: name}
        if per_seed:
            out[TRAIN_SEED] = label
        out.update(n=len(x), mean=float(np.mean(x)), iqm=iq.estimate, iqm_ci_low=iq.low, iqm_ci_high=iq.high)
        out.update(nan_diff if name == baseline else _diff_row(pairs, resample_groups=pooled, **ci))
        return out

    rows = []
    for name, episodes in results.groupby(by, sort=False):
        pairs = diffs[diffs[by] == name]
        has_seeds = per_seed and episodes[TRAIN_SEED].notna().any()
        if has_seeds:
            for ts, g in episodes.groupby(TRAIN_SEED, sort=True):
                p = pairs[pairs[TRAIN_SEED] == ts].drop(columns=TRAIN_SEED)
                rows.append(row(name, g.drop(columns=TRAIN_SEED), p, _label(ts)))
        rows.append(row(name, episodes if has_seeds else episodes.drop(columns=TRAIN_SEED, errors="ignore"),
                        pairs if has_seeds else pairs.drop(columns=TRAIN_SEED, errors="ignore"), AGGREGATE))
    return pd.DataFrame(rows)
