"""An ipywidgets explorer of the Q(s, op) landscape.

``LandscapeExplorer`` records a trajectory (env seed, controller, length), computes the landscape
of the loaded policy along it and draws four plots: Q(s, op) per op with V(s), the step x op
heatmap, the pi(op | s) stack and a feature sweep at the selected step. Every control has an
explicit ``observe`` / ``on_click`` handler (no ``interactive``, which hides exceptions); each
handler reports failures in the status line of the UI, with the traceback in a fold-out, and keeps
the previous plots on screen.

Plots are rendered to PNG into ``ipywidgets.Image`` widgets, so the explorer needs no matplotlib
widget backend and runs headless (tests drive it by setting ``.value`` and calling ``.click()``).
The current data and figures are attributes: ``trajectory``, ``frame``, ``sweep_frame``,
``figures`` (name -> Figure), ``error`` (last error message or None), ``redraws`` (counter).
"""
from __future__ import annotations

import functools
import html
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import ipywidgets as W
import pandas as pd
from matplotlib.figure import Figure

from esper_lib.landscape.core import (
    OP_NAMES,
    Trajectory,
    check_compatible,
    feature_sweep,
    landscape_frame,
    record_trajectory,
    recorded_range,
    sweep_values,
)
from esper_lib.landscape.plots import figure_png, plot_feature_sweep, plot_op_probs, plot_q_heatmap, plot_q_trajectory, save_figure
from esper_lib.landscape.sources import (
    ControllerContext,
    ControllerFactory,
    QUICK_ENV_KWARGS,
    LoadedModel,
    controller_factories,
    env_factory as named_env_factory,
    load_model,
)
from esper_lib.network import FactoredRecurrentActorCritic
from esper_lib.observation import feature_names

PLOT_NAMES: tuple[str, ...] = ("q_trajectory", "q_heatmap", "op_probs", "feature_sweep")
_TRAJECTORY_PLOTS = {"q_trajectory": plot_q_trajectory, "q_heatmap": plot_q_heatmap, "op_probs": plot_op_probs}


def _guarded(action: str) -> Callable:
    """Decorator for UI handlers: any exception becomes a visible error in the status line."""

    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def run(self: "LandscapeExplorer", *args: Any, **kwargs: Any) -> Any:
            if self._busy:  # a handler setting a widget value must not re-enter the handlers
                return None
            self._busy = True
            try:
                result = method(self, *args, **kwargs)
            except Exception as exc:  # shown in the UI, never swallowed
                self._show_error(action, exc)
                return None
            finally:
                self._busy = False
            return result

        return run

    return wrap


class LandscapeExplorer:
    """Interactive Q(s, op) landscape of one policy on one recorded episode.

    Args:
        policy: network to inspect; when None, ``checkpoint_path`` is loaded (an error if missing).
        checkpoint_path: shown in the path box; loaded at start when ``policy`` is None.
        obs_normalizer: applied to raw states before the network (``landscape.apply_normalizer``).
        env_factory: zero-argument callable returning a fresh env (default: the morpho env with
            ``max_epochs = max_steps`` and ``QUICK_ENV_KWARGS``).
        controllers: name -> factory ``ControllerContext -> controller`` (default: ``controller_factories()``).
        controller: initial controller name. seed: env seed. max_steps: recording length cap.
        feature: initial feature to sweep (a name of ``esper_lib.observation.feature_names()``).
        sweep_range: ``(low, high)`` of the sweep, in raw observation units; None (default) uses the
            range the feature takes in the recorded episode plus a margin (``landscape.recorded_range``),
            recomputed for each new episode and each new feature until the user edits from/to.
        sweep_points: values in the sweep.
        dpi: resolution of the rendered plots (all four have the same size, ``plots.FIGSIZE``).
        model_message: one line about where ``policy`` came from, shown in the status line.
        model_label: short name of the model (``LoadedModel.label``: fresh or trained, path, PPO
            updates), shown in the status line and in every plot's title.
    """

    def __init__(
        self,
        policy: FactoredRecurrentActorCritic | None = None,
        *,
        checkpoint_path: str = "",
        obs_normalizer: Any | None = None,
        env_factory: Callable[[], gym.Env] | None = None,
        controllers: dict[str, ControllerFactory] | None = None,
        controller: str | None = None,
        seed: int = 0,
        max_steps: int = 16,
        feature: str | None = None,
        sweep_range: tuple[float, float] | None = None,
        sweep_points: int = 21,
        dpi: int = 80,
        model_message: str | None = None,
        model_label: str | None = None,
    ):
        self.env_factory = env_factory or named_env_factory("morpho", max_epochs=max_steps, **QUICK_ENV_KWARGS)
        self.controllers = dict(controllers or controller_factories())
        if not self.controllers:
            raise ValueError("controllers must name at least one controller factory")
        controller = controller or next(iter(self.controllers))
        if controller not in self.controllers:
            raise ValueError(f"controller must be one of {tuple(self.controllers)}, got {controller!r}")
        self.dpi = dpi
        self.policy: FactoredRecurrentActorCritic | None = policy
        self.obs_normalizer = obs_normalizer
        self.model_message = model_message or ("policy passed in" if policy is not None else "")
        self.model_label = model_label or ("policy passed in" if policy is not None else "")
        self.auto_range = sweep_range is None
        self.trajectory: Trajectory | None = None
        self.frame: pd.DataFrame | None = None
        self.sweep_frame: pd.DataFrame | None = None
        self.figures: dict[str, Figure] = {}
        self.error: str | None = None
        self.error_traceback: str | None = None
        self.redraws = 0
        self._busy = False

        names = feature_names(policy.num_slots) if policy is not None else feature_names()
        feature = feature or names[0]
        if feature not in names:
            raise ValueError(f"feature must be one of esper_lib.observation.feature_names(), got {feature!r}")
        style = {"description_width": "initial"}
        self.checkpoint_path = W.Text(value=str(checkpoint_path), description="Checkpoint", continuous_update=False, layout=W.Layout(width="60%"), style=style)
        self.load_button = W.Button(description="Load", icon="folder-open", tooltip="load the checkpoint at this path")
        self.seed = W.IntText(value=int(seed), description="Env seed", layout=W.Layout(width="160px"), style=style)
        self.controller = W.Dropdown(options=list(self.controllers), value=controller, description="Controller", style=style)
        self.max_steps = W.BoundedIntText(value=int(max_steps), min=1, max=10_000, description="Max steps", layout=W.Layout(width="170px"), style=style)
        self.record_button = W.Button(description="Record", icon="play", tooltip="record a new episode with these settings")
        self.step = W.IntSlider(value=0, min=0, max=0, description="Step", continuous_update=False, layout=W.Layout(width="95%"))
        self.feature = W.Dropdown(options=names, value=feature, description="Sweep feature", style=style)
        low, high = sweep_range if sweep_range is not None else (-1.0, 1.0)  # auto: replaced once an episode is recorded
        self.sweep_min = W.FloatText(value=float(low), description="from", layout=W.Layout(width="150px"), style=style)
        self.sweep_max = W.FloatText(value=float(high), description="to", layout=W.Layout(width="150px"), style=style)
        self.sweep_points = W.BoundedIntText(value=int(sweep_points), min=2, max=1000, description="points", layout=W.Layout(width="150px"), style=style)
        self.status = W.HTML()
        self.images = {name: W.Image(format="png", layout=W.Layout(width="100%")) for name in PLOT_NAMES}

        self.load_button.on_click(self._on_load)
        self.checkpoint_path.observe(self._on_load, names="value")
        self.record_button.on_click(self._on_record)
        for control in (self.seed, self.controller, self.max_steps):
            control.observe(self._on_record, names="value")
        self.step.observe(self._on_step, names="value")
        self.feature.observe(self._on_feature, names="value")
        for control in (self.sweep_min, self.sweep_max):
            control.observe(self._on_range, names="value")
        self.sweep_points.observe(self._on_sweep, names="value")

        self.ui = W.VBox(
            [
                W.HBox([self.checkpoint_path, self.load_button]),
                W.HBox([self.seed, self.controller, self.max_steps, self.record_button]),
                self.step,
                W.HBox([self.feature, self.sweep_min, self.sweep_max, self.sweep_points]),
                self.status,
                W.GridBox(
                    [self.images[n] for n in PLOT_NAMES],
                    layout=W.Layout(grid_template_columns="1fr 1fr", grid_gap="4px", width="100%"),
                ),
            ]
        )

        if policy is None:
            self._on_load()
        else:
            self._on_record()

    # --- display --------------------------------------------------------------------------------

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.ui._repr_mimebundle_(**kwargs)

    # --- handlers (each guarded: failures go to the status line) ---------------------------------

    @_guarded("Could not load the checkpoint")
    def _on_load(self, *_: Any) -> None:
        path = self.checkpoint_path.value.strip()
        if not path:
            raise ValueError("checkpoint path is empty: type the path of a checkpoint saved with esper_lib.checkpoint")
        loaded: LoadedModel = load_model(path)
        self._check_env_fit(loaded.policy)
        self.policy, self.obs_normalizer, self.model_message = loaded.policy, loaded.obs_normalizer, loaded.message
        self.model_label = loaded.label
        self._record()

    @_guarded("Could not record a trajectory")
    def _on_record(self, *_: Any) -> None:
        self._record()

    @_guarded("Could not redraw at this step")
    def _on_step(self, *_: Any) -> None:
        self._draw_trajectory_plots()
        self._draw_sweep()
        self._ok()

    @_guarded("Could not compute the feature sweep")
    def _on_sweep(self, *_: Any) -> None:
        self._draw_sweep()
        self._ok()

    @_guarded("Could not compute the feature sweep")
    def _on_feature(self, *_: Any) -> None:
        if self.auto_range:
            self._use_recorded_range()
        self._draw_sweep()
        self._ok()

    @_guarded("Could not compute the feature sweep")
    def _on_range(self, *_: Any) -> None:
        self.auto_range = False  # the user chose a range: keep it for new episodes and features
        self._draw_sweep()
        self._ok()

    # --- work -------------------------------------------------------------------------------------

    def _require_policy(self) -> FactoredRecurrentActorCritic:
        if self.policy is None:
            raise ValueError("no policy loaded: enter a checkpoint path and press Load")
        return self.policy

    def _check_env_fit(self, policy: FactoredRecurrentActorCritic) -> None:
        """Raise ValueError if ``policy`` cannot read this explorer's env observations."""
        env = self.env_factory()
        try:
            space = env.observation_space
            state_dim, num_slots = space["state"].shape[0], space["blueprint_indices"].shape[0]
        finally:
            env.close()
        if (policy.state_dim, policy.num_slots) != (state_dim, num_slots):
            raise ValueError(
                f"incompatible checkpoint: the network expects state_dim={policy.state_dim}, num_slots={policy.num_slots}; "
                f"the env gives state_dim={state_dim}, num_slots={num_slots}"
            )

    def _record(self) -> None:
        policy = self._require_policy()
        env = self.env_factory()
        try:
            ctx = ControllerContext(env=env, policy=policy, obs_normalizer=self.obs_normalizer, seed=int(self.seed.value))
            controller = self.controllers[self.controller.value](ctx)
            trajectory = record_trajectory(env, controller, seed=int(self.seed.value), max_steps=int(self.max_steps.value))
        finally:
            env.close()
        check_compatible(policy, trajectory)
        self.trajectory = trajectory
        self.frame = landscape_frame(policy, trajectory, self.obs_normalizer)
        self._sync_feature_options(policy)
        self.step.max = len(trajectory) - 1  # ipywidgets clamps value to max (re-entry is blocked by _busy)
        self.step.value = min(self.step.value, self.step.max)
        if self.auto_range:
            self._use_recorded_range()
        self._draw_trajectory_plots()
        self._draw_sweep()
        self._ok()

    def _sync_feature_options(self, policy: FactoredRecurrentActorCritic) -> None:
        names = feature_names(policy.num_slots)
        if list(self.feature.options) != names:
            current = self.feature.value
            self.feature.options = names
            self.feature.value = current if current in names else names[0]

    def _use_recorded_range(self) -> None:
        """Set from/to to the range the swept feature takes in the recorded episode (with a margin)."""
        if self.trajectory is None:
            return
        low, high = recorded_range(self.trajectory, self.feature.value)
        self.sweep_min.value, self.sweep_max.value = low, high  # handlers are blocked while busy

    def _draw_trajectory_plots(self) -> None:
        if self.frame is None:
            raise ValueError("no trajectory recorded yet: press Record")
        for name, plot in _TRAJECTORY_PLOTS.items():
            self._show(name, plot(self.frame, step=int(self.step.value), label=self.model_label))

    def _draw_sweep(self) -> None:
        policy = self._require_policy()
        if self.trajectory is None:
            raise ValueError("no trajectory recorded yet: press Record")
        values = sweep_values(self.sweep_min.value, self.sweep_max.value, int(self.sweep_points.value), names=("from", "to", "points"))
        self.sweep_frame = feature_sweep(policy, self.trajectory, int(self.step.value), self.feature.value, values, self.obs_normalizer)
        self._show("feature_sweep", plot_feature_sweep(self.sweep_frame, label=self.model_label))

    def _show(self, name: str, fig: Figure) -> None:
        self.figures[name] = fig
        self.images[name].value = figure_png(fig, dpi=self.dpi)
        self.redraws += 1

    # --- status -----------------------------------------------------------------------------------

    def _ok(self) -> None:
        self.error = self.error_traceback = None
        t = self.trajectory
        ended = "terminated" if t.terminated else "truncated" if t.truncated else "cut at max steps"
        info = (
            f"<strong>Model: {html.escape(self.model_label)}</strong><br>{html.escape(self.model_message)}<br>"
            f"Episode: {len(t)} steps ({ended}), controller <code>{html.escape(self.controller.value)}</code>, "
            f"seed {self.seed.value}, return {float(t.rewards.sum()):.3f}. Step {self.step.value}: "
            f"op taken <code>{OP_NAMES[int(t.ops[self.step.value])]}</code> &mdash; feature <code>{html.escape(self.feature.value)}</code>."
        )
        self.status.value = f"<div style='color:#225'>{info}</div>"

    def _show_error(self, action: str, exc: BaseException) -> None:
        self.error = f"{action}: {type(exc).__name__}: {exc}"
        self.error_traceback = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        kept = " The plots below still show the previous state." if self.figures else ""
        self.status.value = (
            f"<div style='color:#b00020;border:1px solid #b00020;padding:4px'><b>{html.escape(action)}</b>: "
            f"{html.escape(type(exc).__name__)}: {html.escape(str(exc))}.{kept}"
            f"<details><summary>traceback</summary><pre>{html.escape(self.error_traceback)}</pre></details></div>"
        )

    # --- programmatic use ---------------------------------------------------------------------------

    def save_pngs(self, out_dir: str | Path, prefix: str = "explorer_") -> list[Path]:
        """Save the current figures as ``<out_dir>/<prefix><plot>.png``; returns the paths."""
        if not self.figures:
            raise ValueError("nothing drawn yet: the explorer has no figures to save")
        return [save_figure(fig, Path(out_dir) / f"{prefix}{name}.png") for name, fig in self.figures.items()]


__all__ = ["LandscapeExplorer", "PLOT_NAMES"]
