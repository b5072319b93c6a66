"""The landscape explorer, driven headless: set widget values, click buttons, check the redrawn data."""
from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")

from pathlib import Path

import numpy as np
import pytest
import torch

from esper_lib.checkpoint import save_checkpoint
from esper_lib.landscape.sources import controller_factories
from esper_lib.landscape.widgets import PLOT_NAMES, LandscapeExplorer
from esper_lib.network import FactoredRecurrentActorCritic
from esper_lib.observation import feature_index
from landscape_support import FirstValidController, TinyTamiyoEnv, small_policy

EPISODE = 7


def _explorer(policy=None, **kwargs) -> LandscapeExplorer:
    controllers = {"first_valid": lambda ctx: FirstValidController(), "policy": controller_factories()["policy"]}
    defaults = dict(
        env_factory=lambda: TinyTamiyoEnv(EPISODE), controllers=controllers, feature="slot0.alpha", sweep_range=(-1.0, 1.0), sweep_points=5, dpi=40
    )
    defaults.update(kwargs)
    return LandscapeExplorer(policy, **defaults)


@pytest.fixture
def explorer() -> LandscapeExplorer:
    return _explorer(small_policy(2))


def _pngs(ex: LandscapeExplorer) -> dict[str, bytes]:
    return {name: bytes(ex.images[name].value) for name in PLOT_NAMES}


def test_initial_draw(explorer: LandscapeExplorer) -> None:
    assert explorer.error is None, explorer.error
    assert len(explorer.trajectory) == EPISODE
    assert explorer.step.max == EPISODE - 1 and explorer.step.value == 0
    assert len(explorer.frame) == EPISODE * 6
    assert set(explorer.figures) == set(PLOT_NAMES)
    assert all(png.startswith(b"\x89PNG") for png in _pngs(explorer).values())
    assert (explorer.sweep_frame["step"] == 0).all() and (explorer.sweep_frame["feature"] == "slot0.alpha").all()
    assert "7 steps" in explorer.status.value
    assert "<b>" not in explorer.status.value  # no error box


def test_step_slider_redraws_plots_and_sweep(explorer: LandscapeExplorer) -> None:
    before, redraws = _pngs(explorer), explorer.redraws
    explorer.step.value = 4
    assert explorer.error is None, explorer.error
    assert explorer.redraws == redraws + 4
    assert (explorer.sweep_frame["step"] == 4).all()
    observed = explorer.trajectory.states[4, feature_index("slot0.alpha")]
    assert np.isclose(explorer.sweep_frame["observed"].iloc[0], observed)
    after = _pngs(explorer)
    assert all(after[name] != before[name] for name in PLOT_NAMES)  # step marker moved, sweep recomputed
    # the step marker sits at the new step in the trajectory plot
    marker = explorer.figures["q_trajectory"].axes[0].get_lines()[-1]
    assert list(marker.get_xdata()) == [4, 4]


def test_feature_and_range_controls_redraw_the_sweep(explorer: LandscapeExplorer) -> None:
    explorer.feature.value = "val_accuracy"
    assert explorer.error is None, explorer.error
    assert (explorer.sweep_frame["feature"] == "val_accuracy").all()
    explorer.sweep_max.value = 3.0
    explorer.sweep_points.value = 4
    assert explorer.error is None, explorer.error
    np.testing.assert_allclose(sorted(explorer.sweep_frame["value"].unique()), np.linspace(-1.0, 3.0, 4))
    assert "val_accuracy" in explorer.figures["feature_sweep"].axes[0].get_xlabel()


def test_bad_sweep_range_shows_an_error_and_keeps_the_last_sweep(explorer: LandscapeExplorer) -> None:
    last = explorer.sweep_frame
    explorer.sweep_min.value = 2.0  # now min > max (1.0)
    assert explorer.error is not None and "sweep range: from (2.0) must be smaller than to (1.0)" in explorer.error
    assert "sweep range" in explorer.status.value and "traceback" in explorer.status.value
    assert explorer.sweep_frame is last
    explorer.sweep_max.value = 4.0  # fixing it clears the error
    assert explorer.error is None
    assert explorer.sweep_frame["value"].max() == pytest.approx(4.0)
    explorer.sweep_max.value = 50.0
    assert "outside the observation bounds" in explorer.error


def test_seed_and_controller_record_new_trajectories(explorer: LandscapeExplorer) -> None:
    first = explorer.trajectory
    explorer.seed.value = 11
    assert explorer.error is None, explorer.error
    assert explorer.trajectory is not first and explorer.trajectory.meta["seed"] == 11
    assert not np.array_equal(explorer.trajectory.states, first.states)
    explorer.controller.value = "policy"
    assert explorer.error is None, explorer.error
    assert explorer.trajectory.meta["controller"] != "FirstValidController"
    explorer.step.value = 6
    explorer.max_steps.value = 3  # a shorter recording clamps the slider
    assert explorer.error is None, explorer.error
    assert len(explorer.trajectory) == 3 and explorer.step.max == 2 and explorer.step.value == 2
    assert explorer.frame["step"].max() == 2 and (explorer.sweep_frame["step"] == 2).all()
    same = explorer.trajectory
    explorer.record_button.click()
    assert explorer.trajectory is not same and np.array_equal(explorer.trajectory.states, same.states)


def test_failing_controller_shows_its_error(explorer: LandscapeExplorer) -> None:
    def broken(ctx):
        raise RuntimeError("controller exploded")

    explorer.controllers["broken"] = broken
    explorer.controller.options = list(explorer.controllers)
    explorer.controller.value = "broken"
    assert "Could not record a trajectory: RuntimeError: controller exploded" == explorer.error


def test_bad_checkpoint_path_shows_the_error(explorer: LandscapeExplorer, tmp_path: Path) -> None:
    policy, frame = explorer.policy, explorer.frame
    explorer.checkpoint_path.value = str(tmp_path / "missing.pt")
    assert explorer.error.startswith("Could not load the checkpoint: FileNotFoundError: checkpoint not found")
    assert "checkpoint not found" in explorer.status.value and "missing.pt" in explorer.status.value
    assert explorer.policy is policy and explorer.frame is frame  # previous state kept
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage")
    explorer.checkpoint_path.value = str(tmp_path / "corrupt.pt")
    assert "ValueError" in explorer.error and "not a readable checkpoint" in explorer.error
    explorer.checkpoint_path.value = " "
    explorer.load_button.click()
    assert "checkpoint path is empty" in explorer.error


def test_incompatible_checkpoint_shows_the_error(explorer: LandscapeExplorer, tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "two_slots.pt", FactoredRecurrentActorCritic(num_slots=2, feature_dim=32, hidden_dim=32))
    explorer.checkpoint_path.value = str(path)
    assert "incompatible checkpoint" in explorer.error and "num_slots=2" in explorer.error


def test_loading_a_checkpoint_redraws_with_its_model(explorer: LandscapeExplorer, tmp_path: Path) -> None:
    other = small_policy(99)
    path = save_checkpoint(tmp_path / "other.pt", other)
    old_q = explorer.frame["q"].to_numpy()
    explorer.checkpoint_path.value = str(path)
    assert explorer.error is None, explorer.error
    assert str(path) in explorer.model_message and str(path) in explorer.status.value
    for a, b in zip(explorer.policy.state_dict().values(), other.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert not np.allclose(explorer.frame["q"].to_numpy(), old_q)


def test_explorer_without_a_policy_reports_the_missing_checkpoint(tmp_path: Path) -> None:
    ex = _explorer(None, checkpoint_path=str(tmp_path / "nothing.pt"))
    assert "checkpoint not found" in ex.error and ex.frame is None and not ex.figures
    assert "previous state" not in ex.status.value
    ex.seed.value = 3  # still no model: a clear message, not a crash
    assert "no policy loaded" in ex.error
    path = save_checkpoint(tmp_path / "ok.pt", small_policy(5))
    ex.checkpoint_path.value = str(path)
    assert ex.error is None and ex.frame is not None and set(ex.figures) == set(PLOT_NAMES)
    saved = ex.save_pngs(tmp_path / "pngs")
    assert len(saved) == 4 and all(p.stat().st_size > 0 for p in saved)


def test_constructor_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="controller must be one of"):
        _explorer(small_policy(), controller="nope")
    with pytest.raises(ValueError, match="feature must be one of"):
        _explorer(small_policy(), feature="nope")


def test_widget_renders_as_a_widget(explorer: LandscapeExplorer) -> None:
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_one_step_episode() -> None:
    ex = _explorer(small_policy(1), env_factory=lambda: TinyTamiyoEnv(1))
    assert ex.error is None, ex.error
    assert len(ex.trajectory) == 1 and ex.step.max == 0 and set(ex.figures) == set(PLOT_NAMES)


def test_default_sweep_range_follows_the_recorded_feature() -> None:
    from esper_lib.landscape.core import recorded_range

    ex = _explorer(small_policy(2), sweep_range=None)
    assert ex.error is None, ex.error
    column = ex.trajectory.states[:, feature_index("slot0.alpha")]
    low, high = recorded_range(ex.trajectory, "slot0.alpha")
    assert (ex.sweep_min.value, ex.sweep_max.value) == (low, high)
    assert low <= column.min() and high >= column.max() and high - low >= 0.2 - 1e-9
    ex.feature.value = "val_accuracy"  # a new feature gets its own recorded range
    acc = ex.trajectory.states[:, feature_index("val_accuracy")]
    assert ex.sweep_frame["value"].min() == pytest.approx(recorded_range(ex.trajectory, "val_accuracy")[0])
    assert ex.sweep_frame["value"].min() <= acc.min() and ex.sweep_frame["value"].max() >= acc.max()
    ex.sweep_max.value = 0.9  # a range the user typed is kept for the next feature
    ex.feature.value = "epoch_progress"
    assert not ex.auto_range and ex.sweep_max.value == 0.9


def test_status_line_and_titles_name_the_model(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "other.pt", small_policy(3))
    ex = _explorer(None, checkpoint_path=str(path))
    assert ex.error is None, ex.error
    assert "Model: untrained checkpoint" in ex.status.value and str(path) in ex.status.value
    for fig in ex.figures.values():
        assert f"{path.parent.name}/{path.name}" in fig.axes[0].get_title()
    sizes = {tuple(fig.get_size_inches()) for fig in ex.figures.values()}
    assert len(sizes) == 1, f"explorer plots differ in size, so their fonts scale differently: {sizes}"
