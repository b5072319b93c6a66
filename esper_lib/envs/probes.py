"""Probe environments: tiny Gymnasium envs with known optimal values and policies.

They use the real Tamiyo spaces (``esper_lib.envs.spaces``; default 3 slots, 121-dim state), so
the real network and PPO run on them unchanged. The state vector is all zeros except for the probe
signals below (the Obs V3 feature names do not apply on probes); blueprint indices are -1 (empty
slots); every action is valid unless the probe says otherwise.

- ``CUE_INDEX`` (0): the probe's cue, +1 or -1, where a probe has one.
- ``TIME_INDEX`` (1): ``t / (episode_length - 1)`` in probes whose optimum depends on the step.

Every probe documents its optimum through three methods, all about the *current* state (call them
after ``reset`` or ``step``, before the next ``step``):

- ``optimal_value()``: V*(s) under the optimal policy with discount ``gamma``;
- ``optimal_q()``: ``[NUM_OPS]`` Q*(s, op) assuming optimal choices of the other heads and optimal
  play afterwards (NaN for ops masked at s);
- ``optimal_action()``: ``{head: index}`` for the heads whose choice matters at s (``{}`` when every
  valid action is optimal).

Actions are checked as in the morphogenetic env (``spaces.action_to_dict``): a wrong shape, a
non-integer dtype or an index outside its head raises ValueError; a ``step`` before ``reset`` or
after the episode ended (terminated or truncated) raises RuntimeError. Taking a *masked* (but
in-range) action is counted in ``masked_violations`` and rewarded ``VIOLATION_REWARD``.
``get_state()`` / ``set_state()`` capture everything (including the RNG) so a PPO checkpoint can
resume a probe run exactly.

| probe | episode | reward | optimum |
|---|---|---|---|
| ``ConstantRewardProbe`` | 1 step | 1 | V = 1 |
| ``ObservationRewardProbe`` | 1 step | the cue (+1 / -1) | V = cue |
| ``DelayedRewardProbe`` | 2 steps | 0 then 1 | V(t=0) = gamma, V(t=1) = 1 |
| ``OpRewardProbe`` | 1 step | ``OP_REWARDS[op]`` | op FOSSILIZE, V = 1 |
| ``MemoryProbe`` | ``length`` steps, cue at t=0 only | 1 at the last step if op = WAIT (cue -1) / ADVANCE (cue +1) | V(t) = gamma^(length-1-t) |
| ``MaskedActionProbe`` | 1 step, FOSSILIZE masked when cue = +1 | FOSSILIZE 1, ADVANCE 0.5, else 0 | FOSSILIZE (V=1) / ADVANCE (V=0.5) |
| ``SecondaryHeadProbe`` | 1 step, only GERMINATE valid | 1 if blueprint = ``BEST_BLUEPRINT`` | V = 1 |
| ``TruncationProbe`` | truncated after a random, unobserved limit (2-6 steps) | 1 every step, never terminates | V = 1 / (1 - gamma) at every step, cut included |
"""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from esper_lib.constants import (
    DEFAULT_NUM_SLOTS,
    HEAD_NAMES,
    NUM_OPS,
    RELEVANCE_TABLE,
    BlueprintAction,
    LifecycleOp,
)
from esper_lib.envs.spaces import action_space, action_to_dict, all_valid_masks, observation_space

CUE_INDEX = 0
TIME_INDEX = 1
VIOLATION_REWARD = -1.0


class ProbeEnv(gym.Env):
    """Base class: Tamiyo spaces, zero state, empty slots, all actions valid.

    Subclasses set ``episode_length`` and override ``_begin`` (draw the episode's randomness),
    ``_signals`` (state entries), ``_op_mask`` / ``_masks`` (masks), ``_reward`` and the three
    ``optimal_*`` methods.

    Args:
        gamma: discount the optimal values refer to (use the same in PPO).
        num_slots: slots of the spaces (default 3, state 121).
    """

    metadata = {"render_modes": []}
    episode_length = 1

    def __init__(self, gamma: float = 0.9, num_slots: int = DEFAULT_NUM_SLOTS):
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma must lie in [0, 1), got {gamma!r}")
        self.gamma = float(gamma)
        self.num_slots = num_slots
        self.observation_space = observation_space(num_slots)
        self.action_space = action_space(num_slots)
        self.state_dim = self.observation_space["state"].shape[0]
        self.t = 0
        self.cue = 0.0
        self.masked_violations = 0
        self._needs_reset = True

    # --- gymnasium API ---------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        self.t = 0
        self._needs_reset = False
        self._begin()
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        if self._needs_reset:
            raise RuntimeError(f"{type(self).__name__}.step() called before reset() or after the episode ended: call reset()")
        act = action_to_dict(action, self.num_slots)
        violation = self._violates_mask(act)
        reward = VIOLATION_REWARD if violation else float(self._reward(act))
        self.masked_violations += int(violation)
        self.t += 1
        terminated, truncated = self._done()
        self._needs_reset = terminated or truncated
        return self._obs(), reward, terminated, truncated, {"masked_violation": violation}

    # --- hooks --------------------------------------------------------------------------------

    def _begin(self) -> None:
        """Draw the episode's randomness (called by ``reset``)."""

    def _signals(self) -> dict[int, float]:
        """Non-zero state entries of the current step."""
        return {}

    def _op_mask(self) -> np.ndarray:
        return np.ones(NUM_OPS, dtype=np.int8)

    def _masks(self) -> dict[str, np.ndarray]:
        masks = all_valid_masks(self.num_slots)
        masks["op"] = self._op_mask()
        return masks

    def _reward(self, action: dict[str, int]) -> float:
        raise NotImplementedError

    def _done(self) -> tuple[bool, bool]:
        return self.t >= self.episode_length, False

    def optimal_value(self) -> float:
        raise NotImplementedError

    def optimal_q(self) -> np.ndarray:
        raise NotImplementedError

    def optimal_action(self) -> dict[str, int]:
        return {}

    # --- helpers -------------------------------------------------------------------------------

    def _obs(self) -> dict[str, Any]:
        state = np.zeros(self.state_dim, dtype=np.float32)
        for i, v in self._signals().items():
            state[i] = v
        return {
            "state": state,
            "blueprint_indices": np.full(self.num_slots, -1, dtype=np.int64),
            "action_mask": self._masks(),
        }

    def _violates_mask(self, act: dict[str, int]) -> bool:
        masks = self._masks()
        op = act["op"]
        if not masks["op"][op]:
            return True
        rel = RELEVANCE_TABLE[op]
        for i, name in enumerate(HEAD_NAMES[1:], start=1):
            if rel[i] and not masks[name][act[name]]:
                return True
        return bool(rel[HEAD_NAMES.index("slot")]) and not masks["slot_by_op"][op, act["slot"]]

    def _masked_q(self, q: np.ndarray) -> np.ndarray:
        q = np.asarray(q, dtype=np.float64).copy()
        q[self._op_mask() == 0] = np.nan
        return q

    def _time_signal(self) -> float:
        return self.t / max(self.episode_length - 1, 1)

    # --- exact save / restore --------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """Everything needed to continue this env exactly (plain Python values)."""
        return {
            "t": int(self.t),
            "cue": float(self.cue),
            "masked_violations": int(self.masked_violations),
            "needs_reset": bool(self._needs_reset),
            "rng": self.np_random.bit_generator.state,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
        self.cue = float(state["cue"])
        self.masked_violations = int(state["masked_violations"])
        self._needs_reset = bool(state.get("needs_reset", False))
        self.np_random.bit_generator.state = state["rng"]

    def _draw_cue(self) -> float:
        return 1.0 if self.np_random.random() < 0.5 else -1.0


class ConstantRewardProbe(ProbeEnv):
    """One step, reward 1: the critic must learn V = Q(s, o) = 1 for every op."""

    def _reward(self, action: dict[str, int]) -> float:
        return 1.0

    def optimal_value(self) -> float:
        return 1.0

    def optimal_q(self) -> np.ndarray:
        return np.ones(NUM_OPS)


class ObservationRewardProbe(ProbeEnv):
    """One step, reward = the cue (+1 or -1, drawn at reset): V(s) = cue."""

    def _begin(self) -> None:
        self.cue = self._draw_cue()

    def _signals(self) -> dict[int, float]:
        return {CUE_INDEX: self.cue}

    def _reward(self, action: dict[str, int]) -> float:
        return self.cue

    def optimal_value(self) -> float:
        return self.cue

    def optimal_q(self) -> np.ndarray:
        return np.full(NUM_OPS, self.cue)


class DelayedRewardProbe(ProbeEnv):
    """Two steps: reward 0, then 1. V(t=0) = gamma, V(t=1) = 1 (checks discounting and bootstrapping)."""

    episode_length = 2

    def _signals(self) -> dict[int, float]:
        return {TIME_INDEX: self._time_signal()}

    def _reward(self, action: dict[str, int]) -> float:
        return 1.0 if self.t == self.episode_length - 1 else 0.0

    def optimal_value(self) -> float:
        return self.gamma ** (self.episode_length - 1 - self.t)

    def optimal_q(self) -> np.ndarray:
        return np.full(NUM_OPS, self.optimal_value())


class OpRewardProbe(ProbeEnv):
    """One step; the reward depends on the op only (``OP_REWARDS``); FOSSILIZE is best."""

    OP_REWARDS = (0.0, 0.3, 0.3, 0.0, 1.0, 0.5)  # WAIT, GERMINATE, SET_ALPHA_TARGET, PRUNE, FOSSILIZE, ADVANCE
    BEST_OP = int(LifecycleOp.FOSSILIZE)

    def _reward(self, action: dict[str, int]) -> float:
        return self.OP_REWARDS[action["op"]]

    def optimal_value(self) -> float:
        return max(self.OP_REWARDS)

    def optimal_q(self) -> np.ndarray:
        return np.asarray(self.OP_REWARDS, dtype=np.float64)

    def optimal_action(self) -> dict[str, int]:
        return {"op": self.BEST_OP}


class MemoryProbe(ProbeEnv):
    """A cue (+1 / -1) shown at t = 0 only; at the last step op WAIT pays 1 after cue -1, ADVANCE after cue +1.

    Only WAIT and ADVANCE are valid. The last observation is the same for both cues, so only a
    policy with memory reaches V(t) = gamma^(length - 1 - t); a memoryless one gets half of that.
    """

    OPS = (int(LifecycleOp.WAIT), int(LifecycleOp.ADVANCE))

    def __init__(self, gamma: float = 0.9, num_slots: int = DEFAULT_NUM_SLOTS, length: int = 3):
        super().__init__(gamma, num_slots)
        if not isinstance(length, int) or length < 2:
            raise ValueError(f"length must be an int >= 2, got {length!r}")
        self.episode_length = length

    def _begin(self) -> None:
        self.cue = self._draw_cue()

    def _signals(self) -> dict[int, float]:
        return {CUE_INDEX: self.cue if self.t == 0 else 0.0, TIME_INDEX: self._time_signal()}

    def _op_mask(self) -> np.ndarray:
        m = np.zeros(NUM_OPS, dtype=np.int8)
        m[list(self.OPS)] = 1
        return m

    @property
    def target_op(self) -> int:
        return self.OPS[1] if self.cue > 0 else self.OPS[0]

    def _reward(self, action: dict[str, int]) -> float:
        if self.t < self.episode_length - 1:
            return 0.0
        return 1.0 if action["op"] == self.target_op else 0.0

    def optimal_value(self) -> float:
        return self.gamma ** (self.episode_length - 1 - self.t)

    def optimal_q(self) -> np.ndarray:
        if self.t < self.episode_length - 1:
            return self._masked_q(np.full(NUM_OPS, self.optimal_value()))
        q = np.zeros(NUM_OPS)
        q[self.target_op] = 1.0
        return self._masked_q(q)

    def optimal_action(self) -> dict[str, int]:
        return {"op": self.target_op} if self.t == self.episode_length - 1 else {}


class MaskedActionProbe(ProbeEnv):
    """One step; FOSSILIZE pays 1, ADVANCE 0.5, others 0; when the cue is +1 FOSSILIZE is masked."""

    OP_REWARDS = (0.0, 0.0, 0.0, 0.0, 1.0, 0.5)
    BEST_OP = int(LifecycleOp.FOSSILIZE)
    FALLBACK_OP = int(LifecycleOp.ADVANCE)

    def _begin(self) -> None:
        self.cue = self._draw_cue()

    @property
    def best_masked(self) -> bool:
        return self.cue > 0

    def _signals(self) -> dict[int, float]:
        return {CUE_INDEX: self.cue}

    def _op_mask(self) -> np.ndarray:
        m = np.ones(NUM_OPS, dtype=np.int8)
        if self.best_masked:
            m[self.BEST_OP] = 0
        return m

    def _reward(self, action: dict[str, int]) -> float:
        return self.OP_REWARDS[action["op"]]

    def optimal_value(self) -> float:
        return self.OP_REWARDS[self.FALLBACK_OP] if self.best_masked else self.OP_REWARDS[self.BEST_OP]

    def optimal_q(self) -> np.ndarray:
        return self._masked_q(np.asarray(self.OP_REWARDS))

    def optimal_action(self) -> dict[str, int]:
        return {"op": self.FALLBACK_OP if self.best_masked else self.BEST_OP}


class SecondaryHeadProbe(ProbeEnv):
    """One step; only GERMINATE is valid and only the blueprint decides the reward (1 for ``BEST_BLUEPRINT``).

    NOOP is masked on the blueprint head, leaving 12 choices.
    """

    BEST_BLUEPRINT = int(BlueprintAction.CONV_HEAVY)
    OP = int(LifecycleOp.GERMINATE)

    def _op_mask(self) -> np.ndarray:
        m = np.zeros(NUM_OPS, dtype=np.int8)
        m[self.OP] = 1
        return m

    def _masks(self) -> dict[str, np.ndarray]:
        masks = super()._masks()
        masks["blueprint"][int(BlueprintAction.NOOP)] = 0
        return masks

    def _reward(self, action: dict[str, int]) -> float:
        return 1.0 if action["blueprint"] == self.BEST_BLUEPRINT else 0.0

    def optimal_value(self) -> float:
        return 1.0

    def optimal_q(self) -> np.ndarray:
        q = np.zeros(NUM_OPS)
        q[self.OP] = 1.0
        return self._masked_q(q)

    def optimal_action(self) -> dict[str, int]:
        return {"op": self.OP, "blueprint": self.BEST_BLUEPRINT}


class TruncationProbe(ProbeEnv):
    """Reward 1 every step, never terminates, truncated by a time limit the agent does not observe.

    The limit of each episode is drawn uniformly from ``[min_episode_steps, max_episode_steps]``
    (``limit``); set both equal for a fixed limit. The state is constant, so the true value
    everywhere, at the cut included, is the infinite-horizon 1 / (1 - gamma). Treating the cut as a
    termination would instead pull the value towards the finite-horizon ``finite_horizon_value(t)``
    (1 at the last step).

    Why a random limit by default: an LSTM counts steps even on a constant observation. With a
    fixed limit the observation after the cut sits at an LSTM position no training step ever
    visits, its bootstrap value is an extrapolation, and PPO settles on a self-consistent but
    biased fixed point (measured: about 4.7-4.9 instead of 5 with gamma 0.8 and a limit of 5).
    With a random limit every bootstrap position is also a training position.
    """

    def __init__(self, gamma: float = 0.8, num_slots: int = DEFAULT_NUM_SLOTS, max_episode_steps: int = 6, min_episode_steps: int = 2):
        super().__init__(gamma, num_slots)
        for name, v in (("max_episode_steps", max_episode_steps), ("min_episode_steps", min_episode_steps)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if min_episode_steps > max_episode_steps:
            raise ValueError(f"min_episode_steps ({min_episode_steps}) must not exceed max_episode_steps ({max_episode_steps})")
        self.max_episode_steps = max_episode_steps
        self.min_episode_steps = min_episode_steps
        self.episode_length = self.limit = max_episode_steps

    def _begin(self) -> None:
        self.limit = int(self.np_random.integers(self.min_episode_steps, self.max_episode_steps + 1))
        self.episode_length = self.limit

    def _reward(self, action: dict[str, int]) -> float:
        return 1.0

    def _done(self) -> tuple[bool, bool]:
        return False, self.t >= self.limit

    def optimal_value(self) -> float:
        return 1.0 / (1.0 - self.gamma)

    def optimal_q(self) -> np.ndarray:
        return np.full(NUM_OPS, self.optimal_value())

    def finite_horizon_value(self, t: int | None = None) -> float:
        """What a critic that wrongly treats the cut as terminal would aim at, at step ``t`` of this episode."""
        t = self.t if t is None else t
        return (1.0 - self.gamma ** (self.limit - t)) / (1.0 - self.gamma)

    def get_state(self) -> dict[str, Any]:
        return {**super().get_state(), "limit": int(self.limit)}

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        self.limit = self.episode_length = int(state["limit"])


PROBES: dict[str, type[ProbeEnv]] = {
    "constant": ConstantRewardProbe,
    "observation": ObservationRewardProbe,
    "delayed": DelayedRewardProbe,
    "op": OpRewardProbe,
    "memory": MemoryProbe,
    "masked": MaskedActionProbe,
    "secondary": SecondaryHeadProbe,
    "truncation": TruncationProbe,
}


def make_probe(name: str, **kwargs: Any) -> ProbeEnv:
    """Build a probe by its short name (``PROBES`` keys)."""
    if name not in PROBES:
        raise ValueError(f"unknown probe {name!r}; choose from {sorted(PROBES)}")
    return PROBES[name](**kwargs)
