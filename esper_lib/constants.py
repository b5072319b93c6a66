"""Every enum, size and numeric constant of the Tamiyo V2 action space (design section 1).

Nothing else in the package hard-codes a cardinality: import it from here.
"""
from __future__ import annotations

from enum import IntEnum

import torch


class LifecycleOp(IntEnum):
    """The op head: what Tamiyo does this epoch."""

    WAIT = 0
    GERMINATE = 1
    SET_ALPHA_TARGET = 2
    PRUNE = 3
    FOSSILIZE = 4
    ADVANCE = 5


class BlueprintAction(IntEnum):
    """Seed module blueprints (the blueprint head)."""

    NOOP = 0
    CONV_LIGHT = 1
    ATTENTION = 2
    NORM = 3
    DEPTHWISE = 4
    BOTTLENECK = 5
    CONV_SMALL = 6
    CONV_HEAVY = 7
    LORA = 8
    LORA_LARGE = 9
    MLP_SMALL = 10
    MLP = 11
    FLEX_ATTENTION = 12


class GerminationStyle(IntEnum):
    """How a seed's output is combined with the host stream."""

    LINEAR_ADD = 0
    LINEAR_MULTIPLY = 1
    SIGMOID_ADD = 2
    GATED_GATE = 3


class TempoAction(IntEnum):
    """Blend duration chosen at germination."""

    FAST = 0
    STANDARD = 1
    SLOW = 2


class AlphaTargetAction(IntEnum):
    """Alpha the seed blends towards."""

    HALF = 0
    SEVENTY = 1
    FULL = 2


class AlphaSpeedAction(IntEnum):
    """How many epochs an alpha change takes."""

    INSTANT = 0
    FAST = 1
    MEDIUM = 2
    SLOW = 3


class AlphaCurveAction(IntEnum):
    """Shape of the alpha ramp."""

    LINEAR = 0
    COSINE = 1
    SIGMOID_GENTLE = 2
    SIGMOID = 3
    SIGMOID_SHARP = 4


TEMPO_EPOCHS: dict[TempoAction, int] = {TempoAction.FAST: 3, TempoAction.STANDARD: 5, TempoAction.SLOW: 8}
ALPHA_TARGET_VALUES: dict[AlphaTargetAction, float] = {
    AlphaTargetAction.HALF: 0.5,
    AlphaTargetAction.SEVENTY: 0.7,
    AlphaTargetAction.FULL: 1.0,
}
ALPHA_SPEED_EPOCHS: dict[AlphaSpeedAction, int] = {
    AlphaSpeedAction.INSTANT: 0,
    AlphaSpeedAction.FAST: 3,
    AlphaSpeedAction.MEDIUM: 5,
    AlphaSpeedAction.SLOW: 8,
}

NUM_OPS = len(LifecycleOp)
OP_NAMES: tuple[str, ...] = tuple(op.name for op in LifecycleOp)  # labels for tables and plots
NUM_BLUEPRINTS = len(BlueprintAction)
NUM_STYLES = len(GerminationStyle)
NUM_TEMPOS = len(TempoAction)
NUM_ALPHA_TARGETS = len(AlphaTargetAction)
NUM_ALPHA_SPEEDS = len(AlphaSpeedAction)
NUM_ALPHA_CURVES = len(AlphaCurveAction)

DEFAULT_NUM_SLOTS = 3

# The eight factored heads, in a fixed order used by every table and tensor stack.
HEAD_NAMES: tuple[str, ...] = (
    "op",
    "slot",
    "blueprint",
    "style",
    "tempo",
    "alpha_target",
    "alpha_speed",
    "alpha_curve",
)
NUM_HEADS = len(HEAD_NAMES)


def head_sizes(num_slots: int = DEFAULT_NUM_SLOTS) -> dict[str, int]:
    """Number of actions of each head, in ``HEAD_NAMES`` order."""
    if not isinstance(num_slots, int) or num_slots < 1:
        raise ValueError(f"num_slots must be a positive int, got {num_slots!r}")
    return {
        "op": NUM_OPS,
        "slot": num_slots,
        "blueprint": NUM_BLUEPRINTS,
        "style": NUM_STYLES,
        "tempo": NUM_TEMPOS,
        "alpha_target": NUM_ALPHA_TARGETS,
        "alpha_speed": NUM_ALPHA_SPEEDS,
        "alpha_curve": NUM_ALPHA_CURVES,
    }


# Which heads matter for each op (design section 1, last column). The op head always counts.
# This is both the canonicalisation rule and the causal mask of the PPO losses.
HEAD_RELEVANCE: dict[LifecycleOp, frozenset[str]] = {
    LifecycleOp.WAIT: frozenset({"op"}),
    LifecycleOp.GERMINATE: frozenset({"op", "slot", "blueprint", "style", "tempo", "alpha_target"}),
    LifecycleOp.SET_ALPHA_TARGET: frozenset(
        {"op", "slot", "style", "alpha_target", "alpha_speed", "alpha_curve"}
    ),
    LifecycleOp.PRUNE: frozenset({"op", "slot", "alpha_speed", "alpha_curve"}),
    LifecycleOp.FOSSILIZE: frozenset({"op", "slot"}),
    LifecycleOp.ADVANCE: frozenset({"op", "slot"}),
}

# RELEVANCE_TABLE[op, head] is True when HEAD_NAMES[head] counts for that op.  [NUM_OPS, NUM_HEADS]
RELEVANCE_TABLE: torch.Tensor = torch.tensor(
    [[name in HEAD_RELEVANCE[op] for name in HEAD_NAMES] for op in LifecycleOp], dtype=torch.bool
)

# The single action an irrelevant head is narrowed to (its log-prob and entropy are then exactly 0).
CANONICAL_ACTION: dict[str, int] = {
    "op": int(LifecycleOp.WAIT),  # never used: the op head is always relevant
    "slot": 0,
    "blueprint": int(BlueprintAction.NOOP),
    "style": int(GerminationStyle.LINEAR_ADD),
    "tempo": int(TempoAction.STANDARD),
    "alpha_target": int(AlphaTargetAction.FULL),
    "alpha_speed": int(AlphaSpeedAction.INSTANT),
    "alpha_curve": int(AlphaCurveAction.LINEAR),
}

# Per-head entropy-bonus coefficients (multiplied by the config's global entropy coefficient).
ENTROPY_COEF_PER_HEAD: dict[str, float] = {
    "op": 1.0,
    "slot": 1.0,
    "blueprint": 1.3,
    "style": 1.2,
    "tempo": 1.3,
    "alpha_target": 1.2,
    "alpha_speed": 1.2,
    "alpha_curve": 1.2,
}

# Observation (Obs V3): 24 base + 7 action feedback + 30 per slot.
BASE_FEATURE_DIM = 24
FEEDBACK_FEATURE_DIM = 7
SLOT_FEATURE_DIM = 30


def state_dim_for(num_slots: int = DEFAULT_NUM_SLOTS) -> int:
    """Length of the observation vector for ``num_slots`` slots (121 for 3)."""
    return BASE_FEATURE_DIM + FEEDBACK_FEATURE_DIM + SLOT_FEATURE_DIM * num_slots


DEFAULT_STATE_DIM = state_dim_for(DEFAULT_NUM_SLOTS)  # 121

# Network sizes of the plan (section 4a).
FEATURE_DIM = 512
LSTM_HIDDEN_DIM = 512
HEAD_HIDDEN_DIM = LSTM_HIDDEN_DIM // 2  # 256

# Blueprint embedding: index -1 (empty slot) maps to the extra null row.
BLUEPRINT_NULL_INDEX = NUM_BLUEPRINTS  # 13
BLUEPRINT_EMBED_DIM = 4
EMPTY_SLOT = -1

# Masking.
MASK_FILL_VALUE = -1e4  # never -inf: keeps softmax and its gradient finite
LOG_PROB_MIN = -100.0  # floor used when a log-prob is clamped for logging


class SeedStage(IntEnum):
    """Lifecycle stage of the seed in a slot (10 stages, one-hot in the observation)."""

    DORMANT = 0
    GERMINATED = 1
    TRAINING = 2
    BLENDING = 3
    HOLDING = 4
    FOSSILIZED = 5
    PRUNING = 6  # alpha ramping down after a PRUNE with a non-instant speed
    PRUNED = 7
    EMBARGOED = 8
    RESETTING = 9


NUM_SEED_STAGES = len(SeedStage)
