"""Env-steps/s of the morphogenetic env behind each vector env kind, in one run on this machine.

    python benchmarks/bench_vector_envs.py [--steps N] [--max-epochs E] [--train-size M] [--controller wait|random]

Two envs stepped by ``SyncVectorEnv`` (this process), ``AsyncVectorEnv`` (one subprocess each) and
``RayVectorEnv`` with one actor holding both envs and with two actors of one env each, all with
SAME_STEP autoreset as PPO uses them (``make_vector_env``). Each kind is timed over ``--steps`` vector
steps after a reset and one warm-up step; autoresets are included. Ray starts a local instance with
2 CPUs first (not timed). One env step = one host epoch; each env runs torch with one thread.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from esper_lib.envs.morpho import MorphoEnv
from esper_lib.evaluation.baselines import AlwaysWaitController, RandomMaskedController
from esper_lib.ppo import make_vector_env

NUM_ENVS = 2


def _row(obs: dict, i: int) -> dict:
    return {k: _row(v, i) if isinstance(v, dict) else v[i] for k, v in obs.items()}


def env_steps_per_s(venv: Any, controller: str, steps: int) -> float:
    """Env steps per second summed over the sub-envs (``steps`` vector steps, autoresets included)."""
    ctrls = [RandomMaskedController(seed=i, wait_prob=0.5) if controller == "random" else AlwaysWaitController() for i in range(NUM_ENVS)]
    try:
        obs, _ = venv.reset(seed=0)
        act = lambda o: np.stack([c.act(_row(o, i)) for i, c in enumerate(ctrls)])  # noqa: E731
        obs, *_ = venv.step(act(obs))  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            obs, *_ = venv.step(act(obs))
        return steps * NUM_ENVS / (time.perf_counter() - start)
    finally:
        venv.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="vector steps timed per kind")
    parser.add_argument("--max-epochs", type=int, default=20)
    parser.add_argument("--train-size", type=int, default=500)
    parser.add_argument("--controller", choices=("wait", "random"), default="wait")
    args = parser.parse_args()
    env_fn: Callable[[], gym.Env] = functools.partial(MorphoEnv, max_epochs=args.max_epochs, train_size=args.train_size)

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024**2)
    kinds = [
        ("SyncVectorEnv, 2 envs", lambda: make_vector_env(env_fn, NUM_ENVS, kind="sync")),
        ("AsyncVectorEnv, 2 processes", lambda: make_vector_env(env_fn, NUM_ENVS, kind="async")),
        ("RayVectorEnv, 1 actor x 2 envs", lambda: make_vector_env(env_fn, NUM_ENVS, kind="ray", envs_per_actor=2)),
        ("RayVectorEnv, 2 actors x 1 env", lambda: make_vector_env(env_fn, NUM_ENVS, kind="ray", envs_per_actor=1)),
    ]
    print(
        f"MorphoEnv(max_epochs={args.max_epochs}, train_size={args.train_size}), controller={args.controller}, "
        f"{args.steps} vector steps; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}"
    )
    try:
        for name, build in kinds:
            rate = env_steps_per_s(build(), args.controller, args.steps)
            print(f"{name:34s} {rate:7.2f} env-steps/s  ({1000 * NUM_ENVS / rate:6.1f} ms per vector step)")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
