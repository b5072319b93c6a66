"""Screen one PPO lever on the morphogenetic env: train one seed, read it out on held-out seeds against WAIT.

A screening run, not an evaluation (design section 5b): one training seed, 12 held-out env seeds,
no confidence interval beyond a standard error. It says whether a lever is worth a full notebook-04
run (3 training seeds, 20 held-out seeds, paired bootstrap CIs). Each run appends one JSON line to
``--out`` (default ``artefacts/ppo_screening/results.jsonl``) and keeps its training files under
``artefacts/ppo_screening/<name>/seed_<k>/``.

Baseline: notebook 04's defaults (4 async envs x 32 steps, 72 updates, seq_len 16, lr 3e-4,
ent_coef 0.01, ``op_advantage="expected"``, MorphoEnv with 16 epochs and 500 train images);
``--set`` overrides ``PPOConfig`` fields with JSON values, ``--env`` the env's arguments.

Example (the runs recorded in docs/ppo_morpho.md, one line per lever and training seed)::

    python scripts/ppo_screening.py --name opent3 --train-seed 0 --set entropy_coef_per_head='{"op": 3.0}'
    python scripts/ppo_screening.py --name ns64 --train-seed 1 --set num_steps=64 --set total_updates=36
"""
from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from esper_lib.envs.morpho import MorphoEnv
from esper_lib.evaluation.baselines import AlwaysWaitController, evaluate_controller
from esper_lib.ppo import PPOConfig
from esper_lib.training_runs import greedy_controller, sampling_controller, train_morpho_policy

BASE_CONFIG = dict(num_envs=4, num_steps=32, seq_len=16, epochs=4, lr=3e-4, ent_coef=0.01, op_advantage="expected",
                   total_updates=72, num_threads=1)
BASE_ENV = dict(max_epochs=16, train_size=500)
HELDOUT_SEEDS = list(range(10_000, 10_012))


def _assignment(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=JSON_VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{key}: value {value!r} is not JSON ({err})") from err


def write_report(results: Path, report: Path) -> None:
    """A markdown table of the screening runs in ``results`` (one row per lever and training seed)."""
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{results} holds no screening run")
    lines = ["| lever | overrides | training seed | env steps | train s | training return first / last 20% "
             "| greedy - WAIT | sampled - WAIT (SE) | greedy ops, first held-out seed |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | `{json.dumps(r['overrides'])}` | {r['train_seed']} | {r['env_steps']:,} | {r['train_s']} "
                     f"| {r['train_return_first20pct']:.3f} / {r['train_return_last20pct']:.3f} | {r['greedy_vs_wait']:+.3f} "
                     f"| {r['sampled_vs_wait']:+.3f} ({r['sampled_vs_wait_se']:.3f}) | `{r['greedy_ops_first_seed']}` |")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines) + "\n")
    print(f"wrote {report} ({len(rows)} runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", help="label of the lever (folder and JSON line)")
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--set", type=_assignment, action="append", default=[], metavar="FIELD=JSON", help="PPOConfig override")
    parser.add_argument("--env", type=_assignment, action="append", default=[], metavar="ARG=JSON", help="MorphoEnv override")
    parser.add_argument("--out", type=Path, default=Path("artefacts/ppo_screening/results.jsonl"))
    parser.add_argument("--report", type=Path, metavar="MARKDOWN", help="only write a table of the runs in --out to this file")
    args = parser.parse_args()
    if args.report is not None:
        write_report(args.out, args.report)
        return

    if not args.name:
        parser.error("--name is required to train (or pass --report)")
    config = PPOConfig(**{**BASE_CONFIG, **dict(args.set)})
    env_kwargs = {**BASE_ENV, **dict(args.env)}
    run_dir = args.out.parent / args.name / f"seed_{args.train_seed}"
    start = time.perf_counter()
    run = train_morpho_policy(config, env_kwargs, run_dir, train_seed=args.train_seed, vector_env="async", progress=True)
    train_seconds = time.perf_counter() - start

    env_fn = partial(MorphoEnv, **env_kwargs)
    wait = evaluate_controller(AlwaysWaitController(), env_fn, HELDOUT_SEEDS, name="wait")["return"].to_numpy()
    greedy = evaluate_controller(greedy_controller(run.checkpoint), env_fn, HELDOUT_SEEDS, name="greedy")
    sampled = evaluate_controller(sampling_controller(run.checkpoint, seed=1), env_fn, HELDOUT_SEEDS, name="sampled")
    episodes, n = run.episodes, len(run.episodes)
    sampled_diff = sampled["return"].to_numpy() - wait
    row = {
        "name": args.name, "train_seed": args.train_seed, "overrides": {**dict(args.set), **{f"env.{k}": v for k, v in args.env}},
        "config": config.to_dict(), "env": env_kwargs,
        "train_s": round(train_seconds), "env_steps": int(run.metrics.env_steps.max()),
        "train_return_first20pct": round(float(episodes["return"].iloc[: n // 5].mean()), 4),
        "train_return_last20pct": round(float(episodes["return"].iloc[n - n // 5:].mean()), 4),
        "greedy_vs_wait": round(float((greedy["return"].to_numpy() - wait).mean()), 4),
        "sampled_vs_wait": round(float(sampled_diff.mean()), 4),
        "sampled_vs_wait_se": round(float(sampled_diff.std(ddof=1) / np.sqrt(len(sampled_diff))), 4),
        "greedy_distinct_sequences": int(greedy["ops"].nunique()),
        "greedy_ops_first_seed": greedy["ops"].iloc[0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(pd.Series({k: v for k, v in row.items() if k not in ("config", "env")}).to_string())


if __name__ == "__main__":
    main()
