"""Evaluation statistics (design 5b) against hand-computed references, and the paired-difference plot."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from esper_lib.evaluation.plots import POINTS_GID, plot_paired_differences
from esper_lib.evaluation.stats import (
    bootstrap_ci,
    compare_controllers,
    iqm,
    paired_differences,
    probability_of_improvement,
    probability_of_improvement_ci,
    stratified_bootstrap_ci,
    summarize_differences,
)


def test_iqm_by_hand():
    assert iqm(np.arange(1, 9)) == pytest.approx(4.5)  # drop 1, 2 and 7, 8: mean(3, 4, 5, 6)
    assert iqm([1, 2, 3, 100]) == pytest.approx(2.5)  # the outlier is cut
    assert iqm([5.0]) == 5.0


def test_probability_of_improvement_by_hand():
    x, y = [1, 2, 3], [2, 2, 0]
    # unpaired: 9 pairs; x=1: loses to 2, 2, beats 0 -> 1; x=2: ties 2, 2, beats 0 -> 2; x=3: 3 wins
    assert probability_of_improvement(x, y) == pytest.approx((1 + 2 + 3) / 9)
    # paired: (1<2) 0, (2=2) 0.5, (3>0) 1
    assert probability_of_improvement(x, y, paired=True) == pytest.approx(1.5 / 3)
    assert probability_of_improvement([1, 1], [1, 1]) == 0.5
    ci = probability_of_improvement_ci(x, y, paired=True)
    assert 0.0 <= ci.low <= ci.estimate <= ci.high <= 1.0
    with pytest.raises(ValueError, match="paired x and y"):
        probability_of_improvement([1, 2], [1], paired=True)


def _hand_results() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "controller": ["wait"] * 3 + ["sched"] * 3 + ["rand"] * 2,
            "seed": [0, 1, 2, 0, 1, 2, 1, 5],
            "return": [0.5, 0.6, 0.7, 0.6, 0.6, 0.9, 0.2, 9.0],
        }
    )


def test_paired_differences_on_a_hand_frame():
    d = paired_differences(_hand_results(), "return", baseline="wait")
    sched = d[d.controller == "sched"].sort_values("seed")
    assert list(sched.seed) == [0, 1, 2]
    np.testing.assert_allclose(sched["diff"], [0.1, 0.0, 0.2], atol=1e-12)
    rand = d[d.controller == "rand"]
    assert list(rand.seed) == [1] and rand["diff"].iloc[0] == pytest.approx(-0.4)  # seed 5 has no pair
    assert "wait" not in set(d.controller)


def test_paired_differences_errors_name_the_problem():
    r = _hand_results()
    with pytest.raises(ValueError, match="score"):
        paired_differences(r, "score", baseline="wait")
    with pytest.raises(ValueError, match="baseline 'nobody'"):
        paired_differences(r, "return", baseline="nobody")
    with pytest.raises(ValueError, match="'episode'"):
        paired_differences(r, "return", baseline="wait", pair_on="episode")
    lonely = pd.concat([r, pd.DataFrame({"controller": ["x"], "seed": [99], "return": [1.0]})])
    with pytest.raises(ValueError, match="'x' shares no"):
        paired_differences(lonely, "return", baseline="wait")
    dup = pd.concat([r, r[r.controller == "wait"]])
    with pytest.raises(ValueError, match="several rows"):
        paired_differences(dup, "return", baseline="wait")


def test_ci_of_constant_data_is_a_point_and_degenerate_inputs_stay_finite():
    for method in ("percentile", "BCa"):
        assert tuple(bootstrap_ci([3.0] * 7, method=method)) == (3.0, 3.0, 3.0)
        assert tuple(bootstrap_ci([2.0], method=method)) == (2.0, 2.0, 2.0)
        ci = bootstrap_ci([0, 0, 0, 0, 1], method=method)  # nearly constant counts
        assert np.isfinite(ci.low) and np.isfinite(ci.high) and 0.0 <= ci.low <= ci.high <= 1.0
    assert tuple(stratified_bootstrap_ci({0: [1.0, 1.0], 1: [1.0]})) == (1.0, 1.0, 1.0)


def test_ci_contains_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (10, 100, 1000):
        x = rng.normal(1.0, 1.0, size=n)
        ci = bootstrap_ci(x, n_resamples=2000, seed=1)
        assert ci.low < np.mean(x) < ci.high and ci.estimate == pytest.approx(np.mean(x))
        widths.append(ci.high - ci.low)
    assert widths[0] > 2 * widths[1] > 4 * widths[2]  # ~ 1 / sqrt(n)
    x = rng.normal(size=50)
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)  # reproducible


def test_counts_never_get_impossible_bounds():
    counts = np.array([0, 0, 1, 0, 2, 0, 0, 1])
    for stat in (np.mean, iqm, np.median):
        ci = bootstrap_ci(counts, stat)
        assert counts.min() <= ci.low <= ci.high <= counts.max()
    ci = stratified_bootstrap_ci({0: [0, 0, 1], 1: [2, 2, 1]})
    assert 0 <= ci.low <= ci.high <= 2


def test_stratified_bootstrap_resamples_within_groups():
    groups = {0: np.array([1.0, 2.0, 3.0]), 1: np.array([10.0, 11.0, 12.0])}
    ci = stratified_bootstrap_ci(groups, n_resamples=4000, seed=7)
    assert ci.estimate == pytest.approx(np.mean([np.mean(g) for g in groups.values()]))  # equal sizes
    assert 1.0 <= ci.low < ci.estimate < ci.high <= 12.0
    # the same draws by hand: per group, B x n_g indices from the generator in group order
    rng = np.random.default_rng(7)
    by_hand = np.concatenate([g[rng.integers(0, g.size, size=(4000, g.size))] for g in groups.values()], axis=1)
    dist = by_hand.mean(axis=1)
    assert ci.low == pytest.approx(np.quantile(dist, 0.025)) and ci.high == pytest.approx(np.quantile(dist, 0.975))
    # strata are kept: every resample holds 3 episodes of each group, so the mean never leaves [5.5, 7.5]
    assert 5.5 <= ci.low and ci.high <= 7.5
    # the two-level version also draws groups: much wider
    wide = stratified_bootstrap_ci(groups, n_resamples=1000, seed=7, resample_groups=True)
    assert wide.low < ci.low and wide.high > ci.high


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="values"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1, 2], confidence=1.5)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci([1, 2], n_resamples=0)
    with pytest.raises(ValueError, match="method"):
        bootstrap_ci([1, 2], method="basic")
    with pytest.raises(ValueError, match="groups"):
        stratified_bootstrap_ci({})
    with pytest.raises(ValueError, match=r"groups\[1\]"):
        stratified_bootstrap_ci({0: [1.0], 1: [np.nan]})


def test_compare_controllers_table():
    t = compare_controllers(_hand_results(), "return", baseline="wait", n_resamples=500)
    assert list(t.controller) == ["wait", "sched", "rand"]
    sched = t[t.controller == "sched"].iloc[0]
    assert sched.n == 3 and sched["mean"] == pytest.approx(0.7) and sched.n_pairs == 3
    assert sched.diff_mean == pytest.approx(0.1) and sched.p_improvement == pytest.approx(2.5 / 3)
    assert 0.0 <= sched.diff_ci_low <= 0.1 <= sched.diff_ci_high <= 0.2 + 1e-12  # within the diffs [0.1, 0, 0.2]
    assert np.isnan(t[t.controller == "wait"].diff_mean.iloc[0])
    assert t[t.controller == "rand"].n.iloc[0] == 2 and t[t.controller == "rand"].n_pairs.iloc[0] == 1


def _with_training_seeds() -> pd.DataFrame:
    rows = [{"controller": "wait", "seed": s, "return": 0.1 * s} for s in range(4)]
    for ts, gain in ((0, 0.0), (1, 0.2)):
        rows += [{"controller": "ppo", "train_seed": ts, "seed": s, "return": 0.1 * s + gain + 0.01 * s} for s in range(4)]
    return pd.DataFrame(rows)


def test_compare_controllers_by_training_seed():
    t = compare_controllers(_with_training_seeds(), "return", baseline="wait", n_resamples=500)
    ppo = t[t.controller == "ppo"].set_index("train_seed")
    assert list(ppo.index) == [0, 1, "all"] and list(t[t.controller == "wait"].train_seed) == ["all"]
    assert ppo.loc[0, "diff_mean"] == pytest.approx(0.015) and ppo.loc[1, "diff_mean"] == pytest.approx(0.215)
    assert ppo.loc["all", "diff_mean"] == pytest.approx(0.115) and ppo.loc["all", "n_pairs"] == 8
    assert 0.0 <= ppo.loc["all", "diff_ci_low"] <= 0.115 <= ppo.loc["all", "diff_ci_high"] <= 0.23
    flat = compare_controllers(_with_training_seeds(), "return", baseline="wait", by_training_seed=False, n_resamples=200)
    assert "train_seed" not in flat.columns and len(flat) == 2
    s = summarize_differences(paired_differences(_with_training_seeds(), "return", "wait"), n_resamples=200)
    assert list(s.train_seed) == [0, 1, "all"]


def test_plot_paired_differences_draws_one_point_per_episode():
    results = _hand_results()
    fig = plot_paired_differences(results, "return", baseline="wait", n_resamples=200)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    points = sum(len(c.get_offsets()) for c in ax.collections if c.get_gid() == POINTS_GID)
    assert points == len(paired_differences(results, "return", "wait")) == 4
    assert "n=3" in ax.get_xticklabels()[0].get_text()
    assert any(np.allclose(line.get_ydata(), 0.0) for line in ax.get_lines())  # the zero line
    diffs = paired_differences(_with_training_seeds(), "return", "wait")
    fig2 = plot_paired_differences(diffs, "return", baseline="wait", n_resamples=200)
    assert sum(len(c.get_offsets()) for c in fig2.axes[0].collections if c.get_gid() == POINTS_GID) == 8
    import matplotlib.pyplot as plt

    plt.close("all")
