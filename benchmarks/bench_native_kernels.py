"""The env's convolutions and max-pool, one at a time: the torch path against the C kernels.

    python benchmarks/bench_native_kernels.py [--calls N] [--repeats R]

For each layer shape of the default host and its seeds (minibatch 64), times forward + backward through
autograd (``SmallConv2d.forward_relu`` / ``max_pool2x2``, as the env calls them) with the C kernels off,
then on, in the same process, and prints the best of ``--repeats`` runs of ``--calls`` calls each (in us)
with the path the torch side took (Toeplitz product or oneDNN). A second table times the bare C calls (no
autograd, no allocation): forward and backward (every gradient) per layer, with their arithmetic rate
(2 flops per multiply-add; the backward does twice the forward's multiply-adds, one less input gradient for
block 0 whose input needs none in the env but is computed here).
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from esper_lib.envs import native
from esper_lib.envs.small_ops import TOEPLITZ_MAX_ENTRIES, SmallConv2d, max_pool2x2

# (what, in channels, out channels, map size, kernel, groups)
SHAPES = [
    ("host block 0", 1, 4, 8, 3, 1),
    ("host block 1", 4, 8, 8, 3, 1),
    ("host block 2", 8, 8, 4, 3, 1),
    ("seed depthwise, slot 1", 8, 8, 4, 3, 8),
    ("seed 3x3, slot 0", 4, 4, 8, 3, 1),
    ("seed depthwise, slot 0", 4, 4, 8, 3, 4),
    ("seed 1x1, slot 0", 4, 4, 8, 1, 1),
]


def best_us(fn: Callable[[], None], calls: int, repeats: int) -> float:
    """Best mean time per call over ``repeats`` runs of ``calls`` calls, in microseconds."""
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return min(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.calls < 1 or args.repeats < 1:
        ap.error("--calls and --repeats must be >= 1")
    if not native.available():
        ap.error("the C kernels could not be built here (see the warning above)")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    before = native.switched_on()  # put back after the comparisons
    print(f"torch {torch.__version__}, 1 thread, minibatch 64; forward + backward per call, best of {args.repeats} x {args.calls} calls")
    print(f"{'layer':<24}{'shape':<18}{'torch path':>18}{'C kernels':>12}{'C / torch':>11}")
    for what, c_in, c_out, size, kernel, groups in SHAPES:
        conv = SmallConv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups)
        x = torch.randn(64, c_in, size, size, requires_grad=True)

        def step() -> None:
            conv.forward_relu(x).sum().backward()

        times = []
        for flag in (False, True):
            native.enable(flag)
            times.append(best_us(step, args.calls, args.repeats))
        native.enable(before)
        toeplitz = c_in * size * size * c_out * size * size <= TOEPLITZ_MAX_ENTRIES
        path = "Toeplitz" if toeplitz else "oneDNN"
        on_c = "C"  # SmallConv2d uses the kernels for every 1x1 and 3x3 convolution when they are on
        shape = f"{c_in}->{c_out} {size}x{size} k{kernel}" + (f" g{groups}" if groups > 1 else "")
        print(f"{what:<24}{shape:<18}{times[0]:>10.0f} {path:<8}{times[1]:>7.0f} {on_c:<5}{times[1] / times[0]:>7.2f}x")
    x = torch.relu(torch.randn(64, 8, 8, 8)).requires_grad_(True)
    times = []
    for flag in (False, True):
        native.enable(flag)
        times.append(best_us(lambda: max_pool2x2(x).sum().backward(), args.calls, args.repeats))
    native.enable(before)
    print(f"{'max-pool 2x2':<24}{'8 ch 8x8':<18}{times[0]:>10.0f} {'':<8}{times[1]:>7.0f} {'C':<5}{times[1] / times[0]:>7.2f}x")
    bare_kernel_rates(args.calls * 3, args.repeats)


def bare_kernel_rates(calls: int, repeats: int) -> None:
    """Forward and backward of each layer as bare C calls, in us and GFLOP/s."""
    lib, ptr = native._lib(), native._ptr
    print(f"\n{'bare C calls':<24}{'shape':<18}{'forward us':>11}{'GFLOP/s':>9}{'backward us':>13}{'GFLOP/s':>9}")
    for what, c_in, c_out, size, kernel, groups in SHAPES:
        n, pad = 64, kernel // 2
        x, w, b = torch.randn(n, c_in, size, size), torch.randn(c_out, c_in // groups, kernel, kernel), torch.randn(c_out)
        y, gy = torch.empty(n, c_out, size, size), torch.randn(n, c_out, size, size)
        gx, gw, gb = torch.empty_like(x), torch.empty_like(w), torch.empty_like(b)
        dims = (n, c_in, size, size, c_out, kernel, pad, groups)
        fwd = best_us(lambda: lib.conv2d_forward(ptr(x), ptr(w), ptr(b), ptr(y), *dims, 1), calls, repeats)
        bwd = best_us(lambda: lib.conv2d_backward(ptr(x), ptr(w), ptr(gy), ptr(y), ptr(gx), ptr(gw), ptr(gb), *dims), calls, repeats)
        flops = 2 * n * c_out * size * size * (c_in // groups) * kernel * kernel / 1e3  # per us = GFLOP/s
        shape = f"{c_in}->{c_out} {size}x{size} k{kernel}" + (f" g{groups}" if groups > 1 else "")
        print(f"{what:<24}{shape:<18}{fwd:>11.1f}{flops / fwd:>9.1f}{bwd:>13.1f}{2 * flops / bwd:>9.1f}")


if __name__ == "__main__":
    main()
