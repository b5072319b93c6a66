"""State-aware references: the contribution gate reads the observation, hindsight takes the per-seed best."""
from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest

from esper_lib.constants import BlueprintAction, LifecycleOp, TempoAction
from esper_lib.envs.morpho import MorphoEnv
from esper_lib.evaluation.baselines import evaluate_controller
from esper_lib.evaluation.control import ContributionGatedController, GradNormSwitchController, hindsight_best
from esper_lib.evaluation.schedules import FixedSchedule, ScheduleController
from esper_lib.observation import feature_index

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


# 8 minibatches per epoch: enough for a seed at lr 1.0 to show a gradient norm far above one at 5e-3
PROBE_ENV = dict(max_epochs=6, train_size=256, val_size=40, batch_size=32)
PROBE = FixedSchedule(0, BlueprintAction.CONV_HEAVY, 0, tempo=TempoAction.FAST)
FALLBACK = FixedSchedule(1, BlueprintAction.NORM, 0, tempo=TempoAction.FAST)


def _probe_episode(env: MorphoEnv, ctrl: GradNormSwitchController, seed: int, steps: int) -> tuple[dict, dict]:
    obs, info = env.reset(seed=seed)
    ctrl.reset(seed)
    for _ in range(steps):
        obs, *_ = env.step(ctrl.act(obs))
    return obs, info


def test_switch_plays_first_below_the_threshold_and_the_fallback_above_it():
    env_fn = functools.partial(MorphoEnv, **PROBE_ENV)
    plain = evaluate_controller(ScheduleController(PROBE), env_fn, [0])
    never = evaluate_controller(GradNormSwitchController(PROBE, FALLBACK, max_grad_norm=1e9), env_fn, [0])
    assert list(never["ops"]) == list(plain["ops"])
    always = GradNormSwitchController(PROBE, FALLBACK, max_grad_norm=1e-9)
    obs, _ = _probe_episode(env := env_fn(), always, seed=0, steps=PROBE_ENV["max_epochs"])
    assert always.switched
    # the probe never leaves TRAINING; the fallback's seed (germinated at the switch) joins the host
    assert obs["state"][feature_index("slot0.stage_training")] == 1.0 and obs["state"][feature_index("slot0.alpha")] == 0.0
    assert obs["state"][feature_index("slot1.alpha")] > 0.0 and env.host.slots[1].blueprint == BlueprintAction.NORM


def test_switch_decides_on_the_measured_gradient_norm_and_so_reacts_to_the_seed_learning_rate():
    env = MorphoEnv(**PROBE_ENV, seed_lr=[5e-3, 1.0])
    ctrl = GradNormSwitchController(PROBE, FALLBACK, max_grad_norm=0.3)
    decisions = []
    for seed in range(10):
        obs, info = _probe_episode(env, ctrl, seed, steps=2)  # the norm is measured after epoch 1
        ctrl.act(obs)  # the decision
        norm = np.expm1(7 * obs["state"][feature_index("slot0.grad_norm")])
        decisions.append((info["seed_lr"], ctrl.switched))
        assert ctrl.switched == (norm > 0.3) or abs(norm - 0.3) < 1e-3, (seed, norm)
    # at lr 5e-3 seed gradients stay far below 0.3 (about 0.03); at lr 1.0 most exceed it
    assert not any(switched for lr, switched in decisions if lr == 5e-3), decisions
    assert any(switched for lr, switched in decisions if lr == 1.0), decisions


def test_switch_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_grad_norm"):
        GradNormSwitchController(PROBE, FALLBACK, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="first must be a FixedSchedule"):
        GradNormSwitchController("s0-norm@0", FALLBACK, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="fallback must be a FixedSchedule"):
        GradNormSwitchController(PROBE, None, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="must not use slot 0"):
        GradNormSwitchController(PROBE, FixedSchedule(0, BlueprintAction.NORM, 0), max_grad_norm=1.0)


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
