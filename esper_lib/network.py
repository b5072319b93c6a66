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
from operator import attrgetter
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from esper_lib.constants import (
    BLUEPRINT_EMBED_DIM,
    CANONICAL_ACTION,
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
_SLOT = HEAD_NAMES.index("slot")
_SLOT_RELEVANT = RELEVANCE_TABLE[:, _SLOT]
_BLUEPRINT = HEAD_NAMES.index("blueprint")


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


class _FastWeights(NamedTuple):
    """The weights in ``get_action``'s fused layout (copies, no grad), rebuilt whenever a source parameter changes.

    Matmuls take the weights transposed and contiguous (``x @ W^T`` with ``W^T`` stored ``[in, out]``
    runs ~2x faster on CPU at batch 8 than ``F.linear``'s transposed read). ``hh = hidden_dim // 2``,
    ``K`` = the largest head size.
    """

    stamps: tuple  # (optimizer steps so far, then the ids, _versions and data_ptrs of the sources) when built
    sources: tuple[torch.Tensor, ...]  # the parameters it was built from (kept alive, so their ids stay theirs)
    feature_wt: torch.Tensor  # [in_dim, F] feature_net[0].weight.T
    lstm_wt: torch.Tensor  # [F + H, 4H] [W_ih, W_hh].T, gate columns reordered (i, f, o, g)
    lstm_b: torch.Tensor  # [4H] b_ih + b_hh, same order
    first_wt: torch.Tensor  # [H, 7*hh + H + hh] first layers: 7 two-layer heads (HEAD_NAMES order), blueprint, critic's state part
    first_b: torch.Tensor  # [7*hh + H + hh]
    blueprint_mid_wt: torch.Tensor  # [H, hh] the blueprint head's middle layer, transposed
    last_w: torch.Tensor  # [8, hh, K] last layers transposed, zero-padded to K columns, HEAD_NAMES order
    last_b: torch.Tensor  # [8, 1, K]
    value_op_w: torch.Tensor  # [NUM_OPS, hh] the critic first layer's one-hot columns, transposed
    pad_index: torch.Tensor  # [8 * K] int64: column of cat(per-head [B, k] in HEAD_NAMES order, one more) for each padded slot
    canon_index: torch.Tensor  # [NUM_OPS, 8 * K + S] int64 (S = sum of head sizes): for each op, the column of
    #   cat(masks in HEAD_NAMES order, False, True) that each canonicalised mask entry reads: the head's own column
    #   where the head counts for the op, else True at its placeholder action and False elsewhere; first the
    #   padded [8, K] layout (padding reads False), then the S entries unpadded (the masks get_action returns)
    valid_pad: torch.Tensor  # [8, K] bool: the slot is one of the head's actions
    live: dict[str, torch.Tensor]  # parameters used as they are (not copied): always current
    eps: tuple[float, float]  # LayerNorm eps of feature_net and lstm_norm
    sizes: tuple[int, ...]  # head sizes, HEAD_NAMES order
    mask_split: tuple[int, ...]  # (8 * K, k0, k1, ...): a row of the canon_index gather split into its parts
    slot_relevant: torch.Tensor  # [NUM_OPS] bool: ops that use the slot head
    value_w2: torch.Tensor  # [hh] the critic's last weight as a vector (shares the live parameter's storage)
    null_index: int  # the embedding row of an empty slot (blueprint index -1)
    embedding_shifted: torch.Tensor  # [NUM_BLUEPRINTS + 1, E] the embedding table, null row first: row = blueprint index + 1
    neg_inf: torch.Tensor  # 0-d -inf of the weights' dtype and device (no Python scalar wrapped per call)
    batches: dict  # batch size -> _BatchPlan, filled on first use (see _batch_plan)


_VERSION = attrgetter("_version")

# Fused optimizers (``Adam(fused=True)``, the trainer's choice on the CPU) update parameters without
# bumping their version counters, so the fused copy of the weights also keys on the number of
# optimizer steps taken in this process, counted by a global post-step hook on torch.optim.Optimizer.
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)

# get_action's fused path steps the LSTM with one transposed-layout matmul from this batch size up;
# below it torch.lstm_cell is as fast (measured on 2 CPU cores: B=1 0.34 vs 0.42 ms, B=8 0.95 vs 0.48 ms).
FUSED_CELL_MIN_BATCH = 4

# get_action's fused path multiplies by MKL-packed copies (cblas_sgemm_pack, through torch.ops.mkl) of its
# two large weights, the LSTM cell's and the heads' first layers (13.6 of the 14.5 MB read per step), for
# a batch size called MKL_PACK_AFTER_CALLS times since the weights last changed: ~15% faster than the
# transposed copies at B = 2..256 on 1 CPU thread (measured on a loaded 2-core machine, B=8: LSTM 432 vs
# 496 us, first layer 297 vs 364 us), same results to float rounding (checked when packing). A packed copy
# is specific to its batch size (MKL allocates ~33 MB for both at the default size), so at most
# MKL_PACKED_MAX_BATCH_SIZES are packed: the collector's batch, not the bootstrap's occasional ones.
# float32 on the CPU only; MKL_PACKED_MAX_BATCH_SIZES = 0 switches packing off.
MKL_PACKED_MAX_BATCH_SIZES = 2
MKL_PACKED_MIN_BATCH = 2
MKL_PACK_AFTER_CALLS = 16
# Per-batch-size plans kept with the fused weights (small index tensors; the packed copies are counted
# above), for batch sizes up to _PLAN_MAX_BATCH; a larger batch gets a plan per call (draws head by head).
_BATCH_PLANS_MAX = 16
_PLAN_MAX_BATCH = 1024


class _BatchPlan:
    """What the fused step keeps for one batch size B (built on its first call, dropped with the fused weights).

    ``arange``: ``[B]``. ``n_draws``: ``B * sum(head sizes)``. ``race_index``: ``[B, 8, K]`` int64, for each
    padded slot its position in one flat ``exponential_`` draw of every head (HEAD_NAMES order, ``[B, k]``
    row-major each) followed by a 1, and ``op_race_index`` ``[B, n_ops]`` the op head's (``torch.take``
    indices); None where one draw does not reproduce the per-head draws (the step then draws head by
    head). ``row_offsets``: ``[B, 8]`` the flat offset of each (row, head) in ``[B, 8, K]``. ``all_valid``: a read-only all-True ``[B, k]`` per head
    (stands for an absent mask). ``false_true``: ``[B, 2]`` (False, True), the columns that padding and
    canonicalised heads read (``canon_index``); ``all_valid_source``: the gather source when no mask is given.
    ``mask_shapes``: the shape of each mask key at B. ``packed``: MKL-packed (LSTM, its ``[out, in]``
    view, first layer, its view) for B, or None. ``calls``: calls counted, up to MKL_PACK_AFTER_CALLS.
    """

    __slots__ = ("arange", "n_draws", "race_index", "op_race_index", "row_offsets", "all_valid", "false_true", "all_valid_source", "mask_shapes", "packed", "calls")

    def __init__(self, batch: int, sizes: tuple[int, ...], num_slots: int, dtype: torch.dtype, device: torch.device, one_draw: bool = True):
        n_heads, K = len(sizes), max(sizes)
        self.arange = torch.arange(batch, device=device)
        self.n_draws = batch * sum(sizes)
        self.race_index: torch.Tensor | None = None
        self.op_race_index: torch.Tensor | None = None
        if one_draw and _one_draw_matches_per_head(batch, sizes, dtype, device):
            index = torch.full((batch, n_heads, K), self.n_draws, dtype=torch.int64)
            offset = 0
            for i, k in enumerate(sizes):
                index[:, i, :k] = torch.arange(offset, offset + batch * k).view(batch, k)
                offset += batch * k
            self.race_index = index.to(device)
            self.op_race_index = torch.arange(batch * sizes[0], device=device).view(batch, sizes[0])
        self.row_offsets = torch.arange(batch * n_heads, device=device).view(batch, n_heads) * K  # [B, 8]: (b, head) -> row start in [B, 8, K]
        # contiguous (not expanded): torch.cat takes its fast path when every input is
        self.all_valid = tuple(torch.ones(batch, k, dtype=torch.bool, device=device) for k in sizes)
        self.false_true = torch.tensor([[False, True]], device=device).repeat(batch, 1)
        self.all_valid_source = torch.cat([*self.all_valid, self.false_true], dim=-1)  # the source when no mask is given
        self.mask_shapes = {name: (batch, k) for name, k in zip(HEAD_NAMES, sizes)}
        self.mask_shapes["slot_by_op"] = (batch, NUM_OPS, num_slots)
        self.packed: tuple[torch.Tensor, ...] | None = None
        self.calls = 0


def _one_draw_matches_per_head(batch: int, sizes: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether one ``exponential_`` over ``batch * sum(sizes)`` values (then a 1 left as it is) gives exactly the
    values and the generator state of one ``exponential_`` per head (``[batch, k]`` each, in order).

    True with the CPU generator of the tested torch (one draw per value, in order); checked once per
    batch size with a scratch generator, so a torch whose CPU kernel draws in blocks falls back to per-head draws.
    """
    if device.type != "cpu":
        return False
    total = batch * sum(sizes)
    g1, g2 = torch.Generator(device).manual_seed(20240607), torch.Generator(device).manual_seed(20240607)
    per_head = torch.cat([torch.empty(batch, k, dtype=dtype, device=device).exponential_(generator=g1).flatten() for k in sizes])
    one = torch.ones(total + 1, dtype=dtype, device=device)
    one.narrow(0, 0, total).exponential_(generator=g2)
    return torch.equal(per_head, one[:total]) and float(one[total]) == 1.0 and torch.equal(g1.get_state(), g2.get_state())


def _mkl_linear_unavailable(*args: object) -> torch.Tensor:
    raise RuntimeError("torch.ops.mkl._mkl_linear is not available in this torch build")


try:
    _MKL_LINEAR = torch.ops.mkl._mkl_linear  # used only with weights that _mkl_pack produced (and checked)
except (AttributeError, RuntimeError):
    _MKL_LINEAR = _mkl_linear_unavailable


def _mkl_pack(weight_t: torch.Tensor, batch: int) -> torch.Tensor | None:
    """An MKL-packed copy of ``weight_t`` (``[in, out]``, the fused layout) for ``x [batch, in] @ weight_t``,
    or None where MKL packing is unavailable or does not reproduce ``torch.mm`` (checked on a random input)."""
    if weight_t.device.type != "cpu" or weight_t.dtype != torch.float32 or not torch.backends.mkl.is_available():
        return None
    weight = weight_t.t().contiguous()  # [out, in], what the packing reads
    try:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, batch)
        x = torch.randn(batch, weight.shape[1], generator=torch.Generator().manual_seed(0))
        out = torch.ops.mkl._mkl_linear(x, packed, weight_t.t(), None, batch)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None
    ref = x @ weight_t
    return packed if torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max().clamp(min=1.0))) else None


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
        fused_heads: ``get_action`` runs the fused single-step path (``_fast_step``: one matmul for
            the LSTM cell, one for the first layers of all heads and the critic, one batched matmul
            for the heads' last layers, all heads masked and sampled as one padded tensor, the random
            draws of all heads made at once; on the CPU in float32, MKL-packed weights for the batch
            size in use, see MKL_PACK_AFTER_CALLS). False runs the plain per-head path; both give the
            same results to float tolerance (tested), the same random draws, and are interchangeable
            on the same instance (attribute). Both validate their inputs alike (``validate_inputs``).

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
        fused_heads: bool = True,
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
        self.fused_heads = fused_heads
        self.head_sizes = head_sizes(num_slots)
        self._fast_cache: _FastWeights | None = None  # built by _fast_weights(), never saved
        self._fast_seen: tuple | None = None  # (module dicts, their contents, where the sources are) of _fast_sources

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

    def __getstate__(self) -> dict:
        """Pickling and ``copy.deepcopy`` leave the fused copy of the weights behind (rebuilt on first use)."""
        state = self.__dict__.copy()
        state["_fast_cache"], state["_fast_seen"] = None, None
        return state

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

    # --- get_action's fused layout ------------------------------------------------------------

    def _fast_containers(self) -> tuple[dict, ...]:
        """The ``_modules`` dicts whose contents make up the modules the fused path reads: the network's own,
        ``feature_net``'s, ``heads`` and each head's, ``value_head``'s and ``blueprint_embedding``'s."""
        mods = self._modules
        heads = mods["heads"]._modules
        return (
            mods,
            mods["feature_net"]._modules,
            heads,
            *(heads[name]._modules for name in HEAD_NAMES),
            mods["value_head"]._modules,
            mods["blueprint_embedding"]._modules,
        )

    def _fast_plan(self) -> tuple[tuple[nn.Module, str], ...] | None:
        """(module, parameter name) of every parameter the fused path copies, in a fixed order; None when a
        head is not the standard MLP (Linear, ReLU, Linear; the blueprint head Linear, ReLU, Linear, ReLU, Linear)."""
        blueprint_layers = 3
        plan: list[tuple[nn.Module, str]] = [(self.feature_net[0], "weight"), (self.feature_net[0], "bias")]
        plan += [(self.lstm, name) for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")]
        for name in HEAD_NAMES:
            head = self.heads[name]
            want = blueprint_layers if name == "blueprint" else 2
            if not isinstance(head, nn.Sequential) or len(head) != 2 * want - 1:
                return None
            for i, layer in enumerate(head):
                if not isinstance(layer, nn.Linear if i % 2 == 0 else nn.ReLU):
                    return None
                if i % 2 == 0:
                    plan += [(layer, "weight"), (layer, "bias")]
        plan += [(self.value_head[0], "weight"), (self.value_head[0], "bias")]
        # used live (not copied), listed so that replacing them is noticed like the rest
        plan += [(m, n) for m in (self.feature_net[1], self.lstm_norm, self.value_head[2]) for n in ("weight", "bias")]
        plan += [(self.blueprint_embedding.embedding, "weight")]
        return tuple(plan)

    def _fast_sources(self) -> tuple[torch.Tensor, ...] | None:
        """The parameters the fused path copies (the plan is recomputed only when a module was added, replaced
        or removed: the modules in ``_fast_containers`` are compared by identity with those of the last call)."""
        seen = self._fast_seen
        if seen is None or tuple(map(tuple, map(dict.values, seen[0]))) != seen[1]:
            containers = self._fast_containers()
            plan = self._fast_plan()
            where = None if plan is None else (tuple(m._parameters for m, _ in plan), tuple(n for _, n in plan))
            seen = self._fast_seen = (containers, tuple(map(tuple, map(dict.values, containers))), where)
        return None if seen[2] is None else tuple(map(dict.__getitem__, *seen[2]))

    def _fast_weights(self) -> _FastWeights | None:
        """The cached fused layout, rebuilt when a source parameter was replaced, changed in place
        (version counter: ``load_state_dict``, ``nn.init``, in-place ops) or moved (``.to()``), and after
        any ``torch.optim`` optimizer step in this process (fused optimizers do not bump versions).

        Edits through ``param.data`` bypass all of these: after one, call ``invalidate_fast_weights()``.
        """
        sources = self._fast_sources()
        if sources is None:
            return None
        try:
            stamps = (_OPTIMIZER_STEPS[0], tuple(map(id, sources)), tuple(map(_VERSION, sources)), tuple(map(torch.Tensor.data_ptr, sources)))
        except (AttributeError, TypeError):  # a planned parameter is None (e.g. a bias removed): the plain path
            return None
        cache = self._fast_cache
        if cache is not None and cache.stamps == stamps:  # ids stay valid: the cache holds the sources
            return cache
        with torch.no_grad():
            cache = self._build_fast_weights(sources, stamps)
        self._fast_cache = cache
        return cache

    def invalidate_fast_weights(self) -> None:
        """Drop the fused copy of the weights (needed only after edits through ``param.data``)."""
        self._fast_cache = None

    def _build_fast_weights(self, sources: tuple[torch.Tensor, ...], stamps: tuple) -> _FastWeights:
        H, hh = self.hidden_dim, self.head_hidden
        ref = self.lstm_norm.weight
        device = ref.device
        lstm = self.lstm
        embedding, null = self.blueprint_embedding.embedding.weight.detach(), self.blueprint_embedding.null_index
        gates = torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)]).to(device)
        lstm_wt = torch.cat([lstm.weight_ih_l0, lstm.weight_hh_l0], dim=1)[gates].t().contiguous()
        lstm_b = (lstm.bias_ih_l0 + lstm.bias_hh_l0)[gates]
        two_layer = [n for n in HEAD_NAMES if n != "blueprint"]
        bp = self.heads["blueprint"]
        value_w = self.value_head[0].weight  # [hh, H + NUM_OPS]
        first = [self.heads[n][0] for n in two_layer]
        first_wt = torch.cat([*(m.weight for m in first), bp[0].weight, value_w[:, :H]], dim=0).t().contiguous()
        first_b = torch.cat([*(m.bias for m in first), bp[0].bias, self.value_head[0].bias])
        sizes = [self.head_sizes[n] for n in HEAD_NAMES]
        K = max(sizes)
        last_w = ref.new_zeros(len(HEAD_NAMES), hh, K)
        last_b = ref.new_zeros(len(HEAD_NAMES), 1, K)
        valid_pad = torch.zeros(len(HEAD_NAMES), K, dtype=torch.bool, device=device)
        total = sum(sizes)
        pad_index = torch.full((len(HEAD_NAMES), K), total, dtype=torch.int64)  # padding: the column after the heads'
        canon_index = torch.full((NUM_OPS, len(HEAD_NAMES), K), total, dtype=torch.int64)  # default: the False column
        offset = 0
        for i, (name, k) in enumerate(zip(HEAD_NAMES, sizes)):
            layer = self.heads[name][-1]
            last_w[i, :, :k] = layer.weight.t()
            last_b[i, 0, :k] = layer.bias
            valid_pad[i, :k] = True
            pad_index[i, :k] = torch.arange(offset, offset + k)
            for op in range(NUM_OPS):
                if i == 0 or bool(RELEVANCE_TABLE[op, i]):
                    canon_index[op, i, :k] = pad_index[i, :k]
                else:
                    canon_index[op, i, CANONICAL_ACTION[name]] = total + 1  # the True column
            offset += k
        return _FastWeights(
            sources=sources,
            stamps=stamps,
            feature_wt=self.feature_net[0].weight.t().contiguous(),
            lstm_wt=lstm_wt,
            lstm_b=lstm_b,
            first_wt=first_wt,
            first_b=first_b,
            blueprint_mid_wt=bp[2].weight.t().contiguous(),
            last_w=last_w,
            last_b=last_b,
            value_op_w=value_w[:, H:].t().contiguous(),
            pad_index=pad_index.flatten().to(device),
            canon_index=torch.cat([canon_index.flatten(1), canon_index.flatten(1)[:, valid_pad.flatten().cpu()]], dim=1).to(device),
            valid_pad=valid_pad,
            live={
                "feature_b": self.feature_net[0].bias,
                "feature_ln_w": self.feature_net[1].weight,
                "feature_ln_b": self.feature_net[1].bias,
                "lstm_ln_w": self.lstm_norm.weight,
                "lstm_ln_b": self.lstm_norm.bias,
                "blueprint_mid_b": bp[2].bias,
                "value_w2": self.value_head[2].weight,
                "value_b2": self.value_head[2].bias,
                "embedding": self.blueprint_embedding.embedding.weight,
                "w_ih": lstm.weight_ih_l0,
                "w_hh": lstm.weight_hh_l0,
                "b_ih": lstm.bias_ih_l0,
                "b_hh": lstm.bias_hh_l0,
            },
            eps=(self.feature_net[1].eps, self.lstm_norm.eps),
            sizes=tuple(sizes),
            mask_split=(len(HEAD_NAMES) * K, *sizes),
            slot_relevant=_SLOT_RELEVANT.to(device),
            value_w2=self.value_head[2].weight.detach().view(-1),
            null_index=self.blueprint_embedding.null_index,
            embedding_shifted=torch.cat([embedding[null : null + 1], embedding[:null]]),
            neg_inf=ref.new_tensor(-math.inf),
            batches={},
        )

    def _batch_plan(self, fast: _FastWeights, batch: int, device: torch.device) -> _BatchPlan:
        """The fused step's plan for ``batch`` (made on first use); packs the large weights for it on its
        MKL_PACK_AFTER_CALLS-th call while fewer than MKL_PACKED_MAX_BATCH_SIZES batch sizes are packed."""
        plans = fast.batches
        plan = plans.get(batch)
        if plan is not None and plan.calls >= MKL_PACK_AFTER_CALLS:
            return plan
        if plan is None:
            if batch > _PLAN_MAX_BATCH:  # not kept: no probe, no packing
                plan = _BatchPlan(batch, fast.sizes, self.num_slots, fast.lstm_b.dtype, device, one_draw=False)
                plan.calls = MKL_PACK_AFTER_CALLS
                return plan
            plan = _BatchPlan(batch, fast.sizes, self.num_slots, fast.lstm_b.dtype, device)
            if len(plans) >= _BATCH_PLANS_MAX:  # forget the oldest unpacked plan
                del plans[next(b for b, p in list(plans.items()) if p.packed is None)]
            plans[batch] = plan
        plan.calls += 1
        if (
            plan.calls == MKL_PACK_AFTER_CALLS
            and batch >= MKL_PACKED_MIN_BATCH
            and sum(p.packed is not None for p in list(plans.values())) < MKL_PACKED_MAX_BATCH_SIZES
        ):
            lstm, first = _mkl_pack(fast.lstm_wt, batch), _mkl_pack(fast.first_wt, batch)
            if lstm is not None and first is not None:
                plan.packed = (lstm, fast.lstm_wt.t(), first, fast.first_wt.t())
        return plan

    def _fast_inputs(
        self,
        fast: _FastWeights,
        state: object,
        blueprint_indices: object,
        hidden: object,
        action_mask: object,
    ) -> tuple | None:
        """``(state [B, D], blueprint_indices [B, num_slots], hidden, masks, plan, slot_rows)`` for the fused step, when the
        inputs take the common form (2-d state and indices, masks a dict of ``[B, k]`` / ``[B, NUM_OPS, num_slots]``
        tensors, or None) and, with ``validate_inputs``, pass every check of ``_check_inputs`` and
        ``_check_masks`` (dtypes, shapes, finite state and hidden, a valid slot for every allowed op; the
        blueprint range too, which on the CPU the fused step's embedding lookup checks instead, raising the
        same error), done with fewer ops: one finiteness reduction for state and hidden together.

        ``slot_rows``: ``slot_by_op`` and-ed with the slot mask, ``[B, NUM_OPS, num_slots]``, when checked here
        (the step reads the sampled op's row), else None.

        None otherwise: ``get_action`` then runs the full checks, which raise their usual errors (or, for a
        form accepted there but not here, such as ``[B, 1, k]`` masks, go on to the same fused step).
        """
        tensor = torch.Tensor
        if not isinstance(state, tensor) or not isinstance(blueprint_indices, tensor) or state.dim() != 2 or blueprint_indices.dim() != 2:
            return None
        if action_mask is not None and type(action_mask) is not dict:
            return None
        B = state.shape[0]
        if B == 0:
            return None
        plan = fast.batches.get(B)
        if plan is None or plan.calls < MKL_PACK_AFTER_CALLS:
            plan = self._batch_plan(fast, B, state.device)
        if not self.validate_inputs:
            if action_mask and any(not isinstance(m, tensor) or m.dim() != len(plan.mask_shapes.get(k, ())) for k, m in action_mask.items()):
                return None  # [B, 1, k] masks: get_action squeezes them
            return state, blueprint_indices, hidden, action_mask, plan, None
        dtype = fast.live["lstm_ln_w"].dtype
        if state.dtype != dtype or state.shape[1] != self.state_dim:
            return None
        if blueprint_indices.dtype != torch.int64 or blueprint_indices.shape != (B, self.num_slots):
            return None
        if hidden is not None:
            if not isinstance(hidden, (tuple, list)) or len(hidden) != 2:
                return None
            h, c = hidden
            want = (1, B, self.hidden_dim)
            if not isinstance(h, tensor) or not isinstance(c, tensor) or h.shape != want or c.shape != want or h.dtype != dtype or c.dtype != dtype:
                return None
            if h.device != state.device or c.device != state.device:
                return None
            total = torch.cat([state, h[0], c[0]], dim=1).sum()  # one finiteness check for state and hidden
        else:
            total = state.sum()
        if not math.isfinite(float(total)):  # finite iff every entry is (or finite values overflowed: the full checks decide)
            return None
        if not state.is_cpu:  # on the CPU the fused step's embedding lookup checks the range (IndexError)
            lo, hi = torch.aminmax(blueprint_indices)
            if int(lo) < -1 or int(hi) >= NUM_BLUEPRINTS:
                return None
        rows = None
        if action_mask:
            shapes = plan.mask_shapes
            for name, m in action_mask.items():
                if not isinstance(m, tensor) or m.dtype != torch.bool or m.shape != shapes.get(name):
                    return None
            by_op = action_mask.get("slot_by_op")
            if by_op is not None:  # every allowed op that uses the slot head leaves a valid slot
                slot = action_mask.get("slot")
                rows = by_op if slot is None else by_op & slot.unsqueeze(1)
                op = action_mask.get("op")
                allowed = fast.slot_relevant if op is None else op & fast.slot_relevant
                if not bool(rows.any(dim=-1).ge(allowed).all()):
                    return None
        return state, blueprint_indices, hidden, action_mask, plan, rows

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
            lo, hi = (int(v) for v in torch.aminmax(blueprint_indices))
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
        fast = self._fast_weights() if self.fused_heads else None
        if fast is not None:
            step = self._fast_inputs(fast, state, blueprint_indices, hidden, action_mask)
            if step is not None:  # the common case, checked
                return self._fast_step(fast, *step, deterministic, return_q_all, generator)
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
        if fast is not None:
            plan = self._batch_plan(fast, state.shape[0], state.device)
            return self._fast_step(fast, state[:, 0], blueprint_indices[:, 0], hidden, action_mask, plan, None, deterministic, return_q_all, generator)
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

    def _fast_step(
        self,
        fast: _FastWeights,
        state: torch.Tensor,
        blueprint_indices: torch.Tensor,
        hidden: Hidden | None,
        action_mask: dict[str, torch.Tensor] | None,
        plan: _BatchPlan,
        slot_rows: torch.Tensor | None,
        deterministic: bool,
        return_q_all: bool,
        generator: torch.Generator | None,
    ) -> GetActionResult:
        """``get_action`` in the fused layout: ``state [B, D]``, ``blueprint_indices [B, num_slots]``, masks ``[B, ...]``.

        The same computation as the per-head path, in fewer and larger ops: trunk (the LSTM cell as one
        matmul on ``[x, h]``), one matmul for the first layer of every head and the critic's state part,
        one batched matmul for the heads' last layers into padded logits ``[B, 8, K]``. The op is
        sampled first (its mask is known); then every head's mask is completed (slot row of
        ``slot_by_op`` at the op, canonicalisation) and all heads are masked, normalised and sampled
        at once. Random draws are those of the per-head path: ``exponential_`` ``[B, k]`` per head in
        HEAD_NAMES order, made as one flat draw where that gives the same values (``plan.race_index``),
        so with the same generator both paths sample the same actions (up to float ties). Padded slots
        are masked like invalid actions, so they never win and add exactly 0.
        """
        B, H, hh = state.shape[0], self.hidden_dim, self.head_hidden
        n_heads, K = fast.valid_pad.shape
        sizes = fast.sizes
        if hidden is None:
            hidden = self.initial_hidden(B, state.device, state.dtype)
        h_in, c_in = hidden  # [1, B, H] each
        packed = plan.packed

        # trunk: features, LSTM cell, LayerNorm
        live = fast.live
        if self.validate_inputs:  # indices in [-1, NUM_BLUEPRINTS - 1]: checked, or checked here by the lookup
            try:
                embedded = torch.embedding(fast.embedding_shifted, blueprint_indices + 1).flatten(1)  # -1 -> null row
            except IndexError:
                self._check_inputs(state.unsqueeze(1), blueprint_indices.unsqueeze(1), hidden)  # raises the range error
                raise
        else:  # as the per-head path: any negative index -> null row
            idx = blueprint_indices.masked_fill(blueprint_indices < 0, fast.null_index)
            embedded = torch.embedding(live["embedding"], idx).flatten(1)
        x = torch.cat([state, embedded if embedded.dtype == state.dtype else embedded.to(state.dtype)], dim=-1)
        x = torch.addmm(live["feature_b"], x, fast.feature_wt)
        x = torch.layer_norm(x, (self.feature_dim,), live["feature_ln_w"], live["feature_ln_b"], fast.eps[0]).relu_()
        if packed is not None or B >= FUSED_CELL_MIN_BATCH:
            xh = torch.cat([x, h_in[0]], dim=-1)
            if packed is not None:
                gates = _MKL_LINEAR(xh, packed[0], packed[1], fast.lstm_b, B)  # [B, 4H], columns (i, f, o, g)
            else:
                gates = torch.addmm(fast.lstm_b, xh, fast.lstm_wt)
            i_gate, f_gate, o_gate = gates[:, : 3 * H].sigmoid_().chunk(3, dim=1)  # in place: gates is ours
            c = torch.addcmul(f_gate * c_in, i_gate, gates[:, 3 * H :].tanh_())  # [1, B, H]: c_in's leading 1
            h = c.tanh().mul_(o_gate)  # [1, B, H]
        else:
            h, c = torch.lstm_cell(x, (h_in[0], c_in[0]), live["w_ih"], live["w_hh"], live["b_ih"], live["b_hh"])
            h, c = h.unsqueeze(0), c.unsqueeze(0)
        lstm_out = torch.layer_norm(h[0], (H,), live["lstm_ln_w"], live["lstm_ln_b"], fast.eps[1])  # [B, H]

        # heads and critic: first layers in one matmul, last layers in one batched matmul
        n_two = (n_heads - 1) * hh  # the 7 two-layer heads' hidden units
        if packed is not None:
            pre = _MKL_LINEAR(lstm_out, packed[2], packed[3], fast.first_b, B)  # [B, 7*hh + H + hh]
        else:
            pre = torch.addmm(fast.first_b, lstm_out, fast.first_wt)
        q_hidden = (pre[:, n_two + H :].unsqueeze(1) + fast.value_op_w).relu_()  # [B, NUM_OPS, hh]
        pre.relu_()  # the heads' first layers (the critic's part was read above)
        bp_hidden = torch.addmm(live["blueprint_mid_b"], pre[:, n_two : n_two + H], fast.blueprint_mid_wt).relu_()  # [B, hh]
        at = _BLUEPRINT * hh
        head_hidden = torch.cat([pre[:, :at], bp_hidden, pre[:, at:n_two]], dim=-1)  # [B, 8*hh], HEAD_NAMES order
        logits = torch.baddbmm(fast.last_b, head_hidden.view(B, n_heads, hh).transpose(0, 1), fast.last_w).transpose(0, 1)  # [B, 8, K]
        q_flat = q_hidden.view(B * NUM_OPS, hh)  # addmv broadcasts its [1] bias to [0] rows as [1]: B = 0 without it
        q_all = (torch.addmv(live["value_b2"], q_flat, fast.value_w2) if B else torch.mv(q_flat, fast.value_w2)).view(B, NUM_OPS)
        if self.validate_inputs and not math.isfinite(float(logits.sum())):  # padding is 0: finite
            for i, name in enumerate(HEAD_NAMES):
                check_finite(f"{name}: logits", logits[:, i, : sizes[i]])

        # the op first (its mask is known); then every head's canonicalised mask given the op
        masks = action_mask or {}
        n_ops = sizes[0]
        op_mask = masks.get("op")
        op_logits = torch.where(plan.all_valid[0] if op_mask is None else op_mask, logits[:, 0, :n_ops], fast.neg_inf)
        op_probs = torch.softmax(op_logits, dim=-1)  # masked ops (-inf): exactly 0
        if deterministic:
            op = op_logits.argmax(dim=-1)
        else:
            dtype, device = logits.dtype, logits.device
            if plan.race_index is not None:  # one draw, the per-head draws' values (checked for this batch size)
                draws = torch.ones(plan.n_draws + 1, dtype=dtype, device=device)
                draws.narrow(0, 0, plan.n_draws).exponential_(generator=generator)
                op_race = torch.take(draws, plan.op_race_index)  # [B, n_ops]: the op head's draws come first
                race = torch.take(draws, plan.race_index)  # [B, 8, K], padding: 1
            else:
                races = [torch.empty(B, k, dtype=dtype, device=device).exponential_(generator=generator) for k in sizes]
                op_race = races[0]
                races.append(torch.ones(B, 1, dtype=dtype, device=device))
                race = torch.cat(races, dim=-1).index_select(1, fast.pad_index).view(B, n_heads, K)  # padding: 1
            op = (op_probs / op_race).argmax(dim=-1)
        # masks [B, 8, K]: one gather from cat(masks in HEAD_NAMES order, False, True) at the op's row of
        # canon_index (the slot mask and-ed with the op's row of slot_by_op; irrelevant heads: the placeholder)
        if masks:
            parts = [masks.get(name, valid) for name, valid in zip(HEAD_NAMES, plan.all_valid)]
            if slot_rows is not None:  # slot_by_op and the slot mask, and-ed by the entry checks
                parts[_SLOT] = slot_rows[plan.arange, op]
            elif "slot_by_op" in masks:
                parts[_SLOT] = parts[_SLOT] & masks["slot_by_op"][plan.arange, op]
            parts.append(plan.false_true)
            source = torch.cat(parts, dim=-1)
        else:
            source = plan.all_valid_source
        padded, *unpadded = source.gather(1, fast.canon_index.index_select(0, op)).split_with_sizes(fast.mask_split, dim=1)
        mask = padded.view(B, n_heads, K)
        if self.validate_inputs and not bool(mask.any(dim=-1).all()):
            for i, name in enumerate(HEAD_NAMES):
                empty = ~mask[:, i].any(dim=-1)
                if bool(empty.any()):
                    raise ValueError(f"{name}: mask has a row with no valid action (first at index {empty.nonzero()[0].tolist()})")
        # log-softmax over the valid actions, normalised only where needed: rows shifted so the best valid
        # logit is exactly 0, masked actions and padding at -inf (exp exactly 0); log_probs = shifted -
        # log(sum(exp(shifted))) at the chosen actions; sampling reads exp(shifted) / race, whose argmax is
        # that of probs / race (the row's sum is a positive constant). Every row has a valid action (checked above).
        filled = torch.where(mask, logits, fast.neg_inf)
        shifted = filled - filled.amax(dim=-1, keepdim=True)  # [B, 8, K]
        unnormalised = shifted.exp()
        actions = shifted.argmax(dim=-1) if deterministic else (unnormalised / race).argmax(dim=-1)  # [B, 8]
        actions[:, 0] = op
        log_norm = unnormalised.sum(dim=-1).log_()  # [B, 8], log of a sum >= 1
        log_probs = torch.take(shifted, actions + plan.row_offsets).sub_(log_norm)  # [B, 8]: shifted at the actions
        return GetActionResult(
            actions=dict(zip(HEAD_NAMES, actions.unbind(1))),
            log_probs=dict(zip(HEAD_NAMES, log_probs.unbind(1))),
            value=q_all[plan.arange, op],
            hidden=(h, c),
            masks=dict(zip(HEAD_NAMES, unpadded)),
            sampled_op=op,
            op_probs=op_probs,
            q_all=q_all if return_q_all else None,
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
