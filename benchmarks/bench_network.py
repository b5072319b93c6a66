"""Benchmark of the V2 network on this machine's CPU.

    python benchmarks/bench_network.py [--threads N] [--repeats R]

Prints median time per call and samples/s for ``get_action`` (batch 1, 8, 32; one step with the
carried hidden state) and for ``evaluate_actions`` forward + backward (8 x 150 and 32 x 16), the
machine's fp32 matmul throughput (a large ``torch.mm``), and the update's achieved FLOP/s as a
fraction of it. FLOPs are counted analytically (2 * in * out per Linear and 2 * 4H(I+H) per LSTM
step, forward; x3 for forward + backward).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from esper_lib.constants import HEAD_NAMES, LifecycleOp, head_sizes
from esper_lib.network import FactoredRecurrentActorCritic


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 5) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(sizes: tuple[int, ...] = (1024, 2048, 4096), repeats: int = 10) -> float:
    """fp32 throughput of large square ``torch.mm`` calls (best median over ``sizes``), in GFLOP/s."""
    best = 0.0
    for n in sizes:
        a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        best = max(best, 2 * n**3 / median_seconds(lambda: torch.mm(a, b, out=c), repeats, warmup=3) / 1e9)
    return best


def forward_flops_per_sample(net: FactoredRecurrentActorCritic) -> int:
    """Forward FLOPs of one step: every Linear once (critic at one op) plus one LSTM step."""
    flops = sum(2 * m.in_features * m.out_features for m in net.modules() if isinstance(m, nn.Linear))
    flops += 2 * 4 * net.hidden_dim * (net.feature_dim + net.hidden_dim)
    return flops


def bench_get_action(net: FactoredRecurrentActorCritic, batch: int, repeats: int) -> tuple[float, float]:
    state = torch.randn(batch, net.state_dim)
    bp = torch.randint(-1, 13, (batch, net.num_slots))
    hidden = [net.initial_hidden(batch)]

    def step() -> None:
        hidden[0] = net.get_action(state, bp, hidden[0]).hidden

    t = median_seconds(step, repeats)
    return t, batch / t


def bench_update(net: FactoredRecurrentActorCritic, batch: int, seq: int, repeats: int) -> tuple[float, float, float]:
    g = torch.Generator().manual_seed(0)
    state = torch.randn(batch, seq, net.state_dim, generator=g)
    bp = torch.randint(-1, 13, (batch, seq, net.num_slots), generator=g)
    sizes = head_sizes(net.num_slots)
    actions = {h: torch.randint(0, k, (batch, seq), generator=g) for h, k in sizes.items()}
    actions["op"] = torch.full((batch, seq), int(LifecycleOp.GERMINATE))

    def step() -> None:
        net.zero_grad(set_to_none=True)
        out = net.evaluate_actions(state, bp, actions)
        loss = sum(out.log_probs[h].mean() + out.entropy[h].mean() for h in HEAD_NAMES) + out.value.pow(2).mean()
        loss.backward()

    t = median_seconds(step, repeats, warmup=2)
    gflops = 3 * forward_flops_per_sample(net) * batch * seq / t / 1e9
    return t, batch * seq / t, gflops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per get_action case")
    parser.add_argument("--no-validate", action="store_true", help="turn input validation off")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = FactoredRecurrentActorCritic(validate_inputs=not args.no_validate)
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()} | {platform.processor() or platform.machine()}")
    print(f"parameters {sum(p.numel() for p in net.parameters()):,} | input validation {'off' if args.no_validate else 'on'}")
    peak = matmul_gflops()
    print(f"fp32 matmul (square torch.mm, best of 1024/2048/4096): {peak:.1f} GFLOP/s\n")
    print(f"{'case':<42}{'median ms':>11}{'samples/s':>12}{'GFLOP/s':>10}{'% matmul':>10}")
    for batch in (1, 8, 32):
        t, sps = bench_get_action(net, batch, args.repeats)
        print(f"{f'get_action  B={batch:<3} T=1 (carried hidden)':<42}{t * 1e3:>11.3f}{sps:>12.0f}{'':>10}{'':>10}")
    for batch, seq in ((8, 150), (32, 16)):
        t, sps, gf = bench_update(net, batch, seq, max(5, args.repeats // 5))
        print(f"{f'evaluate_actions fwd+bwd {batch} x {seq}':<42}{t * 1e3:>11.1f}{sps:>12.0f}{gf:>10.1f}{100 * gf / peak:>9.0f}%")


if __name__ == "__main__":
    main()
