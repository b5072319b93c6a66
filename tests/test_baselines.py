"""Baseline controllers, the evaluation harness and its summary."""
from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from esper_lib.constants import (
    CANONICAL_ACTION,
    HEAD_NAMES,
    HEAD_RELEVANCE,
    AlphaSpeedAction,
    BlueprintAction,
    LifecycleOp,
    SeedStage,
)
from esper_lib.envs.blueprints import CNN_BLUEPRINTS
from esper_lib.envs.morpho import MorphoEnv, make_morpho_env
from esper_lib.evaluation.baselines import (
    AlwaysWaitController,
    HeuristicController,
    RandomMaskedController,
    evaluate_controller,
    make_action,
    summarize_results,
)
from esper_lib.observation import feature_index

Op = LifecycleOp
TINY = dict(max_epochs=10, train_size=64, val_size=40, batch_size=32)
tiny_fn = functools.partial(make_morpho_env, **TINY)


def test_make_action_canonicalises_irrelevant_heads():
    a = make_action(Op.PRUNE, slot=2, blueprint=5, alpha_speed=3, alpha_curve=4, tempo=0)
    assert a.dtype == np.int64 and a.shape == (8,)
    expected = {"op": 3, "slot": 2, "alpha_speed": 3, "alpha_curve": 4}
    for i, name in enumerate(HEAD_NAMES):
        assert a[i] == expected.get(name, CANONICAL_ACTION[name]), name
    with pytest.raises(ValueError, match="unknown heads"):
        make_action(Op.WAIT, colour=1)


def test_random_masked_controller_only_takes_valid_actions():
    env = MorphoEnv(**{**TINY, "max_epochs": 25, "seed_budget": 10})
    ctrl = RandomMaskedController(seed=0)
    ops = set()
    for seed in (0, 1):
        obs, _ = env.reset(seed=seed)
        ctrl.reset(seed=seed)
        for _ in range(25):
            action = ctrl.act(obs)
            op = Op(int(action[0]))
            masks = obs["action_mask"]
            assert masks["op"][op] == 1
            if op != Op.WAIT:
                assert masks["slot_by_op"][op, action[1]] == 1
            if op == Op.GERMINATE:
                assert BlueprintAction(int(action[2])) in CNN_BLUEPRINTS
            for i, name in enumerate(HEAD_NAMES[1:], start=1):  # irrelevant heads hold the placeholder
                if name not in HEAD_RELEVANCE[op]:
                    assert action[i] == CANONICAL_ACTION[name]
            obs, _, _, _, info = env.step(action)
            assert info["action_valid"]
            ops.add(op)
    assert len(ops) >= 4  # it explores the lifecycle, not just WAIT/GERMINATE


def test_random_masked_controller_is_reproducible_and_validates_wait_prob():
    env = MorphoEnv(**TINY)
    obs, _ = env.reset(seed=0)
    a = [RandomMaskedController(seed=3).act(obs) for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    c = RandomMaskedController(seed=1)
    c.reset(seed=3)
    assert np.array_equal(c.act(obs), a[0])
    always = RandomMaskedController(seed=0, wait_prob=1.0)
    assert all(always.act(obs)[0] == Op.WAIT for _ in range(5))
    with pytest.raises(ValueError, match="wait_prob"):
        RandomMaskedController(wait_prob=1.5)


# ------------------------------------------------------------------------------ heuristic rules


def _obs_with(env: MorphoEnv, **features: float) -> dict:
    """A reset observation with some features overwritten by name (a synthetic state for rule tests)."""
    obs, _ = env.reset(seed=0)
    obs = {k: (v.copy() if isinstance(v, np.ndarray) else {m: x.copy() for m, x in v.items()}) for k, v in obs.items()}
    for name, value in features.items():
        obs["state"][feature_index(name)] = value
    return obs


def _set_stage(obs: dict, slot: int, stage: SeedStage, **slot_features: float) -> None:
    for s in SeedStage:
        obs["state"][feature_index(f"slot{slot}.stage_{s.name.lower()}")] = float(s == stage)
    for name, value in slot_features.items():
        obs["state"][feature_index(f"slot{slot}.{name}")] = value


def test_heuristic_rules_on_synthetic_states():
    env = MorphoEnv(**TINY)
    h = HeuristicController()
    masks_all = np.ones((6, 3), dtype=np.int8)

    # fossilize a HOLDING seed that helps, prune one that does not
    obs = _obs_with(env)
    obs["action_mask"]["slot_by_op"] = masks_all
    _set_stage(obs, 1, SeedStage.HOLDING, contribution=0.3, counterfactual_freshness=1.0)
    assert make_action(Op.FOSSILIZE, slot=1).tolist() == h.act(obs).tolist()
    _set_stage(obs, 1, SeedStage.HOLDING, contribution=-0.05, counterfactual_freshness=1.0)
    assert h.act(obs).tolist() == make_action(Op.PRUNE, slot=1, alpha_speed=int(AlphaSpeedAction.INSTANT)).tolist()

    # a harmful blend is cut after the grace period only
    _set_stage(obs, 1, SeedStage.BLENDING, contribution=-0.5, counterfactual_freshness=1.0, epochs_in_stage=0.1)
    assert h.act(obs)[0] == Op.WAIT
    _set_stage(obs, 1, SeedStage.BLENDING, contribution=-0.5, counterfactual_freshness=1.0, epochs_in_stage=0.2)
    assert h.act(obs)[0] == Op.PRUNE

    # a training seed advances only with healthy gradients and when the mask allows it
    _set_stage(obs, 1, SeedStage.TRAINING, grad_health=1.0, grad_vanishing=0.0, grad_exploding=0.0, epochs_in_stage=0.2)
    assert h.act(obs).tolist() == make_action(Op.ADVANCE, slot=1).tolist()
    _set_stage(obs, 1, SeedStage.TRAINING, grad_health=0.1, grad_vanishing=1.0, grad_exploding=0.0, epochs_in_stage=0.2)
    assert h.act(obs)[0] == Op.WAIT
    _set_stage(obs, 1, SeedStage.TRAINING, epochs_in_stage=0.6)
    assert h.act(obs)[0] == Op.PRUNE


def test_heuristic_germinates_on_a_plateau_only():
    env = MorphoEnv(**TINY)
    h = HeuristicController()
    hist = {f"val_accuracy_hist_{i}": v for i, v in enumerate([0.5, 0.6, 0.7, 0.8, 0.9])}
    climbing = _obs_with(env, best_accuracy=0.9, epochs_since_improvement=0.0, **hist)
    assert h.act(climbing)[0] == Op.WAIT
    flat = {f"val_accuracy_hist_{i}": v for i, v in enumerate([0.5, 0.6, 0.89, 0.9, 0.9])}
    plateau = _obs_with(env, best_accuracy=0.9, epochs_since_improvement=0.0, **flat)
    action = h.act(plateau)
    assert action[0] == Op.GERMINATE and action[1] == 2  # deepest dormant slot first
    assert action[2] == int(BlueprintAction.CONV_HEAVY)
    stuck = _obs_with(env, best_accuracy=0.9, epochs_since_improvement=0.2, **hist)
    action = h.act(stuck)
    assert action[0] == Op.GERMINATE and action[2] == int(BlueprintAction.CONV_SMALL)  # blueprints cycle
    fresh = _obs_with(env)  # nothing observed yet: no plateau
    assert h.act(fresh)[0] == Op.WAIT


# ------------------------------------------------------------------------------ evaluation


def test_evaluate_controller_rows_and_columns():
    df = evaluate_controller(RandomMaskedController(seed=0), tiny_fn, seeds=[0, 1, 2])
    assert len(df) == 3 and df["seed"].tolist() == [0, 1, 2]
    for col in (
        "controller",
        "return",
        "final_val_accuracy",
        "best_val_accuracy",
        "initial_val_accuracy",
        "germinations",
        "fossilizations",
        "prunes",
        "seed_params",
        "invalid_actions",
        "reward_accuracy_delta",
        "reward_rent",
        "reward_terminal",
    ):
        assert col in df.columns, col
    assert (df["controller"] == "random_masked").all()
    assert (df["steps"] == TINY["max_epochs"]).all() and (df["invalid_actions"] == 0).all()
    # one "s<slot>:<BLUEPRINT>" entry per executed germination
    grown = df["germinated"].fillna("").map(lambda g: [x for x in g.split(",") if x])
    assert (grown.map(len) == df["germinations"]).all()
    assert all(x.split(":")[1] in BlueprintAction.__members__ for g in grown for x in g)
    terms = df[["reward_accuracy_delta", "reward_rent", "reward_terminal"]].sum(axis=1)
    assert np.allclose(df["return"], terms)
    # accuracy terms telescope: sum of deltas = final - initial
    assert np.allclose(df["reward_accuracy_delta"], df["final_val_accuracy"] - df["initial_val_accuracy"])
    assert (df["best_val_accuracy"] >= df["final_val_accuracy"]).all()


def test_evaluate_controller_accepts_any_object_with_act():
    class Plain:  # no reset, no name: like a thin wrapper around a trained policy
        def __init__(self):
            self.calls = 0

        def act(self, obs):
            self.calls += 1
            return make_action(Op.WAIT)

    plain = Plain()
    df = evaluate_controller(plain, tiny_fn, seeds=[5], max_steps=4, name="ppo")
    assert plain.calls == 4 and df.loc[0, "steps"] == 4 and df.loc[0, "controller"] == "ppo"
    assert df.loc[0, "germinations"] == 0 and df.loc[0, "reward_rent"] == 0.0


def test_summarize_results_means_and_confidence_intervals():
    df = pd.DataFrame(
        {"controller": ["a"] * 4 + ["b"], "return": [1.0, 2.0, 3.0, 4.0, 7.0], "final_val_accuracy": [0.5] * 5}
    )
    out = summarize_results(df, metrics=("return", "final_val_accuracy")).set_index("controller")
    half = stats.t.ppf(0.975, 3) * np.std([1, 2, 3, 4], ddof=1) / 2
    assert out.loc["a", "n"] == 4 and out.loc["a", "return_mean"] == pytest.approx(2.5)
    assert out.loc["a", "return_ci_low"] == pytest.approx(2.5 - half)
    assert out.loc["a", "return_ci_high"] == pytest.approx(2.5 + half)
    assert out.loc["a", "final_val_accuracy_ci_low"] == pytest.approx(0.5)  # zero spread
    assert np.isnan(out.loc["b", "return_ci_low"]) and out.loc["b", "return_mean"] == 7.0
    with pytest.raises(ValueError, match="no column"):
        summarize_results(df, metrics=("nope",))


def test_heuristic_beats_always_wait_on_short_episodes():
    """Deterministic: fixed seeds; a host still slow to learn, where a well-timed seed adds capacity."""
    fn = functools.partial(make_morpho_env, max_epochs=14, train_size=500, val_size=300)
    seeds = range(8)
    wait = evaluate_controller(AlwaysWaitController(), fn, seeds)
    heur = evaluate_controller(HeuristicController(), fn, seeds)
    assert (wait["germinations"] == 0).all() and heur["germinations"].sum() >= 3
    assert heur["fossilizations"].sum() >= 2 and (heur["invalid_actions"] == 0).all()
    gain = heur["final_val_accuracy"].to_numpy() - wait["final_val_accuracy"].to_numpy()
    assert gain.mean() > 0.01, f"heuristic - wait per seed: {gain.round(3)}"
    assert (gain > 0).sum() >= 5
    summary = summarize_results(pd.concat([wait, heur]), metrics=("final_val_accuracy",)).set_index("controller")
    assert summary.loc["heuristic", "final_val_accuracy_mean"] > summary.loc["always_wait", "final_val_accuracy_mean"]
