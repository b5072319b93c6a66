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
from esper_lib.landscape import core, plots, sources, widgets
from esper_lib.landscape.core import *  # noqa: F403 (each module lists its public names in __all__)
from esper_lib.landscape.plots import *  # noqa: F403
from esper_lib.landscape.sources import *  # noqa: F403
from esper_lib.landscape.widgets import *  # noqa: F403

__all__ = [*core.__all__, *sources.__all__, *plots.__all__, *widgets.__all__]
