"""Gymnasium spaces shared by every Tamiyo environment (probes and the morphogenetic env).

Observation: a ``Dict`` with
- ``state``: ``Box(-10, 10, (state_dim,), float32)``, the Obs V3 vector (see ``esper_lib.observation``);
- ``blueprint_indices``: ``Box(-1, 12, (num_slots,), int64)``, -1 = empty slot;
- ``action_mask``: a ``Dict`` of ``MultiBinary`` masks (1 = valid), one per head, plus
  ``slot_by_op`` ``(NUM_OPS, num_slots)``: the valid slots for each op.

Action: ``MultiDiscrete`` over the eight heads in ``HEAD_NAMES`` order.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from esper_lib.constants import (
    DEFAULT_NUM_SLOTS,
    HEAD_NAMES,
    NUM_BLUEPRINTS,
    NUM_OPS,
    head_sizes,
    state_dim_for,
)
from esper_lib.observation import FEATURE_BOUND


def action_space(num_slots: int = DEFAULT_NUM_SLOTS) -> spaces.MultiDiscrete:
    """``MultiDiscrete`` with one entry per head, in ``HEAD_NAMES`` order."""
    return spaces.MultiDiscrete(list(head_sizes(num_slots).values()))


def mask_space(num_slots: int = DEFAULT_NUM_SLOTS) -> spaces.Dict:
    """Masks of every head plus the op-conditioned ``slot_by_op`` mask."""
    sizes = head_sizes(num_slots)
    entries = {name: spaces.MultiBinary(sizes[name]) for name in HEAD_NAMES}
    entries["slot_by_op"] = spaces.MultiBinary((NUM_OPS, num_slots))
    return spaces.Dict(entries)


def observation_space(num_slots: int = DEFAULT_NUM_SLOTS, state_dim: int | None = None) -> spaces.Dict:
    """The Dict observation space of every Tamiyo env."""
    state_dim = state_dim_for(num_slots) if state_dim is None else state_dim
    return spaces.Dict(
        {
            "state": spaces.Box(-FEATURE_BOUND, FEATURE_BOUND, (state_dim,), np.float32),
            "blueprint_indices": spaces.Box(-1, NUM_BLUEPRINTS - 1, (num_slots,), np.int64),
            "action_mask": mask_space(num_slots),
        }
    )


def all_valid_masks(num_slots: int = DEFAULT_NUM_SLOTS) -> dict[str, np.ndarray]:
    """Masks with every action valid (int8, as ``MultiBinary`` holds them)."""
    sizes = head_sizes(num_slots)
    masks = {name: np.ones(sizes[name], dtype=np.int8) for name in HEAD_NAMES}
    masks["slot_by_op"] = np.ones((NUM_OPS, num_slots), dtype=np.int8)
    return masks


def action_to_dict(action: Any, num_slots: int = DEFAULT_NUM_SLOTS) -> dict[str, int]:
    """A ``MultiDiscrete`` action (length 8, ``HEAD_NAMES`` order) as ``{head: index}``, validated.

    The one action check of every Tamiyo env: raises ValueError for a wrong shape, a non-integer
    dtype (e.g. op 4.7) or an index outside its head's range (op 6, blueprint 13, op -1).
    """
    arr = np.asarray(action)
    if arr.shape != (len(HEAD_NAMES),):
        raise ValueError(f"action must have shape ({len(HEAD_NAMES)},) (one index per head, {HEAD_NAMES}), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"action must be an integer array, got dtype {arr.dtype} ({arr.tolist()})")
    sizes = head_sizes(num_slots)
    for name, value in zip(HEAD_NAMES, arr.tolist()):
        if not 0 <= value < sizes[name]:
            raise ValueError(f"action[{name}] = {value} is outside [0, {sizes[name] - 1}]")
    return {name: int(a) for name, a in zip(HEAD_NAMES, arr.tolist())}


def actions_to_array(actions: dict[str, torch.Tensor]) -> np.ndarray:
    """Per-head ``[B]`` action tensors as a ``[B, 8]`` int64 array for ``env.step``."""
    return torch.stack([actions[name] for name in HEAD_NAMES], dim=-1).cpu().numpy()


def masks_to_torch(mask_obs: dict[str, np.ndarray], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Mask observation (int8 arrays, batched or not) as bool tensors, keyed as the network expects."""
    return {name: torch.as_tensor(np.asarray(m), device=device).bool() for name, m in mask_obs.items()}
