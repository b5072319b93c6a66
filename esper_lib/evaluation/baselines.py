"""Baseline controllers for the Tamiyo envs and a common evaluation harness.

Every controller has ``act(obs) -> np.ndarray[8]`` (one action per head, ``HEAD_NAMES`` order) for
a single, unbatched observation of ``esper_lib.envs.spaces.observation_space`` and ``reset(seed=None)``.
Heads that are irrelevant for the chosen op are set to their canonical placeholder
(``CANONICAL_ACTION``), as the policy network does.

- ``AlwaysWaitController``: the host trains alone.
- ``RandomMaskedController``: uniform over valid ops, then over the slots valid for that op
  (``slot_by_op``), then over each relevant head's valid actions.
- ``HeuristicController``: rules on the named observation features: germinate on a plateau,
  advance when the seed's gradients are healthy, fossilize on a positive contribution, prune on a
  negative one.

``evaluate_controller`` runs any object with ``act(obs)`` (a PPO agent wrapper included) over a
list of seeds and returns one row per episode; ``summarize_results`` gives means and 95%
confidence intervals per controller.
"""
from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd

from esper_lib.constants import (
    CANONICAL_ACTION,
    DEFAULT_NUM_SLOTS,
    HEAD_NAMES,
    HEAD_RELEVANCE,
    AlphaSpeedAction,
    AlphaTargetAction,
    BlueprintAction,
    GerminationStyle,
    LifecycleOp,
    SeedStage,
    TempoAction,
)
from esper_lib.observation import HISTORY_LEN, feature_index

Obs = dict[str, Any]


class Controller(Protocol):
    """What ``evaluate_controller`` needs: ``act``; ``reset`` is optional."""

    def act(self, obs: Obs) -> np.ndarray: ...


def make_action(op: LifecycleOp | int, **heads: int) -> np.ndarray:
    """``[8]`` int64 action: ``op`` plus the given heads; irrelevant or missing heads get the placeholder."""
    op = LifecycleOp(int(op))
    unknown = set(heads) - set(HEAD_NAMES)
    if unknown:
        raise ValueError(f"unknown heads {sorted(unknown)}; valid: {HEAD_NAMES}")
    out = np.array([CANONICAL_ACTION[name] for name in HEAD_NAMES], dtype=np.int64)
    out[0] = int(op)
    for i, name in enumerate(HEAD_NAMES[1:], start=1):
        if name in HEAD_RELEVANCE[op] and name in heads:
            out[i] = int(heads[name])
    return out


class AlwaysWaitController:
    """Never intervenes: the host trains without seeds."""

    name = "always_wait"

    def reset(self, seed: int | None = None) -> None:
        pass

    def act(self, obs: Obs) -> np.ndarray:
        return make_action(LifecycleOp.WAIT)


class RandomMaskedController:
    """Uniform random choice among valid actions, respecting ``slot_by_op``.

    Args:
        seed: seed of the controller's own generator (``reset(seed)`` re-seeds it).
        wait_prob: if given, WAIT is chosen with this probability and the other valid ops share
            the rest (uniform over valid ops when None).
    """

    name = "random_masked"

    def __init__(self, seed: int | None = None, wait_prob: float | None = None):
        if wait_prob is not None and not 0.0 <= wait_prob <= 1.0:
            raise ValueError(f"wait_prob must be None or in [0, 1], got {wait_prob!r}")
        self.wait_prob = wait_prob
        self.rng = np.random.default_rng(seed)

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self.rng = np.random.default_rng(seed)

    def _choice(self, mask: np.ndarray) -> int:
        valid = np.flatnonzero(np.asarray(mask))
        if valid.size == 0:
            raise ValueError("a mask with no valid action")
        return int(self.rng.choice(valid))

    def act(self, obs: Obs) -> np.ndarray:
        masks = obs["action_mask"]
        op_mask = np.asarray(masks["op"]).astype(bool)
        if self.wait_prob is not None and op_mask[1:].any():
            if self.rng.random() < self.wait_prob:
                op = int(LifecycleOp.WAIT)
            else:
                op = 1 + self._choice(op_mask[1:])
        else:
            op = self._choice(op_mask)
        op = LifecycleOp(op)
        if op == LifecycleOp.WAIT:
            return make_action(op)
        return make_action(op, **self.random_heads(op, masks))

    def random_heads(self, op: LifecycleOp, masks: dict[str, Any]) -> dict[str, int]:
        """A uniform valid slot for ``op`` and a uniform valid value of every head relevant to it."""
        heads = {"slot": self._choice(np.asarray(masks["slot_by_op"])[op])}
        for name in HEAD_NAMES[2:]:
            if name in HEAD_RELEVANCE[op]:
                heads[name] = self._choice(masks[name])
        return heads


_IN_PROGRESS = frozenset(
    {SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.HOLDING, SeedStage.PRUNING}
)


class EpisodeSeededRandomController(RandomMaskedController):
    """``RandomMaskedController`` whose stream for each episode is seeded with ``[seed, episode seed]``
    (``reset(seed)``), so an episode's draws depend on the episode and not on the episodes played before
    it: controllers built with the same ``seed`` draw alike on the same episode (paired comparisons)."""

    def __init__(self, seed: int, wait_prob: float | None = None):
        super().__init__(seed=seed, wait_prob=wait_prob)
        self.base_seed = int(seed)

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self.rng = np.random.default_rng([self.base_seed, int(seed)])


class HeuristicController:
    """Rule-based Tamiyo, reading the observation by feature name (see ``esper_lib.observation``).

    Each epoch it takes the first rule that applies:
    1. a HOLDING seed: FOSSILIZE if its contribution > ``fossilize_threshold`` accuracy points,
       else PRUNE (instantly);
    2. a BLENDING seed whose contribution < ``prune_threshold`` points after ``blend_grace``
       epochs of blending: PRUNE;
    3. a TRAINING seed: ADVANCE when allowed and its gradient health >= ``health_threshold`` with
       no vanishing/exploding flag; PRUNE after ``max_training_epochs`` without healthy gradients;
    4. a GERMINATED seed: ADVANCE when allowed;
    5. no seed in progress and the host on a plateau (no new best accuracy for
       ``plateau_patience`` epochs, or the best accuracy gained less than ``min_gain`` over the
       last ``plateau_window`` epochs, i.e. the host learns slower than ``min_gain / plateau_window``
       per epoch): GERMINATE ``blueprints[k]`` (the k-th germination, cycling) in the first DORMANT
       slot of ``slot_order``, with ``style``, ``tempo`` and ``alpha_target``;
    6. otherwise WAIT.
    """

    name = "heuristic"

    def __init__(
        self,
        num_slots: int = DEFAULT_NUM_SLOTS,
        blueprints: Sequence[BlueprintAction] = (BlueprintAction.CONV_HEAVY, BlueprintAction.CONV_SMALL),
        slot_order: Sequence[int] | None = None,
        style: GerminationStyle = GerminationStyle.LINEAR_ADD,
        tempo: TempoAction = TempoAction.FAST,
        alpha_target: AlphaTargetAction = AlphaTargetAction.FULL,
        plateau_patience: int = 2,
        plateau_window: int = 2,
        min_gain: float = 0.05,
        fossilize_threshold: float = 0.0,
        prune_threshold: float = -2.0,
        blend_grace: int = 2,
        health_threshold: float = 0.5,
        max_training_epochs: int = 6,
    ):
        if not blueprints:
            raise ValueError("blueprints must not be empty")
        if not 1 <= plateau_window < HISTORY_LEN:
            raise ValueError(f"plateau_window must be in [1, {HISTORY_LEN - 1}], got {plateau_window!r}")
        if plateau_patience < 1:
            raise ValueError(f"plateau_patience must be >= 1, got {plateau_patience!r}")
        self.num_slots = num_slots
        self.blueprints = tuple(BlueprintAction(int(b)) for b in blueprints)
        self.slot_order = tuple(range(num_slots - 1, -1, -1)) if slot_order is None else tuple(slot_order)
        if sorted(self.slot_order) != list(range(num_slots)):
            raise ValueError(f"slot_order must be a permutation of range({num_slots}), got {slot_order!r}")
        self.style, self.tempo, self.alpha_target = style, tempo, alpha_target
        self.plateau_patience, self.plateau_window, self.min_gain = plateau_patience, plateau_window, min_gain
        self.fossilize_threshold, self.prune_threshold = fossilize_threshold, prune_threshold
        self.blend_grace, self.health_threshold = blend_grace, health_threshold
        self.max_training_epochs = max_training_epochs
        self._index = {name: feature_index(name, num_slots) for name in _feature_names(num_slots)}
        self._germinations = 0

    def reset(self, seed: int | None = None) -> None:
        self._germinations = 0

    def _stage(self, state: np.ndarray, slot: int) -> SeedStage:
        onehot = [state[self._index[f"slot{slot}.stage_{s.name.lower()}"]] for s in SeedStage]
        return SeedStage(int(np.argmax(onehot)))

    def _plateau(self, state: np.ndarray) -> bool:
        """No new best for ``plateau_patience`` epochs, or best gained < ``min_gain`` in ``plateau_window`` epochs."""
        since = state[self._index["epochs_since_improvement"]]
        if since < 0:  # nothing observed yet
            return False
        if since * 10.0 >= self.plateau_patience - 1e-6:
            return True
        hist = [state[self._index[f"val_accuracy_hist_{i}"]] for i in range(HISTORY_LEN)]
        earlier = hist[: HISTORY_LEN - self.plateau_window]
        if earlier[-1] < 0.0:  # not enough history yet
            return False
        return state[self._index["best_accuracy"]] - max(earlier) < self.min_gain

    def act(self, obs: Obs) -> np.ndarray:
        state = np.asarray(obs["state"], dtype=np.float64)
        by_op = np.asarray(obs["action_mask"]["slot_by_op"]).astype(bool)
        stages = [self._stage(state, i) for i in range(self.num_slots)]

        def f(slot: int, name: str) -> float:
            return float(state[self._index[f"slot{slot}.{name}"]])

        def contribution_points(slot: int) -> float | None:
            if f(slot, "counterfactual_freshness") < 0:  # never measured
                return None
            return f(slot, "contribution") * 10.0

        instant = {"alpha_speed": int(AlphaSpeedAction.INSTANT)}
        for i, st in enumerate(stages):  # 1. decide on seeds at their target alpha
            if st == SeedStage.HOLDING:
                c = contribution_points(i)
                if c is not None and c > self.fossilize_threshold and by_op[LifecycleOp.FOSSILIZE, i]:
                    return make_action(LifecycleOp.FOSSILIZE, slot=i)
                if by_op[LifecycleOp.PRUNE, i]:
                    return make_action(LifecycleOp.PRUNE, slot=i, **instant)
        for i, st in enumerate(stages):  # 2. cut harmful blends early
            if st == SeedStage.BLENDING and f(i, "epochs_in_stage") * 10.0 >= self.blend_grace - 1e-6:
                c = contribution_points(i)
                if c is not None and c < self.prune_threshold and by_op[LifecycleOp.PRUNE, i]:
                    return make_action(LifecycleOp.PRUNE, slot=i, **instant)
        for i, st in enumerate(stages):  # 3. training seeds with healthy gradients go on
            if st != SeedStage.TRAINING:
                continue
            healthy = (
                f(i, "grad_health") >= self.health_threshold
                and f(i, "grad_vanishing") < 0.5
                and f(i, "grad_exploding") < 0.5
            )
            if healthy and by_op[LifecycleOp.ADVANCE, i]:
                return make_action(LifecycleOp.ADVANCE, slot=i)
            if not healthy and f(i, "epochs_in_stage") * 10.0 >= self.max_training_epochs - 1e-6:
                if by_op[LifecycleOp.PRUNE, i]:
                    return make_action(LifecycleOp.PRUNE, slot=i, **instant)
        for i, st in enumerate(stages):  # 4. germinated seeds start training
            if st == SeedStage.GERMINATED and by_op[LifecycleOp.ADVANCE, i]:
                return make_action(LifecycleOp.ADVANCE, slot=i)
        if not any(st in _IN_PROGRESS for st in stages) and self._plateau(state):  # 5. grow on a plateau
            bp = self.blueprints[self._germinations % len(self.blueprints)]
            for i in self.slot_order:
                if by_op[LifecycleOp.GERMINATE, i] and obs["action_mask"]["blueprint"][bp]:
                    self._germinations += 1
                    return make_action(
                        LifecycleOp.GERMINATE,
                        slot=i,
                        blueprint=int(bp),
                        style=int(self.style),
                        tempo=int(self.tempo),
                        alpha_target=int(self.alpha_target),
                    )
        return make_action(LifecycleOp.WAIT)


def _feature_names(num_slots: int) -> list[str]:
    from esper_lib.observation import feature_names

    return feature_names(num_slots)


# ---------------------------------------------------------------------------------- evaluation


def reset_controller(controller: Any, seed: int) -> None:
    """Call ``controller.reset(seed=seed)``, or ``reset()`` when it takes no seed, or nothing without a ``reset``."""
    reset = getattr(controller, "reset", None)
    if reset is None:
        return
    params = inspect.signature(reset).parameters
    if "seed" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        reset(seed=seed)
    else:
        reset()


def evaluate_controller(
    controller: Controller,
    env_fn: Callable[[], Any],
    seeds: Iterable[int],
    name: str | None = None,
    max_steps: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Run one episode per seed; returns one row per episode.

    Args:
        controller: any object with ``act(obs) -> action``; ``reset(seed=...)`` or ``reset()`` is
            called before each episode when present (a recurrent agent clears its hidden state there).
        env_fn: builds the env (called once; the env is reset with each seed and closed at the end).
        seeds: episode seeds, passed to ``env.reset(seed=...)`` and to the controller's reset.
        name: the ``controller`` column (default: ``controller.name`` or the class name).
        max_steps: stop an episode after this many steps (default: until terminated/truncated).
        progress: show a tqdm bar over the episodes.

    Columns: controller, seed, return, final_val_accuracy, best_val_accuracy, initial_val_accuracy,
    steps, germinations, fossilizations, prunes, invalid_actions, seed_params, host_params,
    seed_lr (the episode's seed learning rate; ``MorphoEnv(seed_lr=[...])`` draws it per episode),
    reward_<term> (sum of each ``info["reward_terms"]`` entry), ops (the episode's op sequence,
    comma-separated), germinated (the executed germinations in order, ``s<slot>:<BLUEPRINT>``,
    comma-separated), wall_s. Counts, accuracies and seed_lr read the morphogenetic env's info keys
    and are NaN for envs that do not report them.
    """
    label = name or getattr(controller, "name", None) or type(controller).__name__
    seeds = list(seeds)
    iterator: Iterable[int] = seeds
    if progress:
        from esper_lib.progress import progress_bar

        iterator = progress_bar(seeds, desc=f"evaluate {label}")
    env = env_fn()
    rows = []
    try:
        for seed in iterator:
            reset_controller(controller, int(seed))
            obs, info = env.reset(seed=int(seed))
            initial = float(info.get("initial_val_accuracy", math.nan))
            seed_lr = float(info.get("seed_lr", math.nan))
            t0 = time.perf_counter()
            total, steps, invalid = 0.0, 0, 0
            ops: list[int] = []
            grown: list[str] = []
            terms: dict[str, float] = {}
            done = False
            while not done:
                action = np.asarray(controller.act(obs))
                flat = action.reshape(-1)
                ops.append(int(flat[0]))
                obs, reward, terminated, truncated, info = env.step(action)
                if int(flat[0]) == LifecycleOp.GERMINATE and info.get("action_executed", False):
                    grown.append(f"s{int(flat[1])}:{BlueprintAction(int(flat[2])).name}")
                total += float(reward)
                steps += 1
                invalid += int(not info.get("action_valid", True))
                for k, v in info.get("reward_terms", {}).items():
                    terms[k] = terms.get(k, 0.0) + float(v)
                done = terminated or truncated or (max_steps is not None and steps >= max_steps)
            rows.append(
                {
                    "controller": label,
                    "seed": int(seed),
                    "return": total,
                    "final_val_accuracy": info.get("val_accuracy", math.nan),
                    "best_val_accuracy": info.get("best_val_accuracy", math.nan),
                    "initial_val_accuracy": initial,
                    "steps": steps,
                    "germinations": info.get("germinations", math.nan),
                    "fossilizations": info.get("fossilizations", math.nan),
                    "prunes": info.get("prunes", math.nan),
                    "invalid_actions": invalid,
                    "seed_params": info.get("seed_params", math.nan),
                    "host_params": info.get("host_params", math.nan),
                    "seed_lr": seed_lr,
                    **{f"reward_{k}": v for k, v in terms.items()},
                    "ops": ",".join(map(str, ops)),
                    "germinated": ",".join(grown),
                    "wall_s": time.perf_counter() - t0,
                }
            )
    finally:
        env.close()
    return pd.DataFrame(rows)


def summarize_results(
    results: pd.DataFrame,
    by: str = "controller",
    metrics: Sequence[str] = ("return", "final_val_accuracy", "germinations", "fossilizations", "prunes", "seed_params"),
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Mean and Student-t confidence interval of each metric per group (one row per group).

    Columns: ``by``, ``n`` and, per metric, ``<metric>_mean``, ``<metric>_ci_low``,
    ``<metric>_ci_high`` (NaN bounds with a single episode).
    """
    from scipy import stats

    missing = [m for m in (by, *metrics) if m not in results.columns]
    if missing:
        raise ValueError(f"results has no column(s) {missing}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    out = []
    for key, group in results.groupby(by, sort=False):
        row: dict[str, Any] = {by: key, "n": len(group)}
        for m in metrics:
            x = group[m].astype(float).to_numpy()
            mean = float(np.mean(x))
            if len(x) > 1:
                sem = float(np.std(x, ddof=1)) / math.sqrt(len(x))
                half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1)) * sem
            else:
                half = math.nan
            row[f"{m}_mean"], row[f"{m}_ci_low"], row[f"{m}_ci_high"] = mean, mean - half, mean + half
        out.append(row)
    return pd.DataFrame(out)
