"""What a PPO training run on the morphogenetic env records besides the trainer's own metrics.

- ``EpisodeRecorder``: a Gymnasium wrapper that keeps one summary per finished episode (return,
  reward-term sums, final accuracy, op counts) and the seconds spent inside ``env.step``.
- ``StepTimer``: a vector-env wrapper that measures the wall time of every vector ``step`` in the
  training process (host training and validation of all envs, in parallel for an
  ``AsyncVectorEnv``), so a run's wall time can be split into host work and policy work.
- ``OpUsage``: a ``PPOTrainer.run`` callback that records the op distribution of each rollout.
- ``FirstEpochChoices``: a ``PPOTrainer.run`` callback that records, after every update, what the
  policy would do at the first epoch of a few probe hosts (p(op), and the blueprint and style a
  germination there would take): when a run gives up on germinating early, and on what.

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

from esper_lib.constants import NUM_OPS, OP_NAMES, BlueprintAction, GerminationStyle

PROBE_SEEDS = (900_001, 900_002)  # env seeds of the probe hosts: used neither by training nor by the held-out evaluation


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


class FirstEpochChoices:
    """``PPOTrainer.run`` callback: the policy's choices at the first epoch of probe hosts, after every update.

    Per update (``frame()``): ``p_<OP>`` = pi(op | s0) averaged over the probe hosts (env seeds
    ``PROBE_SEEDS``, empty host: only WAIT and GERMINATE valid), and ``blueprint`` / ``style`` with
    ``p_blueprint`` / ``p_style``: the most probable valid choice of those heads at s0 of the first
    probe host (what a germination there would take). The global torch and numpy random states are
    restored after each probe, so a run is the same bit for bit with or without it.
    """

    def __init__(self, env_fn: Any, seeds: tuple[int, ...] = PROBE_SEEDS) -> None:
        self.env_fn, self.seeds = env_fn, tuple(int(s) for s in seeds)
        self.env: Any = None
        self.rows: list[dict[str, Any]] = []

    def __call__(self, trainer: Any, row: dict[str, float]) -> None:
        import torch

        from esper_lib.ppo.controller import PolicyController

        rng = (torch.get_rng_state(), np.random.get_state())
        was_training = trainer.policy.training
        try:
            if self.env is None:
                self.env = self.env_fn()
            controller = PolicyController(trainer.policy, trainer.normalizer or False, deterministic=True)
            op_probs, first = [], None
            for seed in self.seeds:
                obs, _ = self.env.reset(seed=seed)
                state, bp, masks = controller.observation_tensors(obs)
                with torch.no_grad():
                    out = trainer.policy(state.unsqueeze(1), bp.unsqueeze(1), action_mask={"op": masks["op"].unsqueeze(1)})
                op_probs.append(_masked_softmax(out.op_logits[0, 0], masks["op"][0]))
                if first is None:
                    first = (_masked_softmax(out.blueprint_logits[0, 0], masks["blueprint"][0]), _masked_softmax(out.style_logits[0, 0], masks["style"][0]))
        finally:
            trainer.policy.train(was_training)
            torch.set_rng_state(rng[0])
            np.random.set_state(rng[1])
        p_op = np.mean(op_probs, axis=0)
        bp, style = first
        self.rows.append({"update": row["update"], **{f"p_{name}": float(p) for name, p in zip(OP_NAMES, p_op)},
                          "blueprint": BlueprintAction(int(bp.argmax())).name, "p_blueprint": float(bp.max()),
                          "style": GerminationStyle(int(style.argmax())).name, "p_style": float(style.max())})

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["update", *(f"p_{n}" for n in OP_NAMES), "blueprint", "p_blueprint", "style", "p_style"])


def _masked_softmax(logits: Any, mask: Any) -> np.ndarray:
    """Probabilities ``[k]`` (numpy) over the valid entries of ``mask``, 0 elsewhere."""
    import torch

    return torch.softmax(logits.float().masked_fill(~mask, float("-inf")), dim=-1).cpu().numpy()
