"""What the C kernels need to know of a host slot (``esper_lib.envs.native``: ``host_epoch``, ``host_forward``).

A slot's seed becomes a ``native.SlotSeed`` when the kernels compute its body: a ``NormSeed``, an ``AttentionSeed``
or a ``FusedSequential`` of size-preserving ``SmallConv2d`` s each optionally followed by an ``nn.ReLU`` (the
convolution blueprints), with a ``ChannelGate`` and float32 contiguous CPU parameters. Anything else is
``False``: the env then runs the epoch's minibatch loop (or the validation passes) on the torch modules.

- ``training_seed(slot, host_opt)``: the slot as an epoch of training sees it;
- ``stream_seed(slot)``: the slot as a validation pass (no gradients) sees it.
"""
from __future__ import annotations

import torch
from torch import nn

from esper_lib.constants import SeedStage
from esper_lib.envs import native
from esper_lib.envs.blueprints import AttentionSeed, ChannelGate, NormSeed
from esper_lib.envs.fused_adam import FusedAdam
from esper_lib.envs.lifecycle import SeedSlot
from esper_lib.envs.small_ops import FusedSequential, SmallConv2d

SeedBody = tuple[list[nn.Parameter], str, int, tuple[tuple[int, bool], ...]]


def seed_body(seed: nn.Module | None) -> SeedBody | None:
    """``(parameters, body, GroupNorm groups, convolution layers)`` of a seed body the kernels compute (``body`` as
    ``native.SlotSeed.body``; layers ``(groups, relu)`` per convolution), or None."""
    if type(seed) is NormSeed:
        norm = seed.norm
        return ([norm.weight, norm.bias], "norm", norm.num_groups, ()) if norm.affine and norm.eps == 1e-5 else None
    if type(seed) is AttentionSeed:
        params = list(seed.parameters())  # scale, channel MLP (w1, b1, w2, b2), spatial (w, b)
        fits = len(params) == 7 and params[0].numel() <= 64  # the kernel keeps a channel's values on its stack
        return (params, "attention", 1, ()) if fits else None
    if not isinstance(seed, FusedSequential):
        return None
    mods, layers, params = list(seed), [], []
    k = 0
    while k < len(mods):
        conv = mods[k]
        if type(conv) is not SmallConv2d or conv.bias is None or conv.stride != (1, 1) or conv.dilation != (1, 1):
            return None
        if conv.padding_mode != "zeros" or conv.kernel_size not in ((1, 1), (3, 3)) or conv.padding != ((conv.kernel_size[0] - 1) // 2,) * 2:
            return None
        relu = k + 1 < len(mods) and type(mods[k + 1]) is nn.ReLU
        layers.append((conv.groups, relu))
        params += [conv.weight, conv.bias]
        k += 2 if relu else 1
    if not 1 <= len(layers) <= native.MAX_SEED_LAYERS:
        return None
    return params, "convs", 1, tuple(layers)


def _known(slot: SeedSlot) -> tuple[SeedBody, list[nn.Parameter]] | None:
    """The slot's body and its parameters with the gate's, when the kernels can compute them."""
    body = seed_body(slot.seed)
    if body is None or type(slot.gate) is not ChannelGate:
        return None
    params = [*body[0], slot.gate.weight, slot.gate.bias]
    if not all(p.dtype == torch.float32 and p.is_contiguous() and p.device.type == "cpu" for p in params):
        return None
    return body, params


def training_seed(slot: SeedSlot, host_opt: FusedAdam) -> native.SlotSeed | None | bool:
    """``slot`` for ``native.host_epoch``: None when it passes its input through and no seed learns or is fossilized
    there; a ``native.SlotSeed`` for a known seed that learns (TRAINING, or in the stream, with its own ``FusedAdam``
    set like ``host_opt``) or is a fossil in the stream; False for anything else."""
    fossil = slot.stage == SeedStage.FOSSILIZED
    if slot.passes_through and not slot.learning and not fossil:
        return None
    known = _known(slot)
    if known is None:
        return False
    (_, kind, groups, layers), params = known
    if slot.stage == SeedStage.TRAINING or (slot.learning and slot.in_stream):
        opt = slot.optimizer
        if opt is None or list(map(id, opt.params)) != list(map(id, params)) or opt.betas != host_opt.betas or opt.eps != host_opt.eps:
            return False
        m, v, t = opt.adam_state()
        mode = "training" if slot.stage == SeedStage.TRAINING else "stream"
        return native.SlotSeed(mode, int(slot.style), slot.alpha, params, kind, groups, layers, list(m), list(v), list(t), opt.lr)
    if fossil and slot.in_stream:
        return native.SlotSeed("fossil", int(slot.style), slot.alpha, params, kind, groups, layers)
    return False  # learning without being in the stream (alpha 0): no gradient reaches it, the loop handles that


def stream_seed(slot: SeedSlot) -> native.SlotSeed | None | bool:
    """``slot`` for ``native.host_forward``: None unless its seed is in the stream (without gradients a TRAINING seed
    changes nothing), a ``native.SlotSeed`` for a known seed, False for anything else."""
    if not slot.in_stream:
        return None
    known = _known(slot)
    if known is None:
        return False
    (_, kind, groups, layers), params = known
    return native.SlotSeed("stream", int(slot.style), slot.alpha, params, kind, groups, layers)
