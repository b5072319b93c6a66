"""Throughput of the morphogenetic env on this machine's CPU (one env step = one host epoch).

    python benchmarks/bench_env.py [--steps N] [--num-envs K] [--controller random|wait] [--train-size M]

Times ``--steps`` steps (after one warm-up step, resets excluded) of a single ``MorphoEnv``, of a
``SyncVectorEnv`` and of an ``AsyncVectorEnv`` of ``--num-envs`` copies, and prints env-steps/s
(= host epochs/s) and ms per epoch. ``--controller random`` drives every env with the masked random
controller (seeds germinate, train, blend and get pruned, so the cost includes seeds and
counterfactuals); ``wait`` trains the bare host. Each env runs torch with one thread.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import time
from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch

from esper_lib.baselines import AlwaysWaitController, RandomMaskedController
from esper_lib.envs.morpho import make_morpho_env


def _split(obs: dict, i: int) -> dict:
    """Observation of sub-env ``i`` from a batched (vector env) observation."""
    return {k: _split(v, i) if isinstance(v, dict) else v[i] for k, v in obs.items()}


def _controllers(kind: str, n: int) -> list:
    if kind == "random":
        return [RandomMaskedController(seed=i, wait_prob=0.5) for i in range(n)]
    return [AlwaysWaitController() for _ in range(n)]


def bench_single(env_fn: Callable[[], gym.Env], kind: str, steps: int) -> float:
    """Env steps per second of one env (reset excluded, episodes restarted as needed)."""
    env = env_fn()
    (ctrl,) = _controllers(kind, 1)
    obs, _ = env.reset(seed=0)
    obs, *_ = env.step(ctrl.act(obs))  # warm-up
    start = time.perf_counter()
    done_steps, resets = 0, 0.0
    while done_steps < steps:
        obs, _, term, trunc, _ = env.step(ctrl.act(obs))
        done_steps += 1
        if term or trunc:
            t0 = time.perf_counter()
            obs, _ = env.reset()
            resets += time.perf_counter() - t0
    elapsed = time.perf_counter() - start - resets
    env.close()
    return steps / elapsed


def bench_vector(vector_cls: type, env_fn: Callable[[], gym.Env], kind: str, steps: int, num_envs: int) -> float:
    """Env steps per second summed over the sub-envs of a vector env (autoreset included)."""
    venv = vector_cls([env_fn] * num_envs)
    ctrls = _controllers(kind, num_envs)
    obs, _ = venv.reset(seed=list(range(num_envs)))

    def act(o: dict) -> np.ndarray:
        return np.stack([c.act(_split(o, i)) for i, c in enumerate(ctrls)])

    obs, *_ = venv.step(act(obs))  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        obs, *_ = venv.step(act(obs))
    elapsed = time.perf_counter() - start
    venv.close()
    return steps * num_envs / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    parser.add_argument("--num-envs", type=int, default=2, help="sub-envs of the vector envs")
    parser.add_argument("--controller", choices=("random", "wait"), default="random")
    parser.add_argument("--max-epochs", type=int, default=20, help="episode length (autoreset in between)")
    parser.add_argument("--train-size", type=int, default=None, help="train images (default: all 1,437)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    if args.steps < 1 or args.num_envs < 1:
        parser.error("--steps and --num-envs must be >= 1")

    env_fn = functools.partial(
        make_morpho_env, max_epochs=args.max_epochs, train_size=args.train_size, batch_size=args.batch_size
    )
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"controller={args.controller}, max_epochs={args.max_epochs}, train_size={args.train_size or 'all'}, "
        f"batch_size={args.batch_size}, {args.steps} timed steps"
    )
    rows = [("MorphoEnv x1", bench_single(env_fn, args.controller, args.steps))]
    n = args.num_envs
    rows.append((f"SyncVectorEnv x{n}", bench_vector(gym.vector.SyncVectorEnv, env_fn, args.controller, args.steps, n)))
    rows.append((f"AsyncVectorEnv x{n}", bench_vector(gym.vector.AsyncVectorEnv, env_fn, args.controller, args.steps, n)))
    print(f"{'configuration':<22}{'env-steps/s':>14}{'ms/epoch':>12}{'speed-up':>10}")
    base = rows[0][1]
    for name, rate in rows:
        print(f"{name:<22}{rate:>14.1f}{1000 / rate:>12.1f}{rate / base:>10.2f}")


if __name__ == "__main__":
    main()
