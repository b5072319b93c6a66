"""GAE against the op-conditioned critic Q(s, op), and the op head's corrected advantage.

Notation per env and step t: ``Q_t = Q(s_t, op_t)`` (stored at collection), ``V^pi(s) = sum_o
pi(o | s) Q(s, o)``. The value of the next state depends on ``bootstrap_mode``:

- ``"expected"`` (default): ``V'_t = V^pi(s_{t+1})``;
- ``"sampled"`` (the plan's): ``V'_t = Q(s_{t+1}, op_{t+1})``, the op actually sampled there;
- ``"greedy"``: ``V'_t = max_o Q(s_{t+1}, o)`` over the ops valid there: every bootstrap assumes the
  best op from then on (a Peng's Q(lambda)-style optimistic target; with lambda < 1 a share 1 - lambda of
  each step's return is that optimistic value). Where the policy's later ops are still random, the
  value of an earlier action is then judged as if they were not (``scripts/follow_through_probe.py``).

At a truncation ``V'_t`` is the bootstrap computed from the post-step (final) observation with the
carried LSTM state (same mode); at a termination it is 0; after the last stored step it is the
value of the observation the rollout stops at. Then

    delta_t = r_t + gamma * V'_t - Q_t
    A_t     = delta_t + gamma * lambda * (1 - cut_t) * A_{t+1},  cut_t = terminated | truncated | ~valid
    R_t     = A_t + Q_t                     (target of Q(s_t, op_t))

Heads other than op use ``A_t``. The op head uses ``A_t`` (``op_advantage="q"``, the plan's) or
``A_t + Q_t - V^pi(s_t)`` (``"expected"``, default; design section 4), i.e. the same return measured
against the expected value of the state instead of the value of the chosen op.

Everything is vectorised over envs; the only Python loop runs over time.
"""
from __future__ import annotations

import torch

from esper_lib.ppo.buffer import BufferError, RolloutBuffer
from esper_lib.ppo.config import BOOTSTRAP_MODES, OP_ADVANTAGE_MODES


def next_state_values(buffer: RolloutBuffer, bootstrap_mode: str) -> torch.Tensor:
    """``[N, T]`` value of s_{t+1} under ``bootstrap_mode`` when the episode goes on (not at truncation/termination)."""
    if bootstrap_mode == "expected":
        per_step, final = buffer.expected_values(), buffer.final_value_expected
    elif bootstrap_mode == "sampled":
        per_step, final = buffer.values, buffer.final_value_sampled
    elif bootstrap_mode == "greedy":
        per_step, final = buffer.greedy_values(), buffer.final_value_greedy
    else:
        raise ValueError(f"bootstrap_mode must be one of {BOOTSTRAP_MODES}, got {bootstrap_mode!r}")
    return torch.cat([per_step[:, 1:], final.unsqueeze(1)], dim=1)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    bootstrap_values: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    valid: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE per env. All inputs ``[N, T]``; returns ``(advantages, returns)`` ``[N, T]``.

    ``values`` is the baseline of each step (Q(s_t, op_t)); ``next_values`` the value of s_{t+1}
    when the episode continues; ``bootstrap_values`` the value of the final observation where
    ``truncated``. Terminated steps never bootstrap. Invalid steps get advantage 0 and cut the chain.
    """
    shape = rewards.shape
    for name, x in (("values", values), ("next_values", next_values), ("bootstrap_values", bootstrap_values), ("terminated", terminated), ("truncated", truncated), ("valid", valid)):
        if x.shape != shape:
            raise ValueError(f"gae: {name} has shape {tuple(x.shape)}, rewards has {tuple(shape)}")
    stop = terminated | ~valid
    v_next = torch.where(truncated, bootstrap_values, torch.where(stop, torch.zeros_like(next_values), next_values))
    deltas = rewards + gamma * v_next - values
    carry = (gamma * gae_lambda) * (~(stop | truncated)).to(rewards.dtype)
    advantages = torch.empty_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in range(shape[1] - 1, -1, -1):
        last = deltas[:, t] + carry[:, t] * last
        advantages[:, t] = last
    advantages = advantages.masked_fill(~valid, 0.0)
    return advantages, advantages + values


def op_head_advantages(advantages: torch.Tensor, values: torch.Tensor, expected_values: torch.Tensor, op_advantage: str) -> torch.Tensor:
    """``[N, T]`` advantage of the op head: ``A`` ("q") or ``A + Q(s, op_t) - V^pi(s)`` ("expected")."""
    if op_advantage == "q":
        return advantages.clone()
    if op_advantage == "expected":
        return advantages + values - expected_values
    raise ValueError(f"op_advantage must be one of {OP_ADVANTAGE_MODES}, got {op_advantage!r}")


def compute_advantages(buffer: RolloutBuffer, *, gamma: float, gae_lambda: float, bootstrap_mode: str = "expected", op_advantage: str = "expected",
                       seed_group_size: int = 1) -> None:
    """Fill ``buffer.advantages``, ``buffer.op_advantages`` and ``buffer.returns`` (raw, not normalised).

    ``seed_group_size > 1``: both advantages are then centred within groups of envs that share
    their seeds (``center_advantages_in_groups``); the returns (the critic's targets) are not.
    """
    if not buffer.finished:
        raise BufferError("compute_advantages: the rollout is not finished (call buffer.finish())")
    next_values = next_state_values(buffer, bootstrap_mode)
    bootstrap = {"expected": buffer.bootstrap_expected, "sampled": buffer.bootstrap_sampled, "greedy": buffer.bootstrap_greedy}[bootstrap_mode]
    if bootstrap_mode == "greedy" and bool(torch.isnan(torch.where(buffer.truncated, bootstrap, 0.0)).any() | torch.isnan(next_values[:, -1]).any()):
        raise BufferError("compute_advantages: bootstrap_mode='greedy' needs the greedy values (set_bootstrap(..., greedy) and finish(..., final_value_greedy))")
    adv, ret = gae(
        buffer.rewards,
        buffer.values,
        next_values,
        bootstrap,
        buffer.terminated,
        buffer.truncated,
        buffer.valid,
        gamma,
        gae_lambda,
    )
    op_adv = op_head_advantages(adv, buffer.values, buffer.expected_values(), op_advantage).masked_fill(~buffer.valid, 0.0)
    if seed_group_size > 1:
        adv = center_advantages_in_groups(adv, buffer.valid, buffer.terminated, seed_group_size, buffer.truncated)
        op_adv = center_advantages_in_groups(op_adv, buffer.valid, buffer.terminated, seed_group_size, buffer.truncated)
    buffer.advantages.copy_(adv)
    buffer.returns.copy_(ret)
    buffer.op_advantages.copy_(op_adv)
    buffer.advantages_ready = True


def center_advantages_in_groups(
    advantages: torch.Tensor, valid: torch.Tensor, terminated: torch.Tensor, group_size: int, truncated: torch.Tensor | None = None
) -> torch.Tensor:
    """``[N, T]`` advantages minus the mean of the other envs of their group at the same step.

    Envs ``k*g .. k*g+g-1`` form group ``k`` (``g = group_size``; N must be a multiple). They share
    their episode seeds (``PPOConfig.seed_group_size``), so they are at the same step of the same
    episode: a group whose envs' episodes end (``terminated``, ``truncated``) or whose steps are
    ``valid`` at different steps raises ``ValueError``. The leave-one-out mean of the others does not depend on
    env i's action, so it is a valid baseline (the gradient's expectation is unchanged); it removes
    what the group's episodes share. Invalid steps stay 0.
    """
    if advantages.dim() != 2:
        raise ValueError(f"center_advantages_in_groups: advantages must be [N, T], got shape {tuple(advantages.shape)}")
    n, t = advantages.shape
    for name, x in (("valid", valid), ("terminated", terminated), ("truncated", truncated)):
        if x is not None and x.shape != advantages.shape:
            raise ValueError(f"center_advantages_in_groups: {name} has shape {tuple(x.shape)}, advantages have {(n, t)}")
    if not isinstance(group_size, int) or group_size < 1 or n % group_size:
        raise ValueError(f"group_size must be a positive int dividing the number of envs ({n}), got {group_size!r}")
    if group_size == 1:
        return advantages.clone()
    checks = [("terminated", terminated), ("valid", valid)] + ([("truncated", truncated)] if truncated is not None else [])
    for name, flags in checks:
        grouped = flags.reshape(n // group_size, group_size, t)
        if bool((grouped != grouped[:, :1]).any()):
            raise ValueError(
                f"center_advantages_in_groups: the envs of a group differ in '{name}' at some step; envs that share "
                "their episode seeds must run episodes of the same length in step (a fixed-length env such as MorphoEnv)"
            )
    grouped = advantages.reshape(n // group_size, group_size, t)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(n, t).masked_fill(~valid, 0.0)


def normalize_masked(x: torch.Tensor, valid: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / (std + eps)`` with mean and std over the ``valid`` entries only; invalid -> 0."""
    n = valid.sum().clamp(min=1)
    mean = torch.where(valid, x, torch.zeros_like(x)).sum() / n
    var = torch.where(valid, (x - mean).square(), torch.zeros_like(x)).sum() / (n - 1).clamp(min=1)
    return torch.where(valid, (x - mean) / (var.sqrt() + eps), torch.zeros_like(x))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, valid: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over valid steps (NaN when returns are constant)."""
    v, r = values[valid].double(), returns[valid].double()
    if r.numel() < 2:
        return float("nan")
    var_r = r.var()
    if var_r <= 0:
        return float("nan")
    return float(1.0 - (r - v).var() / var_r)
