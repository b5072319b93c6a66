"""Does reacting to the state pay? State-aware references next to the best fixed schedule (design section 5).

The best fixed schedule is the best a controller can do *without* looking at the state. Two
references measure how much more a controller could gain by looking:

- ``ContributionGatedController``: a fixed schedule that keeps a seed only if the observation says
  it helps: when the seed is HOLDING it FOSSILIZEs if the measured contribution (accuracy with minus
  without the seed, the ``slot<i>.contribution`` feature) is at least ``min_contribution`` points,
  and PRUNEs it otherwise. A simple, realisable state-aware controller.
- ``GradNormSwitchController``: a fixed schedule with one decision. It plays ``first`` until the
  gradient norm of that schedule's seed is measured (after its first TRAINING epoch), and switches
  to ``fallback`` for the rest of the episode if the norm is above ``max_grad_norm``. For episodes
  that differ in how fast seeds learn (``MorphoEnv(seed_lr=[...])``), a realisable controller
  that probes the episode and reacts.
- ``hindsight_best``: per episode, the best of several controllers' outcomes on that episode (the
  env is deterministic given the episode seed and the actions). An upper bound that no controller
  can reach: it knows the outcome before acting, and it also profits from float-level chaos that
  no observation reveals.

If neither beats the best fixed schedule on held-out seeds, the env rewards a schedule, not
control, and a learned policy that plays one op sequence everywhere is doing the right thing.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from esper_lib.constants import DEFAULT_NUM_SLOTS, AlphaSpeedAction, LifecycleOp, SeedStage
from esper_lib.evaluation.baselines import make_action
from esper_lib.evaluation.schedules import FixedSchedule, ScheduleController
from esper_lib.observation import feature_index

CONTRIBUTION_SCALE = 10.0  # the contribution feature is accuracy points / 10 (esper_lib.observation)
GRAD_NORM_SCALE = 7.0  # the grad_norm feature is symlog(norm) / 7 (esper_lib.observation)


class ContributionGatedController(ScheduleController):
    """Plays ``schedule``, but a HOLDING seed whose measured contribution is below ``min_contribution``
    accuracy points is PRUNEd (instantly) instead of fossilized; seeds at or above it are fossilized as
    the schedule says. A seed whose contribution was never measured is left alone.

    :param schedule: the plan (usually the best fixed schedule).
    :param min_contribution: threshold in accuracy points (0: keep seeds that do not hurt).
    :param num_slots: slots of the env.
    """

    def __init__(self, schedule: FixedSchedule, min_contribution: float = 0.0, num_slots: int = DEFAULT_NUM_SLOTS):
        if not isinstance(min_contribution, (int, float)) or not np.isfinite(min_contribution):
            raise ValueError(f"min_contribution must be a finite number of accuracy points, got {min_contribution!r}")
        super().__init__(schedule, num_slots)
        self.min_contribution = float(min_contribution)
        self.name = f"gated({schedule.name}, >={self.min_contribution:g} pts)"
        self._holding = [feature_index(f"slot{i}.stage_{SeedStage.HOLDING.name.lower()}", num_slots) for i in range(num_slots)]
        self._contribution = [feature_index(f"slot{i}.contribution", num_slots) for i in range(num_slots)]
        self._freshness = [feature_index(f"slot{i}.counterfactual_freshness", num_slots) for i in range(num_slots)]
        self._state: np.ndarray | None = None

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        self._state = np.asarray(obs["state"], dtype=np.float64)
        return super().act(obs)

    def _choose(self, by_op: np.ndarray, blueprint_ok: np.ndarray) -> np.ndarray:
        state = self._state
        for i in sorted(self._germinated):
            measured = state[self._freshness[i]] >= 0
            points = state[self._contribution[i]] * CONTRIBUTION_SCALE
            if state[self._holding[i]] > 0.5 and measured and points < self.min_contribution and by_op[LifecycleOp.PRUNE, i]:
                return make_action(LifecycleOp.PRUNE, slot=i, alpha_speed=int(AlphaSpeedAction.INSTANT))
        return super()._choose(by_op, blueprint_ok)


class GradNormSwitchController:
    """Plays ``first``; at the first observation where the gradient norm of ``first``'s seed in
    ``first.slot`` is measured (``slot<i>.grad_norm`` >= 0, after the seed's first TRAINING epoch) it
    decides once: above ``max_grad_norm`` it plays ``fallback`` for the rest of the episode, else
    ``first``. After a switch the probe seed is never advanced: it stays in TRAINING, outside the
    host stream, and pays its rent.

    :param first: the plan it starts with (its first seeding is the probe).
    :param fallback: the plan after a switch; its seedings must avoid the probe's slot and count
        their ``germinate_at`` from the episode's start (0: as soon as the switch happens).
    :param max_grad_norm: threshold on the seed's mean minibatch gradient norm (raw, not the feature).
    :param num_slots: slots of the env.
    """

    def __init__(self, first: FixedSchedule, fallback: FixedSchedule, max_grad_norm: float, num_slots: int = DEFAULT_NUM_SLOTS):
        if not isinstance(max_grad_norm, (int, float)) or isinstance(max_grad_norm, bool) or not np.isfinite(max_grad_norm) or max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
        for name, plan in (("first", first), ("fallback", fallback)):
            if not isinstance(plan, FixedSchedule):
                raise ValueError(f"{name} must be a FixedSchedule, got {type(plan).__name__}")
        clash = [slot for slot, _, _ in fallback.seedings if slot == first.slot]
        if clash:
            raise ValueError(f"fallback {fallback.name!r} must not use slot {clash[0]}: it holds the probe seed of first {first.name!r}")
        self._first = ScheduleController(first, num_slots)
        self._fallback = ScheduleController(fallback, num_slots)
        self.max_grad_norm = float(max_grad_norm)
        self.name = f"switch({first.name} -> {fallback.name} if grad norm > {self.max_grad_norm:g})"
        self._threshold = float(np.log1p(self.max_grad_norm)) / GRAD_NORM_SCALE  # in feature units (symlog / 7)
        self._grad_norm = feature_index(f"slot{first.slot}.grad_norm", num_slots)
        self._epoch_index = feature_index("epoch_progress", num_slots)
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        """Start of an episode: play ``first`` until the decision."""
        self._first.reset()
        self._fallback.reset()
        self.switched: bool | None = None  # None until decided

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        state = np.asarray(obs["state"], dtype=np.float64)
        if float(state[self._epoch_index]) == 0.0:
            self.reset()
        if self.switched is None and state[self._grad_norm] >= 0:
            self.switched = bool(state[self._grad_norm] > self._threshold)
            self._fallback.epoch = self._first.epoch
        if self.switched:
            return self._fallback.act(obs)
        return self._first.act(obs)


def hindsight_best(
    episodes: pd.DataFrame,
    controllers: Sequence[str],
    metric: str = "return",
    label: str = "hindsight_best",
    pair_on: str = "seed",
) -> pd.DataFrame:
    """Per ``pair_on`` value, the row of the best of ``controllers`` on ``metric``, relabelled ``label``.

    ``episodes`` are ``evaluate_controller`` rows (a ``controller`` column); every controller must
    have played every seed once. The returned rows keep the chosen controller in ``chosen``.
    Ties go to the earlier controller in ``controllers``.
    """
    controllers = list(controllers)
    if not controllers:
        raise ValueError("controllers must not be empty")
    missing = [c for c in controllers if c not in set(episodes["controller"])]
    if missing:
        raise ValueError(f"controllers {missing} have no rows in episodes")
    if metric not in episodes.columns:
        raise ValueError(f"metric {metric!r} is not a column of episodes")
    mine = episodes[episodes["controller"].isin(controllers)]
    counts = mine.groupby(["controller", pair_on]).size()
    seeds = sorted(set(mine[pair_on]))
    if len(counts) != len(controllers) * len(seeds) or (counts != 1).any():
        raise ValueError(f"every controller must play every {pair_on} exactly once (a full controllers x {pair_on} grid)")
    rank = {c: k for k, c in enumerate(controllers)}
    ordered = mine.assign(_rank=mine["controller"].map(rank)).sort_values([pair_on, metric, "_rank"], ascending=[True, False, True])
    best = ordered.groupby(pair_on, sort=True).head(1).drop(columns="_rank")
    return best.assign(chosen=best["controller"], controller=label).reset_index(drop=True)
