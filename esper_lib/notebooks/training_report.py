"""Plotting a PPO run on the morphogenetic env (notebook 04).

Plot functions take an ``ax`` (or make one) and return the figure; none calls ``plt.show``. What
they plot is recorded by ``esper_lib.run_recorders`` (episodes, op usage, env step time) and by the
trainer (metrics).
"""
from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from esper_lib.constants import HEAD_NAMES, OP_NAMES


def _ax(ax: Axes | None, figsize: tuple[float, float] = (7, 4)) -> Axes:
    return plt.subplots(figsize=figsize)[1] if ax is None else ax


def plot_learning_curve(metrics: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """Mean episode return (± std) per update against env steps."""
    ax = _ax(ax)
    x, mean, std = metrics["env_steps"], metrics["episode_return_mean"], metrics["episode_return_std"].fillna(0)
    ax.plot(x, mean, marker="o", ms=3, label="episode return (mean)")
    ax.fill_between(x, mean - std, mean + std, alpha=0.2, label="± std")
    ax.set_xlabel("env steps (host epochs)")
    ax.set_ylabel("return")
    ax.set_title("Learning curve")
    ax.legend()
    ax.figure.tight_layout()
    return ax.figure


def plot_head_entropies(metrics: pd.DataFrame, ax: Axes | None = None, head_sizes: dict[str, int] | None = None) -> Figure:
    """Per-head entropy (over steps where the head is relevant) per update, with ln(k) of each head.

    A head's line has gaps at updates where no step made it relevant (e.g. blueprint when nothing
    was germinated); a head never relevant in the run is listed in the title. ``head_sizes``
    (default: 3 slots) gives the dotted ln(k) reference of a uniform head over k actions (the
    maximum; masks make the real maximum lower).
    """
    from esper_lib.constants import head_sizes as default_head_sizes

    ax = _ax(ax)
    sizes = head_sizes or default_head_sizes(3)
    never = []
    for k, name in enumerate(HEAD_NAMES):
        y = metrics[f"entropy_{name}"]
        if y.isna().all():
            never.append(name)
            continue
        color = f"C{k}"
        ax.plot(metrics["update"], y, color=color, marker=".", ms=3, label=f"{name} (ln {sizes[name]} = {np.log(sizes[name]):.2f})")
        ax.axhline(np.log(sizes[name]), color=color, ls=":", lw=0.8)
    ax.set_xlabel("update")
    ax.set_ylabel("entropy (nats)")
    title = "Per-head entropy (dotted: ln k, uniform)"
    if never:
        title += f"\nnever relevant: {', '.join(never)}"
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.figure.tight_layout()
    return ax.figure


def plot_training_diagnostics(metrics: pd.DataFrame, axes: Sequence[Axes] | None = None, target_kl: float | None = None) -> Figure:
    """Value loss, explained variance, approximate KL (with ``target_kl``) and clip fraction per update (2 x 2)."""
    if axes is None:
        axes = plt.subplots(2, 2, figsize=(10, 6.5))[1].ravel()
    panels = (
        ("value_loss", "value loss (MSE of Q(s, op) vs returns)"),
        ("explained_variance", "explained variance of Q(s, op)"),
        ("approx_kl", "approximate KL per update"),
    )
    for ax, (column, label) in zip(axes, panels):
        ax.plot(metrics["update"], metrics[column], marker="o", ms=3)
        ax.set_ylabel(label)
        ax.set_xlabel("update")
    if target_kl is not None:
        axes[2].axhline(target_kl, color="tab:red", ls="--", lw=1, label=f"target_kl = {target_kl:g} (early stop)")
        axes[2].legend(fontsize=8)
    clip = [c for c in (f"clip_frac_{h}" for h in HEAD_NAMES) if c in metrics.columns and metrics[c].notna().any()]
    for c in clip:
        axes[3].plot(metrics["update"], metrics[c], marker=".", ms=3, label=c.removeprefix("clip_frac_"))
    axes[3].set_ylabel("fraction of relevant steps clipped")
    axes[3].set_xlabel("update")
    if clip:
        axes[3].legend(fontsize=7, ncol=2)
    axes[0].figure.tight_layout()
    return axes[0].figure


def plot_op_distribution(op_usage: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """Stacked area of the op fractions of each rollout."""
    ax = _ax(ax)
    ax.stackplot(op_usage["update"], *(op_usage[name] for name in OP_NAMES), labels=OP_NAMES, alpha=0.85)
    ax.set_xlabel("update")
    ax.set_ylabel("fraction of steps")
    ax.set_ylim(0, 1)
    ax.set_title("Op distribution over training")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.figure.tight_layout()
    return ax.figure


def reward_term_columns(episodes: pd.DataFrame) -> list[str]:
    """The ``reward_<term>`` columns of an episodes frame."""
    return [c for c in episodes.columns if c.startswith("reward_")]


def plot_reward_terms(
    episodes: pd.DataFrame, ax: Axes | None = None, bins: int = 24, title: str = "Reward terms over training"
) -> Figure:
    """Mean per-episode sum of each reward term, and the mean return, over ``bins`` windows of episodes.

    Episodes are taken in finishing order and cut into ``bins`` consecutive windows of (nearly) equal
    size; each line is one term's window means (the terms add up to the return line). The legend
    sits outside the axes.
    """
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    terms = reward_term_columns(episodes)
    if not terms:
        raise ValueError("episodes has no reward_<term> columns: record the env with EpisodeRecorder")
    if len(episodes) == 0:
        raise ValueError("episodes is empty: no finished training episode to plot")
    ax = _ax(ax, (8, 4))
    window = np.minimum(np.arange(len(episodes)) * bins // len(episodes), bins - 1)
    grouped = episodes.reset_index(drop=True).groupby(window)
    x = pd.Series(np.arange(1, len(episodes) + 1)).groupby(window).mean().to_numpy()  # window centres, from 1
    for term in terms:
        ax.plot(x, grouped[term].mean().to_numpy(), marker=".", label=term.removeprefix("reward_"))
    ax.plot(x, grouped["return"].mean().to_numpy(), color="black", lw=2, marker="o", ms=3, label="return")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel(f"training episode (finishing order; means over {len(episodes) / bins:.0f}-episode windows)")
    ax.set_ylabel("sum over the episode")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.figure.tight_layout()
    return ax.figure


def plot_controller_comparison(summary: pd.DataFrame, metric: str = "final_val_accuracy", ax: Axes | None = None) -> Figure:
    """Mean and confidence interval of ``metric`` per controller (from ``baselines.summarize_results``)."""
    ax = _ax(ax, (6, 3.5))
    for column in (f"{metric}_mean", f"{metric}_ci_low", f"{metric}_ci_high"):
        if column not in summary.columns:
            raise ValueError(f"summary has no column {column!r}; summarise with metrics including {metric!r}")
    mean = summary[f"{metric}_mean"].to_numpy(dtype=float)
    low = np.nan_to_num(mean - summary[f"{metric}_ci_low"].to_numpy(dtype=float))
    high = np.nan_to_num(summary[f"{metric}_ci_high"].to_numpy(dtype=float) - mean)
    x = np.arange(len(summary))
    ax.bar(x, mean, yerr=[low, high], capsize=6, color="tab:blue", alpha=0.8)
    ax.set_xticks(x, summary["controller"])
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}: mean and 95% CI over held-out seeds")
    if metric.endswith("accuracy"):
        ax.set_ylim(max(0.0, float(np.nanmin(mean - low)) - 0.05), min(1.0, float(np.nanmax(mean + high)) + 0.02))
    ax.figure.tight_layout()
    return ax.figure


def iteration_timing(metrics: pd.DataFrame, env_step_seconds: float) -> pd.DataFrame:
    """Wall time per PPO iteration split into host work (inside ``env.step``) and policy work.

    ``env_step_seconds``: wall time inside the vector env's ``step`` over the run (``StepTimer``).
    Policy work = rollout time outside ``env.step`` (network inference, buffer writes) + the update.
    """
    collect = float(metrics["collect_s"].sum())
    update = float(metrics["update_s"].sum())
    n = max(len(metrics), 1)
    host = min(env_step_seconds, collect)
    rows = [
        ("host training + validation (env.step)", host / n),
        ("policy inference + buffer (rollout outside env.step)", (collect - host) / n),
        ("PPO update", update / n),
    ]
    df = pd.DataFrame(rows, columns=["part", "seconds_per_iteration"])
    total = df["seconds_per_iteration"].sum()
    df["share_%"] = (100 * df["seconds_per_iteration"] / total).round(1) if total > 0 else 0.0
    df.loc[len(df)] = ["total", total, 100.0]
    return df


def plot_learning_curves(
    metrics_by_seed: dict[int, pd.DataFrame], references: dict[str, float] | None = None, ax: Axes | None = None,
    window: int = 8,
) -> Figure:
    """Mean training-episode return per update against env steps, one colour per training seed.

    Each update's mean is a faint line with points; the solid line is its trailing mean over
    ``window`` updates (an update's episodes come from few hosts, so single updates are noisy;
    ``window=1``: raw only). ``references``: horizontal lines (e.g. the held-out mean return of
    always-WAIT, random and the best fixed schedule), labelled. Training returns are those of the
    sampling policy (exploring), the references those of held-out evaluation episodes: read the gap,
    not the exact level.
    """
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    ax = _ax(ax)
    for k, (seed, m) in enumerate(metrics_by_seed.items()):
        color = f"C{k}"
        if window == 1:
            ax.plot(m["env_steps"], m["episode_return_mean"], color=color, marker="o", ms=2, lw=1.2, label=f"PPO, training seed {seed}")
            continue
        ax.plot(m["env_steps"], m["episode_return_mean"], color=color, marker="o", ms=2, lw=0.6, alpha=0.3)
        smooth = m["episode_return_mean"].rolling(window, min_periods=1).mean()
        ax.plot(m["env_steps"], smooth, color=color, lw=2.0, label=f"PPO, training seed {seed} (mean of {window} updates)")
    styles = iter(["--", ":", "-.", (0, (5, 1)), (0, (1, 3))])
    for name, value in (references or {}).items():
        ax.axhline(value, color="grey", ls=next(styles, "--"), lw=1.2, label=f"{name} (held-out mean)")
    ax.set_xlabel("env steps (host epochs)")
    ax.set_ylabel("mean episode return")
    ax.set_title("Learning curves (sampling policy) and reference levels")
    ax.legend(fontsize=8, loc="best")
    ax.figure.tight_layout()
    return ax.figure


def plot_critic_calibration(calibration_by_seed: dict[int, pd.DataFrame], ax: Axes | None = None) -> Figure:
    """Per update: the critic's mean V(s0) at the episodes' first states (solid) and the mean
    discounted return measured after them (dashed), one colour per training seed.

    A calibrated critic keeps the two together; a bootstrap past the end of the task makes the
    solid line climb away from the dashed one.
    """
    ax = _ax(ax)
    for k, (seed, cal) in enumerate(calibration_by_seed.items()):
        if cal.empty:
            continue
        g = cal.groupby("update")[["value_expected", "discounted_return"]].mean()
        color = f"C{k}"
        ax.plot(g.index, g["value_expected"], color=color, lw=1.5, label=f"seed {seed}: critic V(s0)")
        ax.plot(g.index, g["discounted_return"], color=color, lw=1.0, ls="--", label=f"seed {seed}: measured return")
    ax.set_xlabel("update")
    ax.set_ylabel("discounted return from the first state")
    ax.set_title("Critic calibration: V(s0) vs measured return")
    ax.legend(fontsize=7, ncol=2)
    ax.figure.tight_layout()
    return ax.figure


def plot_op_probabilities(profiles: dict[int, pd.DataFrame], axes: Sequence[Axes] | None = None) -> Figure:
    """One panel per training seed: pi(op | s) over one greedy episode (``op_probabilities_along_episode``), chosen ops marked."""
    if not profiles:
        raise ValueError("profiles must not be empty")
    if axes is None:
        _, axes = plt.subplots(1, len(profiles), figsize=(4.2 * len(profiles), 3.4), sharey=True, squeeze=False)
        axes = axes[0]
    for ax, (seed, df) in zip(axes, profiles.items()):
        for name in OP_NAMES:
            col = f"p_{name}"
            if df[col].max() > 0.02:
                line = ax.plot(df["epoch"], df[col], marker=".", label=name)[0]
                chosen = df["op"] == name
                ax.scatter(df.loc[chosen, "epoch"], df.loc[chosen, col], s=60, facecolors="none", edgecolors=line.get_color())
        ax.axhline(0.5, color="grey", lw=0.6, ls=":")
        ax.set_title(f"training seed {seed}")
        ax.set_xlabel("epoch of the episode")
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("pi(op | s), greedy episode")
    axes[-1].legend(fontsize=7, loc="center right")
    fig = axes[0].figure
    fig.suptitle("Op probabilities along one greedy held-out episode (circles: the op taken)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_first_epoch_choices(traces: dict[int, pd.DataFrame], ax: Axes | None = None) -> Figure:
    """p(GERMINATE) at the first epoch of the probe hosts after every update, one line per training seed.

    ``traces``: training seed -> ``FirstEpochChoices.frame()`` (``seed_<k>/first_epoch.csv``). The
    blueprint and style a germination there would take are written where a choice starts that then
    holds for at least 4 updates.
    """
    if not traces:
        raise ValueError("traces must not be empty")
    ax = _ax(ax, (9, 4))
    for seed, df in traces.items():
        line = ax.plot(df["update"], df["p_GERMINATE"], label=f"training seed {seed}")[0]
        choice = (df["blueprint"] + "/" + df["style"]).reset_index(drop=True)
        run_id = choice.ne(choice.shift()).cumsum()
        lasting = run_id.map(run_id.value_counts()) >= 4  # label a choice where it starts and then holds 4+ updates
        for i in choice.index[lasting & run_id.ne(run_id.shift())]:
            ax.annotate(choice[i].lower(), (df["update"].iloc[i], df["p_GERMINATE"].iloc[i]), fontsize=6, color=line.get_color(),
                        xytext=(2, 4), textcoords="offset points")
    ax.axhline(0.5, color="grey", lw=0.6, ls=":")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("update")
    ax.set_ylabel("p(GERMINATE) at epoch 0")
    ax.set_title("At the first epoch of two probe hosts: germinate? (labels: blueprint/style it would take)", fontsize=10)
    ax.legend(fontsize=8)
    return ax.figure
