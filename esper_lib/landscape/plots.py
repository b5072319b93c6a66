"""Matplotlib views of the Q(s, op) landscape (frames from ``esper_lib.landscape.core``).

Every function draws on the ``ax`` it is given (or on a new ``Figure`` of ``FIGSIZE`` when ``ax`` is
None, created without pyplot so nothing accumulates in pyplot's global state) and returns the
figure. Nothing here calls ``plt.show`` (notebooks use ``esper_lib.notebooks.helpers.show_and_save``).
Each op keeps one colour in every plot (``OP_COLORS``); masked (invalid) ops are drawn in grey. All
four views share one figure size and one set of font sizes, so side by side (the explorer's grid)
their text has the same size. ``label`` (e.g. ``LoadedModel.label``) adds a second title line that
names the model the figure shows.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from esper_lib.landscape.core import OP_NAMES, require_columns, wide

OP_COLORS: dict[str, str] = dict(
    zip(OP_NAMES, ("#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd"))
)
MASKED_COLOR = "0.65"
V_STYLE = {"color": "black", "linestyle": "--", "linewidth": 2.0}
FIGSIZE: tuple[float, float] = (8.0, 3.6)  # every landscape view, so they scale alike side by side
FONT = {"title": 11, "label": 10, "tick": 9, "legend": 8}


def _axes(ax: Axes | None, figsize: tuple[float, float] = FIGSIZE) -> tuple[Figure, Axes]:
    if ax is None:
        fig = Figure(figsize=figsize, layout="constrained")
        return fig, fig.add_subplot()
    if not isinstance(ax, Axes):
        raise TypeError(f"ax must be a matplotlib Axes or None, got {type(ax).__name__}")
    return ax.figure, ax


def _finish(
    ax: Axes, title: str, xlabel: str, ylabel: str | None, label: str | None, legend: bool = True, integer_x: bool = True
) -> None:
    """Title (plus the model ``label`` on a second line), axis labels, legend right of the axes, font sizes."""
    ax.set_title(f"{title}\n{label}" if label else title, fontsize=FONT["title"])
    if integer_x:  # steps are whole host epochs
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel, fontsize=FONT["label"])
    if ylabel is not None:
        ax.set_ylabel(ylabel, fontsize=FONT["label"])
    ax.tick_params(labelsize=FONT["tick"])
    if legend:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=FONT["legend"], frameon=False)


def _mark_step(ax: Axes, step: int | None, on_top: bool = False) -> None:
    """Vertical line at the selected step (behind lines and dots, or on top of filled bars)."""
    if step is not None:
        if on_top:
            ax.axvline(step, color="black", linewidth=1.5, linestyle="--", zorder=5)
        else:
            ax.axvline(step, color="black", linewidth=1.0, alpha=0.5, zorder=0.5)


def plot_q_trajectory(frame: pd.DataFrame, ax: Axes | None = None, step: int | None = None, label: str | None = None) -> Figure:
    """Q(s, op) of each op along the trajectory, V(s) overlaid.

    Valid ops: coloured line and dots. Masked ops: a faint grey line with grey crosses (the critic
    still outputs a number, but the op could not be chosen). A black ring marks the op taken at
    each step; ``step`` draws a vertical marker.
    """
    require_columns(frame, ("step", "op", "q", "valid", "V", "taken"), "frame")
    fig, ax = _axes(ax)
    q, valid = wide(frame, "q"), wide(frame, "valid").astype(bool)
    steps = q.index.to_numpy()
    for op in OP_NAMES:
        series, ok = q[op].to_numpy(), valid[op].to_numpy()
        ax.plot(steps, series, color=MASKED_COLOR, linewidth=0.8, alpha=0.5, zorder=1)
        ax.plot(steps, np.where(ok, series, np.nan), color=OP_COLORS[op], linewidth=1.8, marker="o", markersize=3, label=op, zorder=2)
        if (~ok).any():
            ax.scatter(steps[~ok], series[~ok], color=MASKED_COLOR, marker="x", s=18, zorder=2)
    v = frame.groupby("step", sort=True)["V"].first()
    ax.plot(v.index, v.to_numpy(), label="V(s) = Σ π(o|s) Q(s,o)", zorder=3, **V_STYLE)
    taken = frame[frame["taken"]]
    ax.scatter(taken["step"], taken["q"], facecolors="none", edgecolors="black", s=60, linewidths=1.2, label="op taken", zorder=4)
    ax.scatter([], [], color=MASKED_COLOR, marker="x", label="masked op")
    _mark_step(ax, step)
    _finish(ax, "Critic Q(s, op) along the trajectory", "step (host epoch)", "Q(s, op)", label)
    return fig


def plot_q_heatmap(frame: pd.DataFrame, ax: Axes | None = None, step: int | None = None, label: str | None = None) -> Figure:
    """Heatmap of Q(s, op): steps on x, ops on y; masked cells grey, dots on the op taken."""
    require_columns(frame, ("step", "op", "q", "valid", "taken"), "frame")
    fig, ax = _axes(ax)
    q, valid = wide(frame, "q"), wide(frame, "valid").astype(bool)
    data = np.ma.masked_array(q.to_numpy().T, mask=~valid.to_numpy().T)  # [NUM_OPS, T]
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=MASKED_COLOR)
    finite = q.to_numpy()[valid.to_numpy()]
    norm = Normalize(*(float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0))
    steps = q.index.to_numpy()
    extent = (steps[0] - 0.5, steps[-1] + 0.5, len(OP_NAMES) - 0.5, -0.5)
    image = ax.imshow(data, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest", extent=extent)
    taken = frame[frame["taken"]]
    ax.scatter(taken["step"], taken["op_index"], color="white", edgecolors="black", s=14, linewidths=0.6, label="op taken")
    ax.set_yticks(range(len(OP_NAMES)), OP_NAMES)
    _finish(ax, "Q(s, op) heatmap (grey = masked op, dot = op taken)", "step (host epoch)", None, label, legend=False)
    bar = fig.colorbar(image, ax=ax, pad=0.01)
    bar.set_label("Q(s, op)", fontsize=FONT["label"])
    bar.ax.tick_params(labelsize=FONT["tick"])
    _mark_step(ax, step)
    return fig


def plot_op_probs(frame: pd.DataFrame, ax: Axes | None = None, step: int | None = None, label: str | None = None) -> Figure:
    """pi(op | s) as stacked bars, one bar per step (masked ops have probability 0).

    Steps are discrete decisions, so each step is a full-width bar and nothing is interpolated
    between steps.
    """
    require_columns(frame, ("step", "op", "pi"), "frame")
    fig, ax = _axes(ax)
    pi = wide(frame, "pi")
    steps = pi.index.to_numpy()
    bottom = np.zeros(len(steps))
    for op in OP_NAMES:
        height = pi[op].to_numpy()
        ax.bar(steps, height, bottom=bottom, width=1.0, color=OP_COLORS[op], edgecolor="white", linewidth=0.4, label=op)
        bottom = bottom + height
    _mark_step(ax, step, on_top=True)  # the bars fill the axes: a marker behind them would be hidden
    ax.set_ylim(0, 1)
    ax.set_xlim(steps.min() - 0.5, steps.max() + 0.5)
    _finish(ax, "Op policy π(op | s) per step", "step (host epoch)", "π(op | s)", label)
    return fig


def plot_feature_sweep(sweep: pd.DataFrame, ax: Axes | None = None, label: str | None = None) -> Figure:
    """Q(s, op) per op as one feature varies (a ``feature_sweep`` frame), V(s) dashed.

    Ops masked at that step are drawn as grey dotted lines; the vertical line is the value the
    feature actually had at that step.
    """
    require_columns(sweep, ("feature", "step", "value", "observed", "op", "q", "valid", "V"), "sweep")
    fig, ax = _axes(ax)
    q = sweep.pivot(index="value", columns="op", values="q").reindex(columns=list(OP_NAMES))
    valid = sweep.groupby("op", observed=False)["valid"].all()
    x = q.index.to_numpy()
    for op in OP_NAMES:
        if valid[op]:
            ax.plot(x, q[op].to_numpy(), color=OP_COLORS[op], linewidth=1.8, label=op)
        else:
            ax.plot(x, q[op].to_numpy(), color=MASKED_COLOR, linewidth=1.0, linestyle=":", label=f"{op} (masked)")
    v = sweep.groupby("value", sort=True)["V"].first()
    ax.plot(v.index, v.to_numpy(), label="V(s)", **V_STYLE)
    observed = float(sweep["observed"].iloc[0])
    ax.axvline(observed, color="black", linewidth=1.0, alpha=0.5, label=f"recorded value {observed:.3g}")
    feature, step = sweep["feature"].iloc[0], int(sweep["step"].iloc[0])
    _finish(ax, f"Q(s, op) as {feature} varies at step {step}", f"{feature} (raw observation value)", "Q(s, op)", label, integer_x=False)
    return fig


def landscape_overview(frame: pd.DataFrame, sweep: pd.DataFrame | None = None, step: int | None = None, label: str | None = None) -> Figure:
    """All views on one figure: Q along the trajectory, heatmap, pi stack and (optionally) the sweep.

    ``label`` goes once into the figure's title.
    """
    rows = 4 if sweep is not None else 3
    fig = Figure(figsize=(10, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, 1)
    plot_q_trajectory(frame, axes[0], step)
    plot_q_heatmap(frame, axes[1], step)
    plot_op_probs(frame, axes[2], step)
    if sweep is not None:
        plot_feature_sweep(sweep, axes[3])
    if label:
        fig.suptitle(label, fontsize=FONT["title"])
    return fig


def figure_png(fig: Figure, dpi: int = 90) -> bytes:
    """The figure rendered as PNG bytes (Agg, works headless)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save ``fig`` to ``path`` (parent folders are created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


__all__ = [
    "OP_COLORS",
    "FIGSIZE",
    "plot_q_trajectory",
    "plot_q_heatmap",
    "plot_op_probs",
    "plot_feature_sweep",
    "landscape_overview",
    "figure_png",
    "save_figure",
]
