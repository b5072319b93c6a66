"""Time recurrent PPO: one update (8 envs x 150 steps, full-size 512/512 network) and collection speed.

    .venv/bin/python benchmarks/bench_ppo.py                       # defaults below, torch's thread count
    .venv/bin/python benchmarks/bench_ppo.py --threads 1 --updates 2
    .venv/bin/python benchmarks/bench_ppo.py --feature-dim 64 --hidden-dim 64   # the probe-test size
    .venv/bin/python benchmarks/bench_ppo.py --autocast-bf16 --compare           # the update in fp32 and bf16 autocast

Prints a table: collection (policy + env) env-steps/s, env-only steps/s (random valid actions), the
PPO update time (GAE + epochs; no KL early stop so every run does the same work) and the total.
``--autocast-bf16`` runs the update under bfloat16 autocast (``PPOConfig.autocast_bf16``);
``--compare`` times the update with it off and on in the same run (same rollout, alternated, each
from the same weights), which is the fair comparison on a shared machine.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from esper_lib.envs.probes import PROBES, make_probe
from esper_lib.ppo import PPOConfig, PPOTrainer
from esper_lib.ppo.collect import make_vector_env


def env_only_steps_per_s(make, num_envs: int, steps: int, seed: int = 0) -> float:
    """Steps/s of the vector env alone, with a fixed valid action (no policy)."""
    env = make_vector_env(make, num_envs)
    env.reset(seed=seed)
    action = np.zeros((num_envs, 8), dtype=np.int64)  # WAIT is valid in every probe but the secondary-head one
    action[:, 0] = int(np.flatnonzero(make()._op_mask())[0])
    t0 = time.perf_counter()
    for _ in range(steps):
        env.step(action)
    return num_envs * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-envs", type=int, default=8)
    ap.add_argument("--num-steps", type=int, default=150)
    ap.add_argument("--seq-len", type=int, default=25)
    ap.add_argument("--minibatch-sequences", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--feature-dim", type=int, default=512)
    ap.add_argument("--hidden-dim", type=int, default=512)
    ap.add_argument("--probe", choices=sorted(PROBES), default="memory")
    ap.add_argument("--episode-length", type=int, default=25, help="length of MemoryProbe episodes (memory probe only)")
    ap.add_argument("--updates", type=int, default=3, help="timed updates (after one warm-up update)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's choice)")
    ap.add_argument("--autocast-bf16", action="store_true", help="run the update under bfloat16 autocast (PPOConfig.autocast_bf16)")
    ap.add_argument("--compare", action="store_true", help="also time the update fp32 vs bf16 autocast, alternated on one rollout")
    args = ap.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    kwargs = {"length": args.episode_length} if args.probe == "memory" else {}
    make = lambda: make_probe(args.probe, **kwargs)  # noqa: E731
    cfg = PPOConfig(
        num_envs=args.num_envs,
        num_steps=args.num_steps,
        seq_len=args.seq_len,
        minibatch_sequences=args.minibatch_sequences,
        epochs=args.epochs,
        feature_dim=args.feature_dim,
        hidden_dim=args.hidden_dim,
        target_kl=None,
        total_updates=args.updates + 1,
        autocast_bf16=args.autocast_bf16,
    )
    trainer = PPOTrainer(make, cfg)
    params = sum(p.numel() for p in trainer.policy.parameters())
    trainer.step()  # warm-up
    rows = [trainer.step() for _ in range(args.updates)]
    collect = [r["collect_s"] for r in rows]
    update = [r["update_s"] for r in rows]
    steps = cfg.steps_per_update
    env_sps = env_only_steps_per_s(make, args.num_envs, args.num_steps)
    compare = compare_autocast(trainer, cfg, args.updates) if args.compare else None
    trainer.close()

    minibatches = args.epochs * -(-cfg.num_sequences // args.minibatch_sequences)
    print(f"recurrent PPO benchmark | torch {torch.__version__} | threads {torch.get_num_threads()} | device cpu | "
          f"update {'bf16 autocast' if args.autocast_bf16 else 'fp32'} | CPU bf16 matmuls: {cpu_bf16_flags()}")
    print(f"network {args.feature_dim}/{args.hidden_dim} ({params / 1e6:.2f}M params) | {args.num_envs} envs x {args.num_steps} steps "
          f"= {steps} steps/update | probe {args.probe} | seq_len {args.seq_len}, {cfg.num_sequences} sequences, "
          f"{args.minibatch_sequences}/minibatch, {args.epochs} epochs = {minibatches} minibatch steps")
    print(f"{'measure (' + str(args.updates) + ' timed updates)':<40}{'median':>12}{'best':>12}")
    table = [  # (name, values, format, higher is better)
        ("collection, policy + env (env-steps/s)", [steps / c for c in collect], "{:,.0f}", True),
        ("collection time per rollout (s)", collect, "{:.3f}", False),
        ("PPO update: GAE + epochs (s)", update, "{:.3f}", False),
        ("time per minibatch step (ms)", [1000 * u / minibatches for u in update], "{:.1f}", False),
        ("total per update (s)", [c + u for c, u in zip(collect, update)], "{:.3f}", False),
        ("env only, fixed action (env-steps/s)", [env_sps], "{:,.0f}", True),
    ]
    for name, values, fmt, higher in table:
        best = max(values) if higher else min(values)
        print(f"{name:<40}{fmt.format(statistics.median(values)):>12}{fmt.format(best):>12}")
    if compare is not None:
        fp32, bf16 = compare
        print(f"\nupdate on one rollout, fp32 vs bf16 autocast alternated ({len(fp32)} each){'median s':>14}{'best s':>12}")
        for name, values in (("fp32", fp32), ("bf16 autocast", bf16)):
            print(f"{'  ' + name:<62}{statistics.median(values):>14.3f}{min(values):>12.3f}")
        print(f"{'  speed-up (median fp32 / median bf16)':<62}{statistics.median(fp32) / statistics.median(bf16):>14.2f}x")


def cpu_bf16_flags() -> str:
    """The CPU's bf16 matmul features from /proc/cpuinfo (AMX tiles, AVX512-BF16), or "none"."""
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return "unknown"
    found = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return ", ".join(found) or "none"


def compare_autocast(trainer: PPOTrainer, cfg: PPOConfig, repeats: int) -> tuple[list[float], list[float]]:
    """Update times (s) fp32 and bf16 autocast, alternated, each from the same weights and the same rollout."""
    import copy

    from esper_lib.ppo.update import ppo_update

    buffer = trainer.buffer
    policy0, opt0 = copy.deepcopy(trainer.policy.state_dict()), copy.deepcopy(trainer.optimizer.state_dict())
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for autocast in (False, True):
            trainer.policy.load_state_dict(policy0)
            trainer.optimizer.load_state_dict(opt0)
            gen = torch.Generator().manual_seed(0)
            t0 = time.perf_counter()
            ppo_update(trainer.policy, trainer.optimizer, buffer, cfg.replace(autocast_bf16=autocast), gen)
            times[autocast].append(time.perf_counter() - t0)
    return times[False], times[True]


if __name__ == "__main__":
    main()
