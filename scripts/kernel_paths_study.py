"""Do the C kernels and the torch path pose the same decision problem? The same actions on both, paired by seed.

The env's host training runs in C kernels by default (``esper_lib.envs.native``) and on the torch path with
``ESPER_NATIVE=0``. Both compute the same functions up to float rounding. This study plays each controller on
held-out env seeds once per path and pairs the episodes by seed: the actions must agree step by step (the
masks agreed) and the returns may differ only by rounding (a few validation images flipped), never by a
systematic shift. Prints, per controller, the mean return difference (kernels - torch) with its 95% bootstrap
CI, the largest difference, the episodes whose actions (all eight heads, every step) agreed, and the ratio of the
paths' wall times.

    .venv/bin/python scripts/kernel_paths_study.py                                  # 100 seeds x 4 controllers (~6 min)
    .venv/bin/python scripts/kernel_paths_study.py --seeds 20 --out docs/figures/kernel_paths_study.csv
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from esper_lib.envs import native
from esper_lib.evaluation.baselines import (
    AlwaysWaitController,
    EpisodeSeededRandomController,
    HeuristicController,
    evaluate_controller,
    reset_controller,
)
from esper_lib.evaluation.schedules import ScheduleController, schedule_from_dict
from esper_lib.evaluation.stats import bootstrap_ci
from esper_lib.notebooks.helpers import probe_parser

FIRST_SEED = 10_000  # notebook 04's held-out seeds: never used in training
BEST_SCHEDULE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "headroom_best_schedule.json"


def controllers() -> dict[str, object]:
    """The controllers played on both paths: a fresh instance per path (the random one seeded per episode)."""
    schedule = schedule_from_dict(json.loads(BEST_SCHEDULE.read_text())["schedule"])
    return {
        "always_wait": AlwaysWaitController(),
        "best_schedule": ScheduleController(schedule),
        "heuristic": HeuristicController(),
        "random_masked": EpisodeSeededRandomController(seed=0, wait_prob=0.5),
    }


class RecordingController:
    """Plays ``inner`` and keeps every action it takes, per episode seed (``actions[seed]``: tuples of the heads)."""

    def __init__(self, inner: object):
        self.inner, self.actions, self._seed = inner, {}, None

    def reset(self, seed: int | None = None) -> None:
        self._seed = seed
        self.actions[seed] = []
        reset_controller(self.inner, seed)

    def act(self, obs: dict) -> np.ndarray:
        action = np.asarray(self.inner.act(obs))
        self.actions[self._seed].append(tuple(int(a) for a in action.reshape(-1)))
        return action


def play_both_paths(env_fn, seeds: range, names: tuple[str, ...] | None = None) -> pd.DataFrame:
    """One row per (controller, seed): each path's return and wall time, their difference, and whether every
    action (all eight heads) was the same on both paths. ``names``: a subset of ``controllers()`` (None: all).
    Puts the kernels' switch back as it found it."""
    unknown = set(names or ()) - set(controllers())
    if unknown:
        raise ValueError(f"names: unknown controller(s) {sorted(unknown)}; expected some of {sorted(controllers())}")
    frames, played = {}, {}
    before = native.switched_on()
    try:
        for kernels in (True, False):
            native.enable(kernels)
            chosen = {name: ctrl for name, ctrl in controllers().items() if names is None or name in names}
            recorders = {name: RecordingController(ctrl) for name, ctrl in chosen.items()}
            frames[kernels] = pd.concat([evaluate_controller(rec, env_fn, seeds, name=name) for name, rec in recorders.items()])
            played[kernels] = {(name, seed): acts for name, rec in recorders.items() for seed, acts in rec.actions.items()}
    finally:
        native.enable(before)
    on, off = (frames[k].set_index(["controller", "seed"]) for k in (True, False))
    same = pd.Series([played[True][key] == played[False][key] for key in on.index], index=on.index)
    return pd.DataFrame({
        "return_kernels": on["return"], "return_torch": off["return"], "diff": on["return"] - off["return"],
        "same_actions": same, "wall_s_kernels": on["wall_s"], "wall_s_torch": off["wall_s"],
    }).reset_index()


def summarize(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per controller: the mean difference with its bootstrap CI, the largest |difference|, agreeing episodes."""
    rows = []
    for name, g in pairs.groupby("controller", sort=False):
        ci = bootstrap_ci(g["diff"].to_numpy(), clip=False)
        rows.append({
            "controller": name, "episodes": len(g), "same_actions": int(g["same_actions"].sum()), "diff_mean": ci.estimate,
            "diff_ci_low": ci.low, "diff_ci_high": ci.high, "max_abs_diff": float(g["diff"].abs().max()),
            "return_torch_mean": float(g["return_torch"].mean()),
            "speed_up": float(g["wall_s_torch"].sum() / g["wall_s_kernels"].sum()),
        })
    return pd.DataFrame(rows)


def main() -> None:
    parser = probe_parser(__doc__, seeds=100, first_seed=FIRST_SEED)
    parser.add_argument("--out", type=Path, default=None, help="also write the per-controller summary here (CSV)")
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error("--seeds must be >= 2")
    if not native.available():
        parser.error("the C kernels could not be built here (see the warning above): nothing to compare")
    from functools import partial

    import torch

    from esper_lib.envs.morpho import MorphoEnv

    torch.set_num_threads(1)
    pairs = play_both_paths(partial(MorphoEnv, **dict(args.env)), range(FIRST_SEED, FIRST_SEED + args.seeds))
    table = summarize(pairs)
    with pd.option_context("display.width", 200, "display.float_format", "{:+.4f}".format):
        print(table.to_string(index=False))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
