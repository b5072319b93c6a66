"""Benchmark of the V2 network on this machine's CPU.

    python benchmarks/bench_network.py [--threads N] [--repeats R]

Prints median time per call and samples/s for ``get_action`` (batch 1, 8, 32; one step with the
carried hidden state, masks and ``return_q_all`` as the collector calls it) on the plain per-head
path (``fused_heads=False``) and the fused path (the default), alternated in blocks in the same run;
and ``evaluate_actions`` forward + backward (8 x 150 and 32 x 16) in fp32 and under bfloat16
autocast (as ``PPOConfig.autocast_bf16``). Next to each: the machine's matmul throughput (a large
``torch.mm``, fp32 and bf16) and the achieved FLOP/s as a fraction of it; for ``get_action``, which
is bound by reading the weights (~14 MB fp32 per step), the weight bytes read per second. FLOPs are
counted analytically (2 * in * out per Linear and 2 * 4H(I+H) per LSTM step, forward; x3 for
forward + backward).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from esper_lib.constants import HEAD_NAMES, NUM_OPS, LifecycleOp, head_sizes
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


def matmul_gflops(sizes: tuple[int, ...] = (1024, 2048, 4096), repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Throughput of large square ``torch.mm`` calls in ``dtype`` (best median over ``sizes``), in GFLOP/s."""
    best = 0.0
    for n in sizes:
        a, b, c = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype), torch.empty(n, n, dtype=dtype)
        best = max(best, 2 * n**3 / median_seconds(lambda: torch.mm(a, b, out=c), repeats, warmup=3) / 1e9)
    return best


def forward_flops_per_sample(net: FactoredRecurrentActorCritic) -> int:
    """Forward FLOPs of one step: every Linear once (critic at one op) plus one LSTM step."""
    flops = sum(2 * m.in_features * m.out_features for m in net.modules() if isinstance(m, nn.Linear))
    flops += 2 * 4 * net.hidden_dim * (net.feature_dim + net.hidden_dim)
    return flops


def step_weight_bytes(net: FactoredRecurrentActorCritic) -> int:
    """Bytes of the weights one ``get_action`` step reads (every parameter but the embedding table)."""
    return sum(p.numel() * p.element_size() for n, p in net.named_parameters() if not n.startswith("blueprint_embedding"))


def bench_get_action(net: FactoredRecurrentActorCritic, batch: int, repeats: int, blocks: int = 5) -> dict[bool, float]:
    """Median seconds per ``get_action`` call, plain (False) and fused (True), alternated in ``blocks`` blocks."""
    g = torch.Generator().manual_seed(batch)
    state = torch.randn(batch, net.state_dim, generator=g)
    bp = torch.randint(-1, 13, (batch, net.num_slots), generator=g)
    masks = {h: torch.ones(batch, k, dtype=torch.bool) for h, k in head_sizes(net.num_slots).items()}
    masks["slot_by_op"] = torch.ones(batch, NUM_OPS, net.num_slots, dtype=torch.bool)
    hidden = [net.initial_hidden(batch)]

    def step() -> None:
        hidden[0] = net.get_action(state, bp, hidden[0], masks, return_q_all=True, generator=g).hidden

    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(blocks):
        for fused in (False, True):
            net.fused_heads = fused
            times[fused].append(median_seconds(step, max(1, repeats // blocks)))
    net.fused_heads = True
    return {fused: statistics.median(t) for fused, t in times.items()}


def bench_update(net: FactoredRecurrentActorCritic, batch: int, seq: int, repeats: int, autocast: bool = False) -> tuple[float, float, float]:
    g = torch.Generator().manual_seed(0)
    state = torch.randn(batch, seq, net.state_dim, generator=g)
    bp = torch.randint(-1, 13, (batch, seq, net.num_slots), generator=g)
    sizes = head_sizes(net.num_slots)
    actions = {h: torch.randint(0, k, (batch, seq), generator=g) for h, k in sizes.items()}
    actions["op"] = torch.full((batch, seq), int(LifecycleOp.GERMINATE))

    def step() -> None:
        net.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = net.evaluate_actions(state, bp, actions)
        loss = sum(out.log_probs[h].float().mean() + out.entropy[h].float().mean() for h in HEAD_NAMES) + out.value.float().pow(2).mean()
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
    peak_bf16 = matmul_gflops(dtype=torch.bfloat16)
    print(f"matmul (square torch.mm, best of 1024/2048/4096): fp32 {peak:.1f} GFLOP/s, bf16 {peak_bf16:.1f} GFLOP/s")
    weights = step_weight_bytes(net)
    print(f"get_action reads {weights / 1e6:.1f} MB of fp32 weights per step (plain path; the fused path reads a copy of the same size)\n")
    print(f"{'get_action (masks, q_all, carried hidden)':<44}{'plain ms':>10}{'fused ms':>10}{'fused/plain':>12}{'samples/s':>11}{'GFLOP/s':>9}{'weights GB/s':>13}")
    for batch in (1, 8, 32):
        t = bench_get_action(net, batch, args.repeats)
        gf = forward_flops_per_sample(net) * batch / t[True] / 1e9
        print(f"{f'  B={batch}':<44}{t[False] * 1e3:>10.3f}{t[True] * 1e3:>10.3f}{t[True] / t[False]:>11.2f}x{batch / t[True]:>11.0f}{gf:>9.1f}{weights / t[True] / 1e9:>13.1f}")
    print(f"\n{'evaluate_actions fwd+bwd':<44}{'median ms':>10}{'samples/s':>11}{'GFLOP/s':>9}{'% matmul peak':>15}")
    for autocast, name, ref in ((False, "fp32", peak), (True, "bf16 autocast", peak_bf16)):
        for batch, seq in ((8, 150), (32, 16)):
            t, sps, gf = bench_update(net, batch, seq, max(5, args.repeats // 5), autocast=autocast)
            print(f"{f'  {batch} x {seq}, {name}':<44}{t * 1e3:>10.1f}{sps:>11.0f}{gf:>9.1f}{100 * gf / ref:>14.0f}%")

if __name__ == "__main__":
    main()
