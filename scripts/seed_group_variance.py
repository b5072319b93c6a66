"""How much do envs that share their seeds share their advantages? Plain vs group-centred advantage variance.

Resumes a notebook-04 checkpoint (its policy, critic and normaliser) with all its envs in one seed group,
collects ``--rollouts`` rollouts without updating, and prints, for the shared and the op head's advantages,
the variance of the plain advantages, of the leave-one-out centred ones for groups of 2 and of all envs,
and the correlation between the advantages of envs 0 and 1 (docs/ppo.md, "Shared env seeds")::

    .venv/bin/python scripts/seed_group_variance.py artefacts/04_short_training/seed_0/tamiyo_v2_ppo.pt
"""
from __future__ import annotations

import argparse
import warnings
from functools import partial

import pandas as pd
import torch

from esper_lib.envs.morpho import MorphoEnv
from esper_lib.ppo import PPOTrainer, center_advantages_in_groups, compute_advantages, load_trained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="a PPOTrainer checkpoint trained on MorphoEnv (default env arguments)")
    ap.add_argument("--rollouts", type=int, default=6)
    args = ap.parse_args()
    config = load_trained(args.checkpoint)[2]
    n = config.num_envs if config is not None else 0
    if n < 2 or n % 2:
        raise SystemExit(f"{args.checkpoint}: its run has {n} envs; this needs a PPO checkpoint with an even number >= 2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "envs are reset on resume": intended here
        trainer = PPOTrainer.resume(args.checkpoint, partial(MorphoEnv), seed_group_size=n)
    trainer.collector.started = False  # fresh seeds: the envs of the one group are reset together
    cfg, rows = trainer.config, []
    try:
        for _ in range(args.rollouts):
            trainer.collect()
            buf = trainer.buffer
            compute_advantages(buf, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, bootstrap_mode=cfg.bootstrap_mode, op_advantage=cfg.op_advantage)
            for name, adv in (("shared", buf.advantages.clone()), ("op head", buf.op_advantages.clone())):
                rows.append({
                    "advantage": name,
                    "var plain": float(adv.var()),
                    "var centred, g=2": float(center_advantages_in_groups(adv, buf.valid, buf.terminated, 2).var()),
                    f"var centred, g={n}": float(center_advantages_in_groups(adv, buf.valid, buf.terminated, n).var()),
                    "corr(env 0, env 1)": float(torch.corrcoef(torch.stack([adv[0], adv[1]]))[0, 1]),
                })
    finally:
        trainer.close()
    print(pd.DataFrame(rows).groupby("advantage").mean().round(4).to_string())


if __name__ == "__main__":
    main()
