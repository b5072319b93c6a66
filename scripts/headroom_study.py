"""Headroom of the morphogenetic env: the best fixed schedule vs always-WAIT and random, on held-out seeds.

Writes docs/headroom.md, docs/figures/headroom.png, docs/figures/headroom_training.csv (every
schedule's mean on the training seeds), docs/figures/headroom_heldout.csv (every held-out episode)
and docs/figures/headroom_best_schedule.json (the best member, read by notebook 04).

    .venv/bin/python scripts/headroom_study.py                      # 392 schedules x 5 training seeds, 30 held-out seeds (~15 min, 2 cores)
    .venv/bin/python scripts/headroom_study.py --train-seeds 2 --heldout 6 --out /tmp/headroom   # quick look
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from esper_lib.constants import GerminationStyle, TempoAction  # noqa: E402
from esper_lib.envs import native  # noqa: E402
from esper_lib.envs.morpho import MorphoEnv  # noqa: E402
from esper_lib.evaluation.baselines import HeuristicController, evaluate_controller  # noqa: E402
from esper_lib.evaluation.plots import plot_paired_differences  # noqa: E402
from esper_lib.evaluation.schedules import headroom_table, schedule_grid, schedule_to_dict, select_best_schedule  # noqa: E402
from esper_lib.evaluation.stats import compare_controllers  # noqa: E402

HELDOUT_OFFSET = 10_000  # the held-out seeds notebook 04 evaluates on
TEMPOS = (TempoAction.FAST, TempoAction.STANDARD)  # blend over 3 or 5 epochs (SLOW, 8, is too long for 16-epoch runs)
STYLES = tuple(GerminationStyle)  # every way a seed joins the host stream (LINEAR_MULTIPLY beats LINEAR_ADD here)


def env_defaults() -> dict:
    """The env's constructor defaults (what the study measures)."""
    import inspect

    return {k: v.default for k, v in inspect.signature(MorphoEnv.__init__).parameters.items() if k != "self"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-seeds", type=int, default=5, help="env seeds 0..n-1 on which the best schedule is chosen")
    ap.add_argument("--heldout", type=int, default=30, help=f"held-out env seeds {HELDOUT_OFFSET}.. (never used for the choice)")
    ap.add_argument("--out", type=Path, default=Path("docs"), help="folder for headroom.md (figures go to <out>/figures)")
    ap.add_argument("--workers", type=int, default=2, help="schedules evaluated at once, one process each (one per core)")
    args = ap.parse_args()
    if args.train_seeds < 1 or args.heldout < 2 or args.workers < 1:
        raise SystemExit("--train-seeds and --workers must be >= 1 and --heldout >= 2")
    torch.set_num_threads(1)
    figures = args.out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    env_fn = partial(MorphoEnv)
    defaults = env_defaults()
    t0 = time.perf_counter()

    grid = schedule_grid(num_slots=defaults["num_slots"], max_epochs=defaults["max_epochs"], tempos=TEMPOS, styles=STYLES, every_slot=True)
    best, training = select_best_schedule(env_fn, grid, range(args.train_seeds), progress=True, workers=args.workers)
    training.to_csv(figures / "headroom_training.csv", index=False)

    heldout = list(range(HELDOUT_OFFSET, HELDOUT_OFFSET + args.heldout))
    room = headroom_table(env_fn, best, heldout, random_seed=0, progress=True)
    heuristic = evaluate_controller(HeuristicController(), env_fn, heldout, name="heuristic", progress=True)
    episodes = pd.concat([room.episodes, heuristic], ignore_index=True)
    episodes.to_csv(figures / "headroom_heldout.csv", index=False)
    summary = {m: compare_controllers(episodes, m, baseline="always_wait") for m in ("return", "final_val_accuracy")}
    (figures / "headroom_best_schedule.json").write_text(
        json.dumps({"schedule": schedule_to_dict(best), "env": {k: v for k, v in defaults.items() if _jsonable(v)}}, indent=2)
    )
    seconds = time.perf_counter() - t0

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, metric in zip(axes, summary):
        plot_paired_differences(episodes, metric, "always_wait", ax=ax)
        ax.set_title(f"{metric}: paired difference with always-WAIT\n({args.heldout} held-out seeds, one point per seed)")
    fig.tight_layout()
    fig.savefig(figures / "headroom.png", dpi=110)

    write_page(args, defaults, best, training, summary, seconds)
    print(f"best schedule {best.name}; wrote {args.out / 'headroom.md'} in {seconds:.0f} s")


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def _fmt_row(r: pd.Series) -> str:
    diff = "baseline" if pd.isna(r.diff_mean) else f"{r.diff_mean:+.4f} [{r.diff_ci_low:+.4f}, {r.diff_ci_high:+.4f}]"
    p = "" if pd.isna(r.p_improvement) else f"{r.p_improvement:.2f}"
    return f"| {r.controller} | {r.n} | {r['mean']:.4f} | {r.iqm:.4f} | {diff} | {p} |"


def write_page(args, defaults, best, training, summary, seconds) -> None:
    ret = summary["return"].set_index("controller")
    b = ret.loc["best_schedule"]
    half = (b.diff_ci_high - b.diff_ci_low) / 2
    rnd = ret.loc["random_masked"]
    lines = [
        "# Headroom of the morphogenetic env",
        "",
        f"Generated by `scripts/headroom_study.py` ({seconds / 60:.1f} min on this machine, torch {torch.__version__}, "
        f"{platform.machine()}, 1 torch thread, env host training on {native.path_label()}). Re-run it to refresh this "
        "page, `figures/headroom.png` and the CSVs.",
        "",
        "A controller can only show learning where growing seeds changes the outcome. The **headroom** is how much",
        "the best member of a documented family of fixed (open-loop) schedules gains over always-WAIT on held-out",
        "env seeds; PPO's result is read against it (notebook 04 reports the share of the headroom it captures).",
        "Whether reacting to the state pays beyond the best fixed schedule (a second headroom) is measured in",
        "[`control_headroom.md`](control_headroom.md).",
        "",
        "## The env (MorphoEnv defaults)",
        "",
        "| argument | default |",
        "|---|---|",
        *[f"| `{k}` | `{v!r}` |" for k, v in defaults.items()],
        "",
        "Why these defaults: see the MorphoEnv docstring and the README. In short, a narrow host (4/8/8 channels)",
        "trained on 500 images for 16 epochs at lr 5e-3 is capacity-limited, so a well-placed seed adds accuracy",
        "that survives the rent; a careless seed (random blueprint, slot, style, alpha) costs rent and",
        "disturbs the host, so random growth loses to doing nothing. PRUNE is allowed once a seed is in",
        "the host stream (`prune_before_blending=False`): see the MorphoEnv docstring for why.",
        "",
        "## The family and the choice",
        "",
        f"`schedule_grid` ({len(training)} members): every slot x every CNN blueprint x germination at epoch 0 or",
        "`max_epochs // 4` x tempo FAST or STANDARD x every germination style (LINEAR_ADD, LINEAR_MULTIPLY,",
        "SIGMOID_ADD, GATED_GATE), plus one member per blueprint, tempo and style that seeds every slot",
        "from epoch 0; alpha target 1.0; ADVANCE as soon as allowed,",
        "FOSSILIZE as soon as HOLDING (`esper_lib/evaluation/schedules.py`). The best member is chosen by mean return on",
        f"training seeds 0..{args.train_seeds - 1} only. Top 10:",
        "",
        training.head(10).round(4).to_markdown(index=False),
        "",
        f"**Best: `{best.name}`.**",
        "",
        f"## Held-out comparison ({args.heldout} seeds from {HELDOUT_OFFSET}, paired by seed)",
        "",
        "Differences with always-WAIT per seed; 95% percentile-bootstrap CI of the mean difference; IQM =",
        "interquartile mean; P(improvement) = share of seeds where the controller beats WAIT (ties count half).",
        "",
    ]
    for metric, table in summary.items():
        lines += [f"### {metric}", "", "| controller | n | mean | IQM | paired difference vs WAIT [95% CI] | P(improvement) |",
                  "|---|---|---|---|---|---|", *[_fmt_row(r) for _, r in table.iterrows()], ""]
    lines += [
        "![headroom](figures/headroom.png)",
        "",
        "## Reading",
        "",
        f"- Headroom in return: **{b.diff_mean:+.4f}** [{b.diff_ci_low:+.4f}, {b.diff_ci_high:+.4f}], "
        f"{b.diff_mean / half:.1f}x the half-width of its CI (the bar the env must clear: 3x).",
        f"- Random masked growth vs WAIT: {rnd.diff_mean:+.4f} [{rnd.diff_ci_low:+.4f}, {rnd.diff_ci_high:+.4f}] "
        f"({'costs' if rnd.diff_mean < 0 else 'does not cost'}).",
        "- The episode return is 2 x final accuracy - initial accuracy + rent (the accuracy deltas telescope and",
        "  the terminal term pays the final accuracy once more), so return and accuracy can rank controllers",
        "  differently; both tables are shown.",
    ]
    (args.out / "headroom.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
