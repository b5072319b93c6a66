"""Cheap stand-ins for the landscape and widget tests: a tiny env with the Tamiyo spaces and a controller.

``TinyTamiyoEnv`` draws random (bounded) observations, narrows the op mask differently at each
step (WAIT always valid) and ends after ``episode_length`` steps; it costs microseconds per step.
"""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from esper_lib.constants import DEFAULT_NUM_SLOTS, NUM_OPS, LifecycleOp
from esper_lib.envs.spaces import action_space, all_valid_masks, observation_space
from esper_lib.network import FactoredRecurrentActorCritic

SMALL = {"feature_dim": 32, "hidden_dim": 32}


def small_policy(seed: int = 0) -> FactoredRecurrentActorCritic:
    """A 32-wide network for the default 3-slot observation."""
    import torch

    torch.manual_seed(seed)
    return FactoredRecurrentActorCritic(**SMALL).eval()


class TinyTamiyoEnv(gym.Env):
    """Random observations in the Tamiyo Dict space; reward = 1 when the op taken was GERMINATE."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, episode_length: int = 8, num_slots: int = DEFAULT_NUM_SLOTS):
        self.episode_length = episode_length
        self.num_slots = num_slots
        self.observation_space = observation_space(num_slots)
        self.action_space = action_space(num_slots)
        self._t = 0

    def _obs(self) -> dict[str, Any]:
        state = self.np_random.uniform(-1, 1, self.observation_space["state"].shape).astype(np.float32)
        bps = self.np_random.integers(-1, 13, self.num_slots).astype(np.int64)
        masks = all_valid_masks(self.num_slots)
        op_mask = self.np_random.integers(0, 2, NUM_OPS).astype(np.int8)
        op_mask[LifecycleOp.WAIT] = 1
        masks["op"] = op_mask
        return {"state": state, "blueprint_indices": bps, "action_mask": masks}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t = 0
        return self._obs(), {}

    def step(self, action):
        self._t += 1
        reward = float(int(action[0]) == LifecycleOp.GERMINATE)
        return self._obs(), reward, False, self._t >= self.episode_length, {}


class FirstValidController:
    """Takes the highest valid op (deterministic), slot 0 and zeros elsewhere."""

    def __init__(self) -> None:
        self.calls = 0

    def reset(self) -> None:
        self.calls = 0

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        self.calls += 1
        action = np.zeros(8, dtype=np.int64)
        action[0] = int(np.flatnonzero(obs["action_mask"]["op"])[-1])
        return action
