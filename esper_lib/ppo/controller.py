"""Running a trained policy like any other controller: ``PolicyController`` and ``load_trained``.

``PolicyController`` has the interface of the baseline controllers (``reset()``, ``act(obs)``), so
the same evaluation harness runs PPO policies, random masked policies and heuristics.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from esper_lib.checkpoint import load_checkpoint
from esper_lib.constants import HEAD_NAMES
from esper_lib.envs.spaces import actions_to_array
from esper_lib.network import FactoredRecurrentActorCritic, GetActionResult
from esper_lib.ppo.config import PPOConfig
from esper_lib.ppo.normalization import RunningObsNormalizer

MASK_KEYS = (*HEAD_NAMES, "slot_by_op")


class PolicyController:
    """Acts in one (unbatched) env with a recurrent policy, carrying its LSTM state between calls.

    Args:
        policy: the network (put in eval mode).
        obs_normalizer: normaliser of the ``state`` vector (never updated here). None uses
            ``policy.obs_normalizer`` when ``train`` / ``load_trained`` attached one, else no
            normalisation; pass ``False`` to force none.
        deterministic: argmax of every head's valid logits; otherwise sample (with ``seed``).
        seed: seed of the sampling generator (stochastic mode).

    ``last`` holds the last ``GetActionResult`` (Q(s, o) for all ops, op probabilities, masks used).
    """

    name = "ppo"

    def __init__(
        self,
        policy: FactoredRecurrentActorCritic,
        obs_normalizer: RunningObsNormalizer | None | bool = None,
        deterministic: bool = True,
        *,
        seed: int | None = None,
    ):
        if not isinstance(policy, FactoredRecurrentActorCritic):
            raise TypeError(f"policy must be a FactoredRecurrentActorCritic, got {type(policy).__name__}")
        self.policy = policy.eval()
        if obs_normalizer is None:
            obs_normalizer = getattr(policy, "obs_normalizer", None)
        self.normalizer = obs_normalizer or None
        self.deterministic = deterministic
        self.device = next(policy.parameters()).device
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(seed)
        self.reset()

    def reset(self) -> None:
        """Start of an episode: zero LSTM state."""
        self.hidden = self.policy.initial_hidden(1, self.device)
        self.last: GetActionResult | None = None

    def observation_tensors(self, obs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(state [1, D] normalised, blueprint_indices [1, S], masks head -> [1, ...] bool)`` of one observation."""
        state = torch.as_tensor(np.asarray(obs["state"], dtype=np.float32), device=self.device).reshape(1, -1)
        if self.normalizer is not None:
            state = self.normalizer.normalize(state)
        bp = torch.as_tensor(np.asarray(obs["blueprint_indices"], dtype=np.int64), device=self.device).reshape(1, -1)
        masks = {k: torch.as_tensor(np.asarray(obs["action_mask"][k]), device=self.device).bool().unsqueeze(0) for k in MASK_KEYS if k in obs["action_mask"]}
        return state, bp, masks

    @torch.no_grad()
    def act(self, obs: dict[str, Any]) -> np.ndarray:
        """The ``MultiDiscrete`` action ``[8]`` (int64, HEAD_NAMES order) for one observation dict."""
        state, bp, masks = self.observation_tensors(obs)
        res = self.policy.get_action(state, bp, self.hidden, masks, deterministic=self.deterministic, return_q_all=True, generator=self.generator)
        self.hidden = res.hidden
        self.last = res
        return actions_to_array(res.actions)[0]


def load_trained(path: str | os.PathLike) -> tuple[FactoredRecurrentActorCritic, RunningObsNormalizer | None, PPOConfig | None]:
    """``(policy in eval mode, observation normaliser or None, PPOConfig or None)`` from a checkpoint.

    The normaliser is also attached as ``policy.obs_normalizer``. Raises ``ValueError`` for another
    schema, a corrupt file, or a stored config that is not a valid ``PPOConfig``.
    """
    ckpt = load_checkpoint(path)
    policy = ckpt.model.eval()
    normalizer = RunningObsNormalizer.from_state_dict(ckpt.obs_normalizer_state) if ckpt.obs_normalizer_state is not None else None
    policy.obs_normalizer = normalizer
    config = None
    if ckpt.config is not None:
        try:
            config = PPOConfig.from_dict(ckpt.config)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: stored config is not a valid PPOConfig ({exc})") from exc
    return policy, normalizer, config
