"""The observation layout (Obs V3): one named list of features, used by envs, tests and plots.

``OBS_LAYOUT`` (for the default 3 slots) is a tuple of ``Feature`` records; each names a
contiguous index range of the state vector and says how the raw signal is normalised. Values
that are not yet observed are -1, never 0; every feature is finite and within [-10, 10].
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd

from esper_lib.constants import (
    BASE_FEATURE_DIM,
    DEFAULT_NUM_SLOTS,
    FEEDBACK_FEATURE_DIM,
    NUM_OPS,
    SLOT_FEATURE_DIM,
    LifecycleOp,
    SeedStage,
    state_dim_for,
)

HISTORY_LEN = 5
FEATURE_BOUND = 10.0


@dataclass(frozen=True)
class Feature:
    """One named feature: indices ``start:stop`` of the state vector."""

    name: str
    start: int
    stop: int
    normalisation: str
    group: str  # "base", "feedback" or "slot{i}"

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def size(self) -> int:
        return self.stop - self.start


# (name, width, normalisation) in order; widths add up to the group sizes of constants.py.
_BASE: tuple[tuple[str, int, str], ...] = (
    ("epoch_progress", 1, "epoch / max_epochs"),
    ("val_loss", 1, "symlog(loss) / 7, -1 before the first epoch"),
    ("val_accuracy", 1, "fraction 0-1, -1 before the first epoch"),
    *((f"val_loss_hist_{i}", 1, "symlog(loss) / 7, oldest first, -1 before observed") for i in range(HISTORY_LEN)),
    *((f"val_accuracy_hist_{i}", 1, "fraction 0-1, oldest first, -1 before observed") for i in range(HISTORY_LEN)),
    ("best_accuracy", 1, "fraction 0-1, -1 before observed"),
    ("epochs_since_improvement", 1, "epochs / 10, clipped to 10, -1 before the first epoch"),
    ("seeds_training", 1, "count / num_slots"),
    ("seeds_blending", 1, "count / num_slots"),
    ("seeds_holding_or_fossilized", 1, "count / num_slots"),
    ("seed_budget_used", 1, "seeds germinated / seed budget"),
    ("seed_param_ratio", 1, "total seed params (fossilized included) / original host params, clipped to 10"),
    ("train_loss", 1, "symlog(loss) / 7, -1 before the first epoch"),
    ("train_accuracy", 1, "fraction 0-1, -1 before the first epoch"),
    ("host_lr", 1, "lr / initial lr (1 with a constant learning rate)"),
    ("host_grad_norm", 1, "symlog(mean minibatch norm) / 7, -1 before the first epoch"),
)
_FEEDBACK: tuple[tuple[str, int, str], ...] = (
    ("last_action_success", 1, "1 executed, 0 refused, -1 before the first action"),
    *((f"last_op_{op.name.lower()}", 1, "one-hot of the last op, all -1 before the first action") for op in LifecycleOp),
)
_SLOT: tuple[tuple[str, int, str], ...] = (
    ("has_seed", 1, "0/1"),
    *((f"stage_{s.name.lower()}", 1, "one-hot of SeedStage") for s in SeedStage),
    ("alpha", 1, "0-1"),
    ("alpha_target", 1, "0-1, 0 without a seed"),
    ("alpha_mode", 1, "-1 ramping down, 0 steady, +1 ramping up"),
    ("alpha_steps_left", 1, "epochs / 8"),
    ("contribution", 1, "accuracy points with minus without the seed / 10, clipped to [-1, 1]; -1 before measured"),
    ("contribution_velocity", 1, "change of contribution between its last two measurements, clipped to [-1, 1]; -1 before two measurements"),
    ("tempo", 1, "TempoAction / 2, -1 without a seed"),
    ("style", 1, "GerminationStyle / 3, -1 without a seed"),
    ("alpha_curve", 1, "AlphaCurveAction / 4 of the last alpha ramp, -1 before the seed's first ramp"),
    ("epochs_in_stage", 1, "epochs ended in the current stage (1 at its first observation) / 10, clipped to 10"),
    ("seed_age", 1, "epochs since germination / 10, clipped to 10, -1 without a seed"),
    ("seed_param_ratio", 1, "seed params / original host params, clipped to 10"),
    ("grad_norm", 1, "symlog(mean minibatch norm of the seed's gradient) / 7, -1 before measured"),
    ("grad_health", 1, "0-1, -1 before measured"),
    ("grad_vanishing", 1, "0/1, -1 before measured"),
    ("grad_exploding", 1, "0/1, -1 before measured"),
    ("prev_grad_health", 1, "0-1, -1 before measured"),
    ("counterfactual_freshness", 1, "1 measured this epoch, decays 0.8 per epoch, -1 never"),
    ("interaction", 1, "pairwise-ablation sum / 10, clipped to [-1, 1]; 0 with fewer than two active"),
)


def _build(groups: list[tuple[str, tuple[tuple[str, int, str], ...]]]) -> tuple[Feature, ...]:
    features, start = [], 0
    for group, entries in groups:
        for name, width, norm in entries:
            full = name if group in ("base", "feedback") else f"{group}.{name}"
            features.append(Feature(full, start, start + width, norm, group))
            start += width
    return tuple(features)


@lru_cache(maxsize=None)
def observation_layout(num_slots: int = DEFAULT_NUM_SLOTS) -> tuple[Feature, ...]:
    """The ordered features of the state vector for ``num_slots`` slots."""
    groups = [("base", _BASE), ("feedback", _FEEDBACK)]
    groups += [(f"slot{i}", _SLOT) for i in range(num_slots)]
    layout = _build(groups)
    assert layout[-1].stop == state_dim_for(num_slots)
    return layout


OBS_LAYOUT = observation_layout(DEFAULT_NUM_SLOTS)


def feature_names(num_slots: int = DEFAULT_NUM_SLOTS) -> list[str]:
    """Feature names in index order (one per scalar)."""
    return [f.name for f in observation_layout(num_slots)]


def feature_index(name: str, num_slots: int = DEFAULT_NUM_SLOTS) -> int:
    """Index of the scalar feature called ``name`` (e.g. ``"slot0.alpha"``)."""
    for f in observation_layout(num_slots):
        if f.name == name:
            return f.start
    raise KeyError(f"unknown observation feature {name!r}; see esper_lib.observation.feature_names()")


def layout_table(num_slots: int = DEFAULT_NUM_SLOTS) -> pd.DataFrame:
    """The layout as a DataFrame (name, start, stop, group, normalisation)."""
    return pd.DataFrame(
        [(f.name, f.start, f.stop, f.group, f.normalisation) for f in observation_layout(num_slots)],
        columns=["name", "start", "stop", "group", "normalisation"],
    )


def symlog(x: float | np.ndarray) -> float | np.ndarray:
    """sign(x) * log(1 + |x|): compresses large magnitudes, keeps the sign."""
    return np.sign(x) * np.log1p(np.abs(x))


# Sanity of the group sizes against constants.py (import-time, cheap).
assert sum(w for _, w, _ in _BASE) == BASE_FEATURE_DIM
assert sum(w for _, w, _ in _FEEDBACK) == FEEDBACK_FEATURE_DIM == 1 + NUM_OPS
assert sum(w for _, w, _ in _SLOT) == SLOT_FEATURE_DIM
