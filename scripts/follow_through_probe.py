"""Is an early germination worth it when the ops that follow it are random? Which random ops undo it?

The best fixed schedule germinates at epoch 0 and then only advances and fossilizes its seed. An
untrained policy picks its later ops at random. This probe plays, paired by env seed with
always-WAIT, an *opening* at epoch 0 followed by a masked random *follow-up* at every later epoch:

- openings: ``wait`` (WAIT at epoch 0), ``random_args`` (GERMINATE with uniform random valid
  arguments, as an untrained policy's argument heads choose them), ``best`` (GERMINATE with the best
  fixed schedule's slot, blueprint, style, tempo and alpha target, from ``--schedule``) and every
  ``--germinate BLUEPRINT:STYLE`` given (the best schedule's slot, tempo and alpha target);
- follow-ups (``FOLLOW_UPS``): the random masked policy over all valid ops, or without some of them
  (PRUNE, SET_ALPHA_TARGET, both), or only ADVANCE and FOSSILIZE (WAIT when neither is valid).

For each follow-up it prints every opening's return minus always-WAIT's and the *opening effect*:
the germinating opening minus the ``wait`` opening under the same follow-up and the same random
stream (seeded per episode). That effect is what the op head of a policy whose later ops behave like
that follow-up is told about GERMINATE at epoch 0: when it is negative under ``random``, PPO's first
updates push an early germination down whatever the arguments (docs/ppo_morpho_reading.md).

    .venv/bin/python scripts/follow_through_probe.py                       # 16 env seeds (~3 min)
    .venv/bin/python scripts/follow_through_probe.py --germinate CONV_HEAVY:LINEAR_ADD --seeds 24
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from esper_lib.constants import BlueprintAction, GerminationStyle, LifecycleOp
from esper_lib.evaluation.baselines import EpisodeSeededRandomController, evaluate_controller, make_action
from esper_lib.evaluation.schedules import FixedSchedule, schedule_from_dict
from esper_lib.notebooks.helpers import mean_and_se, probe_parser, probe_wait_baseline

FIRST_SEED = 300
RANDOM_ARGS = "random_args"
FOLLOW_UPS: dict[str, tuple[LifecycleOp, ...]] = {  # name -> ops the random follow-up never picks
    "random": (),
    "no_prune": (LifecycleOp.PRUNE,),
    "no_set_alpha": (LifecycleOp.SET_ALPHA_TARGET,),
    "no_prune_no_set_alpha": (LifecycleOp.PRUNE, LifecycleOp.SET_ALPHA_TARGET),
    "advance_or_fossilize": (LifecycleOp.WAIT, LifecycleOp.GERMINATE, LifecycleOp.SET_ALPHA_TARGET, LifecycleOp.PRUNE),
}


class OpeningThenRandom(EpisodeSeededRandomController):
    """``opening`` (an action, None for WAIT, or ``RANDOM_ARGS``: GERMINATE with uniform random valid
    arguments) at the episode's first step, then uniform random valid ops
    other than ``exclude`` (WAIT when no other op is valid) with uniform random arguments. The random
    stream is seeded per episode with ``[seed, episode seed]``, so two instances with the same ``seed``
    follow up with the same draws wherever they meet the same choices."""

    def __init__(self, seed: int, opening: np.ndarray | str | None, exclude: tuple[LifecycleOp, ...] = ()):
        super().__init__(seed=seed)
        self.opening, self.exclude = opening, tuple(exclude)
        self._step = 0

    def reset(self, seed: int | None = None) -> None:
        self._step = 0
        super().reset(seed)

    def act(self, obs: dict) -> np.ndarray:
        first, self._step = self._step == 0, self._step + 1
        masks = obs["action_mask"]
        if first and isinstance(self.opening, str):
            return make_action(LifecycleOp.GERMINATE, **self.random_heads(LifecycleOp.GERMINATE, masks))
        if first:
            return make_action(LifecycleOp.WAIT) if self.opening is None else self.opening.copy()
        op_mask = np.asarray(masks["op"]).astype(bool).copy()
        op_mask[list(self.exclude)] = False
        if not op_mask.any():
            return make_action(LifecycleOp.WAIT)
        op = LifecycleOp(self._choice(op_mask))
        return make_action(op) if op == LifecycleOp.WAIT else make_action(op, **self.random_heads(op, masks))


def germination(schedule: FixedSchedule, blueprint: str | None = None, style: str | None = None) -> np.ndarray:
    """The GERMINATE action of ``schedule``'s first seed (slot, blueprint, style, tempo, alpha target), with
    ``blueprint`` / ``style`` (names of ``BlueprintAction`` / ``GerminationStyle``) replacing its own when given."""
    try:
        bp = BlueprintAction[blueprint.upper()] if blueprint else schedule.blueprint
        st = GerminationStyle[style.upper()] if style else schedule.style
    except KeyError as err:
        raise SystemExit(f"--germinate expects BLUEPRINT:STYLE, names of BlueprintAction and GerminationStyle; got {blueprint}:{style}") from err
    return make_action(LifecycleOp.GERMINATE, slot=schedule.slot, blueprint=int(bp), style=int(st), tempo=int(schedule.tempo),
                       alpha_target=int(schedule.alpha_target))


def main() -> None:
    ap = probe_parser(__doc__, seeds=16, first_seed=FIRST_SEED)
    ap.add_argument("--schedule", type=Path, default=Path("docs/figures/headroom_best_schedule.json"))
    ap.add_argument("--germinate", action="append", default=[], metavar="BLUEPRINT:STYLE", help="another germinating opening")
    ap.add_argument("--follow-ups", nargs="+", default=list(FOLLOW_UPS), choices=list(FOLLOW_UPS))
    ap.add_argument("--policy-seed", type=int, default=5)
    args = ap.parse_args()
    best = schedule_from_dict(json.loads(args.schedule.read_text())["schedule"])
    openings: dict[str, np.ndarray | str | None] = {
        "wait": None,
        RANDOM_ARGS: RANDOM_ARGS,
        "best": germination(best),
    }
    for pair in args.germinate:
        blueprint, _, style = pair.partition(":")
        openings[pair.lower()] = germination(best, blueprint, style or None)
    env_fn, seeds, wait = probe_wait_baseline(args, FIRST_SEED)
    print(f"env {dict(args.env) or 'defaults'}, {args.seeds} env seeds, best = {best.name}; return minus always-WAIT "
          "(mean, SE over seeds); opening effect = that opening minus the wait opening, same follow-up draws")
    for follow in args.follow_ups:
        returns = {name: evaluate_controller(OpeningThenRandom(args.policy_seed, action, FOLLOW_UPS[follow]), env_fn, seeds)["return"].to_numpy()
                   for name, action in openings.items()}
        print(f"follow-up {follow} (never {', '.join(op.name for op in FOLLOW_UPS[follow]) or '-'}):")
        for name, r in returns.items():
            effect = "" if name == "wait" else f"   opening effect {mean_and_se(r - returns['wait'])}"
            print(f"  {name:28s} {mean_and_se(r - wait['return'].to_numpy())}{effect}")


if __name__ == "__main__":
    main()
