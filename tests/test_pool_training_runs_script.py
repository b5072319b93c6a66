"""scripts/pool_training_runs.py: notebook 04 runs with other training seeds pooled into one evaluation."""
import sys

import numpy as np
import pandas as pd
import pytest

from script_support import load_script


def _run(train_seeds: list[int], gain: float, held_out: range = range(10_000, 10_008)) -> pd.DataFrame:
    """A notebook 04 episodes frame: always-WAIT on the held-out seeds, and each training seed's greedy policy
    gaining ``gain * (k + 1)`` on every episode (k: its position in the run)."""
    wait = pd.DataFrame({"controller": "always_wait", "seed": list(held_out), "return": [1.0 + 0.01 * (s % 5) for s in held_out],
                         "train_seed": np.nan})
    ppo = [wait.assign(controller="ppo", train_seed=float(t), **{"return": wait["return"] + gain * (k + 1)}) for k, t in enumerate(train_seeds)]
    return pd.concat([wait, *ppo], ignore_index=True)


def test_pooled_runs_give_each_training_seed_and_the_pooled_difference():
    module = load_script("pool_training_runs")
    pooled = module.pool_runs([_run([0, 1], 0.1), _run([2], 0.05)])
    assert (pooled.controller == "always_wait").sum() == 8  # the baseline once
    table = module.pooled_table(pooled)
    per_seed = dict(zip(table.train_seed.astype(str), table.diff_mean))
    assert per_seed["0"] == pytest.approx(0.1) and per_seed["1"] == pytest.approx(0.2) and per_seed["2"] == pytest.approx(0.05)
    assert per_seed["all"] == pytest.approx((0.1 + 0.2 + 0.05) / 3)
    row = table[table.train_seed.astype(str) == "all"].iloc[0]
    assert row.two_level_low < row.ci_low <= row.diff_mean <= row.ci_high < row.two_level_high  # resampling runs widens it


def test_runs_that_cannot_be_pooled_are_refused():
    module = load_script("pool_training_runs")
    with pytest.raises(ValueError, match=r"training seeds appear in more than one run: \[1\]"):
        module.pool_runs([_run([0, 1], 0.1), _run([1], 0.1)])
    with pytest.raises(ValueError, match="run 1's always_wait episodes differ from run 0's"):
        module.pool_runs([_run([0], 0.1), _run([1], 0.1, held_out=range(20_000, 20_008))])
    with pytest.raises(ValueError, match=r"run 0 has no episodes of \['ppo'\]"):
        module.pool_runs([_run([0], 0.1).query("controller != 'ppo'")])
    with pytest.raises(ValueError, match=r"run 0 lacks the column\(s\) \['train_seed'\]"):
        module.pool_runs([_run([0], 0.1).drop(columns="train_seed")])
    unlabelled = _run([0], 0.1)
    unlabelled.loc[unlabelled.controller == "ppo", "train_seed"] = np.nan
    with pytest.raises(ValueError, match="run 0 has ppo episodes without a train_seed"):
        module.pool_runs([unlabelled])
    short = _run([0, 1], 0.1)
    short = short.drop(short.index[(short.controller == "ppo") & (short.train_seed == 1) & (short.seed == 10_003)])
    with pytest.raises(ValueError, match=r"training seed\(s\) \[1\] are not on the always_wait episodes' held-out seeds"):
        module.pool_runs([short])


def test_one_training_seed_has_no_interval_for_a_new_run():
    module = load_script("pool_training_runs")
    table = module.pooled_table(module.pool_runs([_run([0], 0.1)]))
    row = table[table.train_seed.astype(str) == "all"].iloc[0]
    assert row.diff_mean == pytest.approx(0.1) and np.isnan(row.two_level_low) and np.isnan(row.two_level_high)


def test_main_prints_the_pooled_table(tmp_path, monkeypatch, capsys):
    paths = []
    for k, seeds in enumerate(([0, 1], [2])):
        paths.append(tmp_path / f"run{k}.csv")
        _run(seeds, 0.1).to_csv(paths[-1], index=False)
    monkeypatch.setattr(sys, "argv", ["pool_training_runs.py", *map(str, paths)])
    load_script("pool_training_runs").main()
    out = capsys.readouterr().out
    assert "3 training seeds x 8 held-out env seeds" in out and "median over training seeds +0.100" in out  # gains 0.1, 0.2 and 0.1


def test_main_reports_runs_that_cannot_be_pooled_as_usage_errors(tmp_path, monkeypatch, capsys):
    paths = [tmp_path / "a.csv", tmp_path / "b.csv"]
    _run([0], 0.1).to_csv(paths[0], index=False)
    _run([0], 0.1).to_csv(paths[1], index=False)
    monkeypatch.setattr(sys, "argv", ["pool_training_runs.py", *map(str, paths)])
    with pytest.raises(SystemExit) as exc:
        load_script("pool_training_runs").main()
    assert exc.value.code == 2 and "training seeds appear in more than one run: [0]" in capsys.readouterr().err
