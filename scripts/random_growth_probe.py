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

import numpy as np

from esper_lib.constants import AlphaTargetAction, BlueprintAction, GerminationStyle, LifecycleOp
from esper_lib.evaluation.baselines import EpisodeSeededRandomController, evaluate_controller, make_action
from esper_lib.notebooks.helpers import mean_and_se, probe_parser, probe_wait_baseline

FIRST_SEED = 300

VARIANTS = ("plain", "no_prune", "good_args", "no_prune+good_args")
GOOD_ARGS = {"blueprint": int(BlueprintAction.NORM), "style": int(GerminationStyle.LINEAR_ADD), "alpha_target": int(AlphaTargetAction.FULL)}


class RandomVariant(EpisodeSeededRandomController):
    """Random masked policy (seeded per episode with ``[seed, episode seed]``), optionally without PRUNE
    and/or with the good arguments at GERMINATE."""

    def __init__(self, seed: int, no_prune: bool = False, good_args: bool = False):
        super().__init__(seed=seed)
        self.no_prune, self.good_args = no_prune, good_args

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
    ap = probe_parser(__doc__, seeds=16, first_seed=FIRST_SEED)
    ap.add_argument("--policy-seed", type=int, default=5)
    args = ap.parse_args()
    env_fn, seeds, wait = probe_wait_baseline(args, FIRST_SEED)
    print(f"env {dict(args.env) or 'defaults'}, {args.seeds} env seeds; return difference with always-WAIT (mean, SE over seeds)")
    for variant in VARIANTS:
        flags = {flag: True for flag in variant.split("+") if flag != "plain"}
        res = evaluate_controller(RandomVariant(args.policy_seed, **flags), env_fn, seeds)
        d = res["return"].to_numpy() - wait["return"].to_numpy()
        print(f"  {variant:20s} {mean_and_se(d)}  "
              f"germinations {res.germinations.mean():.1f}, fossilizations {res.fossilizations.mean():.1f} per episode")


if __name__ == "__main__":
    main()
