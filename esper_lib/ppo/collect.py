"""Rollout collection from Gymnasium envs with a carried LSTM state.

Accepted envs: a single ``gymnasium.Env`` (wrapped as a one-env vector env with same-step
autoreset) or a ``gymnasium.vector.VectorEnv`` whose ``metadata["autoreset_mode"]`` is

- ``SAME_STEP`` (preferred; ``make_vector_env`` builds this, in this process, in subprocesses or in
  Ray actors): when an env finishes, the step returns
  the first observation of the next episode and the final observation sits in
  ``info["final_obs"][i]``. The truncation bootstrap is computed from that final observation.
- ``NEXT_STEP`` (gymnasium's default): the step that ends an episode returns the final observation;
  the next step ignores its action, resets and returns reward 0. That ignored step is stored with
  ``valid=False``: it gets no advantage, no loss and no statistics, and cuts the GAE chain.

``DISABLED`` raises. Per env the collector carries the LSTM state, zeroes it when an episode starts
(and marks ``episode_starts``), stores it at every sequence start, and at a time-limit truncation
bootstraps from the final observation with the carried state (the state after the last step).
``terminated`` never bootstraps.

Non-finite values: every reward and every observed ``state`` (reset, step, final observation) is
checked as it arrives (one ``isfinite`` reduction per step each), before the normaliser ingests it;
a NaN or inf raises ``NonFiniteError`` naming the env, the feature, the rollout step and the update.

Device traffic (the policy may sit on a GPU while the envs run on CPUs): per step, the observation
(state, blueprint indices and every mask) is packed on the host into one float32 row per env and
moved in **one** host-to-device copy; the step's rewards and flags in one more; the sampled actions
come back in **one** device-to-host copy. Episode bookkeeping stays in numpy on the host. On the CPU
these copies are no-ops.
"""
from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv, VectorEnv

from esper_lib.constants import HEAD_NAMES
from esper_lib.envs.spaces import actions_to_array
from esper_lib.finite import check_finite
from esper_lib.network import FactoredRecurrentActorCritic
from esper_lib.ppo.buffer import RolloutBuffer, greedy_value
from esper_lib.ppo.config import VECTOR_ENV_KINDS
from esper_lib.ppo.normalization import RunningObsNormalizer

MASK_KEYS = (*HEAD_NAMES, "slot_by_op")


class RolloutStats(NamedTuple):
    """What one ``collect`` saw: finished episodes and timing."""

    episode_returns: list[float]
    episode_lengths: list[int]
    env_steps: int  # valid steps (transitions that count)
    seconds: float


class SingleEnvAdapter:
    """A ``gymnasium.Env`` seen as a one-env vector env with SAME_STEP autoreset (no copying of spaces)."""

    def __init__(self, env: gym.Env):
        self.env = env
        self.envs = [env]
        self.num_envs = 1
        self.single_observation_space = env.observation_space
        self.single_action_space = env.action_space
        self.metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        obs, info = self.env.reset(seed=seed, options=options)
        return _batch(obs), info

    def step(self, actions: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict]:
        obs, reward, terminated, truncated, info = self.env.step(np.asarray(actions)[0])
        infos: dict[str, Any] = {}
        if terminated or truncated:
            final = np.full(1, None, dtype=object)
            final[0] = obs
            infos = {"final_obs": final, "_final_obs": np.ones(1, dtype=bool), "final_info": info}
            obs, info = self.env.reset()
        return (
            _batch(obs),
            np.array([reward], dtype=np.float64),
            np.array([terminated], dtype=bool),
            np.array([truncated], dtype=bool),
            infos,
        )

    def close(self) -> None:
        self.env.close()


def _batch(obs: Any) -> Any:
    if isinstance(obs, dict):
        return {k: _batch(v) for k, v in obs.items()}
    return np.asarray(obs)[None]


def make_vector_env(
    env_fn: Callable[[], gym.Env], num_envs: int, kind: str | None = None, **options: Any
) -> VectorEnv | SingleEnvAdapter:
    """``num_envs`` copies of ``env_fn()`` in a vector env with SAME_STEP autoreset.

    :param kind: where the envs run: ``"sync"`` (this process, ``SyncVectorEnv``), ``"async"`` (one
        process per env, ``AsyncVectorEnv``) or ``"ray"`` (Ray actors,
        ``esper_lib.envs.ray_vector_env.RayVectorEnv``; needs the ``ray`` extra). None (the old
        two-argument call): "sync", except that one env alone comes as a ``SingleEnvAdapter``.
    :param options: passed to the vector env's constructor, e.g. ``envs_per_actor=2,
        step_timeout_s=60`` for ``"ray"``, ``context="spawn"`` for ``"async"``.

    With ``kind="sync"``, ``env_fn`` may also return a ``VectorEnv`` (used as is; its ``num_envs``
    must match). The other kinds call ``env_fn`` in their workers, where it must return a ``gymnasium.Env``.
    """
    if kind is not None and kind not in VECTOR_ENV_KINDS:
        raise ValueError(f"kind must be one of {VECTOR_ENV_KINDS}, got {kind!r}")
    if not isinstance(num_envs, int) or isinstance(num_envs, bool) or num_envs < 1:
        raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
    if kind == "async":
        return AsyncVectorEnv([env_fn] * num_envs, copy=False, autoreset_mode=AutoresetMode.SAME_STEP, **options)
    if kind == "ray":
        from esper_lib.envs.ray_vector_env import RayVectorEnv  # imports ray (optional extra) only now

        return RayVectorEnv([env_fn] * num_envs, copy=False, **options)
    first = env_fn()
    if isinstance(first, VectorEnv):
        if first.num_envs != num_envs:
            raise ValueError(f"env_fn returned a vector env with {first.num_envs} envs, config.num_envs is {num_envs}")
        return first
    if not isinstance(first, gym.Env):
        raise TypeError(f"env_fn must return a gymnasium.Env or VectorEnv, got {type(first).__name__}")
    if num_envs == 1 and kind is None and not options:
        return SingleEnvAdapter(first)
    fns = [lambda first=first: first] + [env_fn] * (num_envs - 1)
    # copy=False: the collector copies every observation into its own tensors at once.
    return SyncVectorEnv(fns, copy=False, autoreset_mode=AutoresetMode.SAME_STEP, **options)


def as_vector_env(env: Any) -> VectorEnv | SingleEnvAdapter:
    if isinstance(env, (VectorEnv, SingleEnvAdapter)):
        return env
    if isinstance(env, gym.Env):
        return SingleEnvAdapter(env)
    raise TypeError(f"env must be a gymnasium.Env or gymnasium.vector.VectorEnv, got {type(env).__name__}")


def autoreset_mode_of(env: Any) -> AutoresetMode:
    mode = env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
    mode = AutoresetMode(mode) if not isinstance(mode, AutoresetMode) else mode
    if mode == AutoresetMode.DISABLED:
        raise ValueError("vector envs with autoreset_mode=DISABLED are not supported; use SAME_STEP (recommended) or NEXT_STEP")
    return mode


class RolloutCollector:
    """Steps envs with the policy and fills a ``RolloutBuffer``.

    Args:
        env: a ``gymnasium.Env`` or ``VectorEnv`` (see the module docstring for autoreset modes).
        policy: the network; sampling uses ``generator`` so runs are reproducible.
        normalizer: running normaliser of ``state`` (updated with every observation received), or None.
        generator: torch RNG for action sampling.
    """

    def __init__(
        self,
        env: Any,
        policy: FactoredRecurrentActorCritic,
        normalizer: RunningObsNormalizer | None,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
    ):
        self.env = as_vector_env(env)
        self.mode = autoreset_mode_of(self.env)
        self.policy = policy
        self.normalizer = normalizer
        self.generator = generator
        self.device = torch.device(device)
        space = self.env.single_observation_space
        try:
            self.state_dim = int(space["state"].shape[0])
            self.num_slots = int(space["blueprint_indices"].shape[0])
        except (KeyError, TypeError) as exc:
            raise ValueError("env observation space must be the Tamiyo Dict space (esper_lib.envs.spaces.observation_space)") from exc
        if self.state_dim != policy.state_dim or self.num_slots != policy.num_slots:
            raise ValueError(
                f"env has state_dim={self.state_dim}, num_slots={self.num_slots}; the policy was built for "
                f"state_dim={policy.state_dim}, num_slots={policy.num_slots}"
            )
        N = self.num_envs = self.env.num_envs
        dev = self.device
        self._state = torch.zeros(N, self.state_dim, device=dev)
        self._bp = torch.zeros(N, self.num_slots, dtype=torch.int64, device=dev)
        self._masks = {
            k: torch.zeros((N, *space["action_mask"][k].shape), dtype=torch.bool, device=dev) for k in MASK_KEYS
        }
        self.hidden = policy.initial_hidden(N, dev)
        self._episode_start = torch.ones(N, dtype=torch.bool, device=dev)
        self._pending = np.zeros(N, dtype=bool)  # NEXT_STEP: the next action of these envs is ignored (host side)
        # host staging row per env: [state | blueprint indices | every mask flattened], float32 (exact for
        # the small ints and the 0/1 masks); pinned when the policy is on a GPU so the copy can be async
        self._mask_shapes = {k: tuple(space["action_mask"][k].shape) for k in MASK_KEYS}
        widths = [self.state_dim, self.num_slots, *(int(np.prod(shape)) for shape in self._mask_shapes.values())]
        self._offsets = np.cumsum([0, *widths]).tolist()
        self._staging = torch.zeros(N, self._offsets[-1], dtype=torch.float32, pin_memory=dev.type == "cuda")
        self._staging_np = self._staging.numpy()
        self._ep_return = np.zeros(N, dtype=np.float64)
        self._ep_len = np.zeros(N, dtype=np.int64)
        self.started = False

    # --- observations ---------------------------------------------------------------------

    def _ingest(self, obs: dict, update_stats: bool = True, where: str = "") -> None:
        """Copy a batched observation into the staging tensors (one host-to-device copy; normalises the state)."""
        stage, off = self._staging_np, self._offsets
        stage[:, off[0] : off[1]] = obs["state"]  # [N, state_dim]
        stage[:, off[1] : off[2]] = obs["blueprint_indices"]  # [N, num_slots]
        for j, k in enumerate(MASK_KEYS):
            stage[:, off[2 + j] : off[3 + j]] = np.asarray(obs["action_mask"][k]).reshape(self.num_envs, -1)
        # non_blocking is safe: the staging buffer is next written after the actions came back (a sync)
        packed = self._staging.to(self.device, non_blocking=True)  # [N, width]
        state = packed[:, off[0] : off[1]]
        check_finite("observation state", state, axes=("env", "feature"), where=where)
        if self.normalizer is not None:
            if update_stats:
                self.normalizer.update(state)
            self.normalizer.normalize(state, out=self._state)
        else:
            self._state.copy_(state)
        self._bp.copy_(packed[:, off[1] : off[2]])
        for j, k in enumerate(MASK_KEYS):
            self._masks[k].copy_(packed[:, off[2 + j] : off[3 + j]].view(self.num_envs, *self._mask_shapes[k]))

    def _tensors(self, states: np.ndarray, bps: np.ndarray, masks: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Normalised tensors for a few observations (bootstrap path; statistics untouched)."""
        state = torch.from_numpy(np.asarray(states, dtype=np.float32)).to(self.device)
        if self.normalizer is not None:
            state = self.normalizer.normalize(state)
        bp = torch.from_numpy(np.asarray(bps, dtype=np.int64)).to(self.device)
        return state, bp, {k: torch.from_numpy(np.asarray(v)).to(self.device).bool() for k, v in masks.items()}

    # --- lifecycle ---------------------------------------------------------------------------

    def reset(self, seed: int | list[int] | None = None) -> None:
        """Reset every env (seeded: env i gets ``seed + i`` in a vector env, or ``seed[i]`` from a list) and the carried state."""
        obs, _ = self.env.reset(seed=seed)
        self._ingest(obs, where=" returned by env.reset")
        self.hidden = self.policy.initial_hidden(self.num_envs, self.device)
        self._episode_start.fill_(True)
        self._pending[:] = False
        self._ep_return[:] = 0.0
        self._ep_len[:] = 0
        self.started = True

    @torch.no_grad()
    def _bootstrap(
        self, hidden: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor, final_obs: list[dict], where: str = ""
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Q(s', sampled op), sum_o pi(o | s') Q(s', o), max over valid o of Q(s', o)) for the final
        observations of envs ``idx``."""
        states = np.stack([np.asarray(o["state"], dtype=np.float32) for o in final_obs])
        for env, row in zip(idx.tolist(), states) if not np.isfinite(states).all() else ():
            check_finite("final observation state", torch.from_numpy(row), axes=("feature",), where=f" of env {env}{where}")
        state, bp, masks = self._tensors(
            states,
            np.stack([o["blueprint_indices"] for o in final_obs]),
            {k: np.stack([o["action_mask"][k] for o in final_obs]) for k in MASK_KEYS},
        )
        res = self.policy.get_action(state, bp, (hidden[0][:, idx], hidden[1][:, idx]), masks, return_q_all=True, generator=self.generator)
        return res.value, (res.q_all * res.op_probs).sum(-1), greedy_value(res.q_all, res.masks["op"])

    @torch.no_grad()
    def collect(self, buffer: RolloutBuffer, *, update: int | None = None) -> RolloutStats:
        """Fill ``buffer`` (reset first) with ``buffer.num_steps`` steps and ``finish`` it.

        ``update`` (optional) only names the update in the message of a ``NonFiniteError``.
        """
        if buffer.num_envs != self.num_envs:
            raise ValueError(f"buffer has {buffer.num_envs} envs, the collector steps {self.num_envs}")
        if not self.started:
            self.reset()
        t0 = time.perf_counter()
        buffer.reset()
        policy, gen = self.policy, self.generator
        same_step = self.mode == AutoresetMode.SAME_STEP
        returns: list[float] = []
        lengths: list[int] = []
        valid_steps = 0
        of_update = f" of update {update}" if update is not None else ""
        for step in range(buffer.num_steps):
            where = f" at rollout step {step}{of_update}"
            hidden_in = self.hidden
            res = policy.get_action(self._state, self._bp, hidden_in, self._masks, return_q_all=True, generator=gen)
            obs, reward, terminated, truncated, info = self.env.step(actions_to_array(res.actions))  # one device-to-host copy
            # flags on the host (numpy), then one host-to-device copy of [reward, term, trunc, valid, starts]
            valid = ~self._pending
            rew = np.asarray(reward, dtype=np.float32)
            check_finite("reward", torch.from_numpy(rew), axes=("env",), where=where)
            term = np.asarray(terminated, dtype=bool) & valid
            trunc = np.asarray(truncated, dtype=bool) & valid & ~term
            done = term | trunc
            starts = done if same_step else self._pending  # NEXT_STEP: after the ignored step obs is a fresh reset
            rows = np.stack([rew * valid, term, trunc, valid, starts]).astype(np.float32)
            flags = torch.from_numpy(rows).to(self.device)  # [5, N]
            t = buffer.add(
                state=self._state,
                blueprint_indices=self._bp,
                actions=res.actions,
                masks=res.masks,
                log_probs=res.log_probs,
                values=res.value,
                q_all=res.q_all,
                op_probs=res.op_probs,
                rewards=flags[0],
                terminated=flags[1].bool(),
                truncated=flags[2].bool(),
                episode_starts=self._episode_start,
                valid=flags[3].bool(),
                hidden=hidden_in,
            )
            if trunc.any():
                idx_np = trunc.nonzero()[0]
                if same_step:
                    final = [info["final_obs"][i] for i in idx_np.tolist()]
                else:
                    final = [_row(obs, i) for i in idx_np.tolist()]
                idx = torch.from_numpy(idx_np).to(self.device)
                sampled, expected, greedy = self._bootstrap(res.hidden, idx, final, where=where)
                buffer.set_bootstrap(t, idx, sampled, expected, greedy)
            # episode bookkeeping (numpy, vectorised)
            self._ep_return += np.asarray(reward, dtype=np.float64) * valid
            self._ep_len += valid
            valid_steps += int(valid.sum())
            if done.any():
                returns.extend(self._ep_return[done].tolist())
                lengths.extend(self._ep_len[done].tolist())
                self._ep_return[done] = 0.0
                self._ep_len[done] = 0
            # next observation and carried state
            self._ingest(obs, where=f" returned by env.step{where}")
            if not same_step:
                self._pending = done
            keep = (1.0 - flags[4]).to(res.hidden[0].dtype).view(1, -1, 1)
            self.hidden = (res.hidden[0] * keep, res.hidden[1] * keep)
            self._episode_start = flags[4].bool()
        res = policy.get_action(self._state, self._bp, self.hidden, self._masks, return_q_all=True, generator=gen)
        buffer.finish(res.value, (res.q_all * res.op_probs).sum(-1), greedy_value(res.q_all, res.masks["op"]))
        return RolloutStats(returns, lengths, valid_steps, time.perf_counter() - t0)

    # --- checkpointing ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The carried state between rollouts (tensors), for exact resumption."""
        return {
            "state": self._state.cpu().clone(),
            "blueprint_indices": self._bp.cpu().clone(),
            "masks": {k: v.cpu().clone() for k, v in self._masks.items()},
            "hidden": (self.hidden[0].cpu().clone(), self.hidden[1].cpu().clone()),
            "episode_start": self._episode_start.cpu().clone(),
            "pending": torch.from_numpy(self._pending.copy()),
            "ep_return": torch.from_numpy(self._ep_return.copy()),
            "ep_len": torch.from_numpy(self._ep_len.copy()),
            "started": self.started,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["state"].shape) != tuple(self._state.shape) or tuple(state["hidden"][0].shape) != tuple(self.hidden[0].shape):
            raise ValueError(
                f"collector state is for {tuple(state['state'].shape)} states / {tuple(state['hidden'][0].shape)} hidden; "
                f"this collector has {tuple(self._state.shape)} / {tuple(self.hidden[0].shape)}"
            )
        self._state.copy_(state["state"])
        self._bp.copy_(state["blueprint_indices"])
        for k in MASK_KEYS:
            self._masks[k].copy_(state["masks"][k])
        self.hidden = (state["hidden"][0].to(self.device).clone(), state["hidden"][1].to(self.device).clone())
        self._episode_start = state["episode_start"].to(self.device).clone()
        self._pending = state["pending"].cpu().numpy().astype(bool)
        self._ep_return = state["ep_return"].numpy().copy()
        self._ep_len = state["ep_len"].numpy().copy()
        self.started = bool(state["started"])

    def close(self) -> None:
        self.env.close()


def _row(obs: Any, i: int) -> Any:
    if isinstance(obs, dict):
        return {k: _row(v, i) for k, v in obs.items()}
    return np.asarray(obs)[i]
