"""Tamiyo V2 policy network: factored recurrent actor-critic with an op-conditioned critic.

Layout (Phase 4 plan, sections 4a-4g, with design section 3):

    state [B, T, state_dim] ++ BlueprintEmbedding(blueprint_indices [B, T, num_slots])  -> [B, T, state_dim + 4*num_slots]
    feature_net: Linear -> LayerNorm -> ReLU                                             -> [B, T, feature_dim]
    lstm (1 layer) -> LayerNorm                                                          -> lstm_out [B, T, hidden_dim]
    eight policy heads (Linear -> ReLU -> Linear; blueprint has 3 layers)                -> logits [B, T, k]
    value_head on [lstm_out, one_hot(op)]                                                -> Q(s, op) [B, T]

Masks are dicts ``head -> bool tensor [..., k]`` (True = valid) and may omit heads (all valid).
The extra key ``slot_by_op`` ``[..., NUM_OPS, num_slots]`` gives the valid slots per op; the slot
mask used for a step is its row at the step's op (and-ed with ``slot`` when both are given).
Heads irrelevant for the op are canonicalised: narrowed to one placeholder action, so their
log-prob and entropy are exactly 0.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from esper_lib.constants import (
    BLUEPRINT_EMBED_DIM,
    DEFAULT_NUM_SLOTS,
    FEATURE_DIM,
    HEAD_NAMES,
    LSTM_HIDDEN_DIM,
    NUM_BLUEPRINTS,
    NUM_OPS,
    RELEVANCE_TABLE,
    LifecycleOp,
    head_sizes,
    state_dim_for,
)
from esper_lib.finite import check_finite
from esper_lib.masking import MaskedCategorical, canonicalise_actions, canonicalise_mask

Hidden = tuple[torch.Tensor, torch.Tensor]

# With episode resets inside a sequence: step the fused LSTM cell when segments * ratio > T.
# Measured on 2 CPU cores at 512/512 (B=12, T=25, fwd+bwd): one oneDNN call ~21 ms plus ~9 ms per
# extra segment, vs ~2 ms per step for the cell loop.
STEP_LOOP_SEGMENT_RATIO = 4

# The plan's attribute names of the policy heads (``op_head`` ...), all views of ``heads`` (see _PlanHead).
PLAN_HEAD_ATTRS: frozenset[str] = frozenset(f"{name}_head" for name in HEAD_NAMES)

# [NUM_OPS] bool: ops whose step uses the slot head (every op but WAIT).
_SLOT_RELEVANT = RELEVANCE_TABLE[:, HEAD_NAMES.index("slot")]


class ForwardOutput(NamedTuple):
    """Output of ``forward()`` (rollout path over a sequence)."""

    op_logits: torch.Tensor  # [B, T, NUM_OPS]
    slot_logits: torch.Tensor  # [B, T, num_slots]
    blueprint_logits: torch.Tensor  # [B, T, NUM_BLUEPRINTS]
    style_logits: torch.Tensor  # [B, T, NUM_STYLES]
    tempo_logits: torch.Tensor  # [B, T, NUM_TEMPOS]
    alpha_target_logits: torch.Tensor  # [B, T, NUM_ALPHA_TARGETS]
    alpha_speed_logits: torch.Tensor  # [B, T, NUM_ALPHA_SPEEDS]
    alpha_curve_logits: torch.Tensor  # [B, T, NUM_ALPHA_CURVES]
    value: torch.Tensor  # [B, T] Q(s, sampled_op)
    sampled_op: torch.Tensor  # [B, T] int64, the op used for value conditioning
    hidden: Hidden  # ([1, B, H], [1, B, H]) after the last step


class EvaluateOutput(NamedTuple):
    """Output of ``evaluate_actions()`` (PPO update path)."""

    log_probs: dict[str, torch.Tensor]  # head -> [B, T] log-prob of the stored action
    entropy: dict[str, torch.Tensor]  # head -> [B, T] entropy over the valid actions
    value: torch.Tensor  # [B, T] Q(s, stored op)


class GetActionResult(NamedTuple):
    """Output of ``get_action()`` (one step, no grad)."""

    actions: dict[str, torch.Tensor]  # head -> [B] int64
    log_probs: dict[str, torch.Tensor]  # head -> [B]; exactly 0 for canonicalised heads
    value: torch.Tensor  # [B] Q(s, sampled_op)
    hidden: Hidden  # new LSTM state ([1, B, H], [1, B, H])
    masks: dict[str, torch.Tensor]  # head -> [B, k] bool masks actually used (after canonicalisation)
    sampled_op: torch.Tensor  # [B] int64 (== actions["op"])
    op_probs: torch.Tensor  # [B, NUM_OPS] pi(op | s)
    q_all: torch.Tensor | None  # [B, NUM_OPS] Q(s, o) for every op, when ``return_q_all``


class BlueprintEmbedding(nn.Module):
    """Embeds per-slot blueprint indices ``[..., num_slots]`` (-1 = empty) to ``[..., num_slots * embed_dim]``."""

    def __init__(self, num_blueprints: int = NUM_BLUEPRINTS, embed_dim: int = BLUEPRINT_EMBED_DIM):
        super().__init__()
        self.null_index = num_blueprints  # == BLUEPRINT_NULL_INDEX for the default 13
        self.embedding = nn.Embedding(num_blueprints + 1, embed_dim)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, blueprint_indices: torch.Tensor) -> torch.Tensor:
        idx = torch.where(blueprint_indices < 0, torch.full_like(blueprint_indices, self.null_index), blueprint_indices)
        return self.embedding(idx).flatten(-2)


def _mlp_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


class _PlanHead:
    """The Phase 4 plan's name for a policy head: ``net.op_head`` *is* ``net.heads["op"]``.

    The heads are registered once, in the ``heads`` ModuleDict (state_dict keys ``heads.<name>.*``);
    this descriptor only gives them the plan's attribute names, so there is no second module and no
    second copy of any parameter. Assigning (``net.blueprint_head = ...``) replaces ``heads[name]``.
    """

    def __set_name__(self, owner: type, attr: str) -> None:
        self.head = attr.removesuffix("_head")

    def __get__(self, obj: "FactoredRecurrentActorCritic | None", objtype: type | None = None) -> nn.Module:
        return self if obj is None else obj.heads[self.head]  # type: ignore[return-value]

    def __set__(self, obj: "FactoredRecurrentActorCritic", value: nn.Module) -> None:
        if not isinstance(value, nn.Module):
            raise TypeError(f"{self.head}_head must be an nn.Module, got {type(value).__name__}")
        obj.heads[self.head] = value


class FactoredRecurrentActorCritic(nn.Module):
    """Tamiyo V2: eight masked categorical heads and Q(s, op) on a shared LSTM trunk.

    Args:
        state_dim: observation length (121 for 3 slots).
        num_slots: number of seed slots (size of the slot head and of ``blueprint_indices``).
        feature_dim: width of the feature net (512 in the plan).
        hidden_dim: LSTM hidden size (512); heads use ``hidden_dim // 2``.
        validate_inputs: check shapes, dtypes and ranges of every input (a few cheap reductions);
            set False on hot paths once the pipeline is trusted.

    The policy heads live in ``heads`` (a ModuleDict, head name -> module); the plan's names
    ``op_head``, ``slot_head``, ``blueprint_head``, ... are the same modules. ``value_head`` is the critic.
    """

    op_head = _PlanHead()
    slot_head = _PlanHead()
    blueprint_head = _PlanHead()
    style_head = _PlanHead()
    tempo_head = _PlanHead()
    alpha_target_head = _PlanHead()
    alpha_speed_head = _PlanHead()
    alpha_curve_head = _PlanHead()

    def __init__(
        self,
        state_dim: int | None = None,
        num_slots: int = DEFAULT_NUM_SLOTS,
        feature_dim: int = FEATURE_DIM,
        hidden_dim: int = LSTM_HIDDEN_DIM,
        validate_inputs: bool = True,
    ):
        super().__init__()
        state_dim = state_dim_for(num_slots) if state_dim is None else state_dim
        for name, value in (("state_dim", state_dim), ("num_slots", num_slots), ("feature_dim", feature_dim), ("hidden_dim", hidden_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if hidden_dim < 2:
            raise ValueError(f"hidden_dim must be >= 2 (heads use hidden_dim // 2), got {hidden_dim}")
        self.state_dim = state_dim
        self.num_slots = num_slots
        self.feature_dim = feature_dim
        self.hidden_dim = hidden_dim
        self.head_hidden = hidden_dim // 2
        self.validate_inputs = validate_inputs
        self.head_sizes = head_sizes(num_slots)

        self.blueprint_embedding = BlueprintEmbedding()
        in_dim = state_dim + num_slots * BLUEPRINT_EMBED_DIM
        self.feature_net = nn.Sequential(nn.Linear(in_dim, feature_dim), nn.LayerNorm(feature_dim), nn.ReLU())
        self.lstm = nn.LSTM(feature_dim, hidden_dim, num_layers=1, batch_first=True)
        self.lstm_norm = nn.LayerNorm(hidden_dim)

        heads: dict[str, nn.Module] = {}
        for name, size in self.head_sizes.items():
            if name == "blueprint":
                heads[name] = nn.Sequential(
                    nn.Linear(hidden_dim, hidden_dim),
                    nn.ReLU(),
                    nn.Linear(hidden_dim, self.head_hidden),
                    nn.ReLU(),
                    nn.Linear(self.head_hidden, size),
                )
            else:
                heads[name] = _mlp_head(hidden_dim, self.head_hidden, size)
        self.heads = nn.ModuleDict(heads)
        self.value_head = _mlp_head(hidden_dim + NUM_OPS, self.head_hidden, 1)
        self._init_weights()

    def __setattr__(self, name: str, value: object) -> None:
        if name in PLAN_HEAD_ATTRS:  # nn.Module would register a second module; the descriptor replaces heads[...]
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # --- construction ---------------------------------------------------------------------

    def constructor_kwargs(self) -> dict[str, int | bool]:
        """The arguments that rebuild a network of this size (stored in checkpoints)."""
        return {
            "state_dim": self.state_dim,
            "num_slots": self.num_slots,
            "feature_dim": self.feature_dim,
            "hidden_dim": self.hidden_dim,
        }

    def _init_weights(self) -> None:
        """Orthogonal init: gain sqrt(2) inside, 0.01 on policy heads' last layers, 1.0 on the critic's; forget bias 1."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.orthogonal_(module.weight, gain=math.sqrt(2))
                nn.init.zeros_(module.bias)
        for head in self.heads.values():
            nn.init.orthogonal_(head[-1].weight, gain=0.01)
        nn.init.orthogonal_(self.value_head[-1].weight, gain=1.0)
        for name, param in self.lstm.named_parameters():
            if "weight" in name:
                nn.init.orthogonal_(param)
            else:
                nn.init.zeros_(param)
                # PyTorch gate order: input, forget, cell, output. Forget bias (b_ih + b_hh) starts at 1.
                if name == "bias_ih_l0":
                    param.data[self.hidden_dim : 2 * self.hidden_dim] = 1.0

    def _init_head(self, name: str) -> None:
        """Re-initialise one policy head: orthogonal, gain sqrt(2) inside, 0.01 on the last layer; zero biases."""
        layers = [m for m in self.heads[name] if isinstance(m, nn.Linear)]
        for i, layer in enumerate(layers):
            nn.init.orthogonal_(layer.weight, gain=0.01 if i == len(layers) - 1 else math.sqrt(2))
            nn.init.zeros_(layer.bias)

    def _init_blueprint_head(self) -> None:
        """The plan's (section 4b) init of the 3-layer blueprint head: gains sqrt(2), sqrt(2), 0.01; zero biases."""
        self._init_head("blueprint")

    def initial_hidden(self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Hidden:
        """Zero LSTM state ``([1, B, H], [1, B, H])``."""
        ref = self.lstm_norm.weight
        shape = (1, batch_size, self.hidden_dim)
        h = torch.zeros(shape, device=device or ref.device, dtype=dtype or ref.dtype)
        return h, h.clone()

    # --- validation ---------------------------------------------------------------------------

    def _check_inputs(self, state: torch.Tensor, blueprint_indices: torch.Tensor, hidden: Hidden | None) -> None:
        dtype = self.lstm_norm.weight.dtype
        if not torch.is_tensor(state) or not state.is_floating_point():
            raise TypeError(f"state must be a floating-point tensor [B, T, {self.state_dim}], got {_describe(state)}")
        if state.dtype != dtype:
            raise TypeError(f"state must have the network's dtype {dtype} (cast it, or the network with .to()), got {state.dtype}")
        if state.dim() != 3 or state.shape[-1] != self.state_dim:
            raise ValueError(f"state must have shape [B, T, {self.state_dim}], got {tuple(state.shape)}")
        if state.shape[1] == 0:
            raise ValueError(f"state has T = 0 steps (shape {tuple(state.shape)}); a sequence needs at least one step")
        check_finite("state", state)
        if not torch.is_tensor(blueprint_indices) or blueprint_indices.dtype != torch.int64:
            raise TypeError(f"blueprint_indices must be an int64 tensor, got {_describe(blueprint_indices)}")
        expected = (*state.shape[:2], self.num_slots)
        if tuple(blueprint_indices.shape) != expected:
            raise ValueError(f"blueprint_indices must have shape [B, T, num_slots] = {expected}, got {tuple(blueprint_indices.shape)}")
        if blueprint_indices.numel():
            lo, hi = int(blueprint_indices.min()), int(blueprint_indices.max())
            if lo < -1 or hi >= NUM_BLUEPRINTS:
                raise ValueError(
                    f"blueprint_indices must lie in [-1, {NUM_BLUEPRINTS - 1}] (-1 = empty slot), got values in [{lo}, {hi}]"
                )
        if hidden is not None:
            want = (1, state.shape[0], self.hidden_dim)
            if not isinstance(hidden, (tuple, list)) or len(hidden) != 2:
                raise TypeError("hidden must be a tuple (h, c) of tensors [1, B, hidden_dim]")
            for name, t in zip(("h", "c"), hidden):
                if not torch.is_tensor(t) or tuple(t.shape) != want:
                    raise ValueError(f"hidden {name} must have shape {want}, got {_describe(t)}")
                if t.dtype != dtype:
                    raise TypeError(f"hidden {name} must have the network's dtype {dtype}, got {t.dtype}")
                check_finite(f"hidden {name}", t)

    def _check_mask(self, name: str, mask: torch.Tensor, lead: tuple[int, ...]) -> None:
        if name == "slot_by_op":
            want = (*lead, NUM_OPS, self.num_slots)
        elif name in self.head_sizes:
            want = (*lead, self.head_sizes[name])
        else:
            raise ValueError(f"action_mask has unknown head {name!r}; expected keys from {HEAD_NAMES + ('slot_by_op',)}")
        if not torch.is_tensor(mask) or mask.dtype != torch.bool:
            raise TypeError(f"action_mask[{name!r}] must be a bool tensor (True = valid), got {_describe(mask)}")
        if tuple(mask.shape) != want:
            raise ValueError(f"action_mask[{name!r}] must have shape {want}, got {tuple(mask.shape)}")

    def _check_masks(self, action_mask: dict[str, torch.Tensor] | None, lead: tuple[int, ...]) -> None:
        if action_mask is None:
            return
        if not isinstance(action_mask, dict):
            raise TypeError(f"action_mask must be a dict head -> bool tensor, got {type(action_mask).__name__}")
        for name, mask in action_mask.items():
            self._check_mask(name, mask, lead)
        by_op = action_mask.get("slot_by_op")
        if by_op is None:
            return
        # An op the op mask allows must leave a valid slot, or the slot head has no action when it is drawn.
        slot = action_mask.get("slot")
        rows = by_op if slot is None else by_op & slot.unsqueeze(-2)  # [..., NUM_OPS, num_slots]
        dead = ~rows.any(dim=-1) & _SLOT_RELEVANT.to(rows.device)  # [..., NUM_OPS]
        if "op" in action_mask:
            dead &= action_mask["op"]
        if bool(dead.any()):
            where = dead.nonzero()[0].tolist()
            op = LifecycleOp(where[-1]).name
            extra = " and the slot mask" if slot is not None else ""
            raise ValueError(
                f"action_mask allows op {op} but its slot_by_op row{extra} leaves no valid slot (first at index {where[:-1]}); "
                f"mask the op out, or allow a slot for it"
            )

    def _check_actions(self, actions: dict[str, torch.Tensor], lead: tuple[int, ...]) -> None:
        if not isinstance(actions, dict):
            raise TypeError(f"actions must be a dict with the heads {HEAD_NAMES}, got {type(actions).__name__}")
        missing = [h for h in HEAD_NAMES if h not in actions]
        if missing:
            raise ValueError(f"actions is missing heads {missing}; it needs all of {HEAD_NAMES}")
        for name in HEAD_NAMES:
            a = actions[name]
            if not torch.is_tensor(a) or a.dtype != torch.int64:
                raise TypeError(f"actions[{name!r}] must be an int64 tensor, got {_describe(a)}")
            if tuple(a.shape) != lead:
                raise ValueError(f"actions[{name!r}] must have shape {lead}, got {tuple(a.shape)}")
            k = self.head_sizes[name]
            if a.numel() and (int(a.min()) < 0 or int(a.max()) >= k):
                raise ValueError(f"actions[{name!r}] must lie in [0, {k - 1}], got values in [{int(a.min())}, {int(a.max())}]")

    # --- trunk ------------------------------------------------------------------------------

    def _trunk(
        self,
        state: torch.Tensor,
        blueprint_indices: torch.Tensor,
        hidden: Hidden | None,
        episode_starts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Hidden]:
        """``state [B, T, D]`` -> ``lstm_out [B, T, H]`` and the final hidden state.

        ``episode_starts [B, T]`` (bool, optional): the LSTM state of a row is zeroed before each
        step flagged True, so one sequence may span episode boundaries. With few distinct reset
        times the LSTM runs once per stretch between them (oneDNN sequence kernel); with many
        (short episodes) the fused cell runs step by step, which is then several times faster.
        """
        x = torch.cat([state, self.blueprint_embedding(blueprint_indices).to(state.dtype)], dim=-1)
        x = self.feature_net(x)
        if hidden is None:
            hidden = self.initial_hidden(state.shape[0], state.device, state.dtype)
        if episode_starts is None:
            if x.shape[1] == 1:
                # One step: the fused cell is ~3x faster on CPU than nn.LSTM's oneDNN path (rollout hot path).
                lstm = self.lstm
                h, c = torch.lstm_cell(
                    x[:, 0], (hidden[0][0], hidden[1][0]), lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0
                )
                return self.lstm_norm(h).unsqueeze(1), (h.unsqueeze(0), c.unsqueeze(0))
            out, hidden = self.lstm(x, hidden)
            return self.lstm_norm(out), hidden
        if episode_starts.shape != state.shape[:2] or episode_starts.dtype != torch.bool:
            raise ValueError(f"episode_starts must be a bool tensor of shape {tuple(state.shape[:2])}, got {_describe(episode_starts)}")
        cut_times = episode_starts.any(dim=0).nonzero().flatten().tolist()
        bounds = sorted(set([0, *cut_times, x.shape[1]]))
        if (len(bounds) - 1) * STEP_LOOP_SEGMENT_RATIO > x.shape[1]:
            out, hidden = self._lstm_by_step(x, hidden, episode_starts)
        else:
            out, hidden = self._lstm_by_segment(x, hidden, episode_starts, bounds)
        return self.lstm_norm(out), hidden

    def _lstm_by_segment(self, x: torch.Tensor, hidden: Hidden, episode_starts: torch.Tensor, bounds: list[int]) -> tuple[torch.Tensor, Hidden]:
        """One ``nn.LSTM`` call per stretch between reset times ``bounds``; ``x [B, T, F]`` -> ``[B, T, H]``."""
        h, c = hidden
        outs = []
        for start, stop in zip(bounds[:-1], bounds[1:]):
            keep = (~episode_starts[:, start]).to(x.dtype).view(1, -1, 1)
            h, c = h * keep, c * keep
            out, (h, c) = self.lstm(x[:, start:stop], (h, c))
            outs.append(out)
        return torch.cat(outs, dim=1), (h, c)

    def _lstm_by_step(self, x: torch.Tensor, hidden: Hidden, episode_starts: torch.Tensor) -> tuple[torch.Tensor, Hidden]:
        """The fused LSTM cell step by step, zeroing the state of rows that start an episode; ``[B, T, F]`` -> ``[B, T, H]``."""
        lstm = self.lstm
        keep = (~episode_starts).to(x.dtype).unsqueeze(-1)  # [B, T, 1]
        h, c = hidden[0][0], hidden[1][0]
        outs = []
        for t in range(x.shape[1]):
            h, c = torch.lstm_cell(
                x[:, t], (h * keep[:, t], c * keep[:, t]), lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0
            )
            outs.append(h)
        return torch.stack(outs, dim=1), (h.unsqueeze(0), c.unsqueeze(0))

    def _head_logits(self, lstm_out: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(lstm_out) for name, head in self.heads.items()}

    def _compute_value(self, lstm_out: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
        """Q(s, op): ``lstm_out [..., H]``, ``op [...]`` int64 -> ``[...]``."""
        op_one_hot = F.one_hot(op, num_classes=NUM_OPS).to(lstm_out.dtype)
        return self.value_head(torch.cat([lstm_out, op_one_hot], dim=-1)).squeeze(-1)

    def _q_all(self, lstm_out: torch.Tensor) -> torch.Tensor:
        """Q(s, o) for every op in one pass: ``[..., H]`` -> ``[..., NUM_OPS]``."""
        ops = torch.arange(NUM_OPS, device=lstm_out.device).expand(*lstm_out.shape[:-1], NUM_OPS)
        return self._compute_value(lstm_out.unsqueeze(-2).expand(*lstm_out.shape[:-1], NUM_OPS, lstm_out.shape[-1]), ops)

    def _distributions(
        self,
        logits: dict[str, torch.Tensor],
        op: torch.Tensor,
        action_mask: dict[str, torch.Tensor] | None,
        op_dist: MaskedCategorical,
    ) -> dict[str, MaskedCategorical]:
        """Masked distributions of every head given the op ``[...]`` (canonicalised masks)."""
        action_mask = action_mask or {}
        dists = {"op": op_dist}
        for name in HEAD_NAMES[1:]:
            mask = action_mask.get(name)
            if name == "slot" and "slot_by_op" in action_mask:
                by_op = action_mask["slot_by_op"]
                row = by_op.gather(-2, op[..., None, None].expand(*op.shape, 1, self.num_slots)).squeeze(-2)
                mask = row if mask is None else mask & row
            if mask is None:
                mask = torch.ones_like(logits[name], dtype=torch.bool)
            mask = canonicalise_mask(name, mask, op)
            dists[name] = MaskedCategorical(logits[name], mask, head=name, validate=self.validate_inputs)
        return dists

    def _op_distribution(self, op_logits: torch.Tensor, action_mask: dict[str, torch.Tensor] | None) -> MaskedCategorical:
        mask = (action_mask or {}).get("op")
        if mask is None:
            mask = torch.ones_like(op_logits, dtype=torch.bool)
        return MaskedCategorical(op_logits, mask, head="op", validate=self.validate_inputs)

    # --- public API -------------------------------------------------------------------------

    def forward(
        self,
        state: torch.Tensor,
        blueprint_indices: torch.Tensor,
        hidden: Hidden | None = None,
        action_mask: dict[str, torch.Tensor] | None = None,
        episode_starts: torch.Tensor | None = None,
    ) -> ForwardOutput:
        """Rollout path over a sequence: all logits (raw, unmasked), a sampled op and Q(s, sampled op).

        Shapes: ``state [B, T, state_dim]``, ``blueprint_indices [B, T, num_slots]`` int64,
        ``action_mask`` head -> ``[B, T, k]`` bool (only ``op`` is used here, to sample the op).
        """
        if self.validate_inputs:
            self._check_inputs(state, blueprint_indices, hidden)
            self._check_masks(action_mask, tuple(state.shape[:2]))
        lstm_out, new_hidden = self._trunk(state, blueprint_indices, hidden, episode_starts)
        logits = self._head_logits(lstm_out)
        sampled_op = self._op_distribution(logits["op"], action_mask).sample()
        value = self._compute_value(lstm_out, sampled_op)
        return ForwardOutput(
            *(logits[name] for name in HEAD_NAMES), value=value, sampled_op=sampled_op, hidden=new_hidden
        )

    def evaluate_actions(
        self,
        state: torch.Tensor,
        blueprint_indices: torch.Tensor,
        actions: dict[str, torch.Tensor],
        hidden: Hidden | None = None,
        action_mask: dict[str, torch.Tensor] | None = None,
        episode_starts: torch.Tensor | None = None,
    ) -> EvaluateOutput:
        """PPO update path: per-head log-prob and entropy of the stored actions, Q(s, stored op).

        ``actions``: head -> ``[B, T]`` int64 for all eight heads. Masks are canonicalised from
        the stored op, so irrelevant heads give log-prob 0 and entropy 0 (their stored actions are
        replaced by the placeholder first); a relevant action outside its mask raises. Differentiable.
        """
        lead = tuple(state.shape[:2])
        if self.validate_inputs:
            self._check_inputs(state, blueprint_indices, hidden)
            self._check_masks(action_mask, lead)
            self._check_actions(actions, lead)
        lstm_out, _ = self._trunk(state, blueprint_indices, hidden, episode_starts)
        logits = self._head_logits(lstm_out)
        actions = canonicalise_actions(actions)  # irrelevant heads -> their placeholder
        op = actions["op"]
        dists = self._distributions(logits, op, action_mask, self._op_distribution(logits["op"], action_mask))
        log_probs = {name: d.log_prob(actions[name], validate=self.validate_inputs) for name, d in dists.items()}
        entropy = {name: d.entropy() for name, d in dists.items()}
        return EvaluateOutput(log_probs=log_probs, entropy=entropy, value=self._compute_value(lstm_out, op))

    @torch.no_grad()
    def get_action(
        self,
        state: torch.Tensor,
        blueprint_indices: torch.Tensor,
        hidden: Hidden | None = None,
        action_mask: dict[str, torch.Tensor] | None = None,
        deterministic: bool = False,
        return_q_all: bool = False,
        generator: torch.Generator | None = None,
    ) -> GetActionResult:
        """One step (rollout and bootstrap): sample all heads, Q(s, sampled op), new hidden state.

        ``state`` is ``[B, state_dim]`` or ``[B, 1, state_dim]``; ``blueprint_indices`` ``[B, num_slots]``
        or ``[B, 1, num_slots]``; masks ``[B, k]`` (or ``[B, 1, k]``). Outputs are per step ``[B]``.
        ``deterministic`` takes the argmax of the valid logits of every head.
        """
        if torch.is_tensor(state) and state.dim() == 2:
            state = state.unsqueeze(1)
        if torch.is_tensor(blueprint_indices) and blueprint_indices.dim() == 2:
            blueprint_indices = blueprint_indices.unsqueeze(1)
        if torch.is_tensor(state) and state.dim() == 3 and state.shape[1] != 1:
            raise ValueError(f"get_action takes one step: state must be [B, {self.state_dim}] or [B, 1, {self.state_dim}], got {tuple(state.shape)}")
        if action_mask is not None and isinstance(action_mask, dict):
            action_mask = {k: _squeeze_step(k, m) for k, m in action_mask.items()}
        if self.validate_inputs:
            self._check_inputs(state, blueprint_indices, hidden)
            self._check_masks(action_mask, (state.shape[0],))
        lstm_out, new_hidden = self._trunk(state, blueprint_indices, hidden)
        lstm_out = lstm_out[:, 0]
        logits = self._head_logits(lstm_out)
        op_dist = self._op_distribution(logits["op"], action_mask)
        op = op_dist.mode() if deterministic else op_dist.sample(generator)
        dists = self._distributions(logits, op, action_mask, op_dist)
        actions = {"op": op}
        for name in HEAD_NAMES[1:]:
            actions[name] = dists[name].mode() if deterministic else dists[name].sample(generator)
        log_probs = {name: d.log_prob(actions[name], validate=False) for name, d in dists.items()}
        q_all = self._q_all(lstm_out) if return_q_all else None
        value = q_all.gather(-1, op.unsqueeze(-1)).squeeze(-1) if q_all is not None else self._compute_value(lstm_out, op)
        return GetActionResult(
            actions=actions,
            log_probs=log_probs,
            value=value,
            hidden=new_hidden,
            masks={name: d.mask for name, d in dists.items()},
            sampled_op=op,
            op_probs=op_dist.probs,
            q_all=q_all,
        )

    @torch.no_grad()
    def get_value(
        self,
        state: torch.Tensor,
        blueprint_indices: torch.Tensor,
        hidden: Hidden | None,
        op: torch.Tensor,
    ) -> torch.Tensor:
        """Debug only: Q(s, op) for a given op, no grad. ``state [B, T, D]``, ``op [B, T]`` (or ``[B]`` when T = 1) -> ``[B, T]``."""
        if self.validate_inputs:
            self._check_inputs(state, blueprint_indices, hidden)
        lstm_out, _ = self._trunk(state, blueprint_indices, hidden)
        if not torch.is_tensor(op) or op.dtype != torch.int64:
            raise TypeError(f"op must be an int64 tensor, got {_describe(op)}")
        if op.dim() == 1:
            op = op.unsqueeze(1).expand(lstm_out.shape[:2])
        if tuple(op.shape) != tuple(lstm_out.shape[:2]):
            raise ValueError(f"op must have shape [B, T] = {tuple(lstm_out.shape[:2])} or [B], got {tuple(op.shape)}")
        if op.numel() and (int(op.min()) < 0 or int(op.max()) >= NUM_OPS):
            raise ValueError(f"op must lie in [0, {NUM_OPS - 1}]")
        return self._compute_value(lstm_out, op)

    @torch.no_grad()
    def q_values(
        self,
        state: torch.Tensor,
        blueprint_indices: torch.Tensor,
        hidden: Hidden | None = None,
        action_mask: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Hidden]:
        """Q(s, o) for all six ops and pi(o | s) in one pass.

        Returns ``(q [B, T, NUM_OPS], op_probs [B, T, NUM_OPS], hidden)``; ``op_probs`` uses
        ``action_mask["op"]`` when given (0 on masked ops).
        """
        if self.validate_inputs:
            self._check_inputs(state, blueprint_indices, hidden)
            self._check_masks(action_mask, tuple(state.shape[:2]))
        lstm_out, new_hidden = self._trunk(state, blueprint_indices, hidden)
        op_logits = self.heads["op"](lstm_out)
        return self._q_all(lstm_out), self._op_distribution(op_logits, action_mask).probs, new_hidden

    def parameter_table(self) -> list[tuple[str, int]]:
        """(top-level module, parameter count) pairs; the heads are listed one by one."""
        rows = [("blueprint_embedding", _count(self.blueprint_embedding)), ("feature_net", _count(self.feature_net))]
        rows += [("lstm", _count(self.lstm)), ("lstm_norm", _count(self.lstm_norm))]
        rows += [(f"heads.{name}", _count(head)) for name, head in self.heads.items()]
        rows.append(("value_head", _count(self.value_head)))
        return rows


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _squeeze_step(name: str, mask: torch.Tensor) -> torch.Tensor:
    """Accept ``[B, 1, ...]`` step masks in ``get_action`` by dropping the time axis."""
    want = 4 if name == "slot_by_op" else 3
    if torch.is_tensor(mask) and mask.dim() == want and mask.shape[1] == 1:
        return mask[:, 0]
    return mask


def _describe(x: object) -> str:
    if torch.is_tensor(x):
        return f"tensor of dtype {x.dtype} and shape {tuple(x.shape)}"
    return type(x).__name__


def expected_parameter_count(state_dim: int = 121, num_slots: int = DEFAULT_NUM_SLOTS, feature_dim: int = FEATURE_DIM, hidden_dim: int = LSTM_HIDDEN_DIM) -> int:
    """Parameter count computed by hand from the plan's layer list (for tests and the README)."""

    def linear(i: int, o: int) -> int:
        return i * o + o

    hh = hidden_dim // 2
    sizes = head_sizes(num_slots)
    total = (NUM_BLUEPRINTS + 1) * BLUEPRINT_EMBED_DIM
    total += linear(state_dim + num_slots * BLUEPRINT_EMBED_DIM, feature_dim) + 2 * feature_dim
    total += 4 * hidden_dim * (feature_dim + hidden_dim) + 2 * 4 * hidden_dim + 2 * hidden_dim
    for name, k in sizes.items():
        if name == "blueprint":
            total += linear(hidden_dim, hidden_dim) + linear(hidden_dim, hh) + linear(hh, k)
        else:
            total += linear(hidden_dim, hh) + linear(hh, k)
    total += linear(hidden_dim + NUM_OPS, hh) + linear(hh, 1)
    return total
