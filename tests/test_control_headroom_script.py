"""scripts/control_headroom_study.py on a tiny env: the page, figure and episode table it writes."""
import sys

import pandas as pd
import pytest
from script_support import load_script

TINY = ["--env", "max_epochs=8", "--env", "train_size=64", "--env", "val_size=40", "--env", "batch_size=32"]


def _script():
    return load_script("control_headroom_study")


def test_writes_the_page_the_figure_and_every_episode(tmp_path, monkeypatch):
    argv = ["control_headroom_study.py", *TINY, "--rank-train-seeds", "1", "--top", "2", "--heldout", "2", "--workers", "1",
            "--out", str(tmp_path), "--suffix", "_tiny"]
    monkeypatch.setattr(sys, "argv", argv)
    _script().main()
    page = (tmp_path / "control_headroom_tiny.md").read_text()
    assert "## Against the best fixed schedule" in page and "| gated |" in page and "| hindsight_best |" in page
    assert (tmp_path / "figures" / "control_headroom_tiny.png").stat().st_size > 0
    episodes = pd.read_csv(tmp_path / "figures" / "control_headroom_tiny_episodes.csv")
    assert episodes.groupby("controller").size().to_dict() == {c: 2 for c in episodes.controller.unique()}
    assert len(episodes.controller.unique()) == 5  # WAIT, gated, 2 schedules, hindsight
    oracle = episodes[episodes.controller == "hindsight_best"].set_index("seed")["return"]
    others = episodes[episodes.controller.isin(["always_wait", *episodes.chosen.dropna().unique()])]
    assert (oracle >= others.groupby("seed")["return"].max() - 1e-12).all()


def test_env_overrides_need_their_own_ranking(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["control_headroom_study.py", *TINY])
    with pytest.raises(SystemExit, match="rank-train-seeds"):
        _script().main()
