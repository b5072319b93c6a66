"""Play whole morphogenetic-env episodes with one of bench_env's controllers, for an outside profiler.

    perf record -D 6000 -F 2000 -o perf.data .venv/bin/python benchmarks/run_episodes.py --controller random --episodes 150 --native on
    perf report -i perf.data --no-children --sort dso,symbol

``-D 6000`` skips the imports; each episode builds a fresh ``MorphoEnv`` (resets are included). Prints the env
steps played and their wall time. ``--native`` as in ``bench_env.py``: ``on`` the C kernels, ``off`` the torch path.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from esper_lib.envs import native
from esper_lib.envs.morpho import MorphoEnv

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path (tests)
from bench_env import _controllers  # noqa: E402


def play(kind: str, episodes: int) -> int:
    """Play ``episodes`` episodes (env seeds 0, 1, ...) with a fresh ``kind`` controller each; returns the steps."""
    steps = 0
    for seed in range(episodes):
        env, (ctrl,) = MorphoEnv(), _controllers(kind, 1)
        obs, _ = env.reset(seed=seed)
        done = False
        while not done:
            obs, _, term, trunc, _ = env.step(ctrl.act(obs))
            done, steps = term or trunc, steps + 1
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--controller", choices=("random", "wait", "schedule", "grown"), default="random")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--native", choices=("off", "on"), default="on")
    args = parser.parse_args()
    if args.episodes < 1:
        parser.error("--episodes must be >= 1")
    if args.native == "on" and not native.available():
        parser.error("--native on: the C kernels could not be built here (see the warning above)")
    native.enable(args.native == "on")
    start = time.perf_counter()
    steps = play(args.controller, args.episodes)
    elapsed = time.perf_counter() - start
    print(f"{args.controller}, kernels {args.native}: {steps} env steps in {elapsed:.1f} s ({1000 * elapsed / steps:.2f} ms per step)")


if __name__ == "__main__":
    main()
