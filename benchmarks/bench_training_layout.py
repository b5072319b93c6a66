"""Wall time of training several PPO runs: one at a time with subprocess envs vs side by side.

Trains notebook 04's default config (``--seeds`` training seeds x ``--updates`` updates) with each
layout in turn, ``--rounds`` times alternating, and prints each time and the medians:

- ``async-1``: ``workers=1, vector_env="async"`` (one run at a time, each env in its own process);
- ``sync-N``: ``workers=len(seeds), vector_env="sync"`` (all runs at once, each with its envs in its
  process; notebook 04's default).

Both layouts make the same updates (``train_morpho_policies``), so only the time differs.

``--compare native`` times the ``sync-N`` layout with the env's convolutions on the torch path and on the
C kernels (``esper_lib.envs.native``) instead: the same learning problem, float rounding apart.

    .venv/bin/python benchmarks/bench_training_layout.py --updates 8 --rounds 2
    .venv/bin/python benchmarks/bench_training_layout.py --updates 8 --rounds 2 --compare native
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from esper_lib.constants import HEAD_NAMES
from esper_lib.envs import native
from esper_lib.ppo.config import PPOConfig
from esper_lib.training_runs import train_morpho_policies

ENV_KWARGS = {"max_epochs": 16, "batches_per_epoch": None, "train_size": 500}  # notebook 04's env


def notebook_config(updates: int) -> PPOConfig:
    """Notebook 04's default PPO config with ``updates`` updates per run."""
    return PPOConfig(num_envs=4, num_steps=32, total_updates=updates, seq_len=16, epochs=4, minibatch_sequences=2, lr=3e-4,
                     ent_coef=0.01, op_advantage="expected", num_threads=1, seed_group_size=4,
                     head_loss_denominator="relevant_steps", entropy_floor_per_head={"op": 0.8}, entropy_floor_updates=48,
                     entropy_coef_per_head=dict.fromkeys(HEAD_NAMES[1:], 0.0))


def time_layout(layout: str, config: PPOConfig, seeds: list[int], root: Path, env_kwargs: dict = ENV_KWARGS) -> float:
    """Seconds to train ``seeds`` with ``layout`` ("async-1", "sync-N", or "sync-N/torch" and "sync-N/native", which
    also pick the env's kernels) into a fresh folder under ``root``."""
    if "/" in layout:
        layout, kernels = layout.split("/")
        os.environ["ESPER_NATIVE"] = "1" if kernels == "native" else "0"  # worker processes read it at import
        native.enable(kernels == "native")
        root = root / kernels
    if layout == "async-1":
        workers, vector_env = 1, "async"
    elif layout == "sync-N":
        workers, vector_env = len(seeds), "sync"
    else:
        raise ValueError(f"layout must be 'async-1' or 'sync-N', got {layout!r}")
    out = root / layout
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    train_morpho_policies(config, env_kwargs, out, seeds, workers=workers, vector_env=vector_env, progress=False)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=8, help="PPO updates per run")
    ap.add_argument("--rounds", type=int, default=2, help="rounds, each timing both layouts (alternating which goes first)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    ap.add_argument("--compare", choices=("layout", "native"), default="layout",
                    help="layout: async-1 vs sync-N; native: sync-N with the torch path vs the C kernels")
    args = ap.parse_args()
    if args.updates < 1 or args.rounds < 1:
        ap.error(f"--updates and --rounds must be >= 1, got {args.updates} and {args.rounds}")
    if args.compare == "native" and not native.available():
        ap.error("--compare native: the C kernels could not be built here (see the warning above)")
    config = notebook_config(args.updates)
    first, second = ("async-1", "sync-N") if args.compare == "layout" else ("sync-N/torch", "sync-N/native")
    times: dict[str, list[float]] = {first: [], second: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for layout in ([second, first] if r % 2 else [first, second]):
                seconds = time_layout(layout, config, args.seeds, Path(tmp))
                times[layout].append(seconds)
                print(f"round {r}: {layout:13s} {len(args.seeds)} runs x {args.updates} updates  {seconds:7.1f} s", flush=True)
    a, s = statistics.median(times[first]), statistics.median(times[second])
    print(f"median: {first} {a:.1f} s, {second} {s:.1f} s; {second} takes {s / a:.2f}x the time of {first}")


if __name__ == "__main__":
    main()
