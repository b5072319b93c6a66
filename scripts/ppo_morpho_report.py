"""Write docs/ppo_morpho.md from notebook 04 runs: the design estimator (``expected``) and the plan's (``q``) side by side.

Run notebook 04 twice on the same seeds, then this script:

    .venv/bin/python -m esper_lib.notebooks.runner --only 04_short_training                       # op_advantage="expected"
    .venv/bin/python -m esper_lib.notebooks.runner --only 04_short_training -p op_advantage q --out-root artefacts/q
    .venv/bin/python scripts/ppo_morpho_report.py artefacts/04_short_training artefacts/q/04_short_training
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from esper_lib.evaluation.plots import plot_paired_differences  # noqa: E402
from esper_lib.evaluation.stats import compare_controllers  # noqa: E402
from esper_lib.notebooks.training_report import plot_first_epoch_choices  # noqa: E402
from esper_lib.training_runs import describe_first_epoch, describe_outcome  # noqa: E402


def _row(table: pd.DataFrame, controller: str, train_seed: str = "all") -> pd.Series:
    rows = table[(table.controller == controller) & (table.train_seed.astype(str) == train_seed)]
    return rows.iloc[0]


def section(label: str, folder: Path, figures: Path) -> list[str]:
    summary = json.loads((folder / "run_summary.json").read_text())
    results = pd.read_csv(folder / "evaluation_episodes.csv")
    table = pd.read_csv(folder / "evaluation_summary.csv")
    calibration = pd.read_csv(folder / "calibration_summary.csv")
    ret = table[table.metric == "return"]
    seeds = [str(s) for s in summary["train_seeds"]]
    lines = [
        f"## {label}",
        "",
        f"{len(seeds)} training seeds x {summary['updates_per_seed']} updates ({summary['env_steps_total']:,} env steps in "
        f"{summary['train_seconds'] / 60:.1f} min, {summary['env_steps_per_s']:.1f} env-steps/s), "
        f"{summary['heldout_seeds']} held-out env seeds, best fixed schedule `{summary['best_schedule']}`, "
        f"env host training on {'the C kernels' if summary.get('native_kernels') else 'the torch path (`ESPER_NATIVE=0`)'}.",
        "",
        "| controller | training seed | n | mean return | IQM | paired diff. vs WAIT [95% CI] | P(improvement) |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, r in ret.iterrows():
        diff = "baseline" if pd.isna(r.diff_mean) else f"{r.diff_mean:+.3f} [{r.diff_ci_low:+.3f}, {r.diff_ci_high:+.3f}]"
        p = "" if pd.isna(r.p_improvement) else f"{r.p_improvement:.2f}"
        lines.append(f"| {r.controller} | {r.train_seed} | {r.n} | {r['mean']:.3f} | {r.iqm:.3f} | {diff} | {p} |")
    two_level = compare_controllers(results, "return", baseline="always_wait", resample_training_seeds=True)
    agg = _row(two_level, "ppo")
    lines += [
        "",
        f"The 'all' row's interval resamples held-out episodes within each training run: it says how sure we are "
        f"about *these* {len(seeds)} runs. Resampling the training runs too (two-level bootstrap, the question "
        f"'what would a new run give?') gives {agg.diff_mean:+.3f} [{agg.diff_ci_low:+.3f}, {agg.diff_ci_high:+.3f}].",
        "",
        describe_outcome(results, calibration=calibration),
        "",
    ]
    tag = label.split()[0]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, metric in zip(axes, ("return", "final_val_accuracy")):
        plot_paired_differences(results, metric, "always_wait", ax=ax)
        ax.set_title(f"{metric}: paired difference with always-WAIT ({tag})\n"
                     f"{summary['heldout_seeds']} held-out seeds; one point per episode")
    fig.tight_layout()
    target = figures / f"ppo_morpho_{tag}_controller_comparison.png"
    fig.savefig(target, dpi=110)
    lines += [f"![controller comparison](figures/{target.name})", ""]
    target = figures / f"ppo_morpho_{tag}_learning_curve_and_calibration.png"
    shutil.copyfile(folder / "learning_curve_and_calibration.png", target)
    lines += [f"![learning curves and critic calibration](figures/{target.name})", ""]
    traces = {int(k): pd.read_csv(folder / f"seed_{k}" / "first_epoch.csv") for k in seeds if (folder / f"seed_{k}" / "first_epoch.csv").exists()}
    if traces:  # runs of this round on record p(GERMINATE) at the first epoch of two probe hosts after every update
        fig = plot_first_epoch_choices(traces)
        target = figures / f"ppo_morpho_{tag}_first_epoch_choices.png"
        fig.savefig(target, dpi=110)
        plt.close(fig)
        lines += [describe_first_epoch(traces), "", f"![first-epoch choices over training](figures/{target.name})", ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("expected", type=Path, help="notebook 04 output folder of the op_advantage='expected' run")
    ap.add_argument("q", type=Path, nargs="?", help="the same for op_advantage='q' (optional)")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    ap.add_argument("--reading", type=Path, help="a markdown file with the human reading of the numbers, appended as is")
    args = ap.parse_args()
    figures = args.out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    lines = [
        "# PPO on the morphogenetic env: what notebook 04 measured",
        "",
        "Generated by `scripts/ppo_morpho_report.py` from notebook 04's outputs (commands in its docstring).",
        "Every number below is a paired comparison on held-out env seeds never used in training; CIs are",
        "95% percentile-bootstrap intervals of the mean paired difference (per training seed, and for 'all'",
        "the bootstrap stratified by training seed). The headroom is read against `docs/headroom.md`.",
        "",
    ]
    lines += section("expected (design estimator, default)", args.expected, figures)
    if args.q is not None:
        lines += section("q (the plan's estimator)", args.q, figures)
    if args.reading is not None:
        lines += ["## Reading", "", args.reading.read_text().strip(), ""]
    (args.out / "ppo_morpho.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'ppo_morpho.md'}")


if __name__ == "__main__":
    main()
