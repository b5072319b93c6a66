"""The Q(s, op) landscape: what the op-conditioned critic believes along a trajectory (notebook 03).

One concern per module:

- ``core``: ``Trajectory`` and ``record_trajectory``, ``landscape_frame`` (Q(s, op), pi(op | s),
  V(s) per step) and ``feature_sweep`` (one observation feature varied at one step);
- ``sources``: where the inputs come from, resolved by name (``load_model``, ``make_env``,
  ``make_controller``) and the checks of notebook 03's parameters;
- ``plots``: the matplotlib views (trajectory, heatmap, op probabilities, feature sweep);
- ``widgets``: ``LandscapeExplorer``, the ipywidgets UI over the three above.

The public names of all four are importable from here (``from esper_lib.landscape import
landscape_frame, LandscapeExplorer``).
"""
from esper_lib.landscape.core import (
    LANDSCAPE_COLUMNS,
    OP_NAMES,
    Controller,
    Trajectory,
    apply_normalizer,
    check_compatible,
    feature_sweep,
    hidden_at,
    landscape_frame,
    record_trajectory,
    recorded_range,
    resolve_feature,
    resolve_normalizer,
    step_table,
    sweep_states,
    sweep_values,
    wide,
)
from esper_lib.landscape.plots import (
    FIGSIZE,
    OP_COLORS,
    figure_png,
    landscape_overview,
    plot_feature_sweep,
    plot_op_probs,
    plot_q_heatmap,
    plot_q_trajectory,
    save_figure,
)
from esper_lib.landscape.sources import (
    CONTROLLER_NAMES,
    DEFAULT_CHECKPOINT,
    ENV_NAMES,
    QUICK_ENV_KWARGS,
    ControllerContext,
    ControllerFactory,
    LoadedModel,
    check_controller_name,
    check_env_name,
    check_notebook_parameters,
    checkpoint_updates,
    controller_factories,
    env_factory,
    load_model,
    make_controller,
    make_env,
    model_label,
    normalizer_from_checkpoint,
)
from esper_lib.landscape.widgets import PLOT_NAMES, LandscapeExplorer

__all__ = [
    # core
    "OP_NAMES",
    "LANDSCAPE_COLUMNS",
    "Controller",
    "Trajectory",
    "record_trajectory",
    "check_compatible",
    "apply_normalizer",
    "resolve_normalizer",
    "landscape_frame",
    "step_table",
    "wide",
    "sweep_values",
    "recorded_range",
    "resolve_feature",
    "sweep_states",
    "hidden_at",
    "feature_sweep",
    # sources
    "DEFAULT_CHECKPOINT",
    "ENV_NAMES",
    "CONTROLLER_NAMES",
    "QUICK_ENV_KWARGS",
    "LoadedModel",
    "load_model",
    "normalizer_from_checkpoint",
    "checkpoint_updates",
    "model_label",
    "make_env",
    "env_factory",
    "check_env_name",
    "ControllerContext",
    "ControllerFactory",
    "controller_factories",
    "check_controller_name",
    "make_controller",
    "check_notebook_parameters",
    # plots
    "OP_COLORS",
    "FIGSIZE",
    "plot_q_trajectory",
    "plot_q_heatmap",
    "plot_op_probs",
    "plot_feature_sweep",
    "landscape_overview",
    "figure_png",
    "save_figure",
    # widgets
    "LandscapeExplorer",
    "PLOT_NAMES",
]
