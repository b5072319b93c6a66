"""Pool several notebook 04 runs into one evaluation over all their training seeds.

Notebook 04 evaluates every run's greedy policy on the same held-out env seeds, so runs with different
``train_seeds`` (and otherwise the same parameters) can be read as one study: this script concatenates their
``evaluation_episodes.csv``, checks that the baselines' episodes agree (same held-out seeds, same env: the runs
are comparable) and that no training seed appears twice, and prints ``controller`` against ``--baseline`` per
training seed and pooled, with the stratified interval (these runs) and the two-level one (a new run).

    .venv/bin/python -m esper_lib.notebooks.runner --only 04_short_training                               # seeds 0-2
    .venv/bin/python -m esper_lib.notebooks.runner --only 04_short_training -p train_seeds "[3, 4, 5, 6, 7, 8]" \\
        --out-root artefacts/seeds3to8
    .venv/bin/python scripts/pool_training_runs.py artefacts/04_short_training/evaluation_episodes.csv \\
        artefacts/seeds3to8/04_short_training/evaluation_episodes.csv
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from esper_lib.evaluation.stats import compare_controllers


def pool_runs(frames: list[pd.DataFrame], controller: str = "ppo", baseline: str = "always_wait") -> pd.DataFrame:
    """One episodes frame with ``controller``'s episodes of every run and ``baseline``'s once.

    Raises ValueError when a run lacks either, when the baseline's episodes differ between runs (other held-out
    seeds or another env) or when a training seed appears in two runs.
    """
    if len(frames) < 1:
        raise ValueError("pool_runs needs at least one run's episodes")
    for k, f in enumerate(frames):
        columns = {"controller", "seed", "return", "train_seed"} - set(f.columns)
        if columns:
            raise ValueError(f"run {k} lacks the column(s) {sorted(columns)} of notebook 04's evaluation_episodes.csv")
        missing = {controller, baseline} - set(f["controller"])
        if missing:
            raise ValueError(f"run {k} has no episodes of {sorted(missing)}")
        trained = f[f.controller == controller]
        if trained["train_seed"].isna().any():
            raise ValueError(f"run {k} has {controller} episodes without a train_seed")
        held_out = set(f.loc[f.controller == baseline, "seed"])
        uncovered = [int(t) for t, g in trained.groupby("train_seed") if set(g["seed"]) != held_out]
        if uncovered:
            raise ValueError(f"run {k}: the episodes of training seed(s) {uncovered} are not on the {baseline} episodes' held-out seeds")
    base = [f[f.controller == baseline].sort_values("seed")[["seed", "return"]].reset_index(drop=True) for f in frames]
    for k, b in enumerate(base[1:], start=1):
        if not b.equals(base[0]):
            raise ValueError(f"run {k}'s {baseline} episodes differ from run 0's: other held-out seeds or another env")
    seeds = pd.Series([s for f in frames for s in f.loc[f.controller == controller, "train_seed"].unique()])
    if seeds.duplicated().any():
        raise ValueError(f"training seeds appear in more than one run: {sorted(int(t) for t in seeds[seeds.duplicated()].unique())}")
    return pd.concat([frames[0][frames[0].controller == baseline], *(f[f.controller == controller] for f in frames)], ignore_index=True)


def pooled_table(pooled: pd.DataFrame, baseline: str = "always_wait") -> pd.DataFrame:
    """Per training seed and ``all``: the paired difference with ``baseline`` and its two intervals."""
    tables = [compare_controllers(pooled, "return", baseline=baseline, resample_training_seeds=two) for two in (False, True)]
    rows = [t[t.controller != baseline][["train_seed", "diff_mean", "diff_ci_low", "diff_ci_high"]] for t in tables]
    out = rows[0].rename(columns={"diff_ci_low": "ci_low", "diff_ci_high": "ci_high"}).reset_index(drop=True)
    # resampling the training runs needs at least two of them: with one, no interval for a new run
    pooled_row = (out.train_seed.astype(str) == "all") & ((out.train_seed.astype(str) != "all").sum() >= 2)
    out["two_level_low"] = np.where(pooled_row, rows[1].diff_ci_low.to_numpy(), np.nan)
    out["two_level_high"] = np.where(pooled_row, rows[1].diff_ci_high.to_numpy(), np.nan)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("episodes", nargs="+", type=Path, help="evaluation_episodes.csv of each notebook 04 run")
    parser.add_argument("--controller", default="ppo", help="the trained controller (ppo: greedy, ppo_sampled)")
    parser.add_argument("--baseline", default="always_wait")
    args = parser.parse_args()
    for path in args.episodes:
        if not path.is_file():
            parser.error(f"no such file: {path}")
    try:
        pooled = pool_runs([pd.read_csv(p) for p in args.episodes], args.controller, args.baseline)
    except ValueError as exc:
        parser.error(str(exc))
    table = pooled_table(pooled, args.baseline)
    per_seed = table[table.train_seed.astype(str) != "all"].diff_mean
    print(f"{args.controller} - {args.baseline}, {len(per_seed)} training seeds x {pooled.seed.nunique()} held-out env seeds")
    with pd.option_context("display.width", 200, "display.float_format", "{:+.3f}".format):
        print(table.to_string(index=False))
    print(f"median over training seeds {per_seed.median():+.3f}; at the baseline (|difference| < 0.01): {int((per_seed.abs() < 0.01).sum())}")


if __name__ == "__main__":
    main()
