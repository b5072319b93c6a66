"""Which part of random exploration makes growth lose to always-WAIT? Random ops with and without random arguments.

An untrained policy picks ops and arguments (blueprint, style, alpha target, ...) at random. This
probe plays the random masked policy in variants, paired by env seed with always-WAIT:

- ``plain``: random ops, random arguments (the untrained policy);
- ``no_prune``: PRUNE never chosen;
- ``good_args``: GERMINATE always with the best fixed schedule's arguments (NORM blueprint,
  LINEAR_ADD style, alpha target 1.0), every other choice random;
- ``no_prune+good_args``: both.

If ``good_args`` beats WAIT while ``plain`` loses, the op head of an untrained policy is told "growth
loses" because of its argument heads, not because growing is bad (docs/ppo.md, "Per-head averaging").

    .venv/bin/python scripts/random_growth_probe.py                 # 16 env seeds, env defaults (~2 min)
    .venv/bin/python scripts/random_growth_probe.py --env seed_lr=0.05
"""
from __future__ import annotations

import argparse
from functools import partial

import numpy as np
import torch

from esper_lib.constants import AlphaTargetAction, BlueprintAction, GerminationStyle, LifecycleOp
from esper_lib.envs.morpho import MorphoEnv
from esper_lib.evaluation.baselines import AlwaysWaitController, RandomMaskedController, evaluate_controller, make_action
from esper_lib.notebooks.helpers import json_assignment as _assignment

VARIANTS = ("plain", "no_prune", "good_args", "no_prune+good_args")
GOOD_ARGS = {"blueprint": int(BlueprintAction.NORM), "style": int(GerminationStyle.LINEAR_ADD), "alpha_target": int(AlphaTargetAction.FULL)}


class RandomVariant(RandomMaskedController):
    """Random masked policy (seeded per episode with ``[seed, episode seed]``), optionally without PRUNE
    and/or with the good arguments at GERMINATE."""

    def __init__(self, seed: int, no_prune: bool = False, good_args: bool = False):
        super().__init__(seed=seed)
        self.base_seed, self.no_prune, self.good_args = int(seed), no_prune, good_args

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self.rng = np.random.default_rng([self.base_seed, int(seed)])

    def act(self, obs: dict) -> np.ndarray:
        masks = obs["action_mask"]
        op_mask = np.asarray(masks["op"]).astype(bool).copy()
        if self.no_prune and op_mask.sum() > 1:
            op_mask[LifecycleOp.PRUNE] = False
        op = LifecycleOp(self._choice(op_mask))
        if op == LifecycleOp.WAIT:
            return make_action(op)
        heads = self.random_heads(op, masks)
        if self.good_args and op == LifecycleOp.GERMINATE:
            heads.update({k: v for k, v in GOOD_ARGS.items() if np.asarray(masks[k])[v]})
        return make_action(op, **heads)




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", type=_assignment, action="append", default=[], metavar="ARG=JSON", help="MorphoEnv override")
    ap.add_argument("--seeds", type=int, default=16, help="env seeds 300.. (paired with always-WAIT)")
    ap.add_argument("--policy-seed", type=int, default=5)
    args = ap.parse_args()
    if args.seeds < 2:
        raise SystemExit("--seeds must be >= 2")
    torch.set_num_threads(1)
    env_fn = partial(MorphoEnv, **dict(args.env))
    seeds = range(300, 300 + args.seeds)
    wait = evaluate_controller(AlwaysWaitController(), env_fn, seeds)["return"].to_numpy()
    print(f"env {dict(args.env) or 'defaults'}, {args.seeds} env seeds; return difference with always-WAIT (mean, SE over seeds)")
    for variant in VARIANTS:
        flags = {flag: True for flag in variant.split("+") if flag != "plain"}
        res = evaluate_controller(RandomVariant(args.policy_seed, **flags), env_fn, seeds)
        d = res["return"].to_numpy() - wait
        print(f"  {variant:20s} {d.mean():+.3f} (SE {d.std(ddof=1) / np.sqrt(len(d)):.3f})  "
              f"germinations {res.germinations.mean():.1f}, fossilizations {res.fossilizations.mean():.1f} per episode")


if __name__ == "__main__":
    main()
