"""Probe environments: Gymnasium compliance, documented optima, and PPO reaching them.

PPO runs use small networks (32/32), 4 envs x 16 steps, fixed seeds, one torch thread; each probe
is checked every 5 updates and the run stops as soon as the learned values are within 0.1 of the
true ones and the optimal action has probability >= 0.9 at every evaluated step. Every probe runs
twice: the update in float32, and under bfloat16 autocast (``PPOConfig.autocast_bf16``).
"""
import warnings

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from esper_lib.constants import HEAD_NAMES, NUM_OPS, LifecycleOp
from esper_lib.envs.probes import (
    PROBES,
    VIOLATION_REWARD,
    MaskedActionProbe,
    MemoryProbe,
    TruncationProbe,
    make_probe,
)
from esper_lib.ppo import PolicyController, PPOConfig, PPOTrainer, probe_report

VALUE_TOL, P_MIN = 0.1, 0.9


# --- the envs themselves ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PROBES))
def test_probe_passes_gymnasium_env_checker(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(make_probe(name), skip_render_check=True)


def optimal_play(env, obs):
    """An action of the documented optimal policy: the probe's optimal heads, any valid choice elsewhere."""
    best = env.optimal_action()
    masks = obs["action_mask"]
    op = best.get("op", int(np.flatnonzero(masks["op"])[0]))
    action = []
    for name in HEAD_NAMES:
        if name == "op":
            action.append(op)
        elif name in best:
            action.append(best[name])
        else:
            m = masks[name] & (masks["slot_by_op"][op] if name == "slot" else 1)
            action.append(int(np.flatnonzero(m)[0]))
    return np.array(action, dtype=np.int64)


@pytest.mark.parametrize("name", sorted(PROBES))
def test_documented_optimum_matches_the_discounted_return_of_optimal_play(name):
    env = make_probe(name)
    for seed in range(6):
        obs, _ = env.reset(seed=seed)
        claims, rewards, finite = [], [], []
        done = False
        while not done:
            v = env.optimal_value()
            q = env.optimal_q()
            assert q.shape == (NUM_OPS,)
            best_op = env.optimal_action().get("op")
            if best_op is not None:
                assert q[best_op] == pytest.approx(v) and np.nanmax(q) == pytest.approx(v)
            assert np.all(np.isnan(q) == (obs["action_mask"]["op"] == 0))  # NaN exactly on masked ops
            claims.append(v)
            if isinstance(env, TruncationProbe):
                finite.append(env.finite_horizon_value())
            obs, r, term, trunc, info = env.step(optimal_play(env, obs))
            assert not info["masked_violation"]
            rewards.append(r)
            done = term or trunc
        returns = [sum(env.gamma**k * r for k, r in enumerate(rewards[t:])) for t in range(len(rewards))]
        if isinstance(env, TruncationProbe):
            # the episode is cut: its discounted return is the finite-horizon value, the true value is 1/(1-gamma)
            assert trunc and not term
            np.testing.assert_allclose(returns, finite)
            np.testing.assert_allclose(claims, 1.0 / (1.0 - env.gamma))
            assert finite[-1] == pytest.approx(1.0)
        else:
            assert term and not trunc
            np.testing.assert_allclose(returns, claims)
    assert env.masked_violations == 0


def test_masked_action_is_counted_and_penalised():
    env = MaskedActionProbe()
    seed = next(s for s in range(20) if env.reset(seed=s) and env.best_masked)
    obs, _ = env.reset(seed=seed)
    assert obs["action_mask"]["op"][MaskedActionProbe.BEST_OP] == 0
    action = np.zeros(8, dtype=np.int64)
    action[0] = MaskedActionProbe.BEST_OP
    _, r, *_ , info = env.step(action)
    assert r == VIOLATION_REWARD and info["masked_violation"] and env.masked_violations == 1


def _action(**heads: float) -> np.ndarray:
    a = np.zeros(8, dtype=np.int64 if all(float(v).is_integer() for v in heads.values()) else np.float64)
    for name, v in heads.items():
        a[HEAD_NAMES.index(name)] = v
    return a


@pytest.mark.parametrize("name", sorted(PROBES))
@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(op=6), r"action\[op\] = 6 is outside \[0, 5\]"),
        (dict(blueprint=13), r"action\[blueprint\] = 13 is outside \[0, 12\]"),
        (dict(op=-1), r"action\[op\] = -1 is outside"),
        (dict(op=4.7), "action must be an integer array, got dtype float64"),
    ],
)
def test_probe_rejects_actions_outside_the_action_space_like_morpho(name, bad, match):
    env = make_probe(name)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=match):
        env.step(_action(**bad))
    with pytest.raises(ValueError, match=r"action must have shape \(8,\)"):
        env.step(np.zeros(7, dtype=np.int64))
    env.step(np.zeros(8, dtype=np.int64))  # a bad action changed nothing: a valid one still steps


@pytest.mark.parametrize("name", sorted(PROBES))
def test_probe_step_after_episode_end_without_reset_raises(name):
    env = make_probe(name)
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(np.zeros(8, dtype=np.int64))
    env.reset(seed=0)
    done = False
    while not done:
        _, _, terminated, truncated, _ = env.step(np.zeros(8, dtype=np.int64))
        done = terminated or truncated
    with pytest.raises(RuntimeError, match="after the episode ended: call reset"):
        env.step(np.zeros(8, dtype=np.int64))
    env.reset(seed=1)
    env.step(np.zeros(8, dtype=np.int64))


@pytest.mark.parametrize("name", ["memory", "truncation", "observation"])
def test_get_set_state_continues_exactly(name):
    a, b = make_probe(name), make_probe(name)
    a.reset(seed=3)
    _, _, terminated, truncated, _ = a.step(optimal_play(a, a._obs()))
    if terminated or truncated:  # a finished episode must be reset before the next step
        a.reset()
    b.reset(seed=99)
    b.set_state(a.get_state())
    for _ in range(12):
        act = optimal_play(a, a._obs())
        oa, ra, ta, ua, _ = a.step(act)
        ob, rb, tb, ub, _ = b.step(act)
        assert np.array_equal(oa["state"], ob["state"]) and (ra, ta, ua) == (rb, tb, ub)
        if ta or ua:
            assert np.array_equal(a.reset()[0]["state"], b.reset()[0]["state"])


# --- PPO reaches the optimum ----------------------------------------------------------------------

BASE = dict(
    num_envs=4, num_steps=16, seq_len=4, minibatch_sequences=4, epochs=4, lr=3e-3, feature_dim=32, hidden_dim=32,
    ent_coef=0.001, max_grad_norm=1.0, target_kl=None, num_threads=1, gamma=0.9, seed=0,
)
CASES = {
    # probe: (max updates, config changes)
    "constant": (40, {}),
    "observation": (40, {}),
    "delayed": (40, {}),
    "op": (40, {}),
    "masked": (40, {}),
    "secondary": (40, {}),
    "memory": (100, {}),
    # no action matters here: unnormalised advantages keep the actor's noise from shaking the critic
    "truncation": (80, {"gamma": 0.8, "normalize_advantages": False}),
}


def optimal_enough(report) -> bool:
    value_ok = bool(((report.q_optimal_op - report.true_value).abs() < VALUE_TOL).all())
    p = report.p_optimal.dropna()
    return value_ok and bool((p >= P_MIN).all())


def train_probe(name: str, autocast_bf16: bool = False):
    max_updates, changes = CASES[name]
    cfg = PPOConfig(**{**BASE, **changes, "total_updates": max_updates, "autocast_bf16": autocast_bf16})
    make = lambda: make_probe(name, gamma=cfg.gamma)  # noqa: E731
    trainer = PPOTrainer(make, cfg)
    result = {"solved_at": None}

    def check(tr, row):
        if (row["update"] + 1) % 5:
            return True
        result["report"] = probe_report(tr.policy, make(), tr.normalizer, episodes=8, seed=100)
        if optimal_enough(result["report"]):
            result["solved_at"] = row["update"] + 1
            return False
        return True

    trainer.run(progress=False, callback=check)
    return trainer, result["report"], result["solved_at"]


@pytest.mark.parametrize("autocast_bf16", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_ppo_reaches_the_known_optimum(name, autocast_bf16):
    trainer, report, solved_at = train_probe(name, autocast_bf16)
    worst = (report.q_optimal_op - report.true_value).abs().max()
    assert solved_at is not None, f"{name} ({'bf16 autocast' if autocast_bf16 else 'fp32'}): not solved in {CASES[name][0]} updates (worst value error {worst:.3f}, min p {report.p_optimal.min():.3f})"
    assert worst < VALUE_TOL
    if report.p_optimal.notna().any():
        assert report.p_optimal.min() >= P_MIN
    if name in ("observation", "masked", "memory"):
        assert set(report.cue) == {-1.0, 1.0}  # both situations were evaluated
    if name == "truncation":
        # at the cut the learned value is the infinite-horizon one, far from the finite-horizon one
        cut = report.groupby("episode").tail(1)
        assert ((cut.q_optimal_op - cut.finite_horizon_value) > 3.0).all()
    if name == "masked":
        assert all(e.masked_violations == 0 for e in trainer.env.envs)  # never took a masked op in training
        env, ctl = MaskedActionProbe(), PolicyController(trainer.policy, trainer.normalizer)
        for seed in range(8):
            obs, _ = env.reset(seed=seed)
            ctl.reset()
            ctl.act(obs)
            if env.best_masked:
                assert float(ctl.last.op_probs[0, MaskedActionProbe.BEST_OP]) == 0.0  # exactly, not just small
    if name == "memory":
        last = report[report.t == MemoryProbe().episode_length - 1]
        assert (last.op == last.optimal_op).all() and set(last.optimal_op) == set(MemoryProbe.OPS)
    if name == "secondary":
        assert (report.op == int(LifecycleOp.GERMINATE)).all()
