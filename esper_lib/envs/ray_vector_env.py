"""``RayVectorEnv``: a Gymnasium vector env whose sub-envs live in Ray actors (one machine or a cluster).

Layout. The ``num_envs`` env factories are split over ``ceil(num_envs / envs_per_actor)`` actors:
actor ``a`` builds envs ``a*k .. min((a+1)*k, num_envs) - 1`` (``k = envs_per_actor``) and keeps
them for its lifetime. Factories are pickled to the actors, so what they reference must be
importable there (``esper_lib`` installed on every node, or shipped with ``runtime_env``).

Step. ``step(actions)`` sends each actor its slice of the actions in one remote call, all actors at
once, and waits for all of them. An actor steps its envs in order with **SAME_STEP autoreset**: an
env that ends is reset (without a seed) within the same call, the step returns the reset
observation, and ``info["final_obs"][i]`` / ``info["final_info"]`` carry the last observation and
info, with the ``_key`` masks. Observations are batched with ``gymnasium.vector.utils.concatenate``
and infos with ``VectorEnv._add_info``, in env order, exactly as ``SyncVectorEnv`` does: for the same
seeds and actions the two return the same arrays, so PPO metrics match bit for bit.

State. ``get_env_states()`` / ``set_env_states()`` capture and restore every sub-env where it lives
(``esper_lib.envs.env_state``), so a ``PPOTrainer`` checkpoint resumes exactly; ``call``,
``get_attr`` and ``set_attr`` behave as in ``SyncVectorEnv``.

Faults. Building the actors waits at most ``start_timeout_s`` seconds (a new actor is a new
process that imports torch), every later round trip at most ``step_timeout_s`` seconds. An env that raises, an
actor that dies and a round trip that times out all raise ``RayEnvError`` naming the env indices,
the method and the cause; the vector env is then broken (later calls raise the same error) and only
``close`` is meaningful. ``close()`` kills every actor (``ray.kill``), whatever state it is in.

Ray is imported only when a ``RayVectorEnv`` is built; without it the ImportError says how to install
the extra. If Ray is not initialised, ``ray.init()`` is called: it joins the cluster named by
``RAY_ADDRESS`` when that is set, else it starts a local instance.
"""
from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from copy import deepcopy
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array, iterate

from esper_lib.envs import native
from esper_lib.envs.env_state import capture_env_state, restore_env_state, supports_env_state

INSTALL_HINT = "pip install -e .[ray]  (or: pip install 'esper-lib[ray]')"


def import_ray() -> Any:
    """The ``ray`` module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"vector_env='ray' needs the optional dependency Ray: {INSTALL_HINT}") from exc
    return ray


class SubEnvError(RuntimeError):
    """Raised inside an actor when sub-env ``index`` fails in ``method`` (``detail``: the traceback)."""

    def __init__(self, index: int, method: str, detail: str):
        super().__init__(index, method, detail)  # args kept positional so the error pickles back
        self.index, self.method, self.detail = index, method, detail

    def __str__(self) -> str:
        return f"env {self.index} raised in {self.method}:\n{self.detail}"


class RayEnvError(RuntimeError):
    """A sub-env of a ``RayVectorEnv`` failed, its actor died, or a call timed out (the message names the envs)."""


class EnvWorker:
    """The actor body: a few sub-envs with consecutive global indices, stepped in order."""

    def __init__(self) -> None:
        self.envs: list[gym.Env] = []
        self.first_index = 0

    @contextmanager
    def _blame(self, j: int, method: str) -> Iterator[None]:
        """Re-raise any error of local env ``j`` as a ``SubEnvError`` naming its global index."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - every env error is reported with its index
            raise SubEnvError(self.first_index + j, method, traceback.format_exc()) from exc

    def build(self, env_fns: Sequence[Callable[[], gym.Env]], first_index: int, native_kernels: bool | None = None) -> dict[str, Any]:
        """Build the envs (with the driver's switch of the C kernels, ``esper_lib.envs.native``); returns their
        spaces and metadata for the driver to check, and whether the kernels run here. None: the actor's own
        ``ESPER_NATIVE`` (on unless 0)."""
        if native_kernels is not None:
            native.enable(native_kernels)
        self.first_index = first_index
        for j, fn in enumerate(env_fns):
            with self._blame(j, "construction"):
                env = fn()
                if not isinstance(env, gym.Env):
                    raise TypeError(f"the env factory must return a gymnasium.Env, got {type(env).__name__}")
            self.envs.append(env)
        first = self.envs[0]
        return {
            "observation_spaces": [e.observation_space for e in self.envs],
            "action_spaces": [e.action_space for e in self.envs],
            "metadata": dict(first.metadata),
            "render_mode": first.render_mode,
            "supports_state": all(supports_env_state(e) for e in self.envs),
            "native_kernels": native.enabled(),
        }

    def reset(self, seeds: Sequence[int | None], options: dict | None) -> list[tuple[Any, dict]]:
        out = []
        for j, (env, seed) in enumerate(zip(self.envs, seeds)):
            with self._blame(j, "reset"):
                out.append(env.reset(seed=seed, options=options))
        return out

    def step(self, actions: Sequence[Any]) -> list[tuple[Any, float, bool, bool, dict, tuple[Any, dict] | None]]:
        """Per env ``(obs, reward, terminated, truncated, info, final)``; ``final = (obs, info)`` of an ended episode, else None."""
        out = []
        for j, (env, action) in enumerate(zip(self.envs, actions)):
            with self._blame(j, "step"):
                obs, reward, terminated, truncated, info = env.step(action)
                final = None
                if terminated or truncated:
                    final = (obs, info)
                    obs, info = env.reset()
            out.append((obs, reward, terminated, truncated, info, final))
        return out

    def call(self, name: str, args: tuple, kwargs: dict) -> list[Any]:
        out = []
        for j, env in enumerate(self.envs):
            with self._blame(j, f"call({name!r})"):
                attr = env.get_wrapper_attr(name)
                out.append(attr(*args, **kwargs) if callable(attr) else attr)
        return out

    def set_attr(self, name: str, values: Sequence[Any]) -> None:
        for j, (env, value) in enumerate(zip(self.envs, values)):
            with self._blame(j, f"set_attr({name!r})"):
                env.set_wrapper_attr(name, value)

    def get_states(self) -> list[dict[str, Any]]:
        out = []
        for j, env in enumerate(self.envs):
            with self._blame(j, "get_state"):
                out.append(capture_env_state(env))
        return out

    def set_states(self, states: Sequence[dict[str, Any]]) -> None:
        for j, (env, state) in enumerate(zip(self.envs, states)):
            with self._blame(j, "set_state"):
                restore_env_state(env, state)

    def close(self) -> None:
        for j, env in enumerate(self.envs):
            with self._blame(j, "close"):
                env.close()


class RayVectorEnv(VectorEnv):
    """Sub-envs in Ray actors, stepped in parallel, SAME_STEP autoreset (see the module docstring).

    :param env_fns: one factory per env (called inside the actors), like ``SyncVectorEnv``'s.
    :param envs_per_actor: envs per actor (>= 1); the last actor may hold fewer.
    :param step_timeout_s: the longest wait for a round trip (reset, step, call, ...), seconds.
    :param start_timeout_s: the longest wait for the actors to start and build their envs, seconds.
    :param copy: return a copy of the batched observation (False: a buffer reused by the next step).
    :param actor_options: passed to ``.options()`` of every actor (``num_cpus``, ``resources``,
        ``runtime_env``, ``scheduling_strategy``, ...); default: Ray's defaults.
    """

    def __init__(
        self,
        env_fns: Sequence[Callable[[], gym.Env]],
        *,
        envs_per_actor: int = 1,
        step_timeout_s: float = 120.0,
        start_timeout_s: float = 300.0,
        copy: bool = True,
        actor_options: dict[str, Any] | None = None,
    ):
        if not isinstance(env_fns, Sequence) or len(env_fns) == 0 or not all(callable(f) for f in env_fns):
            raise ValueError("env_fns must be a non-empty sequence of callables returning gymnasium.Env")
        if not isinstance(envs_per_actor, int) or isinstance(envs_per_actor, bool) or envs_per_actor < 1:
            raise ValueError(f"envs_per_actor must be an int >= 1, got {envs_per_actor!r}")
        for name, value in (("step_timeout_s", step_timeout_s), ("start_timeout_s", start_timeout_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        ray = self._ray = import_ray()
        if not ray.is_initialized():
            ray.init()
        self.num_envs = len(env_fns)
        self.envs_per_actor = envs_per_actor
        self.step_timeout_s = float(step_timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self.copy = copy
        self.autoreset_mode = AutoresetMode.SAME_STEP
        self._error: str | None = None
        n, k = self.num_envs, envs_per_actor
        self._slices = [range(s, min(s + k, n)) for s in range(0, n, k)]
        remote_cls = ray.remote(EnvWorker)
        self._actors = [remote_cls.options(**(actor_options or {})).remote() for _ in self._slices]
        try:
            switch = native.switched_on()  # the actors follow the driver's switch (a failed build there warns)
            refs = [a.build.remote([env_fns[i] for i in sl], sl.start, switch) for a, sl in zip(self._actors, self._slices)]
            infos = self._gather(refs, "construction", self.start_timeout_s)
            self._check_spaces(infos)
        except BaseException:
            self.close()
            raise
        first = infos[0]
        self.single_observation_space = first["observation_spaces"][0]
        self.single_action_space = first["action_spaces"][0]
        self.observation_space = batch_space(self.single_observation_space, n)
        self.action_space = batch_space(self.single_action_space, n)
        self.metadata = {**first["metadata"], "autoreset_mode": AutoresetMode.SAME_STEP}
        self.render_mode = first["render_mode"]
        self.supports_env_states = all(info["supports_state"] for info in infos)
        self.native_kernels = [info["native_kernels"] for info in infos]  # per actor: whether the C kernels run there
        self._observations = create_empty_array(self.single_observation_space, n=n, fn=np.zeros)

    @property
    def actors(self) -> tuple[Any, ...]:
        """The actor handles, actor ``a`` holding envs ``a*envs_per_actor ...`` (for inspection and fault tests)."""
        return tuple(self._actors)

    def actor_of(self, env_index: int) -> int:
        """Index of the actor that holds env ``env_index``."""
        return env_index // self.envs_per_actor

    # --- round trips -------------------------------------------------------------------------------

    def _gather(self, refs: list[Any], method: str, timeout_s: float | None = None) -> list[Any]:
        """Results of one remote call per actor (actor order); raises ``RayEnvError`` on the first failure.

        Waits at most ``timeout_s`` (default ``step_timeout_s``) seconds for all of them.
        """
        timeout_s = self.step_timeout_s if timeout_s is None else timeout_s
        ray = self._ray
        pending = {ref: a for a, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        deadline = time.monotonic() + timeout_s
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = sorted(pending.values())
                envs = [i for a in late for i in self._slices[a]]
                name = "start_timeout_s" if method == "construction" else "step_timeout_s"
                self._fail(f"env(s) {envs} (actor(s) {late}) gave no result for {method} within {name}={timeout_s:g} s")
            for ref in ready:
                a = pending.pop(ref)
                results[a] = self._get(ref, a, method)
        return results

    def _get(self, ref: Any, a: int, method: str) -> Any:
        exceptions = self._ray.exceptions
        envs = list(self._slices[a])
        try:
            return self._ray.get(ref)
        except exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, SubEnvError):
                self._fail(str(cause), exc)
            self._fail(f"actor {a} (envs {envs}) raised in {method}: {exc}", exc)
        except exceptions.RayActorError as exc:
            self._fail(f"the actor of env(s) {envs} (actor {a}) died during {method}: {type(exc).__name__}", exc)

    def _fail(self, message: str, cause: BaseException | None = None) -> None:
        self._error = message
        raise RayEnvError(f"RayVectorEnv: {message}") from cause

    def _each(self, method: str, per_actor_args: Sequence[tuple] | None = None) -> list[Any]:
        """Call ``method`` on every actor (with ``per_actor_args[a]``) and gather the results."""
        if self._error is not None:
            raise RayEnvError(f"RayVectorEnv is broken by an earlier failure ({self._error}); close it and build a new one")
        if self.closed:
            raise RayEnvError("RayVectorEnv is closed")
        args = per_actor_args or [()] * len(self._actors)
        return self._gather([getattr(actor, method).remote(*a) for actor, a in zip(self._actors, args)], method)

    def _split(self, values: Sequence[Any]) -> list[list[Any]]:
        return [[values[i] for i in sl] for sl in self._slices]

    def _check_spaces(self, infos: list[dict[str, Any]]) -> None:
        obs0, act0 = infos[0]["observation_spaces"][0], infos[0]["action_spaces"][0]
        for sl, info in zip(self._slices, infos):
            for i, obs_space, act_space in zip(sl, info["observation_spaces"], info["action_spaces"]):
                if obs_space != obs0 or act_space != act0:
                    raise ValueError(f"env {i} has other spaces than env 0: {obs_space} / {act_space} vs {obs0} / {act0}")

    # --- the VectorEnv API -------------------------------------------------------------------------

    def reset(self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """Reset every env; ``seed`` None, an int (env i gets ``seed + i``) or one seed per env."""
        n = self.num_envs
        if options is not None and "reset_mask" in options:
            raise ValueError("RayVectorEnv.reset: options['reset_mask'] is not supported (SAME_STEP autoreset resets ended envs itself)")
        if seed is None:
            seeds: list[int | None] = [None] * n
        elif isinstance(seed, int):
            seeds = [seed + i for i in range(n)]
        else:
            seeds = list(seed)
        if len(seeds) != n:
            raise ValueError(f"RayVectorEnv.reset: seed must be None, an int or {n} seeds, got {len(seeds)}")
        per_actor = self._each("reset", [(s, options) for s in self._split(seeds)])
        results = [r for part in per_actor for r in part]
        infos: dict[str, Any] = {}
        for i, (_, info) in enumerate(results):
            infos = self._add_info(infos, info, i)
        self._observations = concatenate(self.single_observation_space, [obs for obs, _ in results], self._observations)
        return (deepcopy(self._observations) if self.copy else self._observations), infos

    def step(self, actions: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Step every env with its action (batched as ``action_space``); SAME_STEP autoreset."""
        per_env = list(iterate(self.action_space, actions))
        if len(per_env) != self.num_envs:
            raise ValueError(f"RayVectorEnv.step: got {len(per_env)} actions for {self.num_envs} envs")
        per_actor = self._each("step", [(part,) for part in self._split(per_env)])
        results = [r for part in per_actor for r in part]
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        terminated = np.zeros(self.num_envs, dtype=np.bool_)
        truncated = np.zeros(self.num_envs, dtype=np.bool_)
        infos: dict[str, Any] = {}
        for i, (_, reward, term, trunc, info, final) in enumerate(results):
            rewards[i], terminated[i], truncated[i] = reward, term, trunc
            if final is not None:
                infos = self._add_info(infos, {"final_obs": final[0], "final_info": final[1]}, i)
            infos = self._add_info(infos, info, i)
        self._observations = concatenate(self.single_observation_space, [r[0] for r in results], self._observations)
        return (deepcopy(self._observations) if self.copy else self._observations), rewards, terminated, truncated, infos

    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """``name(*args, **kwargs)`` on every env (or the attribute's value), in env order."""
        return tuple(r for part in self._each("call", [(name, args, kwargs)] * len(self._actors)) for r in part)

    def get_attr(self, name: str) -> tuple[Any, ...]:
        return self.call(name)

    def set_attr(self, name: str, values: list[Any] | tuple[Any, ...] | Any) -> None:
        """Set attribute ``name`` on every env: one value for all, or a list/tuple of ``num_envs`` values."""
        if not isinstance(values, (list, tuple)):
            values = [values] * self.num_envs
        if len(values) != self.num_envs:
            raise ValueError(f"RayVectorEnv.set_attr: values must have {self.num_envs} entries, got {len(values)}")
        self._each("set_attr", [(name, part) for part in self._split(values)])

    def get_env_states(self) -> list[dict[str, Any]] | None:
        """Every env's captured state (``esper_lib.envs.env_state``), or None when an env has no get_state/set_state."""
        if not self.supports_env_states:
            return None
        return [s for part in self._each("get_states") for s in part]

    def set_env_states(self, states: Sequence[dict[str, Any]]) -> None:
        """Restore states from ``get_env_states`` (one per env)."""
        if not self.supports_env_states:
            raise ValueError("RayVectorEnv.set_env_states: some env has no get_state/set_state")
        if len(states) != self.num_envs:
            raise ValueError(f"RayVectorEnv.set_env_states: states must have {self.num_envs} entries, got {len(states)}")
        self._each("set_states", [(part,) for part in self._split(list(states))])

    def close_extras(self, **kwargs: Any) -> None:
        """Close the envs (healthy actors only, at most 10 s), kill every actor and wait until each is gone."""
        ray = getattr(self, "_ray", None)
        actors = getattr(self, "_actors", [])
        if ray is None or not actors or not ray.is_initialized():
            return
        if self._error is None:
            refs = [a.close.remote() for a in actors]
            ray.wait(refs, num_returns=len(refs), timeout=min(self.step_timeout_s, 10.0))
        for actor in actors:
            ray.kill(actor, no_restart=True)
        # ray.kill is asynchronous: poll until every actor answers as dead, so close() really releases them.
        alive, deadline = list(actors), time.monotonic() + 30.0
        while alive and time.monotonic() < deadline:
            pings = [a.__ray_ready__.remote() for a in alive]
            ray.wait(pings, num_returns=len(pings), timeout=1.0)
            alive = [a for a, ref in zip(alive, pings) if not _is_dead(ray, ref)]
            if alive:
                time.sleep(0.05)

    def __repr__(self) -> str:
        return f"RayVectorEnv(num_envs={self.num_envs}, envs_per_actor={self.envs_per_actor}, actors={len(self._slices)})"



def _is_dead(ray: Any, ping: Any) -> bool:
    """Whether an actor's ``__ray_ready__`` ping (already waited for) failed because the actor is dead."""
    ready, _ = ray.wait([ping], timeout=0)
    if not ready:
        return False
    try:
        ray.get(ping)
    except ray.exceptions.RayActorError:
        return True
    return False
