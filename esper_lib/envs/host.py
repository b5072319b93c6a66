"""The host of the morphogenetic env: scikit-learn's 8x8 digits and a small CNN with seed slots.

Data: ``load_digits`` (1,797 images, 10 classes, bundled with scikit-learn, no download), scaled
to [0, 1] then standardised with the train split's mean and std, as ``[N, 1, 8, 8]`` float32.

Host (default ``channels=(16, 32, 32)``, 3 blocks): each block is ``Conv3x3 -> ReLU`` (block 1
also max-pools 8x8 -> 4x4) and is followed by a ``SeedSlot``; a global average pool and a linear
classifier finish it::

    x [B,1,8,8] -> block0 [B,16,8,8] -> slot0 -> block1 [B,32,4,4] -> slot1
                -> block2 [B,32,4,4] -> slot2 -> mean over H,W [B,32] -> linear [B,10]

The convolutions are ``SmallConv2d`` (an ``nn.Conv2d`` computed as a Toeplitz matrix product on
small maps) and the pool is ``MaxPool2x2`` (same values as ``nn.MaxPool2d(2)``), both from
``esper_lib.envs.small_ops``: the same functions and parameters, several times cheaper at these
sizes on CPU.

About 14k parameters at ``HostCNN``'s defaults; ``MorphoEnv`` uses a narrower host by default
(channels 4/8/8, 1,010 parameters: see its docstring), deliberately small (and without a dense
layer on the spatial map) so that seeds have capacity to add and an epoch runs in tens of
milliseconds on CPU.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from esper_lib.constants import SeedStage
from esper_lib.envs import native
from esper_lib.envs.blueprints import parameter_count
from esper_lib.envs.lifecycle import SeedSlot
from esper_lib.envs.small_ops import MaxPool2x2, SmallConv2d, run_sequential

NUM_CLASSES = 10
NUM_DIGITS = 1797


@dataclass(frozen=True)
class DigitsSplit:
    """A train/validation split: ``x_*`` ``[N, 1, 8, 8]`` float32, ``y_*`` ``[N]`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


def load_digits_split(val_size: int = 360, train_size: int | None = None, seed: int = 0) -> DigitsSplit:
    """Stratified split of the digits into ``val_size`` validation and ``train_size`` training images.

    ``train_size=None`` takes every image not in validation. The split depends only on ``seed``.
    """
    from sklearn.model_selection import train_test_split

    x, y = _digits()
    if not isinstance(val_size, (int, np.integer)) or not 10 <= val_size <= NUM_DIGITS - 10:
        raise ValueError(f"val_size must be an int in [10, {NUM_DIGITS - 10}], got {val_size!r}")
    rest = NUM_DIGITS - int(val_size)
    if train_size is None:
        train_size = rest
    if not isinstance(train_size, (int, np.integer)) or not 10 <= train_size <= rest:
        raise ValueError(f"train_size must be None or an int in [10, {rest}] (with val_size={val_size}), got {train_size!r}")
    idx_train, idx_val = train_test_split(
        np.arange(NUM_DIGITS), test_size=int(val_size), stratify=y, random_state=int(seed) % (2**32)
    )
    idx_train = idx_train[: int(train_size)]
    mean, std = float(x[idx_train].mean()), float(x[idx_train].std())

    def prep(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        xs = torch.from_numpy((x[idx] - mean) / std).reshape(-1, 1, 8, 8).contiguous()
        return xs, torch.from_numpy(y[idx])

    x_tr, y_tr = prep(idx_train)
    x_va, y_va = prep(idx_val)
    return DigitsSplit(x_tr, y_tr, x_va, y_va)


class HostCNN(nn.Module):
    """Small CNN with a ``SeedSlot`` after each block; ``forward`` ``[B, 1, 8, 8] -> [B, 10]`` logits.

    Args:
        channels: output channels of each block; one slot per block (``len(channels)`` slots).
        pool_after: blocks followed by a 2x2 max-pool.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 32), pool_after: Sequence[int] = (1,)):
        super().__init__()
        blocks, c_in = [], 1
        for i, c in enumerate(channels):
            layers: list[nn.Module] = [SmallConv2d(c_in, c, 3, padding=1), nn.ReLU()]
            if i in pool_after:
                layers.append(MaxPool2x2())
            blocks.append(nn.Sequential(*layers))
            c_in = c
        self.blocks = nn.ModuleList(blocks)
        self.slots = nn.ModuleList(SeedSlot(i, c) for i, c in enumerate(channels))
        self.head = nn.Linear(c_in, NUM_CLASSES)
        self.base_param_count = sum(parameter_count(m) for m in (self.blocks, self.head))

    def host_parameters(self) -> list[nn.Parameter]:
        """The original host's parameters (fossilized seeds are added to the host optimizer separately)."""
        return [*self.blocks.parameters(), *self.head.parameters()]

    def param_count(self) -> int:
        """Host parameters including every fossilized seed (they are part of the host)."""
        fossils = sum(s.param_count() for s in self.slots if s.stage == SeedStage.FOSSILIZED)
        return self.base_param_count + fossils

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1, 8, 8] -> [B, C, 4, 4]``: the last slot's output (every slot per its stage), before the head."""
        h = x
        for block, slot in zip(self.blocks, self.slots):
            h = slot(run_sequential(block, h))
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1, 8, 8] -> [B, 10]`` logits with every slot per its stage."""
        return self.head(self.features(x).mean(dim=(2, 3)))

    def train_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F.cross_entropy(logits, y), logits)`` with ``logits = self(x)`` ``[B, 10]``; with the C kernels
        on, the mean-pool, head and loss are one call (``native.head_loss``) whose logits carry no gradient."""
        h = self.features(x)
        if native.enabled() and _native_head_ok(h, self.head, y):
            return native._head_loss(h, self.head.weight, self.head.bias, y)
        logits = self.head(h.mean(dim=(2, 3)))
        return F.cross_entropy(logits, y), logits

    def native_blocks(self) -> list[tuple[int, bool]] | None:
        """Per block ``(padding, pool)`` when ``native.host_epoch`` can run this host's blocks: every block is a
        ``SmallConv2d`` (with bias, 1x1 or 3x3, stride 1, groups 1) + ReLU, optionally + ``MaxPool2x2``, the head has a
        bias, and every host parameter is float32, contiguous and on the CPU; else None. (The slots are the env's
        to check.) The parameters are then ``host_parameters()``, in order."""
        if self.head.bias is None:
            return None
        blocks = []
        for block in self.blocks:
            mods = list(block)
            if len(mods) not in (2, 3) or type(mods[1]) is not nn.ReLU or (len(mods) == 3 and type(mods[2]) is not MaxPool2x2):
                return None
            conv = mods[0]
            if (
                type(conv) is not SmallConv2d
                or conv.bias is None
                or conv.groups != 1
                or conv.stride != (1, 1)
                or conv.dilation != (1, 1)
                or conv.padding_mode != "zeros"
                or isinstance(conv.padding, str)
                or conv.padding[0] != conv.padding[1]
                or conv.kernel_size not in ((1, 1), (3, 3))
            ):
                return None
            blocks.append((conv.padding[0], len(mods) == 3))
        if not all(p.dtype == torch.float32 and p.device.type == "cpu" and p.is_contiguous() for p in self.host_parameters()):
            return None
        return blocks

    def forward_cached(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits ``[B, 10]`` and each block's output before its slot (for ``forward_ablations``)."""
        cache, h = [], x
        for block, slot in zip(self.blocks, self.slots):
            h = run_sequential(block, h)
            cache.append(h)
            h = slot(h)
        return self.head(h.mean(dim=(2, 3))), cache

    def forward_ablated(self, cache: list[torch.Tensor], ablate: frozenset[int] | set[int]) -> torch.Tensor:
        """Logits with the slots in ``ablate`` replaced by the identity (their seed's alpha forced to 0).

        Starts from the cached activation of the first ablated slot, so the unchanged prefix of the
        network is not recomputed.
        """
        return self.forward_ablations(cache, [ablate])[0]

    def forward_ablations(self, cache: list[torch.Tensor], ablations: Sequence[frozenset[int] | set[int]]) -> list[torch.Tensor]:
        """``forward_ablated`` for each set in ``ablations``, computing each partial pass they share once.

        The activation after slot ``k`` depends only on which slots up to ``k`` are ablated: e.g. the ablations
        ``{0}``, ``{0, 1}`` and ``{0, 2}`` share block 1's pass on ``cache[0]``. The same ops on the same inputs
        as separate ``forward_ablated`` calls, so the same values bit for bit.
        """
        block_in: dict[tuple[int, frozenset[int]], torch.Tensor] = {}  # (k, ablated slots < k) -> input of slot k
        slot_out: dict[tuple[int, frozenset[int]], torch.Tensor] = {}  # (k, ablated slots <= k) -> output of slot k
        logits = []
        for ablate in ablations:
            ablate = frozenset(ablate)
            if not ablate:
                raise ValueError("each ablation needs at least one slot (the full forward is forward_cached's)")
            start, h = min(ablate), None
            for k in range(start, len(self.blocks)):
                before = frozenset(i for i in ablate if i < k)
                upto = before | ({k} if k in ablate else frozenset())
                if (k, upto) in slot_out:
                    h = slot_out[(k, upto)]
                    continue
                if (k, before) not in block_in:
                    block_in[(k, before)] = cache[k] if k == start else run_sequential(self.blocks[k], h)
                h = block_in[(k, before)]
                if k not in ablate:
                    h = self.slots[k](h)
                slot_out[(k, upto)] = h
            logits.append(self.head(h.mean(dim=(2, 3))))
        return logits


def _native_head_ok(h: torch.Tensor, head: nn.Linear, y: torch.Tensor) -> bool:
    """Whether ``native.head_loss`` reads these tensors (contiguous float32 CPU, int64 labels, no autocast)."""
    floats = (h, head.weight) if head.bias is None else (h, head.weight, head.bias)
    return (
        h.dim() == 4
        and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in floats)
        and y.dtype == torch.int64
        and y.device.type == "cpu"
        and y.is_contiguous()
        and y.shape == (h.shape[0],)
        and h.shape[0] > 0
        and not torch.is_autocast_enabled("cpu")
    )
