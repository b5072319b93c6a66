"""Comparing a trained policy with a probe's known optimum (values and action probabilities)."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from esper_lib.constants import HEAD_NAMES
from esper_lib.masking import canonicalise_mask
from esper_lib.network import FactoredRecurrentActorCritic, Hidden
from esper_lib.ppo.controller import PolicyController
from esper_lib.ppo.normalization import RunningObsNormalizer


@torch.no_grad()
def action_probability(
    policy: FactoredRecurrentActorCritic,
    state: torch.Tensor,
    blueprint_indices: torch.Tensor,
    masks: dict[str, torch.Tensor],
    hidden: Hidden,
    partial_action: dict[str, int],
) -> float:
    """pi(partial action | s): the product over the given heads (``op`` required) of their probabilities given that op.

    Shapes as in ``PolicyController.observation_tensors`` (one observation, batch 1); ``hidden`` is
    the LSTM state *before* this observation.
    """
    if "op" not in partial_action:
        raise ValueError("partial_action must include the op")
    op = torch.tensor([partial_action["op"]])
    actions: dict[str, torch.Tensor] = {}
    seq_masks: dict[str, torch.Tensor] = {}
    for name in HEAD_NAMES:
        mask = masks.get(name, torch.ones(1, policy.head_sizes[name], dtype=torch.bool))
        if name == "slot" and "slot_by_op" in masks:
            mask = mask & masks["slot_by_op"][:, partial_action["op"]]
        mask = canonicalise_mask(name, mask, op)
        # unspecified heads: any action valid for this op (their log-probs are not used)
        actions[name] = torch.tensor([[partial_action.get(name, int(mask[0].float().argmax()))]])
        seq_masks[name] = mask.unsqueeze(1)
    out = policy.evaluate_actions(state.unsqueeze(1), blueprint_indices.unsqueeze(1), actions, hidden=hidden, action_mask=seq_masks)
    return float(sum(out.log_probs[h][0, 0] for h in partial_action).exp())


def probe_report(
    policy: FactoredRecurrentActorCritic,
    env: Any,
    obs_normalizer: RunningObsNormalizer | None | bool = None,
    episodes: int = 10,
    seed: int = 0,
    deterministic: bool = True,
) -> pd.DataFrame:
    """Roll the policy through ``episodes`` episodes of a probe; one row per step.

    Columns: ``episode``, ``t``, ``cue``, ``op`` (taken), ``reward``, ``true_value`` (V*(s)),
    ``optimal_op`` (the probe's optimal op, or the op taken when every op is optimal), ``q_optimal_op``
    (learned Q(s, optimal_op)), ``true_q_optimal_op`` (Q*(s, optimal_op)), ``v_expected`` (learned
    sum_o pi(o | s) Q(s, o)), ``p_optimal`` (policy probability of the probe's optimal action over
    the heads that matter; NaN when every action is optimal), ``finite_horizon_value`` (truncation
    probe only).
    """
    ctl = PolicyController(policy, obs_normalizer, deterministic=deterministic, seed=seed)
    rows: list[dict[str, Any]] = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        ctl.reset()
        done = False
        while not done:
            state, bp, masks = ctl.observation_tensors(obs)
            hidden_before = ctl.hidden
            true_value = float(env.optimal_value())
            true_q = np.asarray(env.optimal_q(), dtype=np.float64)
            optimal = env.optimal_action()
            t = env.t
            action = ctl.act(obs)
            res = ctl.last
            op_taken = int(action[0])
            opt_op = optimal.get("op", op_taken)
            row = {
                "episode": ep,
                "t": t,
                "cue": float(getattr(env, "cue", 0.0)),
                "op": op_taken,
                "true_value": true_value,
                "optimal_op": opt_op,
                "q_optimal_op": float(res.q_all[0, opt_op]),
                "true_q_optimal_op": float(true_q[opt_op]),
                "v_expected": float((res.q_all[0] * res.op_probs[0]).sum()),
                "p_optimal": action_probability(policy, state, bp, masks, hidden_before, optimal) if optimal else float("nan"),
            }
            if hasattr(env, "finite_horizon_value"):
                row["finite_horizon_value"] = float(env.finite_horizon_value(t))
            obs, reward, terminated, truncated, _ = env.step(action)
            row["reward"] = float(reward)
            rows.append(row)
            done = terminated or truncated
    return pd.DataFrame(rows)
