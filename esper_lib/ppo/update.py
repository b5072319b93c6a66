"""The PPO update: per-head clipped surrogates, Q(s, stored op) value loss, per-head entropy bonus.

For a minibatch of sequences, with ``rel[m, l, h]`` the causal relevance of head h for the stored op
(``RELEVANCE_TABLE``) and'ed with ``valid``, and ``n`` the number of valid steps:

    ratio_h    = exp(log pi_h(a_h) - log pi_h,old(a_h))
    L_pi,h     = sum_{rel} max(-A_h ratio_h, -A_h clip(ratio_h, 1 - eps, 1 + eps)) / n
    L_pi       = sum_h L_pi,h
    H          = sum_h coef_h * sum_{rel} entropy_h / n   (coef_h: PPOConfig.head_entropy_coefs)
    L_V        = 0.5 * sum_valid (Q(s, op_stored) - R)^2 / n           (optionally clipped around the old Q)
    loss       = L_pi - ent_coef * H + vf_coef * L_V

Dividing every head by the number of valid steps (not by the steps where that head is relevant)
keeps the sum over heads equal to the clipped surrogate of the joint factored policy, whose
log-prob is the sum of the relevant heads' log-probs. Irrelevant heads enter through ``torch.where``,
so they receive exactly zero gradient from the policy loss and the entropy bonus.

The approximate KL is the joint one, ``mean_valid((r - 1) - log r)`` with ``log r`` the sum of
the relevant heads' log-ratios (Schulman's low-variance estimator).

With ``PPOConfig.autocast_bf16`` the network's forward (``evaluate_actions``) runs under bfloat16
autocast, so its backward does too; the per-head log-probs, entropies and values are cast to float32
before the losses, and the reduction, gradient clipping and optimizer step stay in float32 (the
parameters and their gradients are float32 throughout).

No step on a non-finite signal: the advantages and returns are checked once per update (before the
first step), the loss and the gradient norm before every optimizer step; a NaN or inf raises
``NonFiniteError`` naming it, the epoch, the minibatch and the update, and that step is not taken,
so the weights stay finite (minibatches before it in the same update have already stepped).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from esper_lib.constants import ENTROPY_COEF_PER_HEAD, HEAD_NAMES, NUM_HEADS, RELEVANCE_TABLE
from esper_lib.finite import check_finite
from esper_lib.network import FactoredRecurrentActorCritic
from esper_lib.ppo.advantages import normalize_masked
from esper_lib.ppo.buffer import RolloutBuffer, SequenceBatch
from esper_lib.ppo.config import PPOConfig

ENTROPY_COEFS = torch.tensor([ENTROPY_COEF_PER_HEAD[h] for h in HEAD_NAMES])  # [8]


class LossOutput(NamedTuple):
    """Losses of one minibatch (scalars are 0-dim tensors; per-head tensors are ``[8]`` in HEAD_NAMES order)."""

    loss: torch.Tensor  # total, differentiable
    policy_loss: torch.Tensor  # sum over heads
    policy_loss_per_head: torch.Tensor  # [8]
    value_loss: torch.Tensor
    entropy_bonus: torch.Tensor  # sum_h coef_h * mean relevant entropy (the term multiplied by ent_coef)
    entropy_per_head: torch.Tensor  # [8] mean entropy over steps where the head is relevant (NaN if none)
    approx_kl: torch.Tensor  # joint approximate KL (no grad)
    clip_frac_per_head: torch.Tensor  # [8] fraction of relevant steps with |ratio - 1| > clip (NaN if none)


def relevance_mask(op: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[..., 8]`` bool: head counts at this step (causal relevance of ``op`` and the step is valid)."""
    return RELEVANCE_TABLE.to(op.device)[op] & valid.unsqueeze(-1)


def max_entropy(masks: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``[M, L, 8]`` the most entropy each head can have at each step: ``ln(valid choices)`` of its mask (0 for one)."""
    return torch.stack([masks[h].sum(-1).clamp(min=1).to(like.dtype).log() for h in HEAD_NAMES], dim=-1)


def ppo_losses(
    new_log_probs: torch.Tensor,
    entropy: torch.Tensor,
    new_values: torch.Tensor,
    batch: SequenceBatch,
    *,
    clip_coef: float,
    ent_coef: float,
    vf_coef: float,
    value_clip: float | None = None,
    entropy_coefs: torch.Tensor | None = None,
    entropy_floors: torch.Tensor | None = None,
    entropy_floor_coef: float = 0.0,
    per_relevant_step: bool = False,
    floor_as_max_fraction: bool = False,
    heads_learning: torch.Tensor | None = None,
) -> LossOutput:
    """Losses for one minibatch.

    ``new_log_probs`` / ``entropy`` ``[M, L, 8]`` (HEAD_NAMES order) and ``new_values`` ``[M, L]``
    come from ``evaluate_actions`` on ``batch``; ``batch.advantages`` ``[M, L, 8]`` are used as given
    (normalise before). ``entropy_coefs`` ``[8]`` defaults to ``ENTROPY_COEF_PER_HEAD``.
    ``entropy_floors`` ``[8]`` (nats, 0 = none) adds ``entropy_floor_coef * sum_h sum_rel
    relu(floor_h - entropy_h) / n`` to the loss. ``n`` is the number of valid steps, or with
    ``per_relevant_step`` each head's own count of relevant steps (a head relevant nowhere adds 0).
    With ``floor_as_max_fraction`` a floor is the fraction ``floor_h`` of ``ln(valid choices)`` of
    that head at that step (``batch.masks``), so it can be met at every step. ``heads_learning``
    ``[8]`` bool (default all): a head marked False adds no surrogate, bonus or floor to the loss (its
    metrics are still computed), e.g. the op head during ``PPOConfig.op_warmup_updates``.
    """
    rel = relevance_mask(batch.actions[..., 0], batch.valid)  # [M, L, 8]
    valid = batch.valid
    n = valid.sum().clamp(min=1).to(new_values.dtype)
    rel_count = rel.sum(dim=(0, 1)).to(new_values.dtype)  # [8]
    head_n = rel_count.clamp(min=1) if per_relevant_step else n  # what each head's terms are averaged over
    zeros = torch.zeros_like(new_log_probs)

    log_ratio = new_log_probs - batch.log_probs
    ratio = log_ratio.exp()
    adv = batch.advantages
    surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef))
    policy_loss_per_head = torch.where(rel, surrogate, zeros).sum(dim=(0, 1)) / head_n
    learning = torch.ones(NUM_HEADS, dtype=torch.bool, device=rel.device) if heads_learning is None else heads_learning.to(rel.device)
    policy_loss = torch.where(learning, policy_loss_per_head, torch.zeros_like(policy_loss_per_head)).sum()

    coefs = (ENTROPY_COEFS if entropy_coefs is None else entropy_coefs).to(entropy.device, entropy.dtype)
    coefs = torch.where(learning, coefs, torch.zeros_like(coefs))
    masked_entropy = torch.where(rel, entropy, zeros)
    entropy_bonus = (masked_entropy.sum(dim=(0, 1)) / head_n * coefs).sum()

    err = new_values - batch.returns
    sq = err.square()
    if value_clip is not None:
        clipped = batch.values + (new_values - batch.values).clamp(-value_clip, value_clip)
        sq = torch.maximum(sq, (clipped - batch.returns).square())
    value_loss = 0.5 * torch.where(valid, sq, torch.zeros_like(sq)).sum() / n

    loss = policy_loss - ent_coef * entropy_bonus + vf_coef * value_loss
    if entropy_floors is not None and entropy_floor_coef > 0:
        floors = entropy_floors.to(entropy.device, entropy.dtype)
        if floor_as_max_fraction:
            floors = floors * max_entropy(batch.masks, entropy)  # [M, L, 8]
        shortfall = torch.where(rel & learning, (floors - entropy).clamp(min=0.0), zeros)
        loss = loss + entropy_floor_coef * (shortfall.sum(dim=(0, 1)) / head_n).sum()

    with torch.no_grad():
        nan = torch.full_like(rel_count, math.nan)
        entropy_per_head = torch.where(rel_count > 0, masked_entropy.detach().sum(dim=(0, 1)) / rel_count.clamp(min=1), nan)
        clipped_flags = ((ratio.detach() - 1.0).abs() > clip_coef) & rel
        clip_frac = torch.where(rel_count > 0, clipped_flags.sum(dim=(0, 1)) / rel_count.clamp(min=1), nan)
        joint = torch.where(rel, log_ratio.detach(), zeros).sum(-1)
        approx_kl = torch.where(valid, joint.exp() - 1.0 - joint, torch.zeros_like(joint)).sum() / n

    return LossOutput(
        loss=loss,
        policy_loss=policy_loss,
        policy_loss_per_head=policy_loss_per_head,
        value_loss=value_loss,
        entropy_bonus=entropy_bonus,
        entropy_per_head=entropy_per_head,
        approx_kl=approx_kl,
        clip_frac_per_head=clip_frac,
    )


def evaluate_batch(policy: FactoredRecurrentActorCritic, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``evaluate_actions`` on stored sequences: ``(log_probs [M, L, 8], entropy [M, L, 8], Q(s, stored op) [M, L])``."""
    out = policy.evaluate_actions(
        batch.state,
        batch.blueprint_indices,
        batch.actions_dict(),
        hidden=batch.hidden,
        action_mask=batch.masks,
        episode_starts=batch.episode_starts,
    )
    log_probs = torch.stack([out.log_probs[h] for h in HEAD_NAMES], dim=-1)
    entropy = torch.stack([out.entropy[h] for h in HEAD_NAMES], dim=-1)
    return log_probs, entropy, out.value


def normalized_sequences(seqs: SequenceBatch) -> SequenceBatch:
    """Advantages normalised over valid steps: the op head's column and the shared column separately."""
    adv = seqs.advantages
    op = normalize_masked(adv[..., 0], seqs.valid)
    rest = normalize_masked(adv[..., 1], seqs.valid)
    return seqs._replace(advantages=torch.cat([op.unsqueeze(-1), rest.unsqueeze(-1).expand(*rest.shape, NUM_HEADS - 1)], dim=-1))



def heads_learning_at(config: PPOConfig, update: int) -> torch.Tensor | None:
    """``[NUM_HEADS]`` bool: which heads' policy terms are in the loss at ``update`` (None: all of them).

    The op head sits out its warm-up (``config.op_warmup_updates``), the argument heads theirs
    (``config.argument_warmup_updates``).
    """
    op_out, args_out = update < config.op_warmup_updates, update < config.argument_warmup_updates
    if not (op_out or args_out):
        return None
    return torch.tensor([not (op_out if h == "op" else args_out) for h in HEAD_NAMES])

def ppo_update(
    policy: FactoredRecurrentActorCritic,
    optimizer: torch.optim.Optimizer,
    buffer: RolloutBuffer,
    config: PPOConfig,
    generator: torch.Generator,
    *,
    update: int | None = None,
) -> dict[str, float]:
    """Several epochs of minibatch PPO on a finished rollout with advantages; returns averaged metrics.

    ``update`` (optional; 0-based) names the update in the message of a ``NonFiniteError`` and decides
    whether ``config.entropy_floor_updates`` still keeps the entropy floors (None counts as update 0).

    Minibatches are ``config.minibatch_sequences`` sequences drawn without replacement (a shuffled
    order per epoch from ``generator``; the last minibatch of an epoch may be smaller). With
    ``target_kl`` set, the update stops at the first minibatch whose approximate KL, measured before
    its gradient step, exceeds ``target_kl`` (that minibatch takes no step).
    """
    of_update = f" of update {update}" if update is not None else ""
    seqs = buffer.sequences()
    for what, x in (("advantage", buffer.advantages), ("op-head advantage", buffer.op_advantages), ("return", buffer.returns)):
        check_finite(what, torch.where(buffer.valid, x, 0.0), axes=("env", "step"), where=of_update)
    if config.normalize_advantages:
        seqs = normalized_sequences(seqs)
    params = [p for p in policy.parameters() if p.requires_grad]
    coefs = config.head_entropy_coefs
    entropy_coefs = torch.tensor([coefs[h] for h in HEAD_NAMES])
    floors = config.head_entropy_floors
    floors_on = any(floors.values()) and (config.entropy_floor_updates is None or (update or 0) < config.entropy_floor_updates)
    entropy_floors = torch.tensor([floors[h] for h in HEAD_NAMES]) if floors_on else None
    heads_learning = heads_learning_at(config, update or 0)
    M = seqs.num_sequences
    sums: dict[str, torch.Tensor] = {}
    kl_sum, kl_count, steps, grad_norm_sum = 0.0, 0, 0, 0.0
    early_stop = False
    device_type = next(policy.parameters()).device.type
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=config.autocast_bf16)
    policy.train()
    for epoch in range(config.epochs):
        order = torch.randperm(M, generator=generator)
        for start in range(0, M, config.minibatch_sequences):
            where = f" in epoch {epoch}, minibatch {start // config.minibatch_sequences}{of_update} (no optimizer step taken)"
            mb = seqs.select(order[start : start + config.minibatch_sequences])
            with autocast:
                log_probs, entropy, values = evaluate_batch(policy, mb)
            log_probs, entropy, values = log_probs.float(), entropy.float(), values.float()  # losses in fp32
            out = ppo_losses(
                log_probs,
                entropy,
                values,
                mb,
                clip_coef=config.clip_coef,
                ent_coef=config.ent_coef,
                entropy_coefs=entropy_coefs,
                entropy_floors=entropy_floors,
                entropy_floor_coef=config.entropy_floor_coef,
                vf_coef=config.vf_coef,
                value_clip=config.value_clip,
                per_relevant_step=config.head_loss_denominator == "relevant_steps",
                floor_as_max_fraction=config.entropy_floor_unit == "max_fraction",
                heads_learning=heads_learning,
            )
            kl = float(out.approx_kl)
            kl_sum += kl
            kl_count += 1
            if config.target_kl is not None and kl > config.target_kl:
                early_stop = True
                break
            check_finite("loss", out.loss.detach(), where=where)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            check_finite("gradient norm", grad_norm, where=where)
            optimizer.step()
            steps += 1
            grad_norm_sum += float(grad_norm)
            for key in ("loss", "policy_loss", "value_loss", "entropy_bonus"):
                sums[key] = sums.get(key, 0.0) + getattr(out, key).detach()
            for key in ("policy_loss_per_head", "entropy_per_head", "clip_frac_per_head"):
                v = getattr(out, key).detach()
                # nan-aware sums for heads absent from a minibatch
                sums[key] = sums.get(key, torch.zeros_like(v)) + torch.nan_to_num(v, nan=0.0)
                sums[key + "_n"] = sums.get(key + "_n", torch.zeros_like(v)) + (~torch.isnan(v)).to(v.dtype)
        if early_stop:
            break

    metrics: dict[str, float] = {
        "approx_kl": kl_sum / max(kl_count, 1),
        "early_stop": float(early_stop),
        "minibatch_steps": float(steps),
        "epochs_completed": steps / math.ceil(M / config.minibatch_sequences),
        "grad_norm": grad_norm_sum / steps if steps else math.nan,
    }
    for key in ("loss", "policy_loss", "value_loss", "entropy_bonus"):
        metrics[key] = float(sums[key]) / steps if steps else math.nan
    for key, prefix in (("policy_loss_per_head", "policy_loss"), ("entropy_per_head", "entropy"), ("clip_frac_per_head", "clip_frac")):
        if steps:
            per = sums[key] / sums[key + "_n"].clamp(min=1)
            per = torch.where(sums[key + "_n"] > 0, per, torch.full_like(per, math.nan))
        else:
            per = torch.full((NUM_HEADS,), math.nan)
        for i, head in enumerate(HEAD_NAMES):
            metrics[f"{prefix}_{head}"] = float(per[i])
    return metrics
