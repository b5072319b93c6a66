"""Seed blueprints that fit a CNN host: small ``nn.Module`` s mapping ``[B, C, H, W] -> [B, C, H, W]``.

Every blueprint's last layer starts at zero (the "zero-init" convention), so a fresh seed's raw
output ``s`` is 0: blending it into the host changes nothing until it has learned something, whatever the style
(``esper_lib.envs.lifecycle``).

The blueprints that do not fit a CNN slot (NOOP, LORA, LORA_LARGE, MLP_SMALL, MLP, FLEX_ATTENTION)
have no builder here and are masked out of the blueprint head by ``blueprint_mask()``.

Parameter counts at ``C = 32`` channels (``C = 16``), against 14,378 for the default host:
CONV_LIGHT 1,056 (272), ATTENTION 603 (183), NORM 64 (32), DEPTHWISE 1,376 (432),
BOTTLENECK 1,136 (296), CONV_SMALL 5,168 (1,304), CONV_HEAVY 18,496 (4,640); the GATED_GATE
style adds ``2 C`` for its gate. ``parameter_count`` gives them for any width.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from esper_lib.constants import NUM_BLUEPRINTS, BlueprintAction
from esper_lib.envs.small_ops import FusedSequential, SmallConv2d


def _zero_(module: nn.Module) -> nn.Module:
    """Zero a layer's weight and bias in place (the seed starts as a no-op)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ConvLightSeed(FusedSequential):
    """1x1 convolution C -> C (channel mixing only)."""

    def __init__(self, channels: int):
        super().__init__(_zero_(SmallConv2d(channels, channels, 1)))


class ConvSmallSeed(FusedSequential):
    """3x3 convolution C -> C/2, ReLU, 1x1 back to C."""

    def __init__(self, channels: int):
        mid = max(1, channels // 2)
        super().__init__(SmallConv2d(channels, mid, 3, padding=1), nn.ReLU(), _zero_(SmallConv2d(mid, channels, 1)))


class ConvHeavySeed(FusedSequential):
    """Two 3x3 convolutions C -> C -> C with a ReLU (a full residual block)."""

    def __init__(self, channels: int):
        super().__init__(
            SmallConv2d(channels, channels, 3, padding=1), nn.ReLU(), _zero_(SmallConv2d(channels, channels, 3, padding=1))
        )


class DepthwiseSeed(FusedSequential):
    """Depthwise 3x3 (one filter per channel), ReLU, pointwise 1x1."""

    def __init__(self, channels: int):
        super().__init__(
            SmallConv2d(channels, channels, 3, padding=1, groups=channels), nn.ReLU(), _zero_(SmallConv2d(channels, channels, 1))
        )


class BottleneckSeed(FusedSequential):
    """1x1 C -> C/4, ReLU, 3x3 C/4 -> C/4, ReLU, 1x1 back to C."""

    def __init__(self, channels: int):
        mid = max(1, channels // 4)
        super().__init__(
            SmallConv2d(channels, mid, 1),
            nn.ReLU(),
            SmallConv2d(mid, mid, 3, padding=1),
            nn.ReLU(),
            _zero_(SmallConv2d(mid, channels, 1)),
        )


class AttentionSeed(nn.Module):
    """Channel (squeeze-excitation) and spatial attention: ``s = scale * h * ca(h) * sa(h)``.

    ``ca(h)``: ``[B, C, 1, 1]`` from the pooled channels through a C -> C/4 -> C MLP; ``sa(h)``:
    ``[B, 1, H, W]`` from the channel mean and max maps through a 3x3 conv; ``scale`` ``[C]`` starts at 0.
    """

    def __init__(self, channels: int):
        super().__init__()
        mid = max(1, channels // 4)
        self.channel = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), SmallConv2d(channels, mid, 1), nn.ReLU(), SmallConv2d(mid, channels, 1), nn.Sigmoid()
        )
        self.spatial = nn.Sequential(SmallConv2d(2, 1, 3, padding=1), nn.Sigmoid())
        self.scale = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        maps = torch.cat([h.mean(dim=1, keepdim=True), h.amax(dim=1, keepdim=True)], dim=1)
        return self.scale * h * self.channel(h) * self.spatial(maps)


class NormSeed(nn.Module):
    """Group normalisation with an affine map that starts at zero: ``s = gamma * norm(h) + beta``."""

    def __init__(self, channels: int):
        super().__init__()
        groups = next(g for g in (4, 2, 1) if channels % g == 0)
        self.norm = _zero_(nn.GroupNorm(groups, channels))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h)


class ChannelGate(nn.Module):
    """Learned per-channel gate ``g(h) = sigmoid(w * mean_hw(h) + b)``, ``[B, C, 1, 1]``, for GATED_GATE."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.weight * h.mean(dim=(2, 3), keepdim=True) + self.bias)


BLUEPRINT_BUILDERS: dict[BlueprintAction, Callable[[int], nn.Module]] = {
    BlueprintAction.CONV_LIGHT: ConvLightSeed,
    BlueprintAction.ATTENTION: AttentionSeed,
    BlueprintAction.NORM: NormSeed,
    BlueprintAction.DEPTHWISE: DepthwiseSeed,
    BlueprintAction.BOTTLENECK: BottleneckSeed,
    BlueprintAction.CONV_SMALL: ConvSmallSeed,
    BlueprintAction.CONV_HEAVY: ConvHeavySeed,
}

CNN_BLUEPRINTS: tuple[BlueprintAction, ...] = tuple(sorted(BLUEPRINT_BUILDERS))


def build_blueprint(blueprint: BlueprintAction | int, channels: int) -> nn.Module:
    """A fresh seed module for ``blueprint`` at a slot with ``channels`` channels.

    Raises ValueError for a blueprint that does not fit a CNN (masked out of the blueprint head).
    """
    bp = BlueprintAction(int(blueprint))
    if bp not in BLUEPRINT_BUILDERS:
        raise ValueError(f"blueprint {bp.name} does not fit a CNN slot; valid: {[b.name for b in CNN_BLUEPRINTS]}")
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    return BLUEPRINT_BUILDERS[bp](channels)


def parameter_count(module: nn.Module) -> int:
    """Number of trainable scalars of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def blueprint_mask() -> np.ndarray:
    """``[NUM_BLUEPRINTS]`` int8, 1 for the blueprints that fit a CNN."""
    mask = np.zeros(NUM_BLUEPRINTS, dtype=np.int8)
    mask[list(CNN_BLUEPRINTS)] = 1
    return mask
