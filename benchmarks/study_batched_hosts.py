"""Would several envs' hosts in one batched computation reach issue 9's 4x? A feasibility timing (C kernels).

    python benchmarks/study_batched_hosts.py [--hosts E] [--calls N] [--repeats R]

Times one training minibatch (forward, loss, backward, clip + Adam) of ``E`` bare default hosts (channels
4/8/8, minibatch 64, no seeds) two ways, with the C kernels (``esper_lib.envs.native``), 1 thread:

- one host after another, as ``MorphoEnv`` trains them (``HostCNN.train_loss``, ``FusedAdam.native_clip_and_step``);
- all ``E`` hosts as one computation on the same minibatch (notebook 04's envs share their data order,
  ``seed_group_size``): block 0 as one convolution with ``4 E`` output channels, blocks 1 and 2 as grouped
  convolutions (``groups=E``), the heads as one ``einsum``, the ``E`` losses summed for one backward, one
  clip + Adam call (a global clip: the per-host clip would be ``E`` calls on views; the timing is the point).

Then the bare convolution calls of both layouts, which show how much of the batched minibatch is arithmetic.
Not the env's code path: a measurement to size the next step, not a result.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from esper_lib.envs import native
from esper_lib.envs.fused_adam import FusedAdam
from esper_lib.envs.host import HostCNN

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path (tests)
from bench_native_kernels import best_us  # noqa: E402

N = 64  # minibatch


def minibatch_steps(hosts: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(one host after another, all hosts batched)``: each trains every host on one minibatch when called."""
    torch.manual_seed(0)
    x, y = torch.randn(N, 1, 8, 8), torch.randint(0, 10, (N,))
    nets = [HostCNN((4, 8, 8)) for _ in range(hosts)]
    opts = [FusedAdam(net.host_parameters(), 5e-3) for net in nets]

    def one_by_one() -> None:
        for net, opt in zip(nets, opts):
            loss, _ = net.train_loss(x, y)
            for p in opt.params:
                p.grad = None
            loss.backward()
            opt.native_clip_and_step(5.0)

    def stacked(get: Callable[[HostCNN], torch.Tensor], dim_new: bool = False) -> torch.nn.Parameter:
        parts = [get(net).detach() for net in nets]
        return torch.nn.Parameter((torch.stack(parts) if dim_new else torch.cat(parts)).contiguous())

    w0, b0 = stacked(lambda n: n.blocks[0][0].weight), stacked(lambda n: n.blocks[0][0].bias)
    w1, b1 = stacked(lambda n: n.blocks[1][0].weight), stacked(lambda n: n.blocks[1][0].bias)
    w2, b2 = stacked(lambda n: n.blocks[2][0].weight), stacked(lambda n: n.blocks[2][0].bias)
    hw, hb = stacked(lambda n: n.head.weight, True), stacked(lambda n: n.head.bias, True)  # [E, 10, 8], [E, 10]
    params = [w0, b0, w1, b1, w2, b2, hw, hb]
    opt = FusedAdam(params, 5e-3)
    y_all = y.repeat_interleave(hosts)

    def batched() -> None:
        h = native.conv2d(x, w0, b0, 1, 1, True)  # [N, 4E, 8, 8]
        h = native.conv2d(h, w1, b1, 1, hosts, True, pool=True)  # [N, 8E, 4, 4]
        h = native.conv2d(h, w2, b2, 1, hosts, True)  # [N, 8E, 4, 4]
        feats = h.view(N, hosts, 8, 16).mean(-1)  # [N, E, 8]
        logits = torch.einsum("nec,ekc->nek", feats, hw) + hb  # [N, E, 10]
        loss = F.cross_entropy(logits.reshape(N * hosts, 10), y_all, reduction="sum") / N  # sum of the E losses
        for p in params:
            p.grad = None
        loss.backward()
        opt.native_clip_and_step(5.0)

    return one_by_one, batched


def bare_convolutions(hosts: int, calls: int, repeats: int) -> list[tuple[str, float, float]]:
    """``(layer, E single calls, one batched call)``: forward + backward of the host's convolutions, in us."""
    lib, ptr = native._lib(), native._ptr
    rows = []
    for what, c, o, size in (("block 0", 1, 4, 8), ("block 1", 4, 8, 8), ("block 2", 8, 8, 4)):
        times = []
        for c_in, c_out, groups in ((c, o, 1), (c * hosts if c > 1 else 1, o * hosts, hosts if c > 1 else 1)):
            x, w, b = torch.randn(N, c_in, size, size), torch.randn(c_out, c_in // groups, 3, 3), torch.randn(c_out)
            y, gy = torch.randn(N, c_out, size, size).relu(), torch.randn(N, c_out, size, size)
            gx = torch.empty_like(x) if c > 1 else None  # the host's input needs no gradient
            gw, gb = torch.empty_like(w), torch.empty_like(b)
            dims = (N, c_in, size, size, c_out, 3, 1, groups)

            def fwd_bwd() -> None:
                lib.conv2d_forward(ptr(x), ptr(w), ptr(b), ptr(y), *dims, 1)
                lib.conv2d_backward(ptr(x), ptr(w), ptr(gy), ptr(y), ptr(gx), ptr(gw), ptr(gb), *dims)

            times.append(best_us(fwd_bwd, calls, repeats))
        rows.append((what, hosts * times[0], times[1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.hosts < 1 or args.calls < 1 or args.repeats < 1:
        ap.error("--hosts, --calls and --repeats must be >= 1")
    if not native.available():
        ap.error("the C kernels could not be built here (see the warning above)")
    before = native.switched_on()
    native.enable(True)
    torch.set_num_threads(1)
    try:
        one_by_one, batched = minibatch_steps(args.hosts)
        with torch.enable_grad():
            single, joint = best_us(one_by_one, args.calls, args.repeats), best_us(batched, args.calls, args.repeats)
        print(f"{args.hosts} bare hosts, minibatch {N}, C kernels, 1 thread; us per minibatch of all hosts")
        print(f"one host after another {single:8.0f}\nbatched                {joint:8.0f}   ({single / joint:.2f}x)")
        print(f"\n{'convolution, forward + backward':<32}{'single calls':>14}{'batched':>10}")
        conv_total = 0.0
        for what, apart, together in bare_convolutions(args.hosts, args.calls, args.repeats):
            conv_total += together
            print(f"{what:<32}{apart:>14.0f}{together:>10.0f}")
        print(f"the batched minibatch's convolutions: {conv_total:.0f} us, {100 * conv_total / joint:.0f}% of it")
    finally:
        native.enable(before)


if __name__ == "__main__":
    main()
