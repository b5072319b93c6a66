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
        ("device", "gpu"),
        ("device", "cuda:x"),
        ("device", "meta"),
        ("device", 0),
        ("num_threads", 0),
        ("autocast_bf16", 1),
        ("autocast_bf16", "yes"),
    ],
)
def test_bad_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"PPOConfig\.{field}\b"):
        PPOConfig(**{field: value})


def test_cross_field_errors_name_the_field():
    with pytest.raises(ValueError, match=r"PPOConfig\.autocast_bf16 needs a device of type"):
        PPOConfig(autocast_bf16=True, device="mps")
    assert PPOConfig(autocast_bf16=True).autocast_bf16 and PPOConfig(autocast_bf16=True, device="cuda").autocast_bf16
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


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "mps"])
def test_device_strings_torch_parses_are_accepted_at_config_time(device):
    # whether the machine has that device is checked when the trainer is built (test_ppo_trainer)
    assert PPOConfig(device=device).device == device


def test_entropy_coefficients_per_head_are_a_config_field():
    from esper_lib.constants import ENTROPY_COEF_PER_HEAD

    assert PPOConfig().head_entropy_coefs == ENTROPY_COEF_PER_HEAD
    cfg = PPOConfig(entropy_coef_per_head={"op": 3.0})
    assert cfg.head_entropy_coefs == {**ENTROPY_COEF_PER_HEAD, "op": 3.0}
    assert PPOConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="entropy_coef_per_head has unknown head"):
        PPOConfig(entropy_coef_per_head={"opp": 1.0})
    with pytest.raises(ValueError, match=r"entropy_coef_per_head\['op'\]"):
        PPOConfig(entropy_coef_per_head={"op": -1.0})


def test_entropy_coefficients_reach_the_loss():
    """With every head's coefficient at 0 but one, the update's entropy bonus is that head's entropy alone."""
    import torch

    from esper_lib.envs.probes import make_probe
    from esper_lib.ppo import PPOTrainer

    base = dict(num_envs=2, num_steps=8, seq_len=4, minibatch_sequences=4, epochs=1, feature_dim=16, hidden_dim=16, num_threads=1, target_kl=None)
    zero = {h: 0.0 for h in ("slot", "blueprint", "style", "tempo", "alpha_target", "alpha_speed", "alpha_curve")}
    trainer = PPOTrainer(lambda: make_probe("op"), PPOConfig(**base, entropy_coef_per_head={"op": 2.0, **zero}))
    try:
        row = trainer.step()
    finally:
        trainer.close()
    assert row["entropy_bonus"] == pytest.approx(2.0 * row["entropy_op"], rel=1e-5)


def test_seed_group_size_must_divide_num_envs():
    assert PPOConfig(num_envs=4, seed_group_size=2, minibatch_sequences=1).seed_group_size == 2
    with pytest.raises(ValueError, match="PPOConfig.seed_group_size"):
        PPOConfig(num_envs=4, seed_group_size=3, minibatch_sequences=1)
    with pytest.raises(ValueError, match="PPOConfig.seed_group_size"):
        PPOConfig(num_envs=4, seed_group_size=0, minibatch_sequences=1)
