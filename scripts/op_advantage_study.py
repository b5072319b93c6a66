"""Op-head advantage study: ``op_advantage="expected"`` (default) vs ``"q"`` (the plan's) on OpRewardProbe.

Writes docs/figures/op_advantage.png, docs/figures/op_advantage.csv and docs/op_advantage.md.

    .venv/bin/python scripts/op_advantage_study.py            # 5 seeds x 60 updates, about 2-4 minutes on 2 CPU cores
    .venv/bin/python scripts/op_advantage_study.py --seeds 2 --updates 20 --out /tmp/study   # quick look
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from esper_lib.envs.probes import OpRewardProbe  # noqa: E402
from esper_lib.ppo.experiments import OP_ADVANTAGE_DEFAULTS, op_advantage_run  # noqa: E402

MODES = ("expected", "q")
SCENARIOS = {False: "critic from scratch", True: "critic pre-fitted to Q*(s, op)"}
COLORS = {"expected": "tab:blue", "q": "tab:red"}


def run(seeds: int, updates: int) -> pd.DataFrame:
    frames = []
    jobs = [(m, p, s) for p in SCENARIOS for m in MODES for s in range(seeds)]
    for mode, prefit, seed in tqdm(jobs, desc="runs"):
        df = op_advantage_run(mode, seed=seed, num_updates=updates, prefit=prefit)
        df["mode"], df["prefit"], df["seed"] = mode, prefit, seed
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def first_reach(p: pd.Series, level: float = 0.9) -> float:
    hit = np.flatnonzero(p.to_numpy() >= level)
    return float(hit[0] + 1) if hit.size else np.nan


def summarise(curves: pd.DataFrame, tail: int = 5) -> pd.DataFrame:
    rows = []
    for (prefit, mode), g in curves.groupby(["prefit", "mode"], sort=False):
        per_seed = g.groupby("seed")
        final = per_seed.p_best.apply(lambda s: s.iloc[-tail:].mean())
        reach = per_seed.p_best.apply(first_reach)
        first = per_seed.head(1)
        after = []
        for _, gs in per_seed:
            hit = np.flatnonzero(gs.p_best.to_numpy() >= 0.9)
            after.append(gs.p_best.iloc[hit[0]:].min() if hit.size else np.nan)
        after = np.asarray(after)
        rows.append(
            {
                "scenario": SCENARIOS[prefit],
                "op_advantage": mode,
                f"p(best op), mean of last {tail} updates": f"{final.mean():.3f} ± {final.std(ddof=0):.3f}",
                "min over seeds": f"{final.min():.3f}",
                "seeds ending >= 0.9": f"{int((final >= 0.9).sum())}/{len(final)}",
                "first update with p >= 0.9 (median)": "never" if reach.isna().all() else f"{np.nanmedian(reach):.0f} ({int(reach.notna().sum())}/{len(reach)} seeds)",
                "lowest p after first reaching 0.9": "-" if np.isnan(after).all() else f"{np.nanmin(after):.3f}",
                "measured op-head advantage gap, update 1": f"{(first.op_adv_best - first.op_adv_other).mean():+.3f}",
            }
        )
    return pd.DataFrame(rows)


def plot(curves: pd.DataFrame, path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for col, prefit in enumerate(SCENARIOS):
        for mode in MODES:
            g = curves[(curves.prefit == prefit) & (curves["mode"] == mode)]
            piv = g.pivot(index="update", columns="seed", values="p_best")
            gap = g.pivot(index="update", columns="seed", values="signal_gap")
            x = piv.index + 1
            axes[0, col].plot(x, piv.to_numpy(), color=COLORS[mode], alpha=0.25, lw=0.8)
            axes[0, col].plot(x, piv.mean(axis=1), color=COLORS[mode], lw=2.2, label=f'op_advantage="{mode}"')
            axes[1, col].plot(x, gap.to_numpy(), color=COLORS[mode], alpha=0.25, lw=0.8)
            axes[1, col].plot(x, gap.mean(axis=1), color=COLORS[mode], lw=2.0, label=f'"{mode}"')
        axes[0, col].axhline(0.9, color="grey", ls=":", lw=1)
        axes[0, col].axhline(1 / 6, color="grey", ls="--", lw=0.8)
        axes[0, col].set_title(SCENARIOS[prefit])
        axes[0, col].set_ylim(-0.02, 1.02)
        axes[1, col].axhline(0.0, color="grey", lw=0.8)
        axes[1, col].set_xlabel("PPO update")
    axes[0, 0].set_ylabel("pi(best op = FOSSILIZE | s)")
    axes[1, 0].set_ylabel("op-head signal: expected advantage\nof best op minus other ops")
    axes[0, 0].legend(loc="lower right")
    fig.suptitle("OpRewardProbe: op-head advantage against Q(s, op) (\"q\") vs against V(s) = sum_o pi(o|s) Q(s, o) (\"expected\")")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_doc(path: Path, table: pd.DataFrame, seeds: int, updates: int, seconds: float) -> None:
    cfg = ", ".join(f"{k}={v}" for k, v in OP_ADVANTAGE_DEFAULTS.items())
    header = "| " + " | ".join(table.columns) + " |\n|" + "---|" * len(table.columns) + "\n"
    body = "".join("| " + " | ".join(str(v) for v in row) + " |\n" for row in table.itertuples(index=False))
    text = f"""# Op-head advantage: `expected` vs `q`

Generated by `scripts/op_advantage_study.py` ({seeds} seeds x {updates} updates per run, {seconds:.0f} s on this
machine, torch {torch.__version__}, {torch.get_num_threads()} thread(s)). Re-run it to refresh this page, the figure
and `docs/figures/op_advantage.csv` (every curve, one row per update).

## What is compared

The critic is Q(s, op). The plan gives every head the same GAE advantage against it (`op_advantage="q"`).
That is fine for the heads chosen *given* the op, but for the op head the baseline depends on the very
action being judged: once Q(s, op) is accurate, A = r + gamma V' - Q(s, op_t) no longer says whether
op_t was better than the other ops, only how lucky the step was. Our default (`op_advantage="expected"`,
design section 4) gives the op head A + Q(s, op_t) - sum_o pi(o | s) Q(s, o): the same return measured
against the value of the state under the current op distribution.

Probe: `OpRewardProbe`, one step, reward by op `{OpRewardProbe.OP_REWARDS}` (FOSSILIZE best, V* = 1).
Config (`esper_lib.ppo.experiments.OP_ADVANTAGE_DEFAULTS`): {cfg}. Two scenarios:

- **critic from scratch**: both the actor and the critic start untrained;
- **critic pre-fitted**: before PPO, the value head alone (the actor is untouched) is regressed onto the
  true Q*(s, op) at the probe's state, i.e. the regime of a critic that already knows the op values,
  as after a warm start or whenever the critic learns faster than the op head.

![op advantage curves](figures/op_advantage.png)

Top: pi(best op | s) per seed (thin) and mean (thick); dotted line 0.9, dashed 1/6 (uniform).
Bottom: the signal the op head can follow, i.e. the expected op-head advantage of the best op minus the
mean over the other ops, computed from the learned critic after each update (on this one-step probe
E[A_op | o] = r(o) - b(o) exactly, with b(o) = Q(s, o) for `q` and V(s) for `expected`;
`esper_lib.ppo.experiments.signal_gap`). The table's last column is the same gap measured from the
rollout of the first update (raw advantages, before normalisation).

## Numbers

{header}{body}
## Reading

- With a pre-fitted critic the plan's estimator gives the op head a signal of about 0 from the
  first update on: the op head has no signal, follows noise (advantage normalisation scales that noise to
  unit size) and wanders, mostly away from the best op. The expected baseline keeps a clear positive gap
  and learns the best op in about ten updates, the same speed as from scratch.
- From scratch, `q` still gets there: early on the critic lags the actor, and that lag is the only
  signal the op head receives (bottom left: it decays as Q(s, op) is learned). Once the critic has
  caught up nothing holds the op head at the optimum: runs drift off it (see the lowest p after first
  reaching 0.9), while `expected` keeps a restoring signal: it dips briefly (advantage normalisation
  amplifies noise once the policy is nearly deterministic) and recovers within a few updates.
- The other seven heads are unaffected: they use the same GAE advantage in both modes.

The regression test `tests/test_ppo_op_advantage.py` checks the same behaviour on one seed (20 updates).
"""
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--updates", type=int, default=60)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs", help="docs folder to write into")
    args = ap.parse_args()
    t0 = time.perf_counter()
    curves = run(args.seeds, args.updates)
    seconds = time.perf_counter() - t0
    table = summarise(curves)
    (args.out / "figures").mkdir(parents=True, exist_ok=True)
    curves.to_csv(args.out / "figures" / "op_advantage.csv", index=False, float_format="%.5g")
    plot(curves, args.out / "figures" / "op_advantage.png")
    write_doc(args.out / "op_advantage.md", table, args.seeds, args.updates, seconds)
    print(table.to_string(index=False))
    print(f"wrote {args.out / 'op_advantage.md'} and figures/op_advantage.png ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
