"""Convolution and max-pool for tiny feature maps, cheaper than the oneDNN kernels on CPU.

The morphogenetic env trains a CNN on 8x8 images in minibatches of 64: a 3x3 convolution there is
a few hundred thousand multiply-adds, and oneDNN runs them far below the machine's matmul rate
(about 100 us per forward and 300-500 us per backward on one core of the dev machine). The layers
here compute the same functions with cheaper calls:

- ``SmallConv2d`` (an ``nn.Conv2d``: same parameters, same initialisation, same state dict) runs a
  stride-1, dilation-1 convolution on an ``H x W`` map as one matrix product with its *Toeplitz*
  matrix ``T`` ``[O*H'*W', C*H*W]`` when ``T`` has at most ``TOEPLITZ_MAX_ENTRIES`` entries::

      T[(o, p), (c, q)] = sum_k w[o, c, k] * S[k, p, q]      y_flat = x_flat @ T^T + b

  ``S[k, p, q] = 1`` when kernel tap ``k`` reads input position ``q`` for output position ``p``
  (zero padding is the missing ones). ``T`` is rebuilt from ``w`` at every call (one small matrix
  product), so autograd gives the gradients of ``w`` and ``b`` through plain ``mm`` s. Larger maps
  (the host's 4 -> 8 channels at 8x8: ``T`` is 512 x 256, and the dense products cost more than
  oneDNN there) keep ``conv2d``.
- ``max_pool2x2``: 2x2/2 max-pool. Without autograd (validation, counterfactuals) the maximum of
  the four strided views (exact, 5-8x faster than NCHW ``max_pool2d``); with autograd the
  channels-last ``max_pool2d`` kernel (vectorised, unlike the NCHW one), whose backward routes each
  gradient to the first maximum of its window, as ``max_pool2d`` does.

Results equal the oneDNN ones up to float rounding (summation order), ~1e-5 relative; the
reductions are deterministic on CPU, so an env seed still gives the same episode bit for bit.
"""
from __future__ import annotations

import itertools
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from esper_lib.envs import native

# Largest Toeplitz matrix (entries) built instead of calling conv2d: 256 x 256 covers every
# convolution of the default env except the host's 4 -> 8 channels on the 8x8 map (256 x 512),
# where the dense product costs more than oneDNN (measured on the 2-core dev machine).
TOEPLITZ_MAX_ENTRIES = 256 * 256


@lru_cache(maxsize=64)
def _shift_matrix(h: int, w: int, kh: int, kw: int, ph: int, pw: int) -> torch.Tensor:
    """``S`` ``[kh*kw, H'*W' * H*W]`` (float32 0/1): tap ``k`` of output ``p`` reads input ``q``."""
    ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    with torch.inference_mode(False):  # cached: a normal tensor even when first built in inference mode
        s = torch.zeros(kh * kw, ho * wo, h * w)
        for dy, dx, y, x in itertools.product(range(kh), range(kw), range(ho), range(wo)):
            yy, xx = y + dy - ph, x + dx - pw
            if 0 <= yy < h and 0 <= xx < w:
                s[dy * kw + dx, y * wo + x, yy * w + xx] = 1.0
        return s.view(kh * kw, -1)


def _dense_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``[O, C/groups, kh, kw]`` -> ``[O, C, kh*kw]`` with zeros between groups."""
    o, cg, kh, kw = weight.shape
    w = weight.reshape(o, cg, kh * kw)
    if groups == 1:
        return w
    eye = torch.eye(groups, dtype=weight.dtype)
    full = torch.einsum("gock,gh->gohck", w.view(groups, o // groups, cg, kh * kw), eye)
    return full.reshape(o, groups * cg, kh * kw)


def toeplitz_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int], groups: int = 1
) -> torch.Tensor:
    """Stride-1 ``conv2d`` as ``x_flat @ T^T`` (see the module docstring). ``[B, C, H, W] -> [B, O, H', W']``."""
    b, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    ph, pw = padding
    ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    s = _shift_matrix(h, w, kh, kw, ph, pw)
    wd = _dense_weight(weight, groups)  # [O, C, K]
    t = (wd.reshape(o * c, kh * kw) @ s).view(o, c, ho * wo, h * w).transpose(1, 2).reshape(o * ho * wo, c * h * w)
    y = (x.reshape(b, c * h * w) @ t.t()).view(b, o, ho, wo)
    return y if bias is None else y + bias.view(1, o, 1, 1)


def _float32_cpu(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())


def _native_conv_ok(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether the C kernels (``esper_lib.envs.native``) compute this convolution: when they are switched
    on, for a ``[N, C, H, W]`` input with the layer's channels and contiguous float32 CPU tensors (input, weight,
    bias; no autocast), stride 1, dilation 1, zero padding equal on both sides and a square 1x1 or 3x3 kernel.
    They are faster than the Toeplitz product and oneDNN on the env's maps, or as fast within noise (the host's
    4x4 block; ``benchmarks/bench_native_kernels.py``). Checked per call, so ``native``'s own checks are skipped."""
    if not native.enabled():  # the torch path: no further checks
        return False
    if x.dim() != 4 or conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        return False
    kh, kw = conv.kernel_size
    if isinstance(conv.padding, str) or not (kh == kw and kh in (1, 3) and conv.padding[0] == conv.padding[1]):
        return False
    if x.shape[1] != conv.in_channels or min(x.shape[2], x.shape[3]) + 2 * conv.padding[0] < kh:
        return False  # torch raises its own error, or returns an empty map
    return _float32_cpu(x) and _float32_cpu(conv.weight) and _float32_cpu(conv.bias) and not torch.is_autocast_enabled("cpu")


class SmallConv2d(nn.Conv2d):
    """``nn.Conv2d`` computed by ``toeplitz_conv2d`` on small maps (stride 1, dilation 1, zero padding).

    Any other configuration, or a map whose Toeplitz matrix is too large, goes through ``conv2d``. With the
    C kernels on (``esper_lib.envs.native``, the default where they build), every convolution they support uses them
    (``_native_conv_ok``); ``forward_relu`` then fuses the ReLU into the same call, and ``forward_relu_pool``
    the ReLU and a following 2x2 max-pool.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, relu=False)

    def forward_relu(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(self(x))``; one fused call on the native path."""
        return self._conv(x, relu=True)

    def forward_relu_pool(self, x: torch.Tensor) -> torch.Tensor:
        """``max_pool2x2(relu(self(x)))``; one autograd node on the native path (values identical either way)."""
        y = self._native_call(x, relu=True, pool=True)
        if y is not None:
            return y
        return max_pool2x2(self._conv(x, relu=True))

    def _conv(self, x: torch.Tensor, relu: bool) -> torch.Tensor:
        y = self._native_call(x, relu)
        if y is not None:
            return y
        y = self._linear_conv(x)
        return F.relu(y) if relu else y

    def _native_call(self, x: torch.Tensor, relu: bool, pool: bool = False) -> torch.Tensor | None:
        """The native kernel's result (ReLU applied if ``relu``, then max-pooled if ``pool``) when it applies, else None."""
        if not _native_conv_ok(self, x):
            return None
        pad, k = self.padding[0], self.kernel_size[0]
        out_h, out_w = x.shape[2] + 2 * pad - k + 1, x.shape[3] + 2 * pad - k + 1
        if pool and (out_h % 2 or out_w % 2):  # the fused pool takes even maps (max_pool2x2 handles odd ones)
            return None
        return native._conv2d(x, self.weight, self.bias, pad, self.groups, relu, pool)

    def _linear_conv(self, x: torch.Tensor) -> torch.Tensor:
        plain = (
            self.stride != (1, 1)
            or self.dilation != (1, 1)
            or self.padding_mode != "zeros"
            or isinstance(self.padding, str)
            or x.dim() != 4
        )
        if plain:
            return super().forward(x)
        _, c, h, w = x.shape
        kh, kw = self.kernel_size
        ph, pw = self.padding
        out_hw = (h + 2 * ph - kh + 1) * (w + 2 * pw - kw + 1)
        if c * h * w * self.out_channels * out_hw <= TOEPLITZ_MAX_ENTRIES:
            return toeplitz_conv2d(x, self.weight, self.bias, (ph, pw), self.groups)
        return super().forward(x)


class _MaxPool2x2(torch.autograd.Function):
    """2x2/2 max-pool through the channels-last kernel (NCHW in and out)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        xc = x.contiguous(memory_format=torch.channels_last)
        out, idx = torch.ops.aten.max_pool2d_with_indices(xc, [2, 2], [2, 2])
        ctx.save_for_backward(xc, idx)
        return out.contiguous()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        xc, idx = ctx.saved_tensors
        gc = g.contiguous(memory_format=torch.channels_last)
        gx = torch.ops.aten.max_pool2d_with_indices_backward(gc, xc, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)
        return gx.contiguous()


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` for ``[B, C, H, W]`` with even ``H``, ``W`` (values and gradients identical)."""
    if x.requires_grad and torch.is_grad_enabled():
        if native.enabled() and _float32_cpu(x) and not torch.is_autocast_enabled("cpu"):
            return native.max_pool2x2(x)
        return _MaxPool2x2.apply(x)
    v = x.unflatten(3, (-1, 2)).unflatten(2, (-1, 2))  # [B, C, H/2, 2, W/2, 2]
    top = torch.maximum(v[:, :, :, 0, :, 0], v[:, :, :, 0, :, 1])
    bottom = torch.maximum(v[:, :, :, 1, :, 0], v[:, :, :, 1, :, 1])
    return torch.maximum(top, bottom)


def run_sequential(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``seq(x)``, with each ``SmallConv2d`` followed by an ``nn.ReLU`` run as one ``forward_relu`` call (and
    ``SmallConv2d``, ``nn.ReLU``, ``MaxPool2x2`` as one ``forward_relu_pool`` call).

    The same values as ``seq(x)`` (bit for bit unless the native kernels are on, which fuse the pair).
    Forward hooks registered on the fused modules are not called (the project registers none).
    """
    mods = list(seq)
    k = 0
    while k < len(mods):
        m = mods[k]
        if isinstance(m, SmallConv2d) and k + 1 < len(mods) and type(mods[k + 1]) is nn.ReLU:
            if k + 2 < len(mods) and type(mods[k + 2]) is MaxPool2x2:
                x = m.forward_relu_pool(x)
                k += 3
            else:
                x = m.forward_relu(x)
                k += 2
        else:
            x = m(x)
            k += 1
    return x


class FusedSequential(nn.Sequential):
    """``nn.Sequential`` whose forward is ``run_sequential`` (same modules, names and state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return run_sequential(self, x)


class MaxPool2x2(nn.Module):
    """Module form of ``max_pool2x2`` (replaces ``nn.MaxPool2d(2)`` in the host)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2x2(x)
