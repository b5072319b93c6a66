"""The best fixed schedule against always-WAIT under env overrides: does growth still pay, and on every seed?

A quick probe, not a headroom study (that is ``scripts/headroom_study.py``): the schedule chosen for
the env's defaults (``docs/figures/headroom_best_schedule.json``) plays ``--seeds`` env seeds from 100
with the given ``MorphoEnv`` overrides; prints the paired return difference with always-WAIT per seed.
Used to look for env variants where growing can hurt (issue 12, item 8; docs/ppo_morpho_reading.md).
``--family`` plays every member of the family that germinates at epoch 0 (each slot x each CNN
blueprint, and each blueprint in every slot; tempo STANDARD, LINEAR_ADD: 28 members) instead, and prints them
ranked by the paired difference: does any growth pay under the override, and which? With
``--all-styles`` the family spans the four germination styles (112 members); ``--germinate-at E``
germinates at epoch E instead of 0 (how much does waiting cost?).

    .venv/bin/python scripts/growth_vs_wait_probe.py --env lr=0.05 --seeds 8
    .venv/bin/python scripts/growth_vs_wait_probe.py --env lr=0.05 --seeds 5 --family
    .venv/bin/python scripts/growth_vs_wait_probe.py --seeds 6 --family --all-styles --germinate-at 8
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from esper_lib.constants import GerminationStyle
from esper_lib.evaluation.baselines import evaluate_controller
from esper_lib.evaluation.schedules import ScheduleController, schedule_from_dict, schedule_grid
from esper_lib.notebooks.helpers import mean_and_se, probe_parser, probe_wait_baseline

FIRST_SEED = 100


def main() -> None:
    ap = probe_parser(__doc__, seeds=8, first_seed=FIRST_SEED)
    ap.add_argument("--schedule", type=Path, default=Path("docs/figures/headroom_best_schedule.json"))
    ap.add_argument("--family", action="store_true", help="rank the germinate-at-epoch-0 family instead of one schedule")
    ap.add_argument("--all-styles", action="store_true", help="with --family: every germination style, not LINEAR_ADD only")
    ap.add_argument("--germinate-at", type=int, default=0, help="with --family: the epoch every member germinates at")
    args = ap.parse_args()
    env_fn, seeds, wait = probe_wait_baseline(args, FIRST_SEED)
    if args.family:
        env = env_fn()
        num_slots, max_epochs = env.num_slots, env.max_epochs
        env.close()
        rows = []
        styles = tuple(GerminationStyle) if args.all_styles else (GerminationStyle.LINEAR_ADD,)
        family = schedule_grid(num_slots, max_epochs=max_epochs, germinate_at=(args.germinate_at,), styles=styles, every_slot=True)
        if args.germinate_at:  # the every-slot members germinate at epoch 0 by construction: move them too
            family = [m if not m.extra_seedings else replace(m, germinate_at=args.germinate_at, name="",
                                                               extra_seedings=tuple((s, b, args.germinate_at) for s, b, _ in m.extra_seedings))
                      for m in family]
        for member in family:
            d = evaluate_controller(ScheduleController(member, num_slots), env_fn, seeds)["return"].to_numpy() - wait["return"].to_numpy()
            rows.append((float(d.mean()), mean_and_se(d), member.name))
        print(f"env {dict(args.env) or 'defaults'}: always-WAIT return {wait['return'].mean():.3f}; "
              f"each member - always-WAIT (mean, SE over {len(wait)} seeds), best first:")
        for _, text, name in sorted(rows, key=lambda r: -r[0]):
            print(f"  {text}  {name}")
        return
    schedule = schedule_from_dict(json.loads(args.schedule.read_text())["schedule"])
    grow = evaluate_controller(ScheduleController(schedule), env_fn, seeds)
    d = grow["return"].to_numpy() - wait["return"].to_numpy()
    print(f"env {dict(args.env) or 'defaults'}: {schedule.name} - always-WAIT, return {mean_and_se(d)}; "
          f"per seed {np.round(d, 3).tolist()}; final accuracy {grow.final_val_accuracy.mean():.3f} vs {wait.final_val_accuracy.mean():.3f}")


if __name__ == "__main__":
    main()
