"""The Q(s, op) landscape: data (landscape_frame, feature_sweep, trajectories), sources and plots."""
from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from esper_lib.checkpoint import save_checkpoint
from esper_lib.constants import NUM_OPS
from esper_lib.landscape.core import (
    LANDSCAPE_COLUMNS,
    OP_NAMES,
    Trajectory,
    feature_sweep,
    hidden_at,
    landscape_frame,
    record_trajectory,
    step_table,
    sweep_states,
    sweep_values,
    wide,
)
from esper_lib.landscape.plots import (
    MASKED_COLOR,
    OP_COLORS,
    figure_png,
    landscape_overview,
    plot_feature_sweep,
    plot_op_probs,
    plot_q_heatmap,
    plot_q_trajectory,
)
from esper_lib.landscape.sources import (
    ControllerContext,
    check_controller_name,
    check_env_name,
    check_notebook_parameters,
    load_model,
    make_controller,
)
from esper_lib.network import FactoredRecurrentActorCritic
from esper_lib.observation import feature_index
from landscape_support import FirstValidController, TinyTamiyoEnv, small_policy

T = 9


@pytest.fixture(scope="module")
def policy() -> FactoredRecurrentActorCritic:
    return small_policy(3)


@pytest.fixture(scope="module")
def trajectory() -> Trajectory:
    return record_trajectory(TinyTamiyoEnv(episode_length=T), FirstValidController(), seed=7, max_steps=50)


@pytest.fixture(scope="module")
def frame(policy, trajectory) -> pd.DataFrame:
    return landscape_frame(policy, trajectory)


def _inputs(trajectory: Trajectory) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(trajectory.states)[None], torch.as_tensor(trajectory.blueprint_indices)[None]


# --- recording ------------------------------------------------------------------------------------


def test_record_trajectory_shapes_and_stop(trajectory: Trajectory) -> None:
    assert len(trajectory) == T and trajectory.truncated and not trajectory.terminated
    assert trajectory.states.shape == (T, 121) and trajectory.states.dtype == np.float32
    assert trajectory.blueprint_indices.shape == (T, 3) and trajectory.blueprint_indices.dtype == np.int64
    assert trajectory.actions.shape == (T, 8) and trajectory.rewards.shape == (T,)
    assert trajectory.masks["op"].shape == (T, NUM_OPS) and trajectory.masks["slot_by_op"].shape == (T, NUM_OPS, 3)
    # The controller took the highest valid op of the observation it was given.
    expected = [int(np.flatnonzero(m)[-1]) for m in trajectory.masks["op"]]
    assert trajectory.ops.tolist() == expected
    assert trajectory.meta["controller"] == "FirstValidController" and trajectory.meta["seed"] == 7


def test_record_trajectory_caps_steps_and_checks_arguments() -> None:
    assert len(record_trajectory(TinyTamiyoEnv(20), FirstValidController(), seed=0, max_steps=4)) == 4
    with pytest.raises(ValueError, match="max_steps"):
        record_trajectory(TinyTamiyoEnv(), FirstValidController(), max_steps=0)

    class Bad:
        def reset(self) -> None: ...

        def act(self, obs):
            return np.zeros(3, dtype=np.int64)

    with pytest.raises(ValueError, match=r"act\(\) must return .* shape \(8,\)"):
        record_trajectory(TinyTamiyoEnv(), Bad())
    with pytest.raises(TypeError, match=r"act\(obs\)"):
        record_trajectory(TinyTamiyoEnv(), object())


def test_trajectory_save_load_roundtrip(trajectory: Trajectory, tmp_path: Path) -> None:
    path = trajectory.save(tmp_path / "sub" / "traj.npz")
    back = Trajectory.load(path)
    np.testing.assert_array_equal(back.states, trajectory.states)
    np.testing.assert_array_equal(back.blueprint_indices, trajectory.blueprint_indices)
    np.testing.assert_array_equal(back.actions, trajectory.actions)
    np.testing.assert_array_equal(back.rewards, trajectory.rewards)
    assert back.masks.keys() == trajectory.masks.keys()
    for k in trajectory.masks:
        np.testing.assert_array_equal(back.masks[k], trajectory.masks[k])
    assert (back.truncated, back.terminated, back.meta) == (trajectory.truncated, trajectory.terminated, trajectory.meta)
    with pytest.raises(FileNotFoundError, match="trajectory file not found"):
        Trajectory.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable trajectory"):
        Trajectory.load(tmp_path / "junk.npz")


def test_trajectory_validates_shapes(trajectory: Trajectory) -> None:
    with pytest.raises(ValueError, match="actions must have shape"):
        Trajectory(trajectory.states, trajectory.blueprint_indices, trajectory.masks, trajectory.actions[:, :3], trajectory.rewards)
    with pytest.raises(ValueError, match="'op' mask"):
        Trajectory(trajectory.states, trajectory.blueprint_indices, {}, trajectory.actions, trajectory.rewards)


# --- the landscape frame --------------------------------------------------------------------------


def test_frame_layout(frame: pd.DataFrame) -> None:
    assert tuple(frame.columns) == LANDSCAPE_COLUMNS
    assert len(frame) == T * NUM_OPS
    assert frame["step"].tolist() == np.repeat(np.arange(T), NUM_OPS).tolist()
    assert frame["op"].astype(str).tolist() == list(OP_NAMES) * T
    assert frame.groupby("step")["taken"].sum().eq(1).all()


def test_frame_matches_direct_get_value_calls(policy, trajectory, frame) -> None:
    states, bps = _inputs(trajectory)
    q = wide(frame, "q")
    for op in range(NUM_OPS):
        direct = policy.get_value(states, bps, None, torch.full((1, T), op, dtype=torch.int64))[0]
        np.testing.assert_allclose(q[OP_NAMES[op]].to_numpy(), direct.numpy(), rtol=1e-5, atol=1e-6)


def test_frame_carries_the_hidden_state_like_a_step_by_step_rollout(policy, trajectory, frame) -> None:
    """The one-call sequence equals calling get_value one step at a time with the carried LSTM state."""
    states, bps = _inputs(trajectory)
    hidden = policy.initial_hidden(1)
    q = wide(frame, "q").to_numpy()
    for t in range(T):
        ops = torch.arange(NUM_OPS)
        per_op = [
            policy.get_value(states[:, t : t + 1], bps[:, t : t + 1], hidden, ops[o : o + 1]).item() for o in range(NUM_OPS)
        ]
        np.testing.assert_allclose(q[t], per_op, rtol=1e-5, atol=1e-5)
        _, _, hidden = policy.q_values(states[:, t : t + 1], bps[:, t : t + 1], hidden)
    # and hidden_at() gives the same carried state
    h, c = hidden_at(policy, trajectory, T - 1)
    _, _, full = policy.q_values(states[:, : T - 1], bps[:, : T - 1])
    torch.testing.assert_close(h, full[0])
    torch.testing.assert_close(c, full[1])


def test_v_is_the_pi_weighted_sum_and_pi_respects_the_mask(policy, trajectory, frame) -> None:
    q, pi = wide(frame, "q").to_numpy(), wide(frame, "pi").to_numpy()
    v = frame.groupby("step")["V"].first().to_numpy()
    np.testing.assert_allclose(v, (pi * q).sum(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pi.sum(axis=1), 1.0, atol=1e-5)
    states, bps = _inputs(trajectory)
    _, direct_pi, _ = policy.q_values(states, bps, action_mask={"op": torch.as_tensor(trajectory.masks["op"])[None]})
    np.testing.assert_allclose(pi, direct_pi[0].numpy(), atol=1e-6)


def test_masked_ops_are_flagged(trajectory, frame) -> None:
    valid = wide(frame, "valid").astype(bool).to_numpy()
    np.testing.assert_array_equal(valid, trajectory.masks["op"])
    assert (~valid).any(), "the tiny env should mask some ops"
    assert (frame.loc[~frame["valid"], "pi"] == 0).all()
    q = wide(frame, "q").to_numpy()
    spread = frame.groupby("step")["spread"].first().to_numpy()
    expected = [q[t][valid[t]].max() - q[t][valid[t]].min() for t in range(T)]
    np.testing.assert_allclose(spread, expected, rtol=1e-5, atol=1e-6)
    table = step_table(frame)
    assert len(table) == T
    assert all(valid[t][OP_NAMES.index(op)] for t, op in enumerate(table["argmax_q_op"]))


def test_observation_normaliser_is_applied_before_the_network(policy, trajectory) -> None:
    scaled = Trajectory(trajectory.states * 0.5, trajectory.blueprint_indices, trajectory.masks, trajectory.actions, trajectory.rewards)
    a = landscape_frame(policy, trajectory, obs_normalizer=lambda s: s * 0.5)

    class Norm:
        def normalize(self, s):
            return s * 0.5

    b = landscape_frame(policy, trajectory, obs_normalizer=Norm())
    ref = landscape_frame(policy, scaled)
    np.testing.assert_allclose(a["q"], ref["q"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b["q"], ref["q"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="changed the state shape"):
        landscape_frame(policy, trajectory, obs_normalizer=lambda s: s[..., :5])
    # A normaliser a trainer attached to the policy is used by default; False turns it off.
    attached = small_policy(3)
    attached.obs_normalizer = Norm()
    np.testing.assert_allclose(landscape_frame(attached, trajectory)["q"], ref["q"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(landscape_frame(attached, trajectory, obs_normalizer=False)["q"], landscape_frame(policy, trajectory)["q"], rtol=1e-5, atol=1e-6)


def test_incompatible_policy_is_rejected(trajectory) -> None:
    other = FactoredRecurrentActorCritic(num_slots=2, feature_dim=32, hidden_dim=32)
    with pytest.raises(ValueError, match=r"does not fit .*state_dim: policy 91 vs trajectory 121"):
        landscape_frame(other, trajectory)


# --- feature sweep --------------------------------------------------------------------------------


def test_sweep_changes_exactly_the_named_feature(trajectory) -> None:
    values = sweep_values(-2.0, 2.0, 7)
    states = sweep_states(trajectory, 4, "slot1.alpha", values)
    idx = feature_index("slot1.alpha")
    assert states.shape == (7, 121)
    np.testing.assert_array_equal(states[:, idx], values.astype(np.float32))
    others = np.delete(states, idx, axis=1)
    np.testing.assert_array_equal(others, np.repeat(np.delete(trajectory.states[4], idx)[None], 7, axis=0))


def test_feature_sweep_uses_the_carried_hidden_state(policy, trajectory, frame) -> None:
    step, name = 5, "val_accuracy"
    observed = float(trajectory.states[step, feature_index(name)])
    sweep = feature_sweep(policy, trajectory, step, name, [observed, -3.0, 3.0])
    assert len(sweep) == 3 * NUM_OPS
    assert (sweep["feature"] == name).all() and (sweep["step"] == step).all()
    assert np.isclose(sweep["observed"].iloc[0], observed)
    at_observed = sweep[sweep["value"] == sweep["value"].iloc[0]]
    np.testing.assert_allclose(at_observed["q"], frame.loc[frame["step"] == step, "q"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(sweep["valid"].to_numpy().reshape(3, NUM_OPS), np.repeat(trajectory.masks["op"][step][None], 3, 0))
    q = sweep.pivot(index="value", columns="op", values="q").to_numpy()
    assert not np.allclose(q[1], q[2]), "Q should depend on the swept feature"
    np.testing.assert_allclose(sweep.groupby("value", sort=False)["V"].first(), (
        sweep.pivot(index="value", columns="op", values="pi") * sweep.pivot(index="value", columns="op", values="q")
    ).sum(axis=1).reindex(sweep["value"].unique()), rtol=1e-5)


def test_feature_sweep_at_step_zero_and_errors(policy, trajectory, frame) -> None:
    sweep = feature_sweep(policy, trajectory, 0, "epoch_progress", [float(trajectory.states[0, 0])])
    np.testing.assert_allclose(sweep["q"], frame.loc[frame["step"] == 0, "q"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="feature_name 'slot0.alpah' is not in the observation layout"):
        feature_sweep(policy, trajectory, 0, "slot0.alpah", [0.0])
    with pytest.raises(ValueError, match=r"step must lie in \[0, 8\]"):
        feature_sweep(policy, trajectory, T, "slot0.alpha", [0.0])
    with pytest.raises(ValueError, match="values must be a non-empty"):
        feature_sweep(policy, trajectory, 0, "slot0.alpha", [])


@pytest.mark.parametrize(
    ("low", "high", "num", "match"),
    [(1.0, 0.5, 5, r"low \(1.0\) must be smaller than high"), (0.0, 11.0, 5, "high = 11.0 lies outside"),
     (float("nan"), 1.0, 5, "low must be a finite number"), (0.0, 1.0, 1, "num must be an int >= 2")],
)
def test_sweep_values_rejects_bad_ranges(low, high, num, match) -> None:
    with pytest.raises(ValueError, match=match):
        sweep_values(low, high, num)


# --- sources ------------------------------------------------------------------------------------------


def test_load_model_fresh_checkpoint_and_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model(tmp_path / "none.pt")
    fresh = load_model(tmp_path / "none.pt", fresh_if_missing=True, fresh_kwargs={"feature_dim": 32, "hidden_dim": 32})
    assert fresh.source == "fresh" and "FRESH" in fresh.message and fresh.obs_normalizer is None
    path = save_checkpoint(tmp_path / "m.pt", small_policy(1))
    loaded = load_model(path)
    assert loaded.source == "checkpoint" and loaded.policy.hidden_dim == 32 and str(path) in loaded.message
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_model(tmp_path / "bad.pt")


def test_controller_names_and_policy_controller(policy) -> None:
    pytest.importorskip("esper_lib.ppo")
    with pytest.raises(ValueError, match=r"controller must be one of .*'nope'"):
        check_controller_name("nope")
    env = TinyTamiyoEnv(6)
    ctx = ControllerContext(env=env, policy=policy, obs_normalizer=None, seed=3)
    a = record_trajectory(env, make_controller("policy", ctx), seed=1)
    b = record_trajectory(env, make_controller("policy", ctx), seed=1)
    np.testing.assert_array_equal(a.actions, b.actions)  # seeded
    assert a.meta["controller"] == "PolicyController"
    greedy = record_trajectory(env, make_controller("policy_greedy", ctx), seed=1)
    assert all(greedy.masks["op"][t, op] for t, op in enumerate(greedy.ops))
    # the greedy op is the argmax of pi(op | s) in the landscape frame
    pi = wide(landscape_frame(policy, greedy), "pi").to_numpy()
    np.testing.assert_array_equal(pi.argmax(axis=1), greedy.ops)


# --- plots ------------------------------------------------------------------------------------------


def test_plots_draw_on_the_given_axes_and_return_the_figure(frame, policy, trajectory) -> None:
    sweep = feature_sweep(policy, trajectory, 2, "slot0.alpha", sweep_values(-1, 1, 5))
    for plot, data in ((plot_q_trajectory, frame), (plot_q_heatmap, frame), (plot_op_probs, frame), (plot_feature_sweep, sweep)):
        fig = Figure()
        ax = fig.add_subplot()
        assert plot(data, ax) is fig
        assert ax.has_data()
        standalone = plot(data)
        assert isinstance(standalone, Figure) and figure_png(standalone)[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(landscape_overview(frame, sweep, step=2).axes) >= 4


def test_trajectory_plot_greys_masked_ops_and_overlays_v(frame) -> None:
    fig = plot_q_trajectory(frame, step=3)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    v_line = next(line for label, line in lines.items() if label.startswith("V(s)"))
    np.testing.assert_allclose(v_line.get_ydata(), frame.groupby("step")["V"].first())
    valid = wide(frame, "valid").astype(bool)
    for op in OP_NAMES:
        y = np.asarray(lines[op].get_ydata(), dtype=float)
        assert lines[op].get_color() == OP_COLORS[op]
        np.testing.assert_array_equal(np.isnan(y), ~valid[op].to_numpy())  # masked steps are not drawn in colour
    def is_grey(c) -> bool:
        face = c.get_facecolor()
        return len(c.get_offsets()) > 0 and len(face) > 0 and np.allclose(face[0][:3], [float(MASKED_COLOR)] * 3)

    greys = [c for c in ax.collections if is_grey(c)]
    assert sum(len(c.get_offsets()) for c in greys) == int((~frame["valid"]).sum())


def test_baseline_controllers_and_env_names(policy) -> None:
    pytest.importorskip("esper_lib.evaluation.baselines")
    env = TinyTamiyoEnv(5)
    classes = {"random": "RandomMaskedController", "heuristic": "HeuristicController", "wait": "AlwaysWaitController"}
    for name, cls in classes.items():
        traj = record_trajectory(env, make_controller(name, ControllerContext(env, policy, None, seed=2)), seed=2)
        assert len(traj) == 5 and traj.meta["controller"] == cls
    assert (traj.ops == 0).all()
    assert check_env_name("morpho") == "morpho"
    with pytest.raises(ValueError, match=r"env must be one of \['morpho'"):
        check_env_name("mrpho")


def test_checkpoint_normaliser_is_rebuilt_and_applied(tmp_path: Path, trajectory) -> None:
    normalization = pytest.importorskip("esper_lib.ppo.normalization")
    norm = normalization.RunningObsNormalizer(121)
    norm.update(torch.randn(100, 121) * 2 + 0.5)
    path = save_checkpoint(tmp_path / "ppo.pt", small_policy(6), obs_normalizer_state=norm.state_dict())
    loaded = load_model(path)
    assert loaded.obs_normalizer is not None and "normaliser applied" in loaded.message
    got = landscape_frame(loaded.policy, trajectory, loaded.obs_normalizer)
    scaled = norm.normalize(torch.as_tensor(trajectory.states)).numpy()
    manual = Trajectory(scaled, trajectory.blueprint_indices, trajectory.masks, trajectory.actions, trajectory.rewards)
    np.testing.assert_allclose(got["q"], landscape_frame(loaded.policy, manual)["q"], rtol=1e-5, atol=1e-6)


NOTEBOOK_PARAMS = dict(
    env_name="morpho", controller="policy", seed=0, max_epochs=4, batches_per_epoch=2, sweep_feature="slot0.alpha",
    sweep_low=-1.0, sweep_high=1.0, sweep_points=5, sweep_step=-1,
)


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [("controller", "nope", "parameter controller must be one of"), ("env_name", "mrpho", "parameter env_name"),
     ("sweep_feature", "alpha", "parameter sweep_feature"), ("sweep_low", 2.0, r"sweep_low \(2.0\) must be smaller than sweep_high"),
     ("sweep_points", 1, "sweep_points must be an int >= 2"), ("max_epochs", 0, "parameter max_epochs"),
     ("batches_per_epoch", -1, "parameter batches_per_epoch"), ("sweep_step", -2, "parameter sweep_step")],
)
def test_notebook_parameter_check_names_the_parameter(name, value, match) -> None:
    check_notebook_parameters(**NOTEBOOK_PARAMS)
    with pytest.raises(ValueError, match=match):
        check_notebook_parameters(**{**NOTEBOOK_PARAMS, name: value})


def test_op_probs_are_drawn_as_one_stacked_bar_per_step(frame) -> None:
    ax = plot_op_probs(frame, step=1, label="TRAINED checkpoint x.pt (3 PPO updates)").axes[0]
    pi = wide(frame, "pi")
    bars = [p for p in ax.patches]
    assert len(bars) == len(pi) * len(OP_NAMES) and not ax.collections  # bars, no interpolated polygons
    assert all(b.get_width() == pytest.approx(1.0) for b in bars)
    tops = np.zeros(len(pi))
    for b in bars:
        i = int(round(b.get_x() + 0.5)) - int(pi.index.min())
        tops[i] = max(tops[i], b.get_y() + b.get_height())
    np.testing.assert_allclose(tops, pi.sum(axis=1).to_numpy(), atol=1e-6)
    assert "3 PPO updates" in ax.get_title()


def test_recorded_range_covers_the_recorded_values_with_a_margin(trajectory) -> None:
    from esper_lib.landscape.core import recorded_range
    from esper_lib.observation import feature_index

    for name in ("val_accuracy", "epoch_progress", "slot0.alpha"):
        column = trajectory.states[:, feature_index(name, trajectory.num_slots)]
        low, high = recorded_range(trajectory, name)
        assert low <= column.min() and high >= column.max() and high - low >= 0.2 - 1e-9
        assert -10 <= low < high <= 10


def test_loaded_model_label_says_fresh_untrained_or_trained_with_updates(tmp_path: Path) -> None:
    plain = save_checkpoint(tmp_path / "plain.pt", small_policy(5))
    trained = save_checkpoint(tmp_path / "ppo.pt", small_policy(5), extra={"ppo": {"update_index": 24}})
    assert load_model(plain).label == f"untrained checkpoint .../{tmp_path.name}/plain.pt (no PPO training state)"
    loaded = load_model(trained)
    assert loaded.label == f"TRAINED checkpoint .../{tmp_path.name}/ppo.pt (24 PPO updates)" and loaded.updates == 24
    assert loaded.label in loaded.message and str(trained) in loaded.message  # the message keeps the full path
    fresh = load_model(tmp_path / "missing.pt", fresh_if_missing=True, fresh_kwargs={"feature_dim": 16, "hidden_dim": 16})
    assert fresh.label.startswith("FRESH untrained network") and fresh.updates == 0


def test_recorded_range_skips_the_not_measured_flag(trajectory) -> None:
    import dataclasses

    from esper_lib.landscape.core import recorded_range

    states = trajectory.states.copy()
    acc, alpha_mode = feature_index("val_accuracy"), feature_index("slot0.alpha_mode")
    states[:, acc] = np.linspace(0.5, 0.7, len(states))
    states[0, acc] = -1.0  # -1 before the first epoch: a flag
    states[:, alpha_mode] = 0.0
    states[0, alpha_mode] = -1.0  # -1 is a real value here (ramping down)
    t = dataclasses.replace(trajectory, states=states)
    low, high = recorded_range(t, "val_accuracy")
    assert 0.45 <= low <= float(states[1:, acc].min()) and float(states[:, acc].max()) <= high <= 0.75
    assert recorded_range(t, "slot0.alpha_mode")[0] < -1.0


def test_package_exports_every_public_name_of_its_modules():
    import esper_lib.landscape as package
    from esper_lib.landscape import core, plots, sources, widgets

    modules = (core, sources, plots, widgets)
    assert package.__all__ == [name for m in modules for name in m.__all__]
    assert len(set(package.__all__)) == len(package.__all__)
    for m in modules:
        for name in m.__all__:
            assert getattr(package, name) is getattr(m, name), name
