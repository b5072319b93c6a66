"""The seed lifecycle of one slot: stages, gates, alpha ramps and how a seed joins the host stream.

Stages (``SeedStage``) and what moves a slot between them::

    DORMANT --GERMINATE--> GERMINATED --ADVANCE--> TRAINING --ADVANCE--> BLENDING --(alpha reached)--> HOLDING
    HOLDING --FOSSILIZE--> FOSSILIZED (permanent: the seed is part of the host from then on)
    BLENDING / HOLDING --SET_ALPHA_TARGET--> BLENDING (new ramp) or HOLDING (INSTANT speed)
    GERMINATED / TRAINING / BLENDING / HOLDING --PRUNE(INSTANT)--> PRUNED
                                               --PRUNE(other speed)--> PRUNING --(alpha reached 0)--> PRUNED
    PRUNED --(1 epoch)--> EMBARGOED --(3 epochs)--> RESETTING --(1 epoch)--> DORMANT

Gates chosen here where the design is silent (module constants, used by the env's masks):
- ADVANCE from GERMINATED needs ``MIN_EPOCHS_GERMINATED`` (1) epoch in the stage, i.e. it is valid
  from the first observation after the germination;
- ADVANCE from TRAINING needs ``MIN_EPOCHS_TRAINING`` (2) epochs of seed training;
- FOSSILIZE only from HOLDING (alpha at its target, contribution measured at that alpha);
- SET_ALPHA_TARGET only in BLENDING or HOLDING; PRUNE from GERMINATED, TRAINING, BLENDING, HOLDING.
- Timed stages last exactly ``DWELL_EPOCHS`` epochs, counted in observations: a slot pruned with
  INSTANT speed shows PRUNED in the next observation, EMBARGOED in the 3 after, RESETTING in one
  more, then DORMANT (5 epochs without a seed before the slot can germinate again).

``epochs_in_stage`` counts the epoch ends (i.e. observations) since the slot entered its stage:
1 at the first observation after an action moved it, also 1 after an automatic move.

How a seed enters the host stream (``h`` = host activation at the slot, ``s = seed(h)``,
``d`` = the style's delta, ``a`` = alpha); every style is ``out = h + a * d(h, s)``:
- LINEAR_ADD ``d = s``; LINEAR_MULTIPLY ``d = h * s`` (i.e. ``h * (1 + a s)``);
  SIGMOID_ADD ``d = 2 sigmoid(s) - 1`` (a bounded add, in (-1, 1)); GATED_GATE ``d = g(h) * s``
  with a learned ``ChannelGate``. Every ``d`` is 0 for a fresh seed (``s = 0``), so blending a
  seed that has learned nothing leaves the host unchanged whatever the style. (SIGMOID_ADD used to
  be ``d = sigmoid(s)``, a constant shift of ``a / 2`` at init: measured on 8 seeds, three NORM
  seeds blended that way lost 0.098 of return to always-WAIT where LINEAR_ADD gained 0.121, which
  made the style head a trap that decided whether PPO ever advanced a seed.)
- TRAINING (alpha 0, host isolated): ``out = h + (d - d.detach())`` with ``d`` computed from
  ``h.detach()``. The value is exactly ``h`` (the host's forward and its gradients are those of a
  host without the seed), while the seed receives the host loss's gradient as if it were blended at
  alpha 1: it learns on the host's error, and no gradient flows from the seed into the host.
- BLENDING, HOLDING, PRUNING, FOSSILIZED: ``out = h + a * d`` with full gradients (co-training).
- Other stages: ``out = h`` (the host's counterfactual passes skip a slot the same way).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from esper_lib.constants import (
    AlphaCurveAction,
    BlueprintAction,
    GerminationStyle,
    SeedStage,
    TempoAction,
)
from esper_lib.envs.blueprints import ChannelGate, parameter_count
from esper_lib.envs.fused_adam import FusedAdam

MIN_EPOCHS_GERMINATED = 1
MIN_EPOCHS_TRAINING = 2
DWELL_EPOCHS: dict[SeedStage, int] = {SeedStage.PRUNED: 1, SeedStage.EMBARGOED: 3, SeedStage.RESETTING: 1}
_NEXT_AFTER_DWELL: dict[SeedStage, SeedStage] = {
    SeedStage.PRUNED: SeedStage.EMBARGOED,
    SeedStage.EMBARGOED: SeedStage.RESETTING,
    SeedStage.RESETTING: SeedStage.DORMANT,
}
# The alpha curve of the blend that ADVANCE starts from TRAINING (the germinate action has no curve head).
DEFAULT_BLEND_CURVE = AlphaCurveAction.LINEAR

PRUNABLE_STAGES = frozenset({SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.HOLDING})
RETARGETABLE_STAGES = frozenset({SeedStage.BLENDING, SeedStage.HOLDING})
# Stages in which the slot holds a seed module (its parameters exist and pay rent).
SEED_PRESENT_STAGES = frozenset(
    {
        SeedStage.GERMINATED,
        SeedStage.TRAINING,
        SeedStage.BLENDING,
        SeedStage.HOLDING,
        SeedStage.PRUNING,
        SeedStage.FOSSILIZED,
    }
)
# Stages in which the seed's parameters are updated by the host loss.
SEED_LEARNING_STAGES = frozenset({SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.HOLDING, SeedStage.PRUNING})
# Stages in which the seed's output enters the host stream with its alpha.
SEED_IN_STREAM_STAGES = frozenset({SeedStage.BLENDING, SeedStage.HOLDING, SeedStage.PRUNING, SeedStage.FOSSILIZED})

_SIGMOID_STEEPNESS = {
    AlphaCurveAction.SIGMOID_GENTLE: 4.0,
    AlphaCurveAction.SIGMOID: 8.0,
    AlphaCurveAction.SIGMOID_SHARP: 16.0,
}


def curve_value(curve: AlphaCurveAction | int, progress: float) -> float:
    """Shape of an alpha ramp: maps progress in [0, 1] to [0, 1] with f(0) = 0 and f(1) = 1.

    LINEAR ``p``; COSINE ``(1 - cos(pi p)) / 2``; the SIGMOID family a logistic of steepness
    4 / 8 / 16 centred at 0.5, rescaled to hit 0 and 1 exactly.
    """
    p = min(max(float(progress), 0.0), 1.0)
    curve = AlphaCurveAction(int(curve))
    if curve == AlphaCurveAction.LINEAR:
        return p
    if curve == AlphaCurveAction.COSINE:
        return 0.5 * (1.0 - math.cos(math.pi * p))
    k = _SIGMOID_STEEPNESS[curve]
    lo, hi = 1.0 / (1.0 + math.exp(k / 2)), 1.0 / (1.0 + math.exp(-k / 2))
    return (1.0 / (1.0 + math.exp(-k * (p - 0.5))) - lo) / (hi - lo)


@dataclass
class AlphaRamp:
    """Alpha moving from ``start`` to ``target`` over ``total`` epochs along ``curve``."""

    start: float
    target: float
    total: int
    curve: AlphaCurveAction
    done: int = 0

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    @property
    def value(self) -> float:
        if self.total <= 0:
            return self.target
        return self.start + (self.target - self.start) * curve_value(self.curve, self.done / self.total)

    @property
    def steps_left(self) -> int:
        return max(self.total - self.done, 0)

    @property
    def direction(self) -> int:
        """+1 ramping up, -1 ramping down, 0 finished or flat."""
        if self.finished or self.target == self.start:
            return 0
        return 1 if self.target > self.start else -1

    def step(self) -> float:
        """Advance one epoch; returns the new alpha."""
        self.done = min(self.done + 1, self.total)
        return self.value


@dataclass
class SlotStats:
    """Measurements of one slot, refreshed by the environment each epoch (None = not measured)."""

    contribution: float | None = None  # accuracy (0-1) with the seed minus with its alpha at 0
    prev_contribution: float | None = None
    interaction: float = 0.0  # pairwise-ablation sum, accuracy fraction
    freshness: float | None = None  # 1 when measured this epoch, x0.8 per epoch since
    grad_norm: float | None = None
    grad_health: float | None = None
    prev_grad_health: float | None = None


class SeedSlot(nn.Module):
    """One injection point of the host: holds at most one seed and its lifecycle state.

    ``forward(h)`` maps ``[B, C, H, W]`` to the same shape following the stage rules of the module
    docstring. The environment drives the lifecycle through the action methods and ``end_epoch``.
    """

    def __init__(self, index: int, channels: int):
        super().__init__()
        self.index = index
        self.channels = channels
        self.seed: nn.Module | None = None
        self.gate: ChannelGate | None = None
        self._clear()

    # --- state -----------------------------------------------------------------------------

    def _clear(self) -> None:
        self.seed = None
        self.gate = None
        self.optimizer: FusedAdam | None = None  # the seed's own Adam while it learns (set by the env)
        self.stage = SeedStage.DORMANT
        self.blueprint: BlueprintAction | None = None
        self.style: GerminationStyle | None = None
        self.tempo: TempoAction | None = None
        self.alpha_target = 0.0
        self.curve: AlphaCurveAction | None = None
        self.alpha = 0.0
        self.ramp: AlphaRamp | None = None
        self.epochs_in_stage = 0
        self.age = 0
        self.stats = SlotStats()
        self._counted: tuple[nn.Module, nn.Module | None] | None = None  # the (seed, gate) _counts belong to
        self._counts = (0, 0)

    def _enter(self, stage: SeedStage) -> None:
        self.stage = stage
        self.epochs_in_stage = 0

    @property
    def has_seed(self) -> bool:
        return self.stage in SEED_PRESENT_STAGES

    @property
    def in_stream(self) -> bool:
        """True when the seed's output currently changes the host's forward (alpha > 0)."""
        return self.stage in SEED_IN_STREAM_STAGES and self.alpha > 0.0

    @property
    def learning(self) -> bool:
        return self.stage in SEED_LEARNING_STAGES

    @property
    def passes_through(self) -> bool:
        """True when ``forward`` returns its input as it is, gradients included (no seed, or one neither in
        TRAINING nor in the stream)."""
        return self.seed is None or (self.stage != SeedStage.TRAINING and not self.in_stream)

    def seed_parameters(self) -> list[nn.Parameter]:
        """Parameters the seed uses (its body, plus its gate under GATED_GATE)."""
        if self.seed is None:
            return []
        params = list(self.seed.parameters())
        if self.style == GerminationStyle.GATED_GATE and self.gate is not None:
            params += list(self.gate.parameters())
        return params

    def param_count(self) -> int:
        """Scalars of the seed (0 without a seed); its gate's too under GATED_GATE."""
        if self.seed is None:
            return 0
        seed_gate = self._counted
        if seed_gate is None or seed_gate[0] is not self.seed or seed_gate[1] is not self.gate:
            # counted once per seed and gate: the env reads this several times an epoch
            self._counts = (parameter_count(self.seed), 0 if self.gate is None else parameter_count(self.gate))
            self._counted = (self.seed, self.gate)
        seed, gate = self._counts
        return seed + (gate if self.style == GerminationStyle.GATED_GATE else 0)

    # --- gates -----------------------------------------------------------------------------

    def can_germinate(self) -> bool:
        return self.stage == SeedStage.DORMANT

    def can_advance(self) -> bool:
        if self.stage == SeedStage.GERMINATED:
            return self.epochs_in_stage >= MIN_EPOCHS_GERMINATED
        if self.stage == SeedStage.TRAINING:
            return self.epochs_in_stage >= MIN_EPOCHS_TRAINING
        return False

    def can_prune(self) -> bool:
        return self.stage in PRUNABLE_STAGES

    def can_fossilize(self) -> bool:
        return self.stage == SeedStage.HOLDING

    def can_set_alpha_target(self) -> bool:
        return self.stage in RETARGETABLE_STAGES

    # --- actions (the env checks the gate first) -------------------------------------------

    def germinate(
        self,
        seed: nn.Module,
        gate: ChannelGate,
        blueprint: BlueprintAction,
        style: GerminationStyle,
        tempo: TempoAction,
        alpha_target: float,
    ) -> None:
        """DORMANT -> GERMINATED with a fresh seed module (not yet trained, not in the stream)."""
        self._clear()
        self.seed, self.gate = seed, gate
        self.blueprint, self.style, self.tempo = blueprint, style, tempo
        self.alpha_target = float(alpha_target)
        self._enter(SeedStage.GERMINATED)

    def advance(self, blend_epochs: int) -> None:
        """GERMINATED -> TRAINING, or TRAINING -> BLENDING (alpha ramps 0 -> target over ``blend_epochs``)."""
        if self.stage == SeedStage.GERMINATED:
            self._enter(SeedStage.TRAINING)
        elif self.stage == SeedStage.TRAINING:
            self.curve = DEFAULT_BLEND_CURVE
            self.ramp = AlphaRamp(self.alpha, self.alpha_target, blend_epochs, self.curve)
            self._enter(SeedStage.BLENDING)
        else:
            raise RuntimeError(f"slot {self.index}: cannot ADVANCE from {self.stage.name}")

    def set_alpha_target(
        self, alpha_target: float, epochs: int, curve: AlphaCurveAction, style: GerminationStyle
    ) -> None:
        """Retarget alpha (BLENDING/HOLDING): a new ramp (stage BLENDING) or an instant jump (stage HOLDING)."""
        self.alpha_target = float(alpha_target)
        self.style, self.curve = style, curve
        if epochs <= 0 or abs(self.alpha_target - self.alpha) < 1e-9:
            self.alpha, self.ramp = self.alpha_target, None
            if self.stage != SeedStage.HOLDING:
                self._enter(SeedStage.HOLDING)
        else:
            self.ramp = AlphaRamp(self.alpha, self.alpha_target, epochs, curve)
            self._enter(SeedStage.BLENDING)

    def prune(self, epochs: int, curve: AlphaCurveAction) -> None:
        """PRUNED at once (``epochs == 0``) or PRUNING: alpha ramps to 0 over ``epochs``."""
        if epochs <= 0:
            self._remove_seed()
            self._enter(SeedStage.PRUNED)
        else:
            self.curve = curve
            self.ramp = AlphaRamp(self.alpha, 0.0, epochs, curve)
            self._enter(SeedStage.PRUNING)

    def fossilize(self) -> None:
        """HOLDING -> FOSSILIZED: alpha frozen at its value, the seed is part of the host from now on."""
        self.ramp = None
        self._enter(SeedStage.FOSSILIZED)

    def _remove_seed(self) -> None:
        self._clear()

    # --- epoch hooks ---------------------------------------------------------------------------

    def begin_epoch(self) -> None:
        """Advance the alpha ramp one epoch (so the coming epoch trains at the new alpha)."""
        if self.ramp is not None and self.stage in (SeedStage.BLENDING, SeedStage.PRUNING):
            self.alpha = self.ramp.step()

    def end_epoch(self) -> None:
        """Automatic transitions after an epoch (ramp finished, dwell elapsed), then the counters."""
        if self.stage == SeedStage.BLENDING and (self.ramp is None or self.ramp.finished):
            self.alpha, self.ramp = self.alpha_target, None
            self._enter(SeedStage.HOLDING)
        elif self.stage == SeedStage.PRUNING and (self.ramp is None or self.ramp.finished):
            self._remove_seed()
            self._enter(SeedStage.PRUNED)
        elif self.stage in DWELL_EPOCHS and self.epochs_in_stage >= DWELL_EPOCHS[self.stage]:
            nxt = _NEXT_AFTER_DWELL[self.stage]
            if nxt == SeedStage.DORMANT:
                self._clear()
            self._enter(nxt)
        self.epochs_in_stage += 1
        if self.has_seed:
            self.age += 1

    # --- forward -------------------------------------------------------------------------------

    def _delta(self, h: torch.Tensor) -> torch.Tensor:
        s = self.seed(h)
        if self.style == GerminationStyle.LINEAR_ADD:
            return s
        if self.style == GerminationStyle.LINEAR_MULTIPLY:
            return h * s
        if self.style == GerminationStyle.SIGMOID_ADD:
            return 2.0 * torch.sigmoid(s) - 1.0
        return self.gate(h) * s

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, C, H, W]``: the host activation with the seed joined per its stage."""
        if self.seed is None:
            return h
        if self.stage == SeedStage.TRAINING:
            if not torch.is_grad_enabled():
                return h
            d = self._delta(h.detach())
            return h + (d - d.detach())
        if self.stage in SEED_IN_STREAM_STAGES and self.alpha > 0.0:
            return h + self.alpha * self._delta(h)
        return h
