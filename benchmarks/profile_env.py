"""Where a morphogenetic env step's time goes, op by op (torch profiler), on the torch path and the C kernels.

    python benchmarks/profile_env.py [--controller wait|schedule|grown] [--steps N] [--native off|on|both] [--top K]

Plays ``--steps`` steps of one ``MorphoEnv`` at its defaults (after 4 warm-up steps, one torch thread)
under ``torch.profiler`` and prints the ``--top`` ops by self CPU time, in ms per env step, with their
calls per step; ``both`` prints the torch path's table, then the C kernels' (``esper_lib.envs.native``).
The profiler adds its own overhead to every op (~1-2 us), so the total is above ``bench_env.py``'s
ms per step; read the shares.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from esper_lib.envs import native
from esper_lib.envs.morpho import MorphoEnv
from esper_lib.evaluation.baselines import AlwaysWaitController
from esper_lib.evaluation.schedules import ScheduleController, schedule_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path (tests)
from bench_env import GROWN_SCHEDULE  # noqa: E402

BEST_SCHEDULE_FILE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "headroom_best_schedule.json"


def profile_steps(controller: str, steps: int, warmup: int = 4) -> list[tuple[str, float, float]]:
    """``(op, self CPU ms per step, calls per step)`` of ``steps`` env steps, largest first."""
    env = MorphoEnv()
    if controller == "schedule":
        ctrl = ScheduleController(schedule_from_dict(json.loads(BEST_SCHEDULE_FILE.read_text())["schedule"]))
    elif controller == "grown":
        ctrl = ScheduleController(schedule_from_dict(GROWN_SCHEDULE))
    else:
        ctrl = AlwaysWaitController()
    obs, _ = env.reset(seed=1)
    for _ in range(warmup):
        obs, *_ = env.step(ctrl.act(obs))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            obs, *_ = env.step(ctrl.act(obs))
    rows = [(e.key, e.self_cpu_time_total / 1000 / steps, e.count / steps) for e in prof.key_averages()]
    return sorted(rows, key=lambda r: -r[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--controller", choices=("wait", "schedule", "grown"), default="wait")
    ap.add_argument("--steps", type=int, default=8, help="profiled env steps (after 4 warm-up steps)")
    ap.add_argument("--native", choices=("off", "on", "both"), default="both")
    ap.add_argument("--top", type=int, default=12, help="ops listed per table")
    args = ap.parse_args()
    if args.steps < 1 or args.top < 1:
        ap.error("--steps and --top must be >= 1")
    modes = {"off": (False,), "on": (True,), "both": (False, True)}[args.native]
    if True in modes and not native.available():
        ap.error("--native on/both: the C kernels could not be built here (see the warning above)")
    torch.set_num_threads(1)
    for flag in modes:
        native.enable(flag)
        rows = profile_steps(args.controller, args.steps)
        total = sum(r[1] for r in rows)
        print(f"\n{args.controller}, {'C kernels' if flag else 'torch path'}: {total:.2f} ms of self CPU time per env step (profiled)")
        print(f"{'op':<48}{'ms/step':>9}{'share':>8}{'calls/step':>12}")
        for name, ms, calls in rows[: args.top]:
            print(f"{name[:47]:<48}{ms:>9.2f}{100 * ms / total:>7.1f}%{calls:>12.1f}")
        rest = sum(r[1] for r in rows[args.top :])
        print(f"{'(all other ops)':<48}{rest:>9.2f}{100 * rest / total:>7.1f}%{sum(r[2] for r in rows[args.top:]):>12.1f}")


if __name__ == "__main__":
    main()
