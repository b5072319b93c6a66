"""Median time of one ``get_action`` step at a given batch, through the public API only.

    PYTHONPATH=<tree> python benchmarks/bench_get_action.py [--batch 8] [--threads 1] [--calls 300]

Runs against whatever ``esper_lib`` is on the path, so two revisions can be compared in alternated
processes on a shared machine (see the README's Benchmarks section): the step is the collector's
(masks for every head and ``slot_by_op``, ``return_q_all``, a generator, the carried hidden state).
Prints the median wall time and the median thread CPU time (less sensitive to other processes) in ms.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from esper_lib.constants import NUM_OPS, head_sizes
from esper_lib.network import FactoredRecurrentActorCritic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = FactoredRecurrentActorCritic()
    B = args.batch
    g = torch.Generator().manual_seed(0)
    state, bp = torch.randn(B, net.state_dim), torch.randint(-1, 13, (B, net.num_slots))
    masks = {k: torch.ones(B, n, dtype=torch.bool) for k, n in head_sizes(net.num_slots).items()}
    masks["slot_by_op"] = torch.ones(B, NUM_OPS, net.num_slots, dtype=torch.bool)
    hidden = [net.initial_hidden(B)]

    def step() -> None:
        hidden[0] = net.get_action(state, bp, hidden[0], masks, return_q_all=True, generator=g).hidden

    for _ in range(20):
        step()
    wall, cpu = [], []
    for _ in range(args.calls):
        t, c = time.perf_counter(), time.thread_time()
        step()
        wall.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
    print(f"get_action B={B} threads={torch.get_num_threads()}: wall {statistics.median(wall) * 1e3:.3f} ms, cpu {statistics.median(cpu) * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
