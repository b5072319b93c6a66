"""``PPOTrainer`` (collect / update / save / load / resume) and ``train(env_fn, config)``.

One update = collect ``num_steps`` steps from each of ``num_envs`` envs, GAE against Q(s, op),
several epochs of minibatch PPO. Every update appends one row of metrics (see ``METRIC_COLUMNS``).

Reproducibility: the network is initialised from ``config.seed`` inside a forked RNG, action
sampling and minibatch shuffling use a private ``torch.Generator`` seeded from ``config.seed``, and
the envs are reset with ``seed=config.seed`` (env i gets ``seed + i``). Same seed and thread count
-> identical metrics on the CPU, except the wall-clock columns ``TIMING_COLUMNS``.

Checkpoints (``save`` / ``load`` / ``resume``) hold model, optimizer, normaliser, config, the
generator, the carried rollout state (observation, LSTM state, episode accumulators), the metric
history and, when every env implements ``get_state()`` / ``set_state()`` (the probes do), the env
states (captured in this process, or inside the actors of a ``RayVectorEnv``), so a resumed run
continues bit for bit. Envs without them are reset on resume (with a
warning), which changes the next rollout but nothing else.

No silent NaN: a non-finite reward or observation (collector), advantage or return, loss or gradient
norm (update) raises ``esper_lib.finite.NonFiniteError`` naming it, the env, the step and the update,
before any optimizer step on it, so the weights stay finite, ``history`` keeps the updates that
finished and the last checkpoint saved is untouched. The trainer is then mid-rollout: load that
checkpoint to go on.

Resources: ``close()`` closes the envs and restores torch's thread count (``num_threads``).
"""
from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import pandas as pd
import torch
from gymnasium.vector import VectorEnv
from esper_lib.progress import progress_bar

from esper_lib.checkpoint import load_checkpoint, read_payload, save_checkpoint
from esper_lib.constants import HEAD_NAMES
from esper_lib.envs.env_state import capture_env_state, restore_env_state
from esper_lib.network import FactoredRecurrentActorCritic
from esper_lib.ppo.advantages import compute_advantages, explained_variance
from esper_lib.ppo.buffer import RolloutBuffer
from esper_lib.ppo.collect import RolloutCollector, RolloutStats, SingleEnvAdapter, as_vector_env, make_vector_env
from esper_lib.ppo.config import PPOConfig
from esper_lib.ppo.normalization import RunningObsNormalizer
from esper_lib.ppo.update import ppo_update

PPO_STATE_VERSION = 1
TAMIYO_OBS_KEYS: tuple[str, ...] = ("state", "blueprint_indices", "action_mask")

METRIC_COLUMNS: tuple[str, ...] = (
    "update",
    "env_steps",
    "episodes",
    "episode_return_mean",
    "episode_return_std",
    "episode_length_mean",
    "policy_loss",
    *(f"policy_loss_{h}" for h in HEAD_NAMES),
    "value_loss",
    *(f"entropy_{h}" for h in HEAD_NAMES),
    "entropy_bonus",
    "approx_kl",
    *(f"clip_frac_{h}" for h in HEAD_NAMES),
    "explained_variance",
    "grad_norm",
    "value_mean",
    "return_mean",
    "lr",
    "epochs_completed",
    "early_stop",
    "collect_s",
    "update_s",
    "steps_per_s",
)
TIMING_COLUMNS: tuple[str, ...] = ("collect_s", "update_s", "steps_per_s")

EnvFn = Callable[[], Any]


class PPOTrainer:
    """Recurrent PPO for ``FactoredRecurrentActorCritic`` on Tamiyo-space envs.

    Args:
        env_fn: callable returning a ``gymnasium.Env`` (called ``num_envs`` times; the envs run in a
            SAME_STEP vector env of kind ``config.vector_env``, see ``make_vector_env``; a single
            sync env is used alone) or, for "sync", a ``VectorEnv`` with ``num_envs`` envs. An env or
            vector env instance (e.g. a ``RayVectorEnv``) is accepted too.
        config: hyperparameters.
        policy: start from this network instead of a fresh one (sizes must match the env and config).
    """

    def __init__(self, env_fn: EnvFn | gym.Env | VectorEnv, config: PPOConfig, *, policy: FactoredRecurrentActorCritic | None = None):
        if not isinstance(config, PPOConfig):
            raise TypeError(f"config must be a PPOConfig, got {type(config).__name__}")
        self.config = config
        self.device = available_device(config.device)
        if not (isinstance(env_fn, (gym.Env, VectorEnv, SingleEnvAdapter)) or callable(env_fn)):
            raise TypeError(f"env_fn must be a callable returning an env, or an env, got {type(env_fn).__name__}")
        self._threads_before = torch.get_num_threads()
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.env: Any = None
        self._env_closed = False
        try:
            self._build(env_fn, policy)
        except BaseException:
            self.close()  # restore the thread count, close the envs built so far
            raise

    def _build(self, env_fn: EnvFn | gym.Env | VectorEnv, policy: FactoredRecurrentActorCritic | None) -> None:
        config = self.config
        if isinstance(env_fn, (gym.Env, VectorEnv, SingleEnvAdapter)):
            self.env = as_vector_env(env_fn)
        elif callable(env_fn):
            # "sync" keeps the old behaviour (one env alone, without a vector wrapper)
            kind = None if config.vector_env == "sync" else config.vector_env
            self.env = make_vector_env(env_fn, config.num_envs, kind=kind)
        if self.env.num_envs != config.num_envs:
            raise ValueError(f"PPOConfig.num_envs is {config.num_envs} but the env has {self.env.num_envs} envs")
        space = self.env.single_observation_space
        check_tamiyo_observation_space(space)
        state_dim, num_slots = int(space["state"].shape[0]), int(space["blueprint_indices"].shape[0])
        if policy is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                policy = FactoredRecurrentActorCritic(
                    state_dim=state_dim,
                    num_slots=num_slots,
                    feature_dim=config.feature_dim,
                    hidden_dim=config.hidden_dim,
                    validate_inputs=config.validate_inputs,
                )
        elif (policy.feature_dim, policy.hidden_dim) != (config.feature_dim, config.hidden_dim):
            raise ValueError(
                f"policy has feature_dim={policy.feature_dim}, hidden_dim={policy.hidden_dim}; "
                f"config asks for feature_dim={config.feature_dim}, hidden_dim={config.hidden_dim}"
            )
        self.policy = policy.to(self.device)
        self.optimizer = _adam(self.policy, config)
        self.normalizer = RunningObsNormalizer(state_dim, clip=config.obs_clip) if config.normalize_obs else None
        self.policy.obs_normalizer = self.normalizer  # plain attribute (not in state_dict): PolicyController picks it up
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed)
        self.buffer = RolloutBuffer(
            config.num_envs, config.num_steps, config.seq_len, state_dim, num_slots, config.hidden_dim, device=self.device
        )
        self.collector = RolloutCollector(self.env, self.policy, self.normalizer, self.generator, self.device)
        self.update_index = 0
        self.env_steps = 0
        self.history: list[dict[str, float]] = []
        self._last_stats: RolloutStats | None = None

    # --- one update -----------------------------------------------------------------------------

    def collect(self) -> RolloutStats:
        """Fill the buffer with one rollout (envs are reset with ``config.seed`` the first time)."""
        if not self.collector.started:
            self.collector.reset(seed=self._reset_seeds(self.config.seed + self.update_index * self.config.num_envs))
        self.policy.eval()
        stats = self.collector.collect(self.buffer, update=self.update_index)
        self.env_steps += stats.env_steps
        self._last_stats = stats
        return stats

    def _reset_seeds(self, base: int) -> int | list[int]:
        """``base`` (env i gets ``base + i``), or with ``seed_group_size = g`` one seed per env: ``base + i // g``."""
        g = self.config.seed_group_size
        return base if g == 1 else [base + i // g for i in range(self.config.num_envs)]

    def update(self) -> dict[str, float]:
        """Advantages and the PPO epochs on the collected rollout; returns the update's metrics."""
        cfg = self.config
        compute_advantages(self.buffer, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, bootstrap_mode=cfg.bootstrap_mode,
                           op_advantage=cfg.op_advantage, seed_group_size=cfg.seed_group_size)
        valid = self.buffer.valid
        pre = {
            "explained_variance": explained_variance(self.buffer.values, self.buffer.returns, valid),
            "value_mean": float(self.buffer.values[valid].mean()) if bool(valid.any()) else math.nan,
            "return_mean": float(self.buffer.returns[valid].mean()) if bool(valid.any()) else math.nan,
        }
        metrics = ppo_update(self.policy, self.optimizer, self.buffer, cfg, self.generator, update=self.update_index)
        return {**metrics, **pre}

    def step(self) -> dict[str, float]:
        """Collect, update, and record one row of metrics (returned)."""
        cfg = self.config
        lr = cfg.lr * (1.0 - self.update_index / cfg.num_updates) if cfg.anneal_lr else cfg.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        stats = self.collect()
        t1 = time.perf_counter()
        metrics = self.update()
        t2 = time.perf_counter()
        rets = np.asarray(stats.episode_returns, dtype=np.float64)
        row: dict[str, float] = {
            "update": self.update_index,
            "env_steps": self.env_steps,
            "episodes": len(rets),
            "episode_return_mean": float(rets.mean()) if rets.size else math.nan,
            "episode_return_std": float(rets.std()) if rets.size else math.nan,
            "episode_length_mean": float(np.mean(stats.episode_lengths)) if stats.episode_lengths else math.nan,
            "lr": lr,
            "collect_s": t1 - t0,
            "update_s": t2 - t1,
            "steps_per_s": stats.env_steps / max(t2 - t0, 1e-9),
            **metrics,
        }
        row = {k: row[k] for k in METRIC_COLUMNS}
        self.history.append(row)
        self.update_index += 1
        return row

    def run(
        self,
        num_updates: int | None = None,
        *,
        progress: bool = True,
        callback: Callable[["PPOTrainer", dict[str, float]], Any] | None = None,
    ) -> pd.DataFrame:
        """Run updates until ``num_updates`` in total (default ``config.num_updates``) have been done.

        ``callback(trainer, row)`` is called after every update; returning ``False`` stops early.
        Returns the metrics of all updates so far (``metrics``).
        """
        total = self.config.num_updates if num_updates is None else num_updates
        remaining = max(total - self.update_index, 0)
        bar = progress_bar(total=total, initial=self.update_index, disable=not progress, desc="PPO", unit="upd")
        try:
            for _ in range(remaining):
                row = self.step()
                bar.update(1)
                bar.set_postfix(ret=f"{row['episode_return_mean']:.3g}", kl=f"{row['approx_kl']:.3g}", ev=f"{row['explained_variance']:.2f}", refresh=False)
                if callback is not None and callback(self, row) is False:
                    break
        finally:
            bar.close()
        return self.metrics

    @property
    def metrics(self) -> pd.DataFrame:
        """One row per update (columns ``METRIC_COLUMNS``)."""
        return pd.DataFrame(self.history, columns=list(METRIC_COLUMNS))

    # --- checkpoints -----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write a resumable checkpoint (at an update boundary)."""
        env_states = _env_states(self.env)
        extra = {
            "ppo": {
                "version": PPO_STATE_VERSION,
                "update_index": self.update_index,
                "env_steps": self.env_steps,
                "generator_state": self.generator.get_state(),
                "collector": self.collector.state_dict(),
                "env_states": env_states,
                "history": [dict(r) for r in self.history],
            }
        }
        return save_checkpoint(
            path,
            self.policy,
            optimizer_state=self.optimizer.state_dict(),
            obs_normalizer_state=self.normalizer.state_dict() if self.normalizer is not None else None,
            config=self.config.to_dict(),
            extra=extra,
        )

    def load(self, path: str | os.PathLike) -> None:
        """Restore model, optimizer, normaliser and run state from ``save``; this trainer's config is kept.

        Raises ``ValueError`` for another checkpoint schema, another network size, a corrupt file,
        a checkpoint without PPO trainer state, or one made with another ``num_envs``.
        """
        ckpt = load_checkpoint(path, expect=self.policy)
        ppo = ckpt.extra.get("ppo") if isinstance(ckpt.extra, dict) else None
        if not isinstance(ppo, dict):
            raise ValueError(f"{path} has no PPO trainer state (it was not written by PPOTrainer.save); use load_trained() to evaluate it")
        if ppo.get("version") != PPO_STATE_VERSION:
            raise ValueError(f"{path} has PPO trainer state version {ppo.get('version')!r}; this esper_lib reads version {PPO_STATE_VERSION}")
        saved_envs = int(ppo["collector"]["state"].shape[0])
        if saved_envs != self.config.num_envs:
            raise ValueError(f"{path} was saved with num_envs={saved_envs}; this trainer has num_envs={self.config.num_envs}")
        if (ckpt.obs_normalizer_state is None) != (self.normalizer is None):
            raise ValueError(
                f"{path} was saved with normalize_obs={ckpt.obs_normalizer_state is not None}; this trainer has normalize_obs={self.normalizer is not None}"
            )
        self.policy.load_state_dict(ckpt.model.state_dict())
        if ckpt.optimizer_state is None:
            raise ValueError(f"{path} has no optimizer state")
        self.optimizer.load_state_dict(ckpt.optimizer_state)
        if self.normalizer is not None:
            self.normalizer.load_state_dict(ckpt.obs_normalizer_state)
        self.generator.set_state(ppo["generator_state"])
        self.update_index = int(ppo["update_index"])
        self.env_steps = int(ppo["env_steps"])
        self.history = [dict(r) for r in ppo["history"]]
        self.collector.load_state_dict(ppo["collector"])
        env_states = ppo.get("env_states")
        if self.collector.started:
            if env_states is not None and _can_set_states(self.env, len(env_states)):
                self.env.reset(seed=self.config.seed)
                _set_env_states(self.env, env_states)
            else:
                warnings.warn(
                    f"{path}: env states were not saved or this env cannot restore them (get_state/set_state); "
                    "the envs are reset, so the next rollout differs from an uninterrupted run",
                    stacklevel=2,
                )
                self.collector.started = False

    @classmethod
    def resume(cls, path: str | os.PathLike, env_fn: EnvFn, **overrides: Any) -> "PPOTrainer":
        """A trainer rebuilt from the config stored at ``path`` (with ``overrides``, e.g. ``total_updates``) and loaded from it."""
        payload = read_payload(path)
        if not isinstance(payload.get("config"), dict):
            raise ValueError(f"{path} holds no PPOConfig; it cannot be resumed")
        try:
            config = PPOConfig.from_dict(payload["config"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: stored config is not a valid PPOConfig ({exc})") from exc
        trainer = cls(env_fn, config.replace(**overrides) if overrides else config)
        trainer.load(path)
        return trainer

    def close(self) -> None:
        """Close the envs and restore torch's thread count as it was before this trainer (idempotent)."""
        try:
            if self.env is not None and not self._env_closed:
                self._env_closed = True
                self.env.close()
        finally:
            if self._threads_before is not None:
                torch.set_num_threads(self._threads_before)
                self._threads_before = None


def train(
    env_fn: EnvFn,
    config: PPOConfig,
    *,
    progress: bool = True,
    callback: Callable[[PPOTrainer, dict[str, float]], Any] | None = None,
) -> tuple[FactoredRecurrentActorCritic, pd.DataFrame]:
    """Train a policy with recurrent PPO; returns ``(policy, metrics)`` (one row per update).

    The returned policy carries its observation normaliser as ``policy.obs_normalizer`` (None when
    ``normalize_obs`` is off), which ``PolicyController`` uses by default.
    """
    trainer = PPOTrainer(env_fn, config)
    try:
        df = trainer.run(progress=progress, callback=callback)
    finally:
        trainer.close()
    return trainer.policy.eval(), df


def available_device(name: str) -> torch.device:
    """``torch.device(name)``, or ValueError naming ``PPOConfig.device`` when this machine lacks it."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"PPOConfig.device is {name!r} but CUDA is not available here (torch {torch.__version__}); use device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"PPOConfig.device is {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"PPOConfig.device is {name!r} but MPS is not available here; use device='cpu'")
    return device


def check_tamiyo_observation_space(space: Any) -> None:
    """ValueError naming the keys the trainer needs when ``space`` is not the Tamiyo Dict observation space."""
    keys = tuple(space.spaces) if isinstance(space, gym.spaces.Dict) else ()
    missing = [k for k in TAMIYO_OBS_KEYS if k not in keys]
    if missing:
        got = f"a Dict space with keys {list(keys)}" if isinstance(space, gym.spaces.Dict) else repr(space)
        raise ValueError(
            f"the env's observation space must be the Tamiyo Dict space with keys {TAMIYO_OBS_KEYS} "
            f"(esper_lib.envs.spaces.observation_space); it lacks {missing}: got {got}"
        )


def _adam(policy: FactoredRecurrentActorCritic, config: PPOConfig) -> torch.optim.Optimizer:
    """Adam, fused where torch supports it on this device (about 5x faster per step on the CPU)."""
    try:
        return torch.optim.Adam(policy.parameters(), lr=config.lr, eps=config.adam_eps, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(policy.parameters(), lr=config.lr, eps=config.adam_eps)


# --- env state capture ------------------------------------------------------------------------------


def _sub_envs(env: Any) -> list[gym.Env] | None:
    envs = getattr(env, "envs", None)
    return list(envs) if envs is not None else None


def _remote_states(env: Any) -> Any:
    """The vector env that captures its sub-envs' states where they live (``RayVectorEnv``), or None."""
    base = getattr(env, "unwrapped", env)  # through VectorWrappers such as StepTimer
    return base if callable(getattr(base, "get_env_states", None)) else None


def _env_states(env: Any) -> list[dict[str, Any]] | None:
    """Per sub-env ``capture_env_state`` (``esper_lib.envs.env_state``), or None when an env cannot."""
    remote = _remote_states(env)
    if remote is not None:
        return remote.get_env_states()
    envs = _sub_envs(env)
    if envs is None or not all(callable(getattr(e.unwrapped, "get_state", None)) for e in envs):
        return None
    return [capture_env_state(e) for e in envs]


def _can_set_states(env: Any, n: int) -> bool:
    remote = _remote_states(env)
    if remote is not None:
        return bool(remote.supports_env_states) and remote.num_envs == n
    envs = _sub_envs(env)
    return envs is not None and len(envs) == n and all(callable(getattr(e.unwrapped, "set_state", None)) for e in envs)


def _set_env_states(env: Any, states: list[dict[str, Any]]) -> None:
    remote = _remote_states(env)
    if remote is not None:
        remote.set_env_states(states)
        return
    for e, s in zip(_sub_envs(env), states):
        restore_env_state(e, s)
