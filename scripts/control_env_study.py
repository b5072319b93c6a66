"""Control, not a schedule: episodes that differ in how fast seeds learn (issue 12, item 8).

``MorphoEnv(seed_lr=[0.005, 1.0])`` draws the seeds' Adam learning rate per episode. No feature
shows it; a seed's gradient norm (``slot<i>.grad_norm``) reveals it after the seed's first TRAINING
epoch. At 5e-3 (the default env) the best member of the schedule family is one CONV_HEAVY seed with
LINEAR_MULTIPLY; at 1.0 that seed wrecks the host and three NORM seeds are best
(``docs/control_headroom_seedlr1.md``). So the best fixed schedule is a compromise, and a controller
that probes the episode and reacts can beat it. On held-out seeds (from 10000, paired by seed):

- ``always_wait``; ``best_fixed``: the family's best member on the training seeds (all episodes);
- ``switch``: ``GradNormSwitchController``, a realisable state-aware controller. It starts with the
  best member on the training episodes at the low rate and, if its seed's gradient norm exceeds a
  threshold, switches to a high-rate plan that leaves the first seed's slot free: the high-rate best
  in its other slots, or the best member avoiding that slot, whichever does better on the high-rate
  training episodes. The threshold is chosen on the training seeds from ``--thresholds``;
- ``hindsight_best``: per episode, the best of always-WAIT, the family's top ``--top`` members and
  the two per-rate bests (an upper bound: it knows each outcome in advance);
- ``ppo``: the greedy policy of each ``--runs`` checkpoint (trained on this env, e.g. with
  ``scripts/ppo_screening.py --env 'seed_lr=[0.005, 1.0]'``), per training seed and aggregated.

Every comparison is reported over all held-out episodes and per drawn rate, with the number of
distinct op sequences and germination plans per controller and rate (a controller that reacts plays
different ones).
Writes ``<out>/control_env<suffix>.md``, ``<out>/figures/control_env<suffix>.png``,
``<out>/figures/control_env<suffix>_episodes.csv`` and ``<out>/figures/control_env<suffix>_training.csv``
(the training-seed table: ``--reuse-training`` reads it back to evaluate other PPO runs without ranking again).

    .venv/bin/python scripts/control_env_study.py --rank-train-seeds 8 --runs artefacts/ppo_screening/mixed_seedlr/seed_*
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from esper_lib.constants import GerminationStyle, TempoAction  # noqa: E402
from esper_lib.envs import native  # noqa: E402
from esper_lib.envs.morpho import MorphoEnv  # noqa: E402
from esper_lib.evaluation.baselines import AlwaysWaitController  # noqa: E402
from esper_lib.evaluation.control import GradNormSwitchController, hindsight_best  # noqa: E402
from esper_lib.evaluation.plots import plot_paired_differences  # noqa: E402
from esper_lib.evaluation.schedules import FixedSchedule, ScheduleController, schedule_grid  # noqa: E402
from esper_lib.evaluation.stats import compare_controllers  # noqa: E402
from esper_lib.notebooks.helpers import json_assignment as _assignment  # noqa: E402
from esper_lib.training_runs import evaluate_runs  # noqa: E402

HELDOUT_OFFSET = 10_000  # notebook 04's held-out seeds
TEMPOS = (TempoAction.FAST, TempoAction.STANDARD)  # the family of scripts/headroom_study.py
STYLES = tuple(GerminationStyle)


def _ranking(episodes: pd.DataFrame, order: list[str]) -> pd.Series:
    """Mean return per schedule, best first; ties go to the earlier member of ``order``."""
    means = episodes.groupby("controller")["return"].mean().reindex(order)
    return means.iloc[np.argsort(-means.to_numpy(), kind="stable")]


def _checkpoint(path: Path) -> Path:
    if path.is_file():
        return path
    found = sorted(path.glob("**/*.pt"))
    if not found:
        raise SystemExit(f"--runs {path}: no checkpoint (*.pt) under it")
    return next((p for p in found if p.name.startswith("final")), found[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed-lrs", type=float, nargs="+", default=[0.005, 1.0], help="the env's seed_lr choices")
    ap.add_argument("--env", type=_assignment, action="append", default=[], metavar="ARG=JSON", help="further MorphoEnv overrides (e.g. a tiny env for a smoke run)")
    ap.add_argument("--rank-train-seeds", type=int, default=8, help="training seeds 0..K-1: family ranking and threshold")
    ap.add_argument("--styles", nargs="+", default=[s.name for s in STYLES], choices=[s.name for s in STYLES], help="germination styles of the family (all by default)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.03, 0.04, 0.05, 0.07, 0.1, 0.2, 0.5], help="switch thresholds (raw gradient norm)")
    ap.add_argument("--top", type=int, default=12, help="family members the hindsight reference chooses among")
    ap.add_argument("--heldout", type=int, default=20, help=f"held-out env seeds {HELDOUT_OFFSET}..")
    ap.add_argument("--runs", type=Path, nargs="*", default=[], help="PPO run folders (seed_<k>) or checkpoints trained on this env")
    ap.add_argument("--workers", type=int, default=2, help="controllers evaluated at once, one process each")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    ap.add_argument("--suffix", default="", help="appended to the file names (e.g. for another PPO budget)")
    ap.add_argument("--reuse-training", type=Path, metavar="CSV",
                    help="control_env_training<suffix>.csv of an earlier run (same env, training seeds and family): skips the ranking")
    args = ap.parse_args()
    if len(args.seed_lrs) < 2 or args.rank_train_seeds < 2 or args.heldout < 2 or args.top < 1 or args.workers < 1:
        raise SystemExit("need two or more --seed-lrs, --rank-train-seeds and --heldout >= 2, --top and --workers >= 1")
    env_kwargs = {**dict(args.env), "seed_lr": list(args.seed_lrs)}
    env = MorphoEnv(**env_kwargs)
    num_slots, max_epochs = env.num_slots, env.max_epochs
    env.close()
    low, high = min(args.seed_lrs), max(args.seed_lrs)
    runs = [SimpleNamespace(checkpoint=_checkpoint(p), train_seed=k) for k, p in enumerate(args.runs)]  # checked before the long part
    for run, path in zip(runs, args.runs):
        digits = "".join(ch for ch in path.name if ch.isdigit())
        run.train_seed = int(digits) if digits else run.train_seed
    t0 = time.perf_counter()

    # 1. the family on the training seeds: overall best, and the best per drawn rate
    styles = tuple(GerminationStyle[name] for name in args.styles)
    grid = {s.name: s for s in schedule_grid(num_slots=num_slots, max_epochs=max_epochs, tempos=TEMPOS, styles=styles, every_slot=True)}
    train_seeds = list(range(args.rank_train_seeds))
    switch_names = [f"switch@{t:g}" for t in args.thresholds]
    saved = None if args.reuse_training is None else pd.read_csv(args.reuse_training)
    if saved is not None:
        missing = sorted(set(grid) - set(saved.controller))
        if missing or set(saved.seed) != set(train_seeds):
            raise SystemExit(f"--reuse-training {args.reuse_training}: not this study's training table "
                             f"(seeds {sorted(set(saved.seed))} vs {train_seeds}; missing controllers {missing[:3]})")
        training = saved[saved.controller.isin(grid)]
    else:
        family = {name: ScheduleController(s, num_slots) for name, s in grid.items()}
        training = evaluate_runs([], family, env_kwargs, train_seeds, workers=args.workers).drop(columns="train_seed")
    rates = training.groupby("seed")["seed_lr"].first()
    if set(rates) != {low, high} and len(args.seed_lrs) == 2:
        raise SystemExit(f"training seeds {train_seeds} drew only {sorted(set(rates))}: pass more --rank-train-seeds")
    order = list(grid)
    overall = _ranking(training, order)
    best = grid[overall.index[0]]
    best_low = grid[_ranking(training[training.seed_lr == low], order).index[0]]
    high_rank = _ranking(training[training.seed_lr == high], order)
    best_high = grid[high_rank.index[0]]
    # the fallback: the high-rate best in the slots the probe leaves free, or the best member that avoids
    # the probe's slot, whichever does better on the high-rate training episodes
    avoiding = next(grid[n] for n in high_rank.index if all(slot != best_low.slot for slot, _, _ in grid[n].seedings))
    free = [seeding for seeding in best_high.seedings if seeding[0] != best_low.slot]
    fallback = avoiding
    if free and len(free) < len(best_high.seedings):
        restricted = dataclasses.replace(best_high, slot=free[0][0], blueprint=free[0][1], germinate_at=free[0][2],
                                         extra_seedings=tuple(free[1:]), name="")
        high_seeds = sorted(set(rates[rates == high].index))
        rows = evaluate_runs([], {restricted.name: ScheduleController(restricted, num_slots)}, env_kwargs, high_seeds, progress=False)
        training = pd.concat([training, rows.drop(columns="train_seed")], ignore_index=True)
        if rows["return"].mean() > high_rank[avoiding.name]:
            fallback = restricted

    # 2. the switch's threshold, on the same training seeds
    switches = {name: GradNormSwitchController(best_low, fallback, t, num_slots) for name, t in zip(switch_names, args.thresholds)}
    switch_train = evaluate_runs([], switches, env_kwargs, train_seeds, workers=args.workers).drop(columns="train_seed")
    switch_means = switch_train.groupby("controller")["return"].mean().reindex(switch_names)
    threshold = args.thresholds[int(np.argmax(switch_means.to_numpy()))]

    # 3. held-out seeds
    seeds = list(range(HELDOUT_OFFSET, HELDOUT_OFFSET + args.heldout))
    top = [grid[n] for n in overall.index[: args.top]]
    candidates = {s.name: s for s in [*top, best_low, best_high]}
    controllers = {"always_wait": AlwaysWaitController(), "switch": GradNormSwitchController(best_low, fallback, threshold, num_slots)}
    controllers.update({name: ScheduleController(s, num_slots) for name, s in candidates.items()})
    episodes = evaluate_runs(runs, controllers, env_kwargs, seeds, label="ppo", workers=args.workers)
    oracle = hindsight_best(episodes, ["always_wait", *candidates]).assign(train_seed=np.nan)
    named = [(best.name, "best_fixed"), (best_low.name, "best_low_rate"), (best_high.name, "best_high_rate")]
    table = pd.concat(
        [episodes[episodes.controller.isin(["always_wait", "switch", "ppo"])], oracle,
         *[episodes[episodes.controller == name].assign(controller=label) for name, label in named]],
        ignore_index=True,
    )
    seconds = time.perf_counter() - t0

    figures = args.out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    stem = f"control_env{args.suffix}"
    pd.concat([training, switch_train], ignore_index=True).to_csv(figures / f"{stem}_training.csv", index=False)
    pd.concat([episodes, oracle], ignore_index=True).to_csv(figures / f"{stem}_episodes.csv", index=False)
    by_rate = {"all": table, f"seed lr {low:g}": table[table.seed_lr == low], f"seed lr {high:g}": table[table.seed_lr == high]}
    by_rate = {k: t for k, t in by_rate.items() if len(t)}  # a short smoke run may draw one rate only
    vs_wait = {k: compare_controllers(t, "return", baseline="always_wait") for k, t in by_rate.items()}
    vs_fixed = {k: compare_controllers(t[t.controller != "always_wait"], "return", baseline="best_fixed") for k, t in by_rate.items()}
    sequences = plans_by_rate(table, low, high)

    fig, axes = plt.subplots(1, len(by_rate), figsize=(5.7 * len(by_rate), 4.6), squeeze=False)
    axes = axes[0]
    plot_paired_differences(table, "return", "always_wait", ax=axes[0])
    axes[0].set_title(f"return - always-WAIT, all {args.heldout} held-out seeds")
    for ax, key in zip(axes[1:], list(by_rate)[1:]):
        part = by_rate[key]
        plot_paired_differences(part[part.controller != "always_wait"], "return", "best_fixed", ax=ax)
        ax.set_title(f"return - best fixed, episodes with {key} (n={part.seed.nunique()})")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(figures / f"{stem}.png", dpi=110)
    write_page(args, stem, env_kwargs, seconds, best, best_low, best_high, fallback, threshold, switch_means, overall,
               rates, vs_wait, vs_fixed, sequences, oracle)
    print(f"wrote {args.out / (stem + '.md')} in {seconds / 60:.1f} min")


def plans_by_rate(table: pd.DataFrame, low: float, high: float) -> pd.DataFrame:
    """Per controller (PPO per training seed): distinct op sequences and germination plans at each rate, and the commonest plan."""
    seed = table["train_seed"].map(lambda k: "" if pd.isna(k) else f" (training seed {int(k)})")
    frame = table.assign(who=table["controller"] + seed, rate=table.seed_lr.map({low: "low", high: "high"}))
    out: dict[str, dict[str, str]] = {}
    for (who, rate), g in frame.groupby(["who", "rate"], sort=False):
        plans = g["germinated"].fillna("").replace("", "none")
        top = plans.value_counts()
        out.setdefault(who, {}).update({f"ops_{rate}": str(g["ops"].nunique()), f"plans_{rate}": str(plans.nunique()),
                                        f"common_{rate}": f"`{top.index[0]}` x{top.iloc[0]}"})
    return pd.DataFrame.from_dict(out, orient="index")


def _row(r: pd.Series) -> str:
    seed = "" if "train_seed" not in r or pd.isna(r.get("train_seed")) or r.get("train_seed") == "all" else f" (training seed {r.train_seed})"
    diff = "baseline" if pd.isna(r.diff_mean) else f"{r.diff_mean:+.4f} [{r.diff_ci_low:+.4f}, {r.diff_ci_high:+.4f}]"
    p = "" if pd.isna(r.p_improvement) else f"{r.p_improvement:.2f}"
    return f"| {r.controller}{seed} | {r.n} | {r['mean']:.4f} | {diff} | {p} |"


def _tables(title: str, tables: dict[str, pd.DataFrame]) -> list[str]:
    header = "| controller | n | mean return | paired difference [95% CI] | P(improvement) |\n|---|---|---|---|---|"
    lines = [f"## {title}", ""]
    for key, t in tables.items():
        lines += [f"### {key}", "", header, *[_row(r) for _, r in t.iterrows()], ""]
    return lines


def _describe(s: FixedSchedule) -> str:
    return f"`{s.name}`"


def write_page(args, stem, env_kwargs, seconds, best, best_low, best_high, fallback, threshold, switch_means, overall,
               rates, vs_wait, vs_fixed, sequences, oracle) -> None:
    runs = " ".join(str(p) for p in args.runs)
    styles = "" if len(args.styles) == len(STYLES) else " --styles " + " ".join(args.styles)
    command = (f"scripts/control_env_study.py" + "".join(f" --env {k}={json.dumps(v)}" for k, v in args.env) + styles + f" --seed-lrs {' '.join(f'{v:g}' for v in args.seed_lrs)} "
               f"--rank-train-seeds {args.rank_train_seeds} --heldout {args.heldout}" + (f" --runs {runs}" if runs else "")
               + (f" --suffix {args.suffix}" if args.suffix else "") + (f" --reuse-training {args.reuse_training}" if args.reuse_training else ""))
    fixed_all = vs_fixed["all"].set_index("controller")

    def cell(t: pd.DataFrame, name: str) -> str:
        rows = t[t.controller == name]
        if "train_seed" in rows.columns:
            rows = rows[rows.train_seed.isin(["all"]) | rows.train_seed.isna()]
        r = rows.iloc[0]
        return f"{r.diff_mean:+.4f} [{r.diff_ci_low:+.4f}, {r.diff_ci_high:+.4f}]"

    lines = [
        f"# Control, not a schedule: episodes with different seed learning rates (env {json.dumps(env_kwargs)})",
        "",
        f"Generated by `{command}` ({seconds / 60:.1f} min, {args.workers} processes, env host training on "
        f"{native.path_label()}). Issue 12, item 8; "
        "method in the script's docstring and `esper_lib/evaluation/control.py`.",
        "",
        f"Each episode draws the seeds' Adam learning rate from {args.seed_lrs}; the observation does not show it, "
        "a seed's gradient norm reveals it after the seed's first TRAINING epoch.",
        "",
        "## Chosen on the training seeds",
        "",
        f"Training seeds 0..{args.rank_train_seeds - 1} drew the rates {({float(k): int(v) for k, v in rates.value_counts().sort_index().items()})}; "
        f"the family ({len(overall)} members) was ranked on them.",
        "",
        f"- best fixed (all episodes): {_describe(best)}, mean return {overall.iloc[0]:.4f};",
        f"- best at the low rate: {_describe(best_low)}; best at the high rate: {_describe(best_high)};",
        f"- the switch: starts with {_describe(best_low)}, switches to {_describe(fallback)} when its seed's gradient norm exceeds "
        f"{threshold:g} (threshold chosen from {', '.join(f'{t:g}: {m:.4f}' for t, m in zip(args.thresholds, switch_means.to_numpy()))} "
        "mean training return).",
        "",
        *_tables("Against always-WAIT (held-out seeds)", vs_wait),
        *_tables("Against the best fixed schedule (what reacting adds)", vs_fixed),
        "## What each controller plays, per drawn rate (held-out episodes)",
        "",
        "Distinct op sequences / distinct germination plans (slot:blueprint in order), and the most common plan",
        "with its count. A controller that reacts to the rate plays different plans at the two rates.",
        "",
        f"| controller | low rate ({min(args.seed_lrs):g}): sequences / plans | most common plan | high rate ({max(args.seed_lrs):g}): sequences / plans | most common plan |",
        "|---|---|---|---|---|",
        *[f"| {c} | {r.get('ops_low', '')} / {r.get('plans_low', '')} | {r.get('common_low', '')} "
          f"| {r.get('ops_high', '')} / {r.get('plans_high', '')} | {r.get('common_high', '')} |" for c, r in sequences.iterrows()],
        "",
        f"![control env](figures/{stem}.png)",
        "",
        "## Reading",
        "",
        f"- Headroom of a fixed schedule: best fixed - WAIT = {cell(vs_wait['all'], 'best_fixed')}.",
        f"- Headroom of control: hindsight - best fixed = {cell(vs_fixed['all'], 'hindsight_best')} (upper bound); "
        f"the switch - best fixed = {cell(vs_fixed['all'], 'switch')} (realisable).",
    ]
    if "ppo" in fixed_all.index:
        lines.append(f"- PPO greedy (aggregate over training seeds) - best fixed = {cell(vs_fixed['all'], 'ppo')}; "
                     f"- WAIT = {cell(vs_wait['all'], 'ppo')}.")
    chosen = oracle["chosen"].value_counts()
    lines.append(f"- The hindsight reference chose: {', '.join(f'`{k}` x{v}' for k, v in chosen.items())}.")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
