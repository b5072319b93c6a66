"""Trainer: metrics frame, determinism, checkpoint round trip and clear errors, controller, load_trained."""
import math

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
import torch

from esper_lib.checkpoint import save_checkpoint
from esper_lib.envs.probes import MemoryProbe, OpRewardProbe
from esper_lib.ppo import (
    METRIC_COLUMNS,
    TIMING_COLUMNS,
    PolicyController,
    PPOConfig,
    PPOTrainer,
    NonFiniteError,
    compute_advantages,
    load_trained,
    ppo_update,
    train,
)

SMALL = dict(num_envs=2, num_steps=8, seq_len=4, minibatch_sequences=2, epochs=2, feature_dim=16, hidden_dim=16, lr=3e-3, num_threads=1, gamma=0.9)


def deterministic_part(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=list(TIMING_COLUMNS))


def test_train_returns_policy_and_one_row_per_update():
    cfg = PPOConfig(**SMALL, total_updates=3)
    policy, df = train(MemoryProbe, cfg, progress=False)
    assert list(df.columns) == list(METRIC_COLUMNS) and len(df) == 3
    assert df["env_steps"].tolist() == [16, 32, 48]
    for col in ("policy_loss_op", "value_loss", "entropy_op", "approx_kl", "clip_frac_op", "explained_variance", "grad_norm", "steps_per_s"):
        assert np.isfinite(df[col]).all(), col
    assert np.isnan(df["entropy_blueprint"]).all()  # only WAIT / ADVANCE in the memory probe: blueprint never relevant
    assert (df["steps_per_s"] > 0).all()
    assert policy.obs_normalizer is not None and policy.obs_normalizer.count > 0


def test_same_seed_gives_identical_metrics_and_weights():
    cfg = PPOConfig(**SMALL, total_updates=3, seed=7)
    p1, d1 = train(OpRewardProbe, cfg, progress=False)
    p2, d2 = train(OpRewardProbe, cfg, progress=False)
    pd.testing.assert_frame_equal(deterministic_part(d1), deterministic_part(d2))
    for a, b in zip(p1.state_dict().values(), p2.state_dict().values()):
        assert torch.equal(a, b)
    _, d3 = train(OpRewardProbe, cfg.replace(seed=8), progress=False)
    assert not deterministic_part(d1).equals(deterministic_part(d3))


def test_callback_can_stop_and_progress_bar_is_switchable(capsys):
    seen = []
    cfg = PPOConfig(**SMALL, total_updates=5)
    _, df = train(OpRewardProbe, cfg, progress=False, callback=lambda tr, row: seen.append(row["update"]) or len(seen) < 2)
    assert seen == [0, 1] and len(df) == 2
    quiet = capsys.readouterr()
    assert quiet.err == "" and "PPO" not in quiet.out
    train(OpRewardProbe, cfg.replace(total_updates=1), progress=True)
    shown = capsys.readouterr()
    # outside a live notebook the bar is text (esper_lib.progress) and ends on its final state
    assert "PPO" in shown.out + shown.err and "100%" in shown.out + shown.err and "1/1" in shown.out + shown.err


def test_checkpoint_round_trip_resumes_with_identical_next_update(tmp_path):
    cfg = PPOConfig(**SMALL, total_updates=4, seed=3)
    a = PPOTrainer(MemoryProbe, cfg)
    a.run(2, progress=False)
    path = a.save(tmp_path / "run.pt")
    a.run(4, progress=False)

    b = PPOTrainer.resume(path, MemoryProbe)
    assert b.update_index == 2 and len(b.history) == 2
    b.run(progress=False)
    pd.testing.assert_frame_equal(deterministic_part(a.metrics), deterministic_part(b.metrics))
    for x, y in zip(a.policy.state_dict().values(), b.policy.state_dict().values()):
        assert torch.equal(x, y)
    assert torch.equal(a.normalizer.mean, b.normalizer.mean)

    # instance load into a fresh trainer gives the same continuation too
    c = PPOTrainer(MemoryProbe, cfg)
    c.load(path)
    c.run(3, progress=False)
    pd.testing.assert_frame_equal(deterministic_part(a.metrics.iloc[:3]), deterministic_part(c.metrics))


def test_bad_checkpoints_fail_clearly(tmp_path):
    cfg = PPOConfig(**SMALL, total_updates=1)
    tr = PPOTrainer(OpRewardProbe, cfg)
    tr.step()
    good = tr.save(tmp_path / "good.pt")

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        tr.load(corrupt)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        PPOTrainer.resume(truncated, OpRewardProbe)
    with pytest.raises(FileNotFoundError):
        tr.load(tmp_path / "missing.pt")

    payload = torch.load(good, weights_only=True)
    other_schema = tmp_path / "schema.pt"
    torch.save({**payload, "schema_version": 99}, other_schema)
    with pytest.raises(ValueError, match="schema 99"):
        tr.load(other_schema)
    with pytest.raises(ValueError, match="schema 99"):
        load_trained(other_schema)

    other_ppo = tmp_path / "ppo_version.pt"
    torch.save({**payload, "extra": {"ppo": {**payload["extra"]["ppo"], "version": 42}}}, other_ppo)
    with pytest.raises(ValueError, match="PPO trainer state version 42"):
        tr.load(other_ppo)

    bigger = PPOTrainer(OpRewardProbe, cfg.replace(hidden_dim=32))
    with pytest.raises(ValueError, match=r"another size.*hidden_dim: checkpoint 16 vs expected 32"):
        bigger.load(good)
    with pytest.raises(ValueError, match="num_envs=2"):
        PPOTrainer(OpRewardProbe, cfg.replace(num_envs=1, minibatch_sequences=1)).load(good)
    with pytest.raises(ValueError, match="normalize_obs"):
        PPOTrainer(OpRewardProbe, cfg.replace(normalize_obs=False)).load(good)

    bare = save_checkpoint(tmp_path / "bare.pt", tr.policy)
    with pytest.raises(ValueError, match="no PPO trainer state"):
        tr.load(bare)
    with pytest.raises(ValueError, match="holds no PPOConfig"):
        PPOTrainer.resume(bare, OpRewardProbe)
    not_ppo_config = save_checkpoint(tmp_path / "other_config.pt", tr.policy, config={"learning_rate": 1.0})
    with pytest.raises(ValueError, match="not a valid PPOConfig"):
        load_trained(not_ppo_config)


def test_resume_without_env_state_warns_and_resets(tmp_path):
    cfg = PPOConfig(**SMALL, total_updates=2)
    tr = PPOTrainer(OpRewardProbe, cfg)
    tr.step()
    path = tr.save(tmp_path / "x.pt")
    payload = torch.load(path, weights_only=True)
    payload["extra"]["ppo"]["env_states"] = None
    torch.save(payload, path)
    with pytest.warns(UserWarning, match="env states"):
        again = PPOTrainer.resume(path, OpRewardProbe)
    row = again.step()
    assert row["update"] == 1 and math.isfinite(row["value_loss"])


def test_load_trained_and_policy_controller(tmp_path):
    cfg = PPOConfig(**SMALL, total_updates=2)
    tr = PPOTrainer(MemoryProbe, cfg)
    tr.run(progress=False)
    path = tr.save(tmp_path / "p.pt")
    policy, norm, config = load_trained(path)
    assert config == cfg and not policy.training
    assert torch.equal(norm.mean, tr.normalizer.mean) and policy.obs_normalizer is norm

    env = MemoryProbe()
    ctl = PolicyController(policy)  # picks up the attached normaliser
    assert ctl.normalizer is norm
    ref = PolicyController(tr.policy, tr.normalizer)
    obs, _ = env.reset(seed=0)
    done = False
    while not done:
        a = ctl.act(obs)
        assert a.shape == (8,) and a.dtype == np.int64 and env.action_space.contains(a)
        assert np.array_equal(a, ref.act(obs))  # same weights + normaliser -> same greedy actions
        assert a[0] in MemoryProbe.OPS  # never a masked op
        obs, _, term, trunc, _ = env.step(a)
        done = term or trunc
    h_before = ctl.hidden[0].clone()
    ctl.reset()
    assert float(ctl.hidden[0].abs().sum()) == 0.0 and float(h_before.abs().sum()) > 0
    # stochastic mode is seeded
    s1, s2 = PolicyController(policy, deterministic=False, seed=1), PolicyController(policy, deterministic=False, seed=1)
    obs, _ = env.reset(seed=0)
    assert np.array_equal(s1.act(obs), s2.act(obs))
    assert PolicyController(policy, obs_normalizer=False).normalizer is None


def test_trainer_argument_errors():
    with pytest.raises(TypeError, match="PPOConfig"):
        PPOTrainer(OpRewardProbe, {"num_envs": 2})
    with pytest.raises(TypeError, match="env_fn"):
        PPOTrainer(42, PPOConfig(**SMALL))
    from esper_lib.network import FactoredRecurrentActorCritic

    with pytest.raises(ValueError, match="hidden_dim=8"):
        PPOTrainer(OpRewardProbe, PPOConfig(**SMALL), policy=FactoredRecurrentActorCritic(feature_dim=16, hidden_dim=8))


# --- environment, device and thread errors ------------------------------------------------------------


def _other_thread_count() -> int:
    return 1 if torch.get_num_threads() != 1 else 2


def test_thread_count_is_restored_when_the_trainer_closes():
    before = torch.get_num_threads()
    n = _other_thread_count()
    tr = PPOTrainer(OpRewardProbe, PPOConfig(**{**SMALL, "num_threads": n}, total_updates=1))
    assert torch.get_num_threads() == n
    tr.step()
    tr.close()
    assert torch.get_num_threads() == before
    tr.close()  # idempotent
    train(OpRewardProbe, PPOConfig(**{**SMALL, "num_threads": n}, total_updates=1), progress=False)
    assert torch.get_num_threads() == before


def test_env_without_tamiyo_observation_keys_names_the_keys_needed():
    before = torch.get_num_threads()
    cfg = PPOConfig(**{**SMALL, "num_threads": _other_thread_count()})
    with pytest.raises(ValueError, match=r"keys \('state', 'blueprint_indices', 'action_mask'\).*lacks \['state', 'blueprint_indices', 'action_mask'\]"):
        PPOTrainer(lambda: gym.make("CartPole-v1"), cfg)
    assert torch.get_num_threads() == before  # a trainer that failed to build leaves the thread count alone
    with pytest.raises(ValueError, match="lacks"):
        PPOTrainer(gym.make("CartPole-v1"), cfg.replace(num_envs=1, minibatch_sequences=1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_fails_when_the_trainer_is_built():
    cfg = PPOConfig(**SMALL, device="cuda")  # accepted: a valid device string
    with pytest.raises(ValueError, match=r"PPOConfig\.device is 'cuda' but CUDA is not available"):
        PPOTrainer(OpRewardProbe, cfg)


# --- no silent NaN ------------------------------------------------------------------------------------


class _Poison(gym.Wrapper):
    """Makes the reward, or entry 5 of the state, NaN at this env's ``at``-th call of ``step``."""

    def __init__(self, env, at: int, what: str):
        super().__init__(env)
        self.at, self.what, self.calls = at, what, 0

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.calls += 1
        if self.calls == self.at:
            if self.what == "reward":
                reward = math.nan
            else:
                obs = {**obs, "state": obs["state"].copy()}
                obs["state"][5] = math.nan
        return obs, reward, terminated, truncated, info


def _second_env_poisoned(probe, at: int, what: str):
    made = []

    def env_fn():
        made.append(None)
        env = probe()
        return _Poison(env, at, what) if len(made) == 2 else env

    return env_fn


@pytest.mark.parametrize("what,probe,match", [
    ("reward", OpRewardProbe, r"reward contains a non-finite value \(nan\) at env 1 at rollout step 2 of update 2"),
    ("state", MemoryProbe, r"observation state contains a non-finite value \(nan\) at env 1, feature 5 returned by env\.step at rollout step 2 of update 2"),
])
def test_non_finite_reward_or_observation_raises_before_any_step_on_it(tmp_path, what, probe, match):
    cfg = PPOConfig(**SMALL, total_updates=4)
    at = 2 * cfg.num_steps + 3  # the 3rd step of update 2 (rollout step 2)
    tr = PPOTrainer(_second_env_poisoned(probe, at, what), cfg)
    tr.run(2, progress=False)
    weights = {k: v.clone() for k, v in tr.policy.state_dict().items()}
    last_good = tr.save(tmp_path / "last_good.pt")
    saved_bytes = last_good.read_bytes()
    with pytest.raises(NonFiniteError, match=match) as info:
        tr.step()
    assert isinstance(info.value, ValueError) and isinstance(info.value, FloatingPointError)
    for k, v in tr.policy.state_dict().items():
        assert torch.equal(v, weights[k]) and torch.isfinite(v).all(), k
    assert torch.isfinite(tr.normalizer.mean).all() and torch.isfinite(tr.normalizer.var).all()
    assert len(tr.history) == 2 and tr.metrics["update"].tolist() == [0, 1]
    assert last_good.read_bytes() == saved_bytes
    tr.close()
    again = PPOTrainer.resume(last_good, _second_env_poisoned(probe, 10**9, what))  # same wrapper stack, never poisons
    assert again.update_index == 2
    again.close()


def test_non_finite_loss_or_gradient_raises_before_the_optimizer_step():
    cfg = PPOConfig(**SMALL, total_updates=2)
    tr = PPOTrainer(OpRewardProbe, cfg)
    weights = {k: v.clone() for k, v in tr.policy.state_dict().items()}
    # a critic that turns NaN in training mode only: collection is clean, the loss is not
    hook = tr.policy.value_head.register_forward_hook(lambda m, i, out: out * math.nan if m.training else out)
    with pytest.raises(NonFiniteError, match=r"loss contains a non-finite value \(nan\) in epoch 0, minibatch 0 of update 0"):
        tr.step()
    hook.remove()
    tr.collector.started = False
    grad_hook = tr.policy.lstm.weight_hh_l0.register_hook(lambda g: g * math.inf)
    with pytest.raises(NonFiniteError, match=r"gradient norm contains a non-finite value .* in epoch 0, minibatch 0 of update 0"):
        tr.step()
    grad_hook.remove()
    for k, v in tr.policy.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert tr.history == []


def test_non_finite_advantage_raises_naming_env_and_step():
    cfg = PPOConfig(**SMALL, total_updates=1)
    tr = PPOTrainer(OpRewardProbe, cfg)
    tr.collect()
    compute_advantages(tr.buffer, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda)
    tr.buffer.advantages[1, 3] = math.inf
    with pytest.raises(NonFiniteError, match=r"advantage contains a non-finite value \(inf\) at env 1, step 3 of update 7"):
        ppo_update(tr.policy, tr.optimizer, tr.buffer, cfg, tr.generator, update=7)
