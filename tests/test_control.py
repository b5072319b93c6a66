"""State-aware references: the contribution gate reads the observation, hindsight takes the per-seed best."""
from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest

from esper_lib.constants import BlueprintAction, LifecycleOp, TempoAction
from esper_lib.envs.morpho import MorphoEnv
from esper_lib.evaluation.baselines import evaluate_controller
from esper_lib.evaluation.control import ContributionGatedController, hindsight_best
from esper_lib.evaluation.schedules import FixedSchedule, ScheduleController

TINY = dict(max_epochs=10, train_size=100, val_size=40, batches_per_epoch=2)
tiny_fn = functools.partial(MorphoEnv, **TINY)
PLAN = FixedSchedule(0, BlueprintAction.NORM, 0, tempo=TempoAction.FAST, extra_seedings=((1, BlueprintAction.NORM, 0),))


def test_gate_below_every_contribution_plays_the_schedule_and_above_every_one_prunes_instead_of_fossilizing():
    seeds = [0, 1]
    plain = evaluate_controller(ScheduleController(PLAN), tiny_fn, seeds)
    keep_all = evaluate_controller(ContributionGatedController(PLAN, min_contribution=-1e6), tiny_fn, seeds)
    keep_none = evaluate_controller(ContributionGatedController(PLAN, min_contribution=1e6), tiny_fn, seeds)
    assert list(keep_all["ops"]) == list(plain["ops"])
    np.testing.assert_array_equal(keep_all["return"], plain["return"])
    assert (plain["fossilizations"] >= 1).all() and (plain["prunes"] == 0).all()
    assert (keep_none["fossilizations"] == 0).all()
    np.testing.assert_array_equal(keep_none["prunes"], plain["fossilizations"])  # each would-be fossil is pruned
    for ops in keep_none["ops"]:
        assert str(int(LifecycleOp.FOSSILIZE)) not in ops.split(",")


def test_gate_rejects_a_non_finite_threshold():
    with pytest.raises(ValueError, match="min_contribution"):
        ContributionGatedController(PLAN, min_contribution=float("nan"))


def test_hindsight_best_takes_each_seeds_best_controller_with_ties_to_the_first():
    episodes = pd.DataFrame({
        "controller": ["a", "a", "a", "b", "b", "b"],
        "seed": [0, 1, 2, 0, 1, 2],
        "return": [1.0, 2.0, 3.0, 1.5, 2.0, 2.5],
    })
    best = hindsight_best(episodes, ["a", "b"])
    assert list(best["seed"]) == [0, 1, 2]
    assert list(best["return"]) == [1.5, 2.0, 3.0]
    assert list(best["chosen"]) == ["b", "a", "a"]  # seed 1 is a tie: the first listed wins
    assert set(best["controller"]) == {"hindsight_best"}


def test_hindsight_best_needs_a_full_grid():
    episodes = pd.DataFrame({"controller": ["a", "a", "b"], "seed": [0, 1, 0], "return": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="every controller must play every seed"):
        hindsight_best(episodes, ["a", "b"])
    with pytest.raises(ValueError, match=r"\['c'\]"):
        hindsight_best(episodes, ["a", "c"])
