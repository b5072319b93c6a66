"""PPOConfig validation: every bad value raises ValueError naming its field."""
import math

import pytest

from esper_lib.ppo import PPOConfig


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_envs", 0),
        ("vector_env", "threads"),
        ("num_envs", 2.5),
        ("num_envs", True),
        ("num_steps", -1),
        ("total_updates", 0),
        ("total_env_steps", 0),
        ("gamma", 1.0),
        ("gamma", -0.1),
        ("gamma", math.nan),
        ("gae_lambda", 1.5),
        ("clip_coef", 0.0),
        ("epochs", 0),
        ("seq_len", 0),
        ("minibatch_sequences", 0),
        ("lr", 0.0),
        ("lr", "fast"),
        ("ent_coef", -0.01),
        ("vf_coef", -1.0),
        ("max_grad_norm", 0.0),
        ("target_kl", 0.0),
        ("value_clip", -0.2),
        ("bootstrap_mode", "mean"),
        ("op_advantage", "v"),
        ("normalize_obs", 1),
        ("normalize_advantages", "yes"),
        ("obs_clip", 0.0),
        ("feature_dim", 0),
        ("hidden_dim", 1),
        ("seed", -3),
        ("device", ""),
        ("num_threads", 0),
    ],
)
def test_bad_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"PPOConfig\.{field}\b"):
        PPOConfig(**{field: value})


def test_cross_field_errors_name_the_field():
    with pytest.raises(ValueError, match=r"PPOConfig\.seq_len .*divide num_steps"):
        PPOConfig(num_steps=10, seq_len=4)
    with pytest.raises(ValueError, match=r"PPOConfig\.minibatch_sequences"):
        PPOConfig(num_envs=2, num_steps=8, seq_len=4, minibatch_sequences=5)


def test_defaults_are_valid_and_derived_sizes():
    cfg = PPOConfig()
    assert cfg.bootstrap_mode == "expected" and cfg.op_advantage == "expected"
    assert cfg.num_sequences == cfg.num_envs * cfg.num_steps // cfg.seq_len
    assert cfg.num_updates == cfg.total_updates
    cfg2 = PPOConfig(num_envs=2, num_steps=16, minibatch_sequences=2, total_env_steps=100)
    assert cfg2.num_updates == 4  # ceil(100 / 32)


def test_round_trip_and_unknown_fields():
    cfg = PPOConfig(num_envs=2, num_steps=8, seq_len=4, minibatch_sequences=2, value_clip=0.3, target_kl=None)
    assert PPOConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="no field"):
        PPOConfig.from_dict({**cfg.to_dict(), "learning_rate": 1e-3})
    with pytest.raises(ValueError, match="no field"):
        cfg.replace(learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"PPOConfig\.lr"):
        cfg.replace(lr=-1.0)
    assert cfg.replace(lr=1e-3).lr == 1e-3
