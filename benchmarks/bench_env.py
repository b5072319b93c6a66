"""Throughput of the morphogenetic env on this machine's CPU (one env step = one host epoch).

    python benchmarks/bench_env.py [--steps N] [--num-envs K] [--controller random|wait|schedule|grown|both|all] [--no-vector]
                                   [--native off|on|both] [--env-threads T]

Times ``--steps`` steps (after one warm-up step, resets excluded) of a single ``MorphoEnv`` at the
env's defaults, of a ``SyncVectorEnv`` and of an ``AsyncVectorEnv`` of ``--num-envs`` copies, and
prints env-steps/s (= host epochs/s) and ms per epoch. ``--controller random`` drives every env
with the masked random controller (seeds germinate, train, blend and get pruned, so the cost
includes seeds and counterfactuals); ``wait`` trains the bare host; ``schedule`` plays the best fixed
schedule of ``docs/figures/headroom_best_schedule.json`` (seeds blended and fossilized, a NORM seed in
every slot until the family spanned the styles, now one CONV_HEAVY seed: the cost of a policy that grows);
``grown`` plays what notebook 04's trained policies grow (a NORM seed in every slot, ``GROWN_SCHEDULE``);
``both`` = wait and random, ``all`` = the four. Each env runs torch with ``--env-threads`` threads
(default 1, the env's default). For the single env it also prints where a step's time goes: host training (the epoch of
minibatch Adam), validation (the forward pass on the validation split) and counterfactuals (the
ablated passes), measured by timing the env's own methods, so the same script measures older
versions of the env too (run it with another ``PYTHONPATH`` to compare, interleaved).

``--native`` picks the C kernels (``esper_lib.envs.native``: with them on, a host epoch with its seeds is
one call, and so are the validation and counterfactual passes): ``off`` the torch path, ``on`` the C kernels,
``both`` each configuration with one then the other, in the same process, with the ratio. Default: whatever
``ESPER_NATIVE`` says (on unless it is 0, as in the library). With the kernels on, the counterfactual passes run inside the
validation call, so their time shows under ``valid``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from esper_lib.envs.morpho import make_morpho_env

try:  # absent from revisions before the C kernels (this script also times older trees via PYTHONPATH)
    from esper_lib.envs import native
except ImportError:
    native = None
from esper_lib.evaluation.baselines import AlwaysWaitController, RandomMaskedController
from esper_lib.evaluation.schedules import ScheduleController, schedule_from_dict


def _split(obs: dict, i: int) -> dict:
    """Observation of sub-env ``i`` from a batched (vector env) observation."""
    return {k: _split(v, i) if isinstance(v, dict) else v[i] for k, v in obs.items()}


BEST_SCHEDULE_FILE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "headroom_best_schedule.json"


# What notebook 04's trained policies grow (docs/figures/ppo_morpho_native_*, README "C kernels"): a NORM seed in
# every slot, germinated at epochs 0, 1, 2, blended with LINEAR_MULTIPLY and fossilized.
GROWN_SCHEDULE = {"slot": 0, "blueprint": "NORM", "germinate_at": 0, "tempo": "STANDARD", "style": "LINEAR_MULTIPLY",
                  "alpha_target": "FULL", "fossilize_at": 0, "prune_at": None,
                  "extra_seedings": [[1, "NORM", 1], [2, "NORM", 2]], "name": "three-norm"}


def _controllers(kind: str, n: int) -> list:
    if kind == "grown":
        return [ScheduleController(schedule_from_dict(GROWN_SCHEDULE)) for _ in range(n)]
    if kind == "schedule":
        schedule = schedule_from_dict(json.loads(BEST_SCHEDULE_FILE.read_text())["schedule"])
        return [ScheduleController(schedule) for _ in range(n)]
    if kind == "random":
        return [RandomMaskedController(seed=i, wait_prob=0.5) for i in range(n)]
    return [AlwaysWaitController() for _ in range(n)]


class _PhaseTimer:
    """Wall time inside the env's training, evaluation and counterfactual methods (seconds)."""

    def __init__(self, env: gym.Env):
        self.env = env
        self.totals = {"train": 0.0, "evaluate": 0.0, "counterfactuals": 0.0}
        self._wrap(env, "_train_epoch", "train")
        self._wrap(env, "_evaluate", "evaluate")
        self._host = None

    def _wrap(self, obj: object, name: str, key: str) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[key] += time.perf_counter() - t0

        setattr(obj, name, timed)

    def watch_host(self) -> None:
        """Time the counterfactual passes of the current host (call after each reset)."""
        host = self.env.host
        if host is not self._host:
            # forward_ablations: every ablation of an epoch in one call (older trees call forward_ablated per set)
            self._wrap(host, "forward_ablations" if hasattr(host, "forward_ablations") else "forward_ablated", "counterfactuals")
            self._host = host


def bench_single(env_fn: Callable[[], gym.Env], kind: str, steps: int) -> tuple[float, dict[str, float]]:
    """Env steps per second of one env (reset excluded) and ms per step in each phase."""
    env = env_fn()
    timer = _PhaseTimer(env)
    (ctrl,) = _controllers(kind, 1)
    obs, _ = env.reset(seed=0)
    timer.watch_host()
    obs, *_ = env.step(ctrl.act(obs))  # warm-up
    timer.totals = dict.fromkeys(timer.totals, 0.0)
    start = time.perf_counter()
    done_steps, resets = 0, 0.0
    while done_steps < steps:
        obs, _, term, trunc, _ = env.step(ctrl.act(obs))
        done_steps += 1
        if term or trunc:
            t0 = time.perf_counter()
            obs, _ = env.reset()
            timer.watch_host()
            resets += time.perf_counter() - t0
    elapsed = time.perf_counter() - start - resets
    env.close()
    phases = {k: 1000 * v / steps for k, v in timer.totals.items()}
    phases["evaluate"] -= phases["counterfactuals"]  # the ablated passes run inside _evaluate
    phases["rest"] = 1000 * elapsed / steps - sum(phases.values())
    return steps / elapsed, phases


def bench_vector(vector_cls: type, env_fn: Callable[[], gym.Env], kind: str, steps: int, num_envs: int) -> float:
    """Env steps per second summed over the sub-envs of a vector env (autoreset included)."""
    venv = vector_cls([env_fn] * num_envs)
    ctrls = _controllers(kind, num_envs)
    obs, _ = venv.reset(seed=list(range(num_envs)))

    def act(o: dict) -> np.ndarray:
        return np.stack([c.act(_split(o, i)) for i, c in enumerate(ctrls)])

    obs, *_ = venv.step(act(obs))  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        obs, *_ = venv.step(act(obs))
    elapsed = time.perf_counter() - start
    venv.close()
    return steps * num_envs / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=32, help="timed steps per configuration")
    parser.add_argument("--num-envs", type=int, default=2, help="sub-envs of the vector envs")
    parser.add_argument("--controller", choices=("random", "wait", "schedule", "grown", "both", "all"), default="both")
    parser.add_argument("--no-vector", action="store_true", help="only the single env")
    parser.add_argument("--native", choices=("off", "on", "both"), default=None, help="kernel path (default: ESPER_NATIVE, on unless 0)")
    parser.add_argument("--env-threads", type=int, default=1, help="torch threads inside each env's steps (MorphoEnv num_threads)")
    args = parser.parse_args()
    if args.steps < 1 or args.num_envs < 1 or args.env_threads < 1:
        parser.error("--steps, --num-envs and --env-threads must be >= 1")
    modes = {"off": (False,), "on": (True,), "both": (False, True), None: (native is not None and native.enabled(),)}[args.native]
    if True in modes and (native is None or not native.available()):
        if args.native == "on":
            parser.error("--native on: the C kernels could not be built here (see the warning above)")
        print("note: the C kernels could not be built here (see the warning above): timing the torch path only")
        modes = (False,)

    env_fn = functools.partial(make_morpho_env, num_threads=args.env_threads)  # the env's defaults otherwise
    probe = env_fn()
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"MorphoEnv defaults (host {probe.host_channels}, max_epochs={probe.max_epochs}, "
        f"train_size={probe.train_size}, val_size={probe.val_size}, batch_size={probe.batch_size}), "
        f"{args.steps} timed steps, {args.env_threads} torch thread(s) per env"
    )
    kinds = {"both": ("wait", "random"), "all": ("wait", "random", "schedule", "grown")}.get(args.controller, (args.controller,))
    print(
        f"{'controller':<11}{'configuration':<20}{'native':>7}{'env-steps/s':>12}{'ms/step':>9}"
        f"{'train':>8}{'valid':>8}{'counterf':>9}{'rest':>7}  (ms per step)"
    )

    def report(kind: str, config: str, measure: Callable[[], tuple[float, dict[str, float] | None]]) -> None:
        rates = []
        for flag in modes:
            _set_native(flag)
            rate, ph = measure()
            rates.append(rate)
            line = f"{kind:<11}{config:<20}{'on' if flag else 'off':>7}{rate:>12.1f}{1000 / rate:>9.1f}"
            if ph is not None:
                line += f"{ph['train']:>8.1f}{ph['evaluate']:>8.2f}{ph['counterfactuals']:>9.2f}{ph['rest']:>7.2f}"
            print(line)
        if len(rates) == 2:
            print(f"{kind:<11}{config:<20}{'on/off':>7}{rates[1] / rates[0]:>11.2f}x")

    for kind in kinds:
        report(kind, "MorphoEnv x1", lambda: bench_single(env_fn, kind, args.steps))
        if args.no_vector:
            continue
        n = args.num_envs
        for cls in (gym.vector.SyncVectorEnv, gym.vector.AsyncVectorEnv):
            report(kind, f"{cls.__name__} x{n}", lambda: (bench_vector(cls, env_fn, kind, args.steps, n), None))


def _set_native(flag: bool) -> None:
    """Switch the kernels in this process and in vector-env workers started from now on (they read the variable)."""
    os.environ["ESPER_NATIVE"] = "1" if flag else "0"
    if native is not None:
        native.enable(flag)


if __name__ == "__main__":
    main()
