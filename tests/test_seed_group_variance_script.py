"""scripts/seed_group_variance.py on a tiny trained checkpoint: one rollout, the table it prints."""
import sys

import pytest

from esper_lib.ppo import PPOConfig
from esper_lib.training_runs import train_morpho_policy
from script_support import load_script



def _script():
    return load_script("seed_group_variance")


def test_prints_plain_and_centred_variances(tmp_path, monkeypatch, capsys):
    cfg = PPOConfig(num_envs=2, num_steps=4, seq_len=4, minibatch_sequences=2, epochs=1, feature_dim=16, hidden_dim=16, total_updates=1, num_threads=1)
    run = train_morpho_policy(cfg, dict(max_epochs=4, train_size=64, val_size=40, batch_size=32), tmp_path, vector_env="sync", progress=False)
    monkeypatch.setattr(sys, "argv", ["seed_group_variance.py", str(run.checkpoint), "--rollouts", "1"])
    _script().main()
    out = capsys.readouterr().out
    assert "var plain" in out and "var centred, g=2" in out and "corr(env 0, env 1)" in out
    assert "op head" in out and "shared" in out


def test_rejects_a_checkpoint_with_an_odd_number_of_envs(tmp_path, monkeypatch):
    cfg = PPOConfig(num_envs=1, num_steps=4, seq_len=4, minibatch_sequences=1, epochs=1, feature_dim=16, hidden_dim=16, total_updates=1, num_threads=1)
    run = train_morpho_policy(cfg, dict(max_epochs=4, train_size=64, val_size=40, batch_size=32), tmp_path, vector_env="sync", progress=False)
    monkeypatch.setattr(sys, "argv", ["seed_group_variance.py", str(run.checkpoint)])
    with pytest.raises(SystemExit, match="even number"):
        _script().main()
