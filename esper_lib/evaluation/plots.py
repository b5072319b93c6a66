"""Figures of the evaluation standard (design 5b): every episode shown, with the paired statistic.

``plot_paired_differences`` draws, per controller, each held-out seed's paired difference with the
baseline as a point (a jittered strip; coloured by training seed when there are several), the mean
difference with its bootstrap CI as an error bar (``stats.summarize_differences``), a
zero line, and ``n`` in the labels. It draws on the ``ax`` it is given (or a new pyplot figure)
and returns the figure; it never calls ``plt.show``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from esper_lib.evaluation.stats import (
    AGGREGATE,
    DEFAULT_RESAMPLES,
    TRAIN_SEED,
    paired_differences,
    summarize_differences,
)

POINTS_GID = "paired_points"  # gid of the per-episode scatter collections (tests count their points)


def plot_paired_differences(
    table_or_results: pd.DataFrame,
    metric: str,
    baseline: str,
    ax: Axes | None = None,
    by: str = "controller",
    pair_on: str | Sequence[str] = "seed",
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    jitter: float = 0.12,
) -> Figure:
    """Per-seed differences ``metric(controller) - metric(baseline)`` with mean and bootstrap CI.

    :param table_or_results: evaluation rows (``evaluate_controller`` frames, concatenated) or a
        table from ``stats.paired_differences`` (recognised by its ``diff`` and
        ``baseline_value`` columns).
    :param metric, baseline: what is compared and against which controller (used for the labels
        when a differences table is given).
    """
    frame = table_or_results
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"table_or_results must be a pandas DataFrame, got {type(frame).__name__}")
    if {"diff", "baseline_value"} <= set(frame.columns):
        diffs = frame
    else:
        diffs = paired_differences(frame, metric, baseline, by=by, pair_on=pair_on)
    summary = summarize_differences(diffs, by=by, confidence=confidence, n_resamples=n_resamples, seed=seed)
    if TRAIN_SEED in summary.columns:
        summary = summary[summary[TRAIN_SEED] == AGGREGATE]
    ax = plt.subplots(figsize=(1.6 + 1.4 * len(summary), 4))[1] if ax is None else ax
    rng = np.random.default_rng(seed)
    train_seeds = diffs[TRAIN_SEED].dropna().unique() if TRAIN_SEED in diffs.columns else []
    colours: dict[Any, Any] = {ts: plt.get_cmap("tab10")(k % 10) for k, ts in enumerate(sorted(train_seeds))}
    labels = []
    for x, row in enumerate(summary.itertuples(index=False)):
        name = getattr(row, by)
        d = diffs[diffs[by] == name]
        offsets = rng.uniform(-jitter, jitter, size=len(d))
        if colours and d[TRAIN_SEED].notna().any():
            point_colours = [colours.get(ts, "0.5") for ts in d[TRAIN_SEED]]
        else:  # a controller without training seeds (a baseline): grey, not a training seed's colour
            point_colours = ["0.45" if colours else "tab:blue"] * len(d)
        ax.scatter(x + offsets, d["diff"], s=14, c=point_colours, alpha=0.6, linewidths=0, gid=POINTS_GID, zorder=2)
        low, high = row.diff_ci_low, row.diff_ci_high
        ax.errorbar(
            x + 2.2 * jitter, row.diff_mean, yerr=[[row.diff_mean - low], [high - row.diff_mean]],
            fmt="o", color="black", capsize=5, markersize=6, zorder=3,
        )
        labels.append(f"{name}\n(n={row.n_pairs})")
    ax.axhline(0.0, color="0.3", linestyle="--", linewidth=1, zorder=1)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_ylabel(f"{metric}: controller - {baseline}")
    ax.set_title(
        f"Paired difference with {baseline} per held-out seed\n"
        f"points: episodes; bar: mean and {confidence:.0%} bootstrap CI",
        fontsize=10,
    )
    if colours:
        for ts, colour in colours.items():
            label = int(ts) if float(ts).is_integer() else ts  # train_seed is float when baselines (NaN) share the column
            ax.scatter([], [], color=colour, s=14, label=f"training seed {label}")
        ax.legend(fontsize=7, loc="best")
    ax.figure.tight_layout()
    return ax.figure
