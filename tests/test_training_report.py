"""Recording (esper_lib.run_recorders) and plotting (esper_lib.notebooks.training_report) of notebook 04's runs."""
from __future__ import annotations

import gymnasium as gym
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from gymnasium import spaces

from esper_lib.constants import HEAD_NAMES, LifecycleOp
from esper_lib.notebooks.training_report import (
    OP_NAMES,
    iteration_timing,
    plot_controller_comparison,
    plot_head_entropies,
    plot_learning_curve,
    plot_op_distribution,
    plot_reward_terms,
    plot_training_diagnostics,
)
from esper_lib.run_recorders import EpisodeRecorder, OpUsage, StepTimer, episodes_frame, recorders


class TermEnv(gym.Env):
    """Three-step episodes; reward = gain - cost with both terms reported."""

    observation_space = spaces.Box(-1, 1, (1,), np.float32)
    action_space = spaces.MultiDiscrete([6, 3, 13, 4, 3, 3, 4, 5])

    def reset(self, *, seed=None, options=None):  # type: ignore[no-untyped-def]
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):  # type: ignore[no-untyped-def]
        self.t += 1
        terms = {"gain": 1.0, "cost": -0.25}
        info = {"reward_terms": terms, "val_accuracy": 0.5 + 0.1 * self.t, "germinations": 1}
        return np.zeros(1, np.float32), sum(terms.values()), False, self.t == 3, info


def run_episode(env: gym.Env, ops: list[int]) -> None:
    env.reset(seed=0)
    for op in ops:
        action = np.zeros(8, dtype=np.int64)
        action[0] = op
        env.step(action)


def test_episode_recorder_sums_terms_and_counts_ops() -> None:
    env = EpisodeRecorder(TermEnv())
    run_episode(env, [int(LifecycleOp.WAIT), int(LifecycleOp.GERMINATE), int(LifecycleOp.WAIT)])
    run_episode(env, [int(LifecycleOp.PRUNE)] * 3)
    df = episodes_frame(env)
    assert len(df) == 2 and list(df["env"]) == [0, 0]
    first = df.iloc[0]
    assert first["return"] == pytest.approx(2.25)
    assert first["reward_gain"] == pytest.approx(3.0) and first["reward_cost"] == pytest.approx(-0.75)
    assert first["op_WAIT"] == 2 and first["op_GERMINATE"] == 1 and first["final_val_accuracy"] == pytest.approx(0.8)
    assert df.iloc[1]["op_PRUNE"] == 3
    assert env.steps == 6 and env.step_seconds > 0


@pytest.mark.parametrize("vector_class", [gym.vector.SyncVectorEnv, gym.vector.AsyncVectorEnv])
def test_episodes_and_step_time_from_a_vector_env(vector_class: type) -> None:
    vec = StepTimer(vector_class([lambda: EpisodeRecorder(TermEnv()), lambda: EpisodeRecorder(TermEnv())]))
    try:
        vec.reset(seed=0)
        for _ in range(3):
            vec.step(np.zeros((2, 8), dtype=np.int64))
        df = episodes_frame(vec.env)
        assert list(df["env"]) == [0, 1] and (df["reward_gain"] == 3.0).all()
        assert vec.step_seconds > 0
        if vector_class is gym.vector.SyncVectorEnv:
            assert len(recorders(vec.env)) == 2
    finally:
        vec.close()


def test_op_usage_counts_valid_steps_only() -> None:
    class FakeBuffer:
        actions = torch.zeros(2, 4, len(HEAD_NAMES), dtype=torch.int64)
        valid = torch.tensor([[True, True, True, False], [True, True, False, False]])

    FakeBuffer.actions[0, :, 0] = torch.tensor([1, 1, 0, 5])  # the 5 is not valid
    FakeBuffer.actions[1, :, 0] = torch.tensor([3, 0, 5, 5])

    class FakeTrainer:
        buffer = FakeBuffer()

    usage = OpUsage()
    usage(FakeTrainer(), {"update": 0, "env_steps": 5})
    row = usage.frame().iloc[0]
    assert row["GERMINATE"] == pytest.approx(0.4) and row["WAIT"] == pytest.approx(0.4)
    assert row["PRUNE"] == pytest.approx(0.2) and row["ADVANCE"] == 0
    assert row[list(OP_NAMES)].sum() == pytest.approx(1.0)


def test_iteration_timing_splits_host_and_policy() -> None:
    metrics = pd.DataFrame({"collect_s": [3.0, 3.0], "update_s": [1.0, 1.0]})
    table = iteration_timing(metrics, env_step_seconds=4.0).set_index("part")
    assert table.loc["host training + validation (env.step)", "seconds_per_iteration"] == pytest.approx(2.0)
    assert table.loc["policy inference + buffer (rollout outside env.step)", "seconds_per_iteration"] == pytest.approx(1.0)
    assert table.loc["PPO update", "seconds_per_iteration"] == pytest.approx(1.0)
    assert table.loc["total", "seconds_per_iteration"] == pytest.approx(4.0)
    assert table.loc["host training + validation (env.step)", "share_%"] == pytest.approx(50.0)


def test_plots_draw_the_data() -> None:
    from esper_lib.ppo import METRIC_COLUMNS

    n = 4
    metrics = pd.DataFrame({c: np.linspace(0, 1, n) for c in METRIC_COLUMNS})
    metrics["update"] = np.arange(n)
    fig = plot_learning_curve(metrics)
    assert list(fig.axes[0].lines[0].get_ydata()) == list(metrics["episode_return_mean"])
    assert len(plot_head_entropies(metrics).axes[0].lines) == 2 * len(HEAD_NAMES)  # a curve and its ln(k) line per head
    metrics_gap = metrics.assign(entropy_blueprint=np.nan)
    ax = plot_head_entropies(metrics_gap).axes[0]
    assert len(ax.lines) == 2 * (len(HEAD_NAMES) - 1) and "never relevant: blueprint" in ax.get_title()
    fig = plot_training_diagnostics(metrics, target_kl=0.03)
    assert len(fig.axes) == 4 and all(ax.get_ylabel() for ax in fig.axes)
    assert any(line.get_ydata()[0] == 0.03 for line in fig.axes[2].lines)  # the target_kl reference
    assert len(fig.axes[3].lines) == len(HEAD_NAMES)  # clip fraction per head
    usage = pd.DataFrame({"update": np.arange(n), "env_steps": np.arange(n), **{op: np.full(n, 1 / 6) for op in OP_NAMES}})
    assert len(plot_op_distribution(usage).axes[0].collections) == len(OP_NAMES)
    episodes = pd.DataFrame({"return": [1.0, 2.0, 3.0, 4.0], "reward_gain": [1.5, 2.5, 3.5, 4.5], "reward_cost": [-0.5] * 4})
    ax = plot_reward_terms(episodes, bins=2).axes[0]
    assert [line.get_label() for line in ax.lines[:3]] == ["gain", "cost", "return"]
    assert list(ax.lines[0].get_ydata()) == [2.0, 4.0] and list(ax.lines[2].get_ydata()) == [1.5, 3.5]  # window means
    assert list(ax.lines[0].get_xdata()) == [1.5, 3.5]  # window centres, episodes counted from 1
    assert len(plot_reward_terms(episodes).axes[0].lines[0].get_xdata()) == 4  # never more windows than episodes
    with pytest.raises(ValueError, match="reward_<term>"):
        plot_reward_terms(pd.DataFrame({"return": [1.0]}))
    with pytest.raises(ValueError, match="bins"):
        plot_reward_terms(episodes, bins=0)
    with pytest.raises(ValueError, match="empty"):
        plot_reward_terms(episodes.iloc[:0])
    summary = pd.DataFrame(
        {"controller": ["a", "b"], "return_mean": [1.0, 2.0], "return_ci_low": [0.5, 1.5], "return_ci_high": [1.5, 2.5]}
    )
    fig = plot_controller_comparison(summary, "return")
    assert [p.get_height() for p in fig.axes[0].patches] == [1.0, 2.0]
    with pytest.raises(ValueError, match="final_val_accuracy_mean"):
        plot_controller_comparison(summary, "final_val_accuracy")


def test_learning_curves_draw_each_seed_raw_and_its_trailing_mean():
    from esper_lib.notebooks.training_report import plot_learning_curves

    m = pd.DataFrame({"env_steps": [10, 20, 30, 40], "episode_return_mean": [1.0, 3.0, 2.0, 6.0]})
    fig = plot_learning_curves({0: m, 1: m.assign(episode_return_mean=0.0)}, {"always_wait": 1.5}, window=2)
    ax = fig.axes[0]
    smooth = [line for line in ax.lines if line.get_label().startswith("PPO, training seed 0")]
    assert len(smooth) == 1 and list(smooth[0].get_ydata()) == [1.0, 2.0, 2.5, 4.0]  # trailing means of 2
    assert sum(1 for line in ax.lines if line.get_alpha() == 0.3) == 2  # one faint raw line per seed
    assert any(line.get_label() == "always_wait (held-out mean)" for line in ax.lines)
    with pytest.raises(ValueError, match="window"):
        plot_learning_curves({0: m}, window=0)


def test_first_epoch_and_op_probability_plots_draw_every_seed():
    from esper_lib.notebooks.training_report import plot_first_epoch_choices, plot_op_probabilities

    trace = pd.DataFrame({"update": range(10), "p_GERMINATE": np.linspace(0.5, 0.1, 10),
                          "blueprint": ["NORM"] * 5 + ["CONV_LIGHT"] * 5, "style": ["LINEAR_ADD"] * 9 + ["GATED_GATE"]})
    fig = plot_first_epoch_choices({0: trace, 1: trace.assign(p_GERMINATE=0.9)})
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 3  # two seeds and the 0.5 line
    labels = sorted(t.get_text() for t in ax.texts)
    assert labels == ["conv_light/linear_add"] * 2 + ["norm/linear_add"] * 2  # a choice held for fewer than 4 updates is not labelled
    profile = pd.DataFrame({"epoch": range(4), "op": ["WAIT", "GERMINATE", "ADVANCE", "WAIT"],
                            **{f"p_{n}": [0.0] * 4 for n in OP_NAMES}})
    profile[["p_WAIT", "p_GERMINATE", "p_ADVANCE"]] = [[0.6, 0.4, 0.0], [0.3, 0.7, 0.0], [0.2, 0.0, 0.8], [0.9, 0.1, 0.0]]
    fig = plot_op_probabilities({0: profile, 2: profile})
    assert len(fig.axes) == 2 and fig.axes[1].get_title() == "training seed 2"
    assert len(fig.axes[0].get_lines()) == 4  # the three ops ever above 0.02, and the 0.5 line
    with pytest.raises(ValueError, match="traces"):
        plot_first_epoch_choices({})
    plt.close("all")
