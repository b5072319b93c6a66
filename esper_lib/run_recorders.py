"""What a PPO training run on the morphogenetic env records besides the trainer's own metrics.

- ``EpisodeRecorder``: a Gymnasium wrapper that keeps one summary per finished episode (return,
  reward-term sums, final accuracy, op counts) and the seconds spent inside ``env.step``.
- ``StepTimer``: a vector-env wrapper that measures the wall time of every vector ``step`` in the
  training process (host training and validation of all envs, in parallel for an
  ``AsyncVectorEnv``), so a run's wall time can be split into host work and policy work.
- ``OpUsage``: a ``PPOTrainer.run`` callback that records the op distribution of each rollout.

``esper_lib.training_runs`` wires them into a run; ``esper_lib.notebooks.training_report`` plots
what they record.
"""
from __future__ import annotations

import time
from typing import Any

import gymnasium as gym
import numpy as np
import pandas as pd
from gymnasium.vector import VectorEnv, VectorWrapper

from esper_lib.constants import NUM_OPS, OP_NAMES


class EpisodeRecorder(gym.Wrapper):
    """Keeps ``episodes`` (one dict per finished episode) and ``step_seconds`` (time inside ``step``)."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.episodes: list[dict[str, Any]] = []
        self.step_seconds = 0.0
        self.steps = 0
        self._current: dict[str, Any] = {}

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        self._current = {"return": 0.0, "steps": 0, **{f"op_{name}": 0 for name in OP_NAMES}}
        return obs, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        start = time.perf_counter()
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.step_seconds += time.perf_counter() - start
        self.steps += 1
        cur = self._current
        cur["return"] += float(reward)
        cur["steps"] += 1
        op = int(np.asarray(action)[0])
        if 0 <= op < NUM_OPS:
            cur[f"op_{OP_NAMES[op]}"] += 1
        for key, value in info.get("reward_terms", {}).items():
            cur[f"reward_{key}"] = cur.get(f"reward_{key}", 0.0) + float(value)
        if terminated or truncated:
            cur["final_val_accuracy"] = info.get("val_accuracy", np.nan)
            for key in ("germinations", "fossilizations", "prunes", "seed_params"):
                cur[key] = info.get(key, np.nan)
            cur["episode"] = len(self.episodes)
            self.episodes.append(dict(cur))
        return obs, reward, terminated, truncated, info


class StepTimer(VectorWrapper):
    """Wall time spent in the wrapped vector env's ``step`` (``step_seconds``), measured in this process."""

    def __init__(self, env: VectorEnv):
        super().__init__(env)
        self.step_seconds = 0.0

    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
        start = time.perf_counter()
        result = self.env.step(actions)
        self.step_seconds += time.perf_counter() - start
        return result


def recorders(env: Any) -> list[EpisodeRecorder]:
    """The ``EpisodeRecorder`` wrappers of an env or of the sub-envs of an in-process vector env."""
    subs = getattr(env, "envs", None) or [env]
    found = []
    for sub in subs:
        while sub is not None:
            if isinstance(sub, EpisodeRecorder):
                found.append(sub)
                break
            sub = getattr(sub, "env", None)
    return found


def episodes_frame(env: Any) -> pd.DataFrame:
    """All episodes recorded by ``EpisodeRecorder`` in every sub-env (column ``env``), finishing order per env.

    Works for a single env, a ``SyncVectorEnv`` and an ``AsyncVectorEnv`` (read with ``get_attr``).
    """
    if isinstance(env, VectorEnv) and not getattr(env, "envs", None):
        per_env = env.get_attr("episodes")
    else:
        per_env = [rec.episodes for rec in recorders(env)]
    return pd.DataFrame([dict(ep, env=i) for i, episodes in enumerate(per_env) for ep in episodes])


class OpUsage:
    """``PPOTrainer.run`` callback: op fractions over the valid steps of each rollout (``frame()``)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def __call__(self, trainer: Any, row: dict[str, float]) -> None:
        buffer = trainer.buffer
        ops = buffer.actions[..., 0][buffer.valid]
        counts = np.bincount(ops.cpu().numpy(), minlength=NUM_OPS).astype(float)
        fractions = counts / max(counts.sum(), 1.0)
        self.rows.append({"update": row["update"], "env_steps": row["env_steps"], **dict(zip(OP_NAMES, fractions))})

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["update", "env_steps", *OP_NAMES])
