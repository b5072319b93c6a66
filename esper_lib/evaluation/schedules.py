"""Fixed (open-loop) schedules: the "best fixed schedule" baseline of design section 5.

A ``FixedSchedule`` is a plan that ignores the observation except for the action masks:

1. GERMINATE ``blueprint`` in ``slot`` (with ``style``, ``tempo``, ``alpha_target``) at epoch
   ``germinate_at``, or at the first later epoch where the env allows it (slot DORMANT, budget left);
2. ADVANCE the seed whenever the env allows it: GERMINATED -> TRAINING after 1 epoch, TRAINING ->
   BLENDING after 2 epochs of training (``esper_lib.envs.lifecycle`` gates); BLENDING -> HOLDING
   is automatic once alpha reaches the target (``TEMPO_EPOCHS[tempo]`` epochs);
3. FOSSILIZE it at the first epoch >= ``fossilize_at`` where it is HOLDING (never if None);
4. PRUNE it (INSTANT) at the first epoch >= ``prune_at`` where it is prunable (never if None);
   PRUNE comes before FOSSILIZE when both are due;
5. WAIT otherwise.

``extra_seedings`` adds further ``(slot, blueprint, germinate_at)`` seeds, handled with the same
rules and the same style / tempo / alpha target / fossilize / prune settings. Each seeding
germinates once per episode (a pruned slot is not refilled). One op per epoch: when several are
due the order is PRUNE, FOSSILIZE, ADVANCE, GERMINATE (by slot order within an op).

Epochs are counted by ``ScheduleController`` itself: epoch ``k`` is the ``k``-th ``act`` call of
the episode (the action applied during host epoch ``k``, seen in the observation with
``epoch_progress = k / max_epochs``). An observation with ``epoch_progress == 0`` starts a new
episode, so the counter is right with or without ``reset`` (e.g. inside a vector env). Validity
comes from ``obs["action_mask"]["slot_by_op"]`` only: the controller never sends an action outside
the masks; a masked op is simply retried the next epoch.

``schedule_grid`` builds the documented family; ``select_best_schedule`` picks its best member on
training seeds; ``headroom_table`` measures the best member against always-WAIT and the random
masked policy on held-out seeds, paired by seed (the env's headroom, design section 5).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from esper_lib.constants import (
    DEFAULT_NUM_SLOTS,
    AlphaSpeedAction,
    AlphaTargetAction,
    BlueprintAction,
    GerminationStyle,
    LifecycleOp,
    TempoAction,
)
from esper_lib.envs.blueprints import CNN_BLUEPRINTS
from esper_lib.evaluation.baselines import (
    AlwaysWaitController,
    EpisodeSeededRandomController,
    evaluate_controller,
    make_action,
)
from esper_lib.evaluation.stats import compare_controllers
from esper_lib.observation import feature_index

Seeding = tuple[int, BlueprintAction, int]  # (slot, blueprint, germinate_at)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_epoch(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be an int >= 0{' or None' if allow_none else ''}, got {value!r}")


def _enum(name: str, kind: type, value: Any) -> Any:
    try:
        return kind(int(value))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a {kind.__name__}, got {value!r}") from None


@dataclass(frozen=True)
class FixedSchedule:
    """An open-loop plan (module docstring). ``name`` defaults to a readable summary.

    :param slot: slot of the first seed.
    :param blueprint: its blueprint (one that fits a CNN, see ``CNN_BLUEPRINTS``).
    :param germinate_at: epoch of its germination (retried later while masked).
    :param tempo: blend duration (``TEMPO_EPOCHS``).
    :param style: how the seed joins the host stream.
    :param alpha_target: alpha the blend reaches.
    :param fossilize_at: fossilize at the first epoch >= this where allowed; None: never.
    :param prune_at: prune at the first epoch >= this where allowed; None: never.
    :param extra_seedings: further ``(slot, blueprint, germinate_at)`` seeds, in distinct slots.
    :param name: label in tables and plots.
    """

    slot: int
    blueprint: BlueprintAction
    germinate_at: int
    tempo: TempoAction = TempoAction.STANDARD
    style: GerminationStyle = GerminationStyle.LINEAR_ADD
    alpha_target: AlphaTargetAction = AlphaTargetAction.FULL
    fossilize_at: int | None = 0
    prune_at: int | None = None
    extra_seedings: tuple[Seeding, ...] = ()
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        _check_epoch("fossilize_at", self.fossilize_at, allow_none=True)
        _check_epoch("prune_at", self.prune_at, allow_none=True)
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("tempo", _enum("tempo", TempoAction, self.tempo))
        set_("style", _enum("style", GerminationStyle, self.style))
        set_("alpha_target", _enum("alpha_target", AlphaTargetAction, self.alpha_target))
        if not isinstance(self.extra_seedings, (tuple, list)):
            raise ValueError(f"extra_seedings must be a tuple of (slot, blueprint, germinate_at), got {self.extra_seedings!r}")
        seedings = []
        for k, entry in enumerate(((self.slot, self.blueprint, self.germinate_at), *self.extra_seedings)):
            label = "" if k == 0 else f"extra_seedings[{k - 1}]."
            if not isinstance(entry, (tuple, list)) or len(entry) != 3:
                raise ValueError(f"extra_seedings[{k - 1}] must be (slot, blueprint, germinate_at), got {entry!r}")
            slot, bp, at = entry
            if not _is_int(slot) or slot < 0:
                raise ValueError(f"{label}slot must be an int >= 0, got {slot!r}")
            bp = _enum(f"{label}blueprint", BlueprintAction, bp)
            if bp not in CNN_BLUEPRINTS:
                raise ValueError(
                    f"{label}blueprint {bp.name} does not fit a CNN slot; valid: {[b.name for b in CNN_BLUEPRINTS]}"
                )
            _check_epoch(f"{label}germinate_at", at)
            seedings.append((int(slot), bp, int(at)))
        slots = [s for s, _, _ in seedings]
        if len(set(slots)) != len(slots):
            raise ValueError(f"extra_seedings: every seeding needs its own slot, got slots {slots}")
        set_("slot", seedings[0][0])
        set_("blueprint", seedings[0][1])
        set_("germinate_at", seedings[0][2])
        set_("extra_seedings", tuple(seedings[1:]))
        if not self.name:
            set_("name", self._default_name())

    @property
    def seedings(self) -> tuple[Seeding, ...]:
        """Every ``(slot, blueprint, germinate_at)`` of the plan, the first seed included."""
        return ((self.slot, self.blueprint, self.germinate_at), *self.extra_seedings)

    def _default_name(self) -> str:
        seeds = "+".join(f"s{s}-{bp.name.lower()}@{at}" for s, bp, at in self.seedings)
        parts = [seeds, self.tempo.name.lower()]
        if self.style != GerminationStyle.LINEAR_ADD:
            parts.append(self.style.name.lower())
        if self.alpha_target != AlphaTargetAction.FULL:
            parts.append(f"a{self.alpha_target.name.lower()}")
        if self.fossilize_at is None:
            parts.append("nofoss")
        elif self.fossilize_at > 0:
            parts.append(f"foss@{self.fossilize_at}")
        if self.prune_at is not None:
            parts.append(f"prune@{self.prune_at}")
        return "-".join(parts)

    def max_slot(self) -> int:
        return max(s for s, _, _ in self.seedings)


class ScheduleController:
    """Plays a ``FixedSchedule`` (module docstring); ``act(obs) -> [8]`` int64, always within the masks.

    :param schedule: the plan.
    :param num_slots: slots of the env (checked against the plan and the masks).
    """

    def __init__(self, schedule: FixedSchedule, num_slots: int = DEFAULT_NUM_SLOTS):
        if not isinstance(schedule, FixedSchedule):
            raise ValueError(f"schedule must be a FixedSchedule, got {type(schedule).__name__}")
        if not _is_int(num_slots) or num_slots < 1:
            raise ValueError(f"num_slots must be a positive int, got {num_slots!r}")
        if schedule.max_slot() >= num_slots:
            raise ValueError(f"schedule {schedule.name!r} uses slot {schedule.max_slot()} but num_slots is {num_slots}")
        self.schedule = schedule
        self.num_slots = int(num_slots)
        self.name = schedule.name
        self._epoch_index = feature_index("epoch_progress", num_slots)
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        """Start of an episode: epoch 0, nothing germinated (``seed`` is unused: the plan is deterministic)."""
        self.epoch = 0
        self._germinated: set[int] = set()  # slots of the seedings already germinated

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        if float(np.asarray(obs["state"])[self._epoch_index]) == 0.0:
            self.reset()  # first observation of an episode
        by_op = np.asarray(obs["action_mask"]["slot_by_op"]).astype(bool)
        if by_op.shape[1] != self.num_slots:
            raise ValueError(f"the observation has {by_op.shape[1]} slots, the controller expects {self.num_slots}")
        action = self._choose(by_op, np.asarray(obs["action_mask"]["blueprint"]).astype(bool))
        self.epoch += 1
        return action

    def _choose(self, by_op: np.ndarray, blueprint_ok: np.ndarray) -> np.ndarray:
        s, t = self.schedule, self.epoch
        mine = sorted(self._germinated)
        if s.prune_at is not None and t >= s.prune_at:
            for i in mine:
                if by_op[LifecycleOp.PRUNE, i]:
                    return make_action(LifecycleOp.PRUNE, slot=i, alpha_speed=int(AlphaSpeedAction.INSTANT))
        if s.fossilize_at is not None and t >= s.fossilize_at:
            for i in mine:
                if by_op[LifecycleOp.FOSSILIZE, i]:
                    return make_action(LifecycleOp.FOSSILIZE, slot=i)
        for i in mine:
            if by_op[LifecycleOp.ADVANCE, i]:
                return make_action(LifecycleOp.ADVANCE, slot=i)
        for slot, bp, at in sorted(s.seedings, key=lambda x: (x[2], x[0])):
            if slot in self._germinated or t < at:
                continue
            if by_op[LifecycleOp.GERMINATE, slot] and blueprint_ok[bp]:
                self._germinated.add(slot)
                return make_action(
                    LifecycleOp.GERMINATE,
                    slot=slot,
                    blueprint=int(bp),
                    style=int(s.style),
                    tempo=int(s.tempo),
                    alpha_target=int(s.alpha_target),
                )
        return make_action(LifecycleOp.WAIT)


# ------------------------------------------------------------------------------ the family


def default_germinate_epochs(max_epochs: int) -> tuple[int, ...]:
    """Germination epochs of the default grid: 0 and a quarter of the run (deduplicated)."""
    return tuple(sorted({0, max_epochs // 4}))


def schedule_grid(
    num_slots: int = DEFAULT_NUM_SLOTS,
    max_epochs: int = 150,
    blueprints: Sequence[BlueprintAction] | None = None,
    germinate_at: Sequence[int] | None = None,
    tempos: Sequence[TempoAction] = (TempoAction.STANDARD,),
    styles: Sequence[GerminationStyle] = (GerminationStyle.LINEAR_ADD,),
    alpha_target: AlphaTargetAction = AlphaTargetAction.FULL,
    fossilize_at: int | None = 0,
    every_slot: bool = False,
) -> list[FixedSchedule]:
    """The documented family of one-seed schedules: slot x blueprint x germination epoch x tempo x style.

    With ``every_slot=True`` the family also has, per blueprint, tempo and style, a member that seeds
    every slot with that blueprint from epoch 0 (one germination per epoch, slot order): the
    reference for controllers that grow more than one seed.

    Every member germinates one seed, advances it as soon as allowed and fossilizes it as soon as
    it is HOLDING (with the default ``fossilize_at=0``). Defaults: every slot, every CNN blueprint
    (``CNN_BLUEPRINTS``, 7), ``germinate_at = default_germinate_epochs(max_epochs)`` (epoch 0 and
    ``max_epochs // 4``), tempo STANDARD, style LINEAR_ADD: 3 x 7 x 2 x 1 x 1 = 42 members for 3 slots.
    Order: slot, then blueprint, then germination epoch, then tempo, then style (itertools.product).
    """
    if not _is_int(num_slots) or num_slots < 1:
        raise ValueError(f"num_slots must be a positive int, got {num_slots!r}")
    if not _is_int(max_epochs) or max_epochs < 1:
        raise ValueError(f"max_epochs must be a positive int, got {max_epochs!r}")
    bps = CNN_BLUEPRINTS if blueprints is None else tuple(_enum("blueprints", BlueprintAction, b) for b in blueprints)
    if not bps:
        raise ValueError("blueprints must not be empty")
    bad = [b.name for b in bps if b not in CNN_BLUEPRINTS]
    if bad:
        raise ValueError(f"blueprints {bad} do not fit a CNN slot; valid: {[b.name for b in CNN_BLUEPRINTS]}")
    epochs = default_germinate_epochs(max_epochs) if germinate_at is None else tuple(germinate_at)
    if not epochs or not all(_is_int(e) and 0 <= e < max_epochs for e in epochs):
        raise ValueError(f"germinate_at must be a non-empty sequence of ints in [0, {max_epochs - 1}], got {germinate_at!r}")
    tempos = tuple(_enum("tempos", TempoAction, t) for t in tempos)
    if not tempos:
        raise ValueError("tempos must not be empty")
    styles = tuple(_enum("styles", GerminationStyle, s) for s in styles)
    if not styles:
        raise ValueError("styles must not be empty")
    if any(len(set(v)) != len(v) for v in (bps, epochs, tempos, styles)):
        raise ValueError("blueprints, germinate_at, tempos and styles must not repeat a value")
    grid = [
        FixedSchedule(slot, bp, int(at), tempo=tempo, style=style, alpha_target=alpha_target, fossilize_at=fossilize_at)
        for slot, bp, at, tempo, style in itertools.product(range(num_slots), bps, epochs, tempos, styles)
    ]
    if every_slot and num_slots > 1:
        grid += [
            FixedSchedule(0, bp, 0, tempo=tempo, style=style, alpha_target=alpha_target, fossilize_at=fossilize_at,
                          extra_seedings=tuple((slot, bp, 0) for slot in range(1, num_slots)))
            for bp, tempo, style in itertools.product(bps, tempos, styles)
        ]
    return grid


# ------------------------------------------------------------------------- selection, headroom


def _num_slots(env_fn: Callable[[], Any]) -> int:
    env = env_fn()
    try:
        return int(getattr(env.unwrapped, "num_slots", DEFAULT_NUM_SLOTS))
    finally:
        env.close()


def select_best_schedule(
    env_fn: Callable[[], Any],
    schedules: Sequence[FixedSchedule],
    train_seeds: Iterable[int],
    metric: str = "return",
    progress: bool = True,
    workers: int = 1,
) -> tuple[FixedSchedule, pd.DataFrame]:
    """Evaluate every schedule on ``train_seeds`` and return the one with the highest mean ``metric``.

    Returns ``(best, table)``; ``table`` has one row per schedule (``schedule``, ``n``,
    ``<metric>_mean``, ``<metric>_std``, ``rank``), sorted best first; ties go to the earlier
    schedule in ``schedules``. Seeds used here must not be reused for the held-out comparison.
    ``workers > 1`` evaluates that many schedules at once, each in a spawned process (``env_fn``
    must then be picklable, e.g. ``functools.partial(MorphoEnv, ...)``); the table is the same.
    """
    schedules = list(schedules)
    if not schedules or not all(isinstance(s, FixedSchedule) for s in schedules):
        raise ValueError("schedules must be a non-empty sequence of FixedSchedule")
    names = [s.name for s in schedules]
    if len(set(names)) != len(names):
        raise ValueError("schedules must have unique names")
    train_seeds = [int(s) for s in train_seeds]
    if not train_seeds:
        raise ValueError("train_seeds must not be empty")
    if not _is_int(workers) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    num_slots = _num_slots(env_fn)
    from esper_lib.progress import progress_bar

    tasks = [(schedule, num_slots, env_fn, train_seeds, metric) for schedule in schedules]
    if workers == 1:
        rows = [_schedule_row(task) for task in progress_bar(tasks, desc="schedules", disable=not progress)]
    else:
        from esper_lib.processes import spawn_process_pool

        with spawn_process_pool(min(workers, len(tasks))) as pool:
            rows = list(progress_bar(pool.map(_schedule_row, tasks, chunksize=4), total=len(tasks), desc="schedules", disable=not progress))
    table = pd.DataFrame(rows)
    order = np.argsort(-table[f"{metric}_mean"].to_numpy(), kind="stable")
    table = table.iloc[order].reset_index(drop=True)
    table["rank"] = np.arange(1, len(table) + 1)
    best = schedules[names.index(table["schedule"].iloc[0])]
    return best, table


def _schedule_row(task: tuple[FixedSchedule, int, Callable[[], Any], list[int], str]) -> dict[str, Any]:
    """One schedule's row of ``select_best_schedule`` (module level so a spawned process can run it)."""
    schedule, num_slots, env_fn, train_seeds, metric = task
    res = evaluate_controller(ScheduleController(schedule, num_slots), env_fn, train_seeds, name=schedule.name)
    if metric not in res.columns:
        raise ValueError(f"metric {metric!r} is not a column of the evaluation results: {list(res.columns)}")
    x = res[metric].astype(float).to_numpy()
    return {"schedule": schedule.name, "n": len(x), f"{metric}_mean": float(np.mean(x)),
            f"{metric}_std": float(np.std(x, ddof=1)) if len(x) > 1 else 0.0}


class Headroom(NamedTuple):
    """Result of ``headroom_table``."""

    episodes: pd.DataFrame  # one row per (controller, held-out seed), columns of evaluate_controller
    summary: pd.DataFrame  # compare_controllers(episodes, metric, baseline="always_wait")


def headroom_table(
    env_fn: Callable[[], Any],
    best: FixedSchedule,
    heldout_seeds: Iterable[int],
    random_seed: int = 0,
    metric: str = "return",
    progress: bool = False,
    **compare_kwargs: Any,
) -> Headroom:
    """Best schedule, always-WAIT and random masked on the same held-out seeds, paired by seed.

    The controllers are labelled ``best_schedule`` (the schedule's name is in the
    ``schedule`` column), ``always_wait`` and ``random_masked``. The summary is
    ``compare_controllers`` against ``always_wait``: the headroom is the best schedule's
    paired difference (mean, bootstrap CI, P(improvement)); ``compare_kwargs`` go to it.
    The random policy's generator is seeded per episode with ``[random_seed, episode seed]``.
    """
    if not isinstance(best, FixedSchedule):
        raise ValueError(f"best must be a FixedSchedule, got {type(best).__name__}")
    seeds = [int(s) for s in heldout_seeds]
    if not seeds:
        raise ValueError("heldout_seeds must not be empty")
    num_slots = _num_slots(env_fn)
    controllers = {
        "best_schedule": ScheduleController(best, num_slots),
        "always_wait": AlwaysWaitController(),
        "random_masked": EpisodeSeededRandomController(random_seed),
    }
    frames = [evaluate_controller(c, env_fn, seeds, name=label, progress=progress) for label, c in controllers.items()]
    episodes = pd.concat(frames, ignore_index=True)
    episodes["schedule"] = np.where(episodes["controller"] == "best_schedule", best.name, "")
    summary = compare_controllers(episodes, metric, baseline="always_wait", **compare_kwargs)
    return Headroom(episodes, summary)


def schedule_to_dict(schedule: FixedSchedule) -> dict[str, Any]:
    """Plain-JSON form of a schedule (enums by name); ``schedule_from_dict`` reverses it."""
    return {
        "slot": schedule.slot,
        "blueprint": schedule.blueprint.name,
        "germinate_at": schedule.germinate_at,
        "tempo": schedule.tempo.name,
        "style": schedule.style.name,
        "alpha_target": schedule.alpha_target.name,
        "fossilize_at": schedule.fossilize_at,
        "prune_at": schedule.prune_at,
        "extra_seedings": [[s, b.name, at] for s, b, at in schedule.extra_seedings],
        "name": schedule.name,
    }


def schedule_from_dict(data: dict[str, Any]) -> FixedSchedule:
    """Rebuild a ``FixedSchedule`` from ``schedule_to_dict``; unknown keys or names raise ValueError."""
    if not isinstance(data, dict):
        raise ValueError(f"schedule data must be a dict, got {type(data).__name__}")
    known = {"slot", "blueprint", "germinate_at", "tempo", "style", "alpha_target", "fossilize_at", "prune_at", "extra_seedings", "name"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"schedule data has unknown key(s) {unknown}")

    def member(kind: type, key: str, value: Any) -> Any:
        try:
            return kind[value] if isinstance(value, str) else kind(int(value))
        except (KeyError, ValueError, TypeError):
            raise ValueError(f"schedule data[{key!r}] = {value!r} is not a {kind.__name__}") from None

    kwargs = dict(data)
    kwargs["blueprint"] = member(BlueprintAction, "blueprint", data.get("blueprint"))
    for key, kind in (("tempo", TempoAction), ("style", GerminationStyle), ("alpha_target", AlphaTargetAction)):
        if key in data:
            kwargs[key] = member(kind, key, data[key])
    kwargs["extra_seedings"] = tuple(
        (int(s), member(BlueprintAction, "extra_seedings", b), int(at)) for s, b, at in data.get("extra_seedings", ())
    )
    return FixedSchedule(**kwargs)
