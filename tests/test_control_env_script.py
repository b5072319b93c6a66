"""scripts/control_env_study.py on a tiny env with a drawn seed learning rate: what it chooses and writes."""
import sys

import pandas as pd
import pytest
from script_support import load_script

TINY = ["--env", "max_epochs=4", "--env", "train_size=64", "--env", "val_size=40", "--env", "batch_size=32", "--styles", "LINEAR_ADD"]


def _script():
    return load_script("control_env_study")


def test_writes_the_page_the_figure_and_every_episode_with_its_drawn_rate(tmp_path, monkeypatch):
    argv = ["control_env_study.py", *TINY, "--rank-train-seeds", "3", "--top", "2", "--heldout", "6", "--workers", "1", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    _script().main()
    page = (tmp_path / "control_env.md").read_text()
    assert "## Against the best fixed schedule" in page and "| switch |" in page and "| hindsight_best |" in page
    assert (tmp_path / "figures" / "control_env.png").stat().st_size > 0
    training = pd.read_csv(tmp_path / "figures" / "control_env_training.csv")
    assert set(training.seed) == {0, 1, 2} and set(training.seed_lr) == {0.005, 1.0}  # both rates among the training seeds
    episodes = pd.read_csv(tmp_path / "figures" / "control_env_episodes.csv")
    assert set(episodes.seed) == set(range(10_000, 10_006)) and episodes.seed_lr.isin([0.005, 1.0]).all()
    assert (episodes.groupby("controller").size() == 6).all()
    # the drawn rate is a function of the episode seed, whatever the controller
    assert (episodes.groupby("seed")["seed_lr"].nunique() == 1).all()
    oracle = episodes[episodes.controller == "hindsight_best"].set_index("seed")["return"]
    others = episodes[episodes.controller.isin(["always_wait", *episodes.chosen.dropna().unique()])]
    assert (oracle >= others.groupby("seed")["return"].max() - 1e-12).all()
    # a second run reuses the training table: same choices, same held-out rows, nothing ranked again
    monkeypatch.setattr(sys, "argv", [*argv, "--suffix", "_again", "--reuse-training", str(tmp_path / "figures" / "control_env_training.csv")])
    _script().main()
    again = pd.read_csv(tmp_path / "figures" / "control_env_again_episodes.csv")
    pd.testing.assert_frame_equal(again.drop(columns="wall_s"), episodes.drop(columns="wall_s"))
    assert "--reuse-training" in (tmp_path / "control_env_again.md").read_text()


def test_a_training_table_of_other_seeds_is_refused(tmp_path, monkeypatch):
    table = tmp_path / "training.csv"
    pd.DataFrame({"controller": ["x"], "seed": [0], "return": [1.0], "seed_lr": [0.005]}).to_csv(table, index=False)
    monkeypatch.setattr(sys, "argv", ["control_env_study.py", *TINY, "--rank-train-seeds", "3", "--reuse-training", str(table)])
    with pytest.raises(SystemExit, match="not this study's training table"):
        _script().main()


def test_a_missing_checkpoint_fails_before_the_long_part(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["control_env_study.py", *TINY, "--runs", str(tmp_path)])
    with pytest.raises(SystemExit, match="no checkpoint"):
        _script().main()
