"""Masked categorical distributions, canonicalisation of irrelevant heads, causal masks.

Convention: a mask is a bool tensor, True = the action is valid.

Masking: the logits are first shifted by their maximum over the valid entries of the row (a
constant per row, so the distribution is unchanged), then masked entries are filled with
``MASK_FILL_VALUE`` (-1e4, never -inf):

    masked_logits = where(mask, logits - max_valid(logits), -1e4)

After the shift the best valid logit is exactly 0, so a masked action sits at least 1e4 below it
and its probability is exp(-1e4 - logsumexp) = exactly 0 in float16, bfloat16, float32 and float64,
whatever the scale of the valid logits (without the shift, valid logits of -1e5 and -2e5 would lose
to a masked 0). The fill stays finite, so entropy and every gradient stay finite (no -inf - -inf),
and masked logits get exactly zero gradient. The shift is detached: log-softmax does not depend on it.
"""
from __future__ import annotations

import math

import torch

from esper_lib.constants import (
    CANONICAL_ACTION,
    HEAD_NAMES,
    MASK_FILL_VALUE,
    NUM_OPS,
    RELEVANCE_TABLE,
)
from esper_lib.finite import check_finite


def masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(masked_logits, log_probs)``, both ``[..., K]``, of ``logits`` under ``mask`` (True = valid), over the last axis.

    ``masked_logits = where(mask, logits - max_valid(logits), -1e4)`` (see the module docstring) and
    ``log_probs = log_softmax(masked_logits)``. Works on any leading shape, so several heads padded to
    one ``K`` (padding masked out) are handled in one call. Every row needs a valid entry (unchecked).
    """
    invalid = ~mask
    # Shift so the best valid logit is 0, then fill: masked actions end >= 1e4 below every row's max.
    valid_max = logits.detach().masked_fill(invalid, float("-inf")).amax(dim=-1, keepdim=True)
    masked_logits = (logits - valid_max).masked_fill(invalid, MASK_FILL_VALUE)
    return masked_logits, torch.log_softmax(masked_logits, dim=-1)


class MaskedCategorical:
    """Categorical distribution over the valid actions of one head.

    Args:
        logits: ``[..., K]`` float tensor.
        mask: ``[..., K]`` bool tensor, True = valid. Every row needs one valid action.
        head: name used in error messages.
        validate: check dtype, shape, all-false rows and non-finite logits (two cheap reductions).
    """

    def __init__(self, logits: torch.Tensor, mask: torch.Tensor, head: str = "action", validate: bool = True):
        if validate:
            if not torch.is_tensor(logits) or not logits.is_floating_point():
                raise TypeError(f"{head}: logits must be a floating-point tensor, got {_describe(logits)}")
            if not torch.is_tensor(mask) or mask.dtype != torch.bool:
                raise TypeError(f"{head}: mask must be a bool tensor (True = valid), got {_describe(mask)}")
            if mask.shape != logits.shape:
                raise ValueError(
                    f"{head}: mask shape {tuple(mask.shape)} does not match logits shape {tuple(logits.shape)}"
                )
            if not bool(mask.any(dim=-1).all()):
                bad = (~mask.any(dim=-1)).nonzero()[0].tolist()
                raise ValueError(f"{head}: mask has a row with no valid action (first at index {bad})")
            check_finite(f"{head}: logits", logits)  # NonFiniteError, a ValueError
        self.head = head
        self.logits = logits
        self.mask = mask
        self.masked_logits, self.log_probs_all = masked_log_softmax(logits, mask)

    @property
    def probs(self) -> torch.Tensor:
        """``[..., K]`` probabilities; exactly 0 on masked actions."""
        return self.log_probs_all.exp()

    @property
    def num_valid(self) -> torch.Tensor:
        """``[...]`` number of valid actions per row."""
        return self.mask.sum(dim=-1)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[...]`` int64 draw (exponential race on the probabilities; masked actions never win)."""
        race = torch.empty_like(self.log_probs_all).exponential_(generator=generator)
        return (self.probs / race).argmax(dim=-1)

    def mode(self) -> torch.Tensor:
        """``[...]`` argmax over the valid logits (``masked_logits`` are the logits shifted by their valid max)."""
        return self.masked_logits.argmax(dim=-1)

    def log_prob(self, actions: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """``[...]`` log-probability of ``actions``; a masked or out-of-range action raises ValueError."""
        k = self.logits.shape[-1]
        if validate:
            if not torch.is_tensor(actions) or actions.dtype != torch.int64:
                raise TypeError(f"{self.head}: actions must be an int64 tensor, got {_describe(actions)}")
            if actions.shape != self.logits.shape[:-1]:
                raise ValueError(
                    f"{self.head}: actions shape {tuple(actions.shape)} should be {tuple(self.logits.shape[:-1])}"
                )
            if actions.numel() and (int(actions.min()) < 0 or int(actions.max()) >= k):
                raise ValueError(f"{self.head}: actions must lie in [0, {k - 1}]")
        index = actions.unsqueeze(-1)
        if validate and not bool(self.mask.gather(-1, index).all()):
            raise ValueError(f"{self.head}: log_prob asked for a masked (invalid) action")
        return self.log_probs_all.gather(-1, index).squeeze(-1)

    def entropy(self) -> torch.Tensor:
        """``[...]`` entropy over the valid actions only (masked terms contribute exactly 0)."""
        p_log_p = torch.where(self.mask, self.probs * self.log_probs_all, torch.zeros_like(self.log_probs_all))
        return -p_log_p.sum(dim=-1)

    def normalized_entropy(self) -> torch.Tensor:
        """``[...]`` entropy / ln(number of valid actions), in [0, 1]; 0 where one action is valid."""
        n = self.num_valid.to(self.logits.dtype)
        denom = torch.log(n.clamp(min=2.0))
        return torch.where(n > 1, self.entropy() / denom, torch.zeros_like(denom))


def _describe(x: object) -> str:
    if torch.is_tensor(x):
        return f"tensor of dtype {x.dtype} and shape {tuple(x.shape)}"
    return type(x).__name__


# --- canonicalisation and causal masks --------------------------------------------------------


def relevance(op: torch.Tensor) -> torch.Tensor:
    """``[..., NUM_HEADS]`` bool: which heads count for each op (``op`` is ``[...]`` int64)."""
    return RELEVANCE_TABLE.to(op.device)[op]


def causal_masks(op: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-head ``[...]`` bool masks: True where the head counts in the losses for that op."""
    rel = relevance(op)
    return {name: rel[..., i] for i, name in enumerate(HEAD_NAMES)}


def placeholder_mask(head: str, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[size]`` bool one-hot of the head's canonical placeholder action."""
    m = torch.zeros(size, dtype=torch.bool, device=device)
    m[CANONICAL_ACTION[head]] = True
    return m


def canonicalise_mask(head: str, mask: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
    """Narrow ``mask`` ``[..., K]`` to the placeholder where ``head`` is irrelevant for ``op`` ``[...]``."""
    if head == "op":
        return mask
    rel = relevance(op)[..., HEAD_NAMES.index(head)].unsqueeze(-1)
    return torch.where(rel, mask, placeholder_mask(head, mask.shape[-1], mask.device))


def canonicalise_actions(actions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace the actions of heads irrelevant for ``actions["op"]`` by their placeholders."""
    rel = relevance(actions["op"])
    out = {"op": actions["op"]}
    for i, name in enumerate(HEAD_NAMES[1:], start=1):
        out[name] = torch.where(rel[..., i], actions[name], torch.full_like(actions[name], CANONICAL_ACTION[name]))
    return out


def max_entropy(num_valid: int) -> float:
    """ln(num_valid): the entropy of a uniform choice among ``num_valid`` actions."""
    return math.log(num_valid) if num_valid > 1 else 0.0


__all__ = [
    "MaskedCategorical",
    "masked_log_softmax",
    "relevance",
    "causal_masks",
    "placeholder_mask",
    "canonicalise_mask",
    "canonicalise_actions",
    "max_entropy",
    "NUM_OPS",
]
