"""Does reacting to the state pay on the morphogenetic env? State-aware references vs the best fixed schedule.

Issue 12, item 8. On held-out env seeds, paired by seed:

- ``always_wait`` and ``best_fixed`` (the best member of the schedule family on the training seeds);
- ``gated``: the best fixed schedule, but a HOLDING seed whose measured contribution is below 0
  accuracy points is pruned instead of fossilized (``ContributionGatedController``): a simple
  controller that reads the state;
- ``hindsight_best``: per episode, the best of always-WAIT and the family's top ``--top`` members
  (``hindsight_best``): an upper bound no controller can reach.

The family's ranking on training seeds comes from ``--ranking`` (``docs/figures/headroom_training.csv``,
written by ``scripts/headroom_study.py`` on training seeds 0..4 for the env's defaults); with
``--env`` overrides pass ``--rank-train-seeds K`` to rank the family on training seeds 0..K-1 of
that env instead. Writes ``<out>/control_headroom<suffix>.md``, ``<out>/figures/control_headroom<suffix>.png``
and ``<out>/figures/control_headroom<suffix>_episodes.csv``.

    .venv/bin/python scripts/control_headroom_study.py                         # default env, top 12, 20 held-out seeds (~3 min, 2 cores)
    .venv/bin/python scripts/control_headroom_study.py --env lr=0.02 --rank-train-seeds 3 --suffix _lr0.02
"""
from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from esper_lib.constants import GerminationStyle, TempoAction  # noqa: E402
from esper_lib.envs import native  # noqa: E402
from esper_lib.envs.morpho import MorphoEnv  # noqa: E402
from esper_lib.evaluation.baselines import AlwaysWaitController  # noqa: E402
from esper_lib.evaluation.control import ContributionGatedController, hindsight_best  # noqa: E402
from esper_lib.evaluation.plots import plot_paired_differences  # noqa: E402
from esper_lib.evaluation.schedules import ScheduleController, schedule_grid, select_best_schedule  # noqa: E402
from esper_lib.evaluation.stats import compare_controllers  # noqa: E402
from esper_lib.training_runs import evaluate_runs  # noqa: E402
from esper_lib.notebooks.helpers import json_assignment as _assignment  # noqa: E402

HELDOUT_OFFSET = 10_000  # notebook 04's held-out seeds
TEMPOS = (TempoAction.FAST, TempoAction.STANDARD)  # the family of scripts/headroom_study.py
STYLES = tuple(GerminationStyle)




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", type=_assignment, action="append", default=[], metavar="ARG=JSON", help="MorphoEnv override")
    ap.add_argument("--ranking", type=Path, default=Path("docs/figures/headroom_training.csv"), help="family ranking on training seeds")
    ap.add_argument("--rank-train-seeds", type=int, default=0, help="rank the family on training seeds 0..K-1 of this env instead")
    ap.add_argument("--top", type=int, default=12, help="family members the hindsight reference chooses among")
    ap.add_argument("--heldout", type=int, default=20, help=f"held-out env seeds {HELDOUT_OFFSET}..")
    ap.add_argument("--workers", type=int, default=2, help="controllers evaluated at once, one process each")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    ap.add_argument("--suffix", default="", help="appended to the file names (for env variants)")
    args = ap.parse_args()
    if args.top < 1 or args.heldout < 2 or args.workers < 1:
        raise SystemExit("--top and --workers must be >= 1 and --heldout >= 2")
    env_kwargs = dict(args.env)
    env = MorphoEnv(**env_kwargs)  # validates the overrides now
    num_slots, max_epochs = env.num_slots, env.max_epochs
    env.close()
    grid = {s.name: s for s in schedule_grid(num_slots=num_slots, max_epochs=max_epochs, tempos=TEMPOS, styles=STYLES, every_slot=True)}
    t0 = time.perf_counter()
    if args.rank_train_seeds:
        _, ranking = select_best_schedule(partial(MorphoEnv, **env_kwargs), list(grid.values()), range(args.rank_train_seeds), workers=args.workers)
        ranking_source = f"ranked here on training seeds 0..{args.rank_train_seeds - 1}"
    else:
        if env_kwargs:
            raise SystemExit("with --env overrides pass --rank-train-seeds (the saved ranking is for the env's defaults)")
        ranking = pd.read_csv(args.ranking)
        ranking_source = f"`{args.ranking}` (scripts/headroom_study.py, training seeds 0..4)"
    top = [grid[name] for name in ranking["schedule"].head(args.top)]
    best = top[0]

    seeds = list(range(HELDOUT_OFFSET, HELDOUT_OFFSET + args.heldout))
    controllers = {"always_wait": AlwaysWaitController(), "gated": ContributionGatedController(best, 0.0, num_slots)}
    controllers.update({s.name: ScheduleController(s, num_slots) for s in top})
    episodes = evaluate_runs([], controllers, env_kwargs, seeds, workers=args.workers).drop(columns="train_seed")
    oracle = hindsight_best(episodes, ["always_wait", *[s.name for s in top]])
    fixed = episodes[episodes.controller == best.name].assign(controller="best_fixed")
    table = pd.concat([episodes[episodes.controller.isin(["always_wait", "gated"])], fixed, oracle], ignore_index=True)
    seconds = time.perf_counter() - t0

    figures = args.out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    stem = f"control_headroom{args.suffix}"
    pd.concat([episodes, oracle], ignore_index=True).to_csv(figures / f"{stem}_episodes.csv", index=False)
    vs_wait = compare_controllers(table, "return", baseline="always_wait")
    vs_fixed = compare_controllers(table, "return", baseline="best_fixed")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    plot_paired_differences(table, "return", "always_wait", ax=axes[0])
    axes[0].set_title(f"return - always-WAIT ({args.heldout} held-out seeds, one point each)")
    plot_paired_differences(table[table.controller != "always_wait"], "return", "best_fixed", ax=axes[1])
    axes[1].set_title("return - best fixed schedule: what reacting adds")
    fig.tight_layout()
    fig.savefig(figures / f"{stem}.png", dpi=110)
    write_page(args, env_kwargs, best, ranking_source, vs_wait, vs_fixed, oracle, seconds, stem)
    print(f"wrote {args.out / (stem + '.md')} in {seconds:.0f} s")


def _row(r: pd.Series) -> str:
    diff = "baseline" if pd.isna(r.diff_mean) else f"{r.diff_mean:+.4f} [{r.diff_ci_low:+.4f}, {r.diff_ci_high:+.4f}]"
    p = "" if pd.isna(r.p_improvement) else f"{r.p_improvement:.2f}"
    return f"| {r.controller} | {r.n} | {r['mean']:.4f} | {diff} | {p} |"


def write_page(args, env_kwargs, best, ranking_source, vs_wait, vs_fixed, oracle, seconds, stem) -> None:
    command = "scripts/control_headroom_study.py" + "".join(f" --env {k}={json.dumps(v)}" for k, v in env_kwargs.items())
    if args.rank_train_seeds:
        command += f" --rank-train-seeds {args.rank_train_seeds}"
    if args.suffix:
        command += f" --suffix {args.suffix}"
    header = "| controller | n | mean return | paired difference [95% CI] | P(improvement) |\n|---|---|---|---|---|"
    fixed = vs_fixed.set_index("controller")
    gated, hind = fixed.loc["gated"], fixed.loc["hindsight_best"]
    chosen = oracle["chosen"].value_counts()
    lines = [
        f"# Does reacting to the state pay? ({'env defaults' if not env_kwargs else 'env ' + json.dumps(env_kwargs)})",
        "",
        f"Generated by `{command}` ({seconds / 60:.1f} min, {args.workers} processes, env host training on "
        f"{native.path_label()}). Issue 12, item 8.",
        "",
        "The best fixed schedule is the best a controller can do without looking at the state. Two references",
        "measure what looking could add (`esper_lib/evaluation/control.py`): **gated** plays the best fixed schedule",
        "but prunes a HOLDING seed whose measured contribution is below 0 accuracy points instead of fossilizing it",
        f"(a realisable state-aware controller); **hindsight_best** takes, per episode, the best of always-WAIT and the",
        f"family's top {args.top} members (an upper bound: it knows each outcome in advance and profits from float-level",
        "chaos no observation reveals).",
        "",
        f"Family ranking: {ranking_source}; best fixed: `{best.name}`. Held-out seeds {HELDOUT_OFFSET}..{HELDOUT_OFFSET + args.heldout - 1},",
        "paired by seed; 95% percentile-bootstrap CIs of the mean paired difference.",
        "",
        "## Against always-WAIT", "", header, *[_row(r) for _, r in vs_wait.iterrows()], "",
        "## Against the best fixed schedule (what reacting adds)", "", header, *[_row(r) for _, r in vs_fixed.iterrows()], "",
        f"![control headroom](figures/{stem}.png)",
        "",
        "## Reading",
        "",
        f"- Reacting as the gate does: {gated.diff_mean:+.4f} [{gated.diff_ci_low:+.4f}, {gated.diff_ci_high:+.4f}] over the best fixed schedule.",
        f"- Upper bound (hindsight over WAIT and {args.top} schedules): {hind.diff_mean:+.4f} [{hind.diff_ci_low:+.4f}, {hind.diff_ci_high:+.4f}].",
        f"- The hindsight reference chose: {', '.join(f'`{k}` x{v}' for k, v in chosen.items())}.",
    ]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
