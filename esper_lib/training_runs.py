"""Several independent PPO training runs on the morphogenetic env, and their held-out evaluation.

Design section 5b: one training seed decides nothing. ``train_morpho_policy`` runs one PPO training
(its own network init, sampling and training env seeds) and keeps everything notebook 04 reports:
metrics (appended to ``metrics.csv`` after every update, so a stopped run keeps them), op usage,
training episodes, the critic's calibration (value at each episode's first state against the
measured discounted return) and a checkpoint (also every ``checkpoint_every`` updates).
``evaluate_runs`` plays every run's greedy policy and the baselines on the same held-out env seeds
(never used in training), one row per (controller, training seed, held-out seed), ready for
``esper_lib.evaluation.stats.compare_controllers``.

Seeds: training run ``k`` uses ``PPOConfig.seed = k * TRAIN_SEED_STRIDE`` (network init, sampling)
and its training envs are reset with seeds ``k * TRAIN_SEED_STRIDE + i`` (the trainer's convention:
env ``i`` of the first rollout gets ``config.seed + i``), far below the held-out seeds (10,000 and up
in notebook 04) for the first few training seeds.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from esper_lib.envs.morpho import MorphoEnv
from esper_lib.evaluation.baselines import evaluate_controller
from esper_lib.run_recorders import EpisodeRecorder, FirstEpochChoices, OpUsage, StepTimer, episodes_frame
from esper_lib.ppo import VECTOR_ENV_KINDS, PolicyController, PPOConfig, PPOTrainer, load_trained, make_vector_env
from esper_lib.ppo.calibration import CalibrationRecorder
from esper_lib.processes import spawn_process_pool

TRAIN_SEED_STRIDE = 1000


def _recorded_env(env_kwargs: Mapping[str, Any]) -> EpisodeRecorder:
    return EpisodeRecorder(MorphoEnv(**env_kwargs))


def make_training_envs(env_kwargs: Mapping[str, Any], num_envs: int, vector_env: str = "async") -> StepTimer:
    """``num_envs`` recorded morpho envs in a SAME_STEP vector env, timed.

    ``vector_env``: ``"sync"`` (this process), ``"async"`` (one process each) or ``"ray"`` (Ray
    actors; the ``ray`` extra), as ``esper_lib.ppo.make_vector_env``.
    """
    if vector_env not in VECTOR_ENV_KINDS:
        raise ValueError(f"vector_env must be one of {VECTOR_ENV_KINDS}, got {vector_env!r}")
    return StepTimer(make_vector_env(partial(_recorded_env, dict(env_kwargs)), num_envs, kind=vector_env))


class LiveMetrics:
    """Trainer callback: appends each update's metrics row to ``path`` (CSV, header once) as it goes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)

    def __call__(self, trainer: PPOTrainer, row: dict[str, float]) -> None:
        pd.DataFrame([row]).to_csv(self.path, mode="a", header=not self.path.exists(), index=False)


class TensorBoardMetrics:
    """Trainer callback: each update's metrics as TensorBoard scalars (x axis: env steps) under ``log_dir``.

    Needs the optional ``tensorboard`` extra (``pip install -e .[tensorboard]``); open the logs with
    ``make tensorboard`` or ``tensorboard --logdir artefacts``.
    """

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError("TensorBoard logging needs the tensorboard package: pip install -e .[tensorboard]") from err
        self.writer = SummaryWriter(str(log_dir))

    def __call__(self, trainer: PPOTrainer, row: dict[str, float]) -> None:
        step = int(row["env_steps"])
        for key, value in row.items():
            if key not in ("update", "env_steps") and isinstance(value, (int, float)) and np.isfinite(value):
                self.writer.add_scalar(key, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@dataclass
class TrainingRun:
    """What one training run leaves (see ``train_morpho_policy``)."""

    train_seed: int
    metrics: pd.DataFrame  # one row per update (PPOTrainer.metrics)
    op_usage: pd.DataFrame  # op fractions per update
    episodes: pd.DataFrame  # one row per finished training episode
    calibration: pd.DataFrame  # one row per training episode: critic's V(s0) vs measured discounted return
    checkpoint: Path
    train_seconds: float
    env_step_seconds: float  # wall time inside the vector env's step (host training of all envs)
    first_epoch: pd.DataFrame | None = None  # per update: the policy's choices at the first epoch of probe hosts (FirstEpochChoices)


def train_morpho_policy(
    config: PPOConfig,
    env_kwargs: Mapping[str, Any],
    out_dir: str | Path,
    *,
    train_seed: int | None = None,
    vector_env: str = "async",
    checkpoint_every: int = 0,
    tensorboard: bool = False,
    progress: bool = True,
    callbacks: Sequence[Callable[[PPOTrainer, dict[str, float]], Any]] = (),
    first_epoch_probe: bool = True,
) -> TrainingRun:
    """Train one PPO policy on ``MorphoEnv(**env_kwargs)``; files go to ``out_dir``.

    ``train_seed``: sets ``config.seed = train_seed * TRAIN_SEED_STRIDE`` (None: keep ``config.seed``
    and report it as the training seed). Writes ``metrics.csv`` (row by row), ``tamiyo_v2_ppo.pt`` (final; with ``checkpoint_every=k``
    also after every k-th update, overwriting), ``op_usage.csv``, ``training_episodes.csv`` and
    ``calibration.csv``; with ``tensorboard=True`` also TensorBoard scalars under ``tensorboard/``
    (``TensorBoardMetrics``, the ``tensorboard`` extra); with ``first_epoch_probe`` (default) also
    ``first_epoch.csv`` (``FirstEpochChoices``: the policy's choices at the first epoch of two probe
    hosts after every update; the run's updates are the same with or without it).
    """
    if not isinstance(config, PPOConfig):
        raise TypeError(f"config must be a PPOConfig, got {type(config).__name__}")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be an int >= 0 (0 = final checkpoint only), got {checkpoint_every!r}")
    if train_seed is not None:
        if not isinstance(train_seed, int) or isinstance(train_seed, bool) or train_seed < 0:
            raise ValueError(f"train_seed must be an int >= 0 or None, got {train_seed!r}")
        config = config.replace(seed=train_seed * TRAIN_SEED_STRIDE)
    MorphoEnv(**env_kwargs)  # validates the env arguments here, with the env's own messages
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "tamiyo_v2_ppo.pt"
    board = TensorBoardMetrics(out / "tensorboard") if tensorboard else None  # before the envs: a missing extra leaks nothing
    envs = make_training_envs(env_kwargs, config.num_envs, vector_env)
    op_usage, calibration, live = OpUsage(), CalibrationRecorder(config.gamma), LiveMetrics(out / "metrics.csv")
    first_epoch = FirstEpochChoices(partial(MorphoEnv, **env_kwargs)) if first_epoch_probe else None

    def on_update(trainer: PPOTrainer, row: dict[str, float]) -> None:
        for cb in (op_usage, calibration, live, *([board] if board else []), *([first_epoch] if first_epoch else []), *callbacks):
            cb(trainer, row)
        if checkpoint_every and (trainer.update_index % checkpoint_every == 0):
            trainer.save(checkpoint)

    trainer = PPOTrainer(envs, config)
    start = time.perf_counter()
    try:
        metrics = trainer.run(progress=progress, callback=on_update)
        train_seconds = time.perf_counter() - start
        episodes = episodes_frame(envs.env)
        trainer.save(checkpoint)
    finally:
        trainer.close()
        if board is not None:
            board.close()
        if first_epoch is not None:
            first_epoch.close()
    run = TrainingRun(
        train_seed=config.seed if train_seed is None else train_seed,
        metrics=metrics,
        op_usage=op_usage.frame(),
        episodes=episodes,
        calibration=calibration.frame(),
        checkpoint=checkpoint,
        train_seconds=train_seconds,
        env_step_seconds=envs.step_seconds,
        first_epoch=first_epoch.frame() if first_epoch is not None else None,
    )
    run.op_usage.to_csv(out / "op_usage.csv", index=False)
    if run.first_epoch is not None:
        run.first_epoch.to_csv(out / "first_epoch.csv", index=False)
    run.episodes.to_csv(out / "training_episodes.csv", index=False)
    run.calibration.to_csv(out / "calibration.csv", index=False)
    return run


def _train_one(kwargs: dict[str, Any]) -> TrainingRun:
    """Worker of ``train_morpho_policies`` (module level so a spawned process can import it)."""
    return train_morpho_policy(**kwargs)


def _rows_written(path: Path) -> int:
    """Data rows in a ``LiveMetrics`` CSV so far (0 while it does not exist)."""
    try:
        with path.open("rb") as f:
            return max(0, sum(1 for _ in f) - 1)
    except FileNotFoundError:
        return 0


def train_morpho_policies(
    config: PPOConfig,
    env_kwargs: Mapping[str, Any],
    out_root: str | Path,
    train_seeds: Sequence[int],
    *,
    workers: int = 1,
    vector_env: str = "async",
    checkpoint_every: int = 0,
    tensorboard: bool = False,
    progress: bool = True,
) -> list[TrainingRun]:
    """One ``train_morpho_policy`` per training seed, into ``out_root/seed_<k>``; runs in seed order.

    ``workers=1`` trains the seeds one after the other in this process (one progress bar per run).
    ``workers=n > 1`` trains up to ``n`` seeds at once, each in its own spawned process, with one
    bar over all updates (read from the runs' live ``metrics.csv``). A run's result does not depend
    on ``workers``: every run is seeded from its training seed alone (tested). On 2 cores three runs
    side by side (sync envs, ``config.num_threads=1``) train 3 seeds in 7-13% less wall time than one
    async run at a time: one run's PPO update overlaps the others' env steps (README, notebook 04's
    default).
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    seeds = list(train_seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"train_seeds must be a non-empty sequence of distinct training seeds, got {train_seeds!r}")
    root = Path(out_root)
    jobs = [
        dict(config=config, env_kwargs=dict(env_kwargs), out_dir=root / f"seed_{seed}", train_seed=seed, vector_env=vector_env,
             checkpoint_every=checkpoint_every, tensorboard=tensorboard, progress=progress and workers == 1)
        for seed in seeds
    ]
    if workers == 1 or len(jobs) == 1:
        return [train_morpho_policy(**job) for job in jobs]
    from concurrent.futures import wait

    from esper_lib.progress import progress_bar

    MorphoEnv(**env_kwargs)  # bad env arguments fail here, before any process starts (a bad seed fails in its worker)
    for job in jobs:
        (Path(job["out_dir"]) / "metrics.csv").unlink(missing_ok=True)  # the bar counts this run's rows only
    total = config.num_updates * len(jobs)
    with spawn_process_pool(min(workers, len(jobs))) as pool:
        futures = [pool.submit(_train_one, job) for job in jobs]
        with progress_bar(total=total, desc=f"train {len(jobs)} runs, {workers} at a time", unit="update", disable=not progress) as bar:
            pending = set(futures)
            while pending:
                _, pending = wait(pending, timeout=1.0)
                done = sum(_rows_written(Path(job["out_dir"]) / "metrics.csv") for job in jobs)
                bar.update(min(done, total) - bar.n)
        return [f.result() for f in futures]


def greedy_controller(checkpoint: str | Path) -> PolicyController:
    """The saved policy (with its observation normaliser) acting greedily: argmax of every valid head."""
    policy, normalizer, _ = load_trained(checkpoint)
    return PolicyController(policy, normalizer, deterministic=True)


def sampling_controller(checkpoint: str | Path, seed: int) -> PolicyController:
    """The saved policy sampling its actions (the policy PPO optimises), from a generator seeded with ``seed``."""
    policy, normalizer, _ = load_trained(checkpoint)
    return PolicyController(policy, normalizer, deterministic=False, seed=seed)


def op_probabilities_along_episode(controller: PolicyController, env_kwargs: Mapping[str, Any], seed: int) -> pd.DataFrame:
    """pi(op | s) at every epoch of one episode the controller plays (env seed ``seed``).

    One row per epoch: ``epoch``, ``op`` (the op it chose), ``p_<OP>`` for every op (0 where masked).
    Read on a greedy controller it shows why a run does or does not grow: argmax never germinates
    where p(GERMINATE) stays below p(WAIT), however close it comes.
    """
    from esper_lib.constants import OP_NAMES

    if not isinstance(controller, PolicyController):
        raise TypeError(f"controller must be a PolicyController (it reports pi(op | s)), got {type(controller).__name__}")
    env = MorphoEnv(**dict(env_kwargs))
    rows = []
    try:
        obs, _ = env.reset(seed=int(seed))
        controller.reset()
        done, epoch = False, 0
        while not done:
            action = controller.act(obs)
            probs = controller.last.op_probs[0].detach().cpu().numpy()
            rows.append({"epoch": epoch, "op": OP_NAMES[int(action[0])], **{f"p_{name}": float(p) for name, p in zip(OP_NAMES, probs)}})
            obs, _, terminated, truncated, _ = env.step(action)
            done, epoch = terminated or truncated, epoch + 1
    finally:
        env.close()
    return pd.DataFrame(rows)


def describe_germination(profiles: Mapping[int, pd.DataFrame]) -> str:
    """One sentence per training seed from ``op_probabilities_along_episode`` frames (greedy episodes)."""
    if not profiles:
        raise ValueError("profiles must not be empty")
    parts = []
    for seed, df in profiles.items():
        germ = df.index[df["op"] == "GERMINATE"]
        if len(germ):
            first = df.loc[germ[0]]
            parts.append(f"seed {seed} germinates first at epoch {int(first.epoch)} (p(GERMINATE) {first.p_GERMINATE:.2f})")
        else:
            peak = df.loc[df["p_GERMINATE"].idxmax()]
            parts.append(f"seed {seed} never germinates: p(GERMINATE) on its path starts at {df.p_GERMINATE.iloc[0]:.2f} and peaks at "
                         f"{peak.p_GERMINATE:.2f} (epoch {int(peak.epoch)}), below p(WAIT) {peak.p_WAIT:.2f} there")
    return "Greedy episode on the first held-out seed: " + "; ".join(parts) + "."


def describe_first_epoch(traces: Mapping[int, pd.DataFrame]) -> str:
    """One sentence per training seed from ``FirstEpochChoices`` frames: p(GERMINATE) at epoch 0 over training."""
    if not traces:
        raise ValueError("traces must not be empty")
    parts = []
    for seed, df in traces.items():
        p = df["p_GERMINATE"].to_numpy()
        last = df.iloc[-1]
        text = f"seed {seed}: {p[0]:.2f} at update {int(df['update'].iloc[0])}, {p.min():.2f} at its lowest (update {int(df['update'].iloc[p.argmin()])}), {p[-1]:.2f} at the end"
        parts.append(text + f", taking {last.blueprint}/{last['style']} there")
    return "p(GERMINATE) at the first epoch of the probe hosts over training: " + "; ".join(parts) + "."


def evaluate_runs(
    runs: Iterable[TrainingRun],
    baselines: Mapping[str, Any],
    env_kwargs: Mapping[str, Any],
    heldout_seeds: Sequence[int],
    *,
    label: str = "ppo",
    sampled_label: str | None = None,
    progress: bool = True,
    workers: int = 1,
) -> pd.DataFrame:
    """Greedy policy of every run and every baseline controller on the same held-out env seeds.

    ``sampled_label``: when set, every run's policy also plays the seeds *sampling* its actions (the
    stochastic policy PPO optimises; generator seeded with the training seed), under that
    controller name. Greedy and sampled readouts can differ a lot: argmax per head never germinates
    where p(GERMINATE) stays below p(WAIT), while sampling does.

    Columns: those of ``evaluate_controller`` (``ops`` is the episode's op sequence: a greedy policy
    that plays one sequence on every seed runs a fixed schedule, one that varies reacts to the
    state) plus ``train_seed`` (NaN for the baselines).

    ``workers > 1`` plays up to that many controllers at once, each in a spawned process (the
    baselines must then be picklable, as the library's are); the rows are the same as with one.
    """
    seeds = [int(s) for s in heldout_seeds]
    if not seeds:
        raise ValueError("heldout_seeds must not be empty")
    if sampled_label is not None and (not isinstance(sampled_label, str) or sampled_label in (label, *baselines)):
        raise ValueError(f"sampled_label must be a new controller name (not {label!r} or a baseline's), got {sampled_label!r}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    jobs: list[tuple[str, Any, Any]] = []  # (controller name, controller or (checkpoint, sampling seed), train_seed)
    for run in runs:
        jobs.append((label, (run.checkpoint, None), run.train_seed))
        if sampled_label is not None:
            jobs.append((sampled_label, (run.checkpoint, int(run.train_seed)), run.train_seed))
    jobs += [(name, controller, np.nan) for name, controller in baselines.items()]
    tasks = [(name, controller, dict(env_kwargs), seeds, train_seed) for name, controller, train_seed in jobs]
    if workers == 1:
        return pd.concat([_evaluate_job(task, progress) for task in tasks], ignore_index=True)
    from concurrent.futures import as_completed

    from esper_lib.progress import progress_bar

    with spawn_process_pool(min(workers, len(tasks))) as pool:
        futures = [pool.submit(_evaluate_job, task, False) for task in tasks]
        for _ in progress_bar(as_completed(futures), total=len(futures), desc=f"evaluate {len(tasks)} controllers", unit="controller", disable=not progress):
            pass
        return pd.concat([f.result() for f in futures], ignore_index=True)


def _evaluate_job(task: tuple[str, Any, dict[str, Any], list[int], Any], progress: bool) -> pd.DataFrame:
    """One controller on the held-out seeds (``evaluate_runs``); a policy comes as ``(checkpoint, sampling seed or None)``."""
    name, controller, env_kwargs, seeds, train_seed = task
    if isinstance(controller, tuple):
        checkpoint, sampling_seed = controller
        controller = greedy_controller(checkpoint) if sampling_seed is None else sampling_controller(checkpoint, seed=sampling_seed)
    df = evaluate_controller(controller, partial(MorphoEnv, **env_kwargs), seeds, name=name, progress=progress)
    df["train_seed"] = train_seed
    return df


def distinct_op_sequences(results: pd.DataFrame) -> pd.DataFrame:
    """Per (controller, train_seed): episodes and distinct op sequences over the held-out seeds."""
    if "ops" not in results.columns:
        raise ValueError("results has no 'ops' column (use evaluate_runs)")
    keys = ["controller", "train_seed"]
    return (
        results.assign(train_seed=results["train_seed"].fillna(-1))
        .groupby(keys, sort=False)["ops"]
        .agg(episodes="size", distinct_sequences="nunique")
        .reset_index()
        .replace({"train_seed": {-1: np.nan}})
    )


def calibration_summary(runs: Iterable[TrainingRun], last_updates: int = 5) -> pd.DataFrame:
    """Per run: the critic's mean V(s0) and the mean measured discounted return over its last updates."""
    rows = []
    for run in runs:
        cal = run.calibration
        if cal.empty:
            continue
        late = cal[cal["update"] > cal["update"].max() - last_updates]
        value, ret = late["value_expected"].mean(), late["discounted_return"].mean()
        rows.append({"train_seed": run.train_seed, "episodes": len(late), "critic_value_s0": value,
                     "measured_discounted_return": ret, "relative_error": (value - ret) / abs(ret) if ret else np.nan})
    return pd.DataFrame(rows)


def _diff(table: pd.DataFrame, controller: str, train_seed: Any = "all") -> pd.Series:
    rows = table[table["controller"] == controller]
    if "train_seed" in rows.columns:
        rows = rows[rows["train_seed"].astype(str) == str(train_seed)]
    if rows.empty:
        raise ValueError(f"no row for controller {controller!r} (train_seed {train_seed!r})")
    return rows.iloc[0]


def _ci(r: pd.Series) -> str:
    return f"{r.diff_mean:+.3f} (95% CI [{r.diff_ci_low:+.3f}, {r.diff_ci_high:+.3f}])"


def describe_outcome(
    results: pd.DataFrame,
    *,
    policy: str = "ppo",
    wait: str = "always_wait",
    random: str = "random_masked",
    best: str = "best_schedule",
    sampled: str | None = "ppo_sampled",
    metric: str = "return",
    calibration: pd.DataFrame | None = None,
    **compare_kwargs: Any,
) -> str:
    """Markdown paragraph saying, from ``results`` (``evaluate_runs``), who won and by how much.

    The policy is compared with always-WAIT and with random, paired by held-out seed, per training
    seed and aggregated (stratified bootstrap); the share of the headroom is
    (policy - WAIT) / (best schedule - WAIT) on the mean ``metric``; whether the greedy policy
    reacts is the number of distinct op sequences over the held-out seeds; a ``sampled`` controller
    (``evaluate_runs(sampled_label=...)``), when present, gets its own line against WAIT; ``calibration``
    (``calibration_summary``) adds the critic's V(s0) against the measured return.
    """
    from esper_lib.evaluation.stats import compare_controllers

    vs_wait = compare_controllers(results, metric, baseline=wait, **compare_kwargs)
    seeds = sorted(results.loc[results["controller"] == policy, "train_seed"].dropna().unique())
    agg = _diff(vs_wait, policy)
    n_heldout = results.loc[results["controller"] == wait, "seed"].nunique()
    lines = [f"**{policy} vs {wait}** ({metric}, {len(seeds)} training seeds x {n_heldout} held-out env seeds, paired by seed): "
             f"{_ci(agg)} aggregated; "
             + "; ".join(f"seed {int(s)}: {_ci(_diff(vs_wait, policy, int(s)))}" for s in seeds) + "."]
    verdict = "beats" if agg.diff_ci_low > 0 else "loses to" if agg.diff_ci_high < 0 else "is not distinguishable from"
    lines.append(f"On aggregate the trained policy **{verdict}** always-WAIT.")
    if random in set(results["controller"]):
        vs_random = compare_controllers(results, metric, baseline=random, **compare_kwargs)
        r = _diff(vs_random, policy)
        lines.append(f"Against the random masked policy: {_ci(r)}.")
    if best in set(results["controller"]):
        mean = results.groupby("controller")[metric].mean()
        room = mean[best] - mean[wait]
        share = (mean[policy] - mean[wait]) / room if room > 0 else np.nan
        share = 0.0 if np.isfinite(share) and abs(share) < 0.005 else share  # no "-0%"
        lines.append(f"Headroom (best fixed schedule - WAIT): {room:+.3f}; the policy captures **{share:.0%}** of it "
                     f"(target: at least 50%)." if np.isfinite(share) else
                     f"Headroom (best fixed schedule - WAIT) is {room:+.3f}: no positive headroom to share.")
    if sampled is not None and sampled in set(results["controller"]):
        sampled_seeds = sorted(results.loc[results["controller"] == sampled, "train_seed"].dropna().unique())
        lines.append(f"The same policies **sampling** their actions (the stochastic policy PPO optimises; greedy is argmax per head): "
                     f"{_ci(_diff(vs_wait, sampled))} vs {wait} aggregated; "
                     + "; ".join(f"seed {int(s)}: {_ci(_diff(vs_wait, sampled, int(s)))}" for s in sampled_seeds) + ".")
    distinct = distinct_op_sequences(results)
    d = distinct[distinct["controller"] == policy]
    lines.append("Greedy op sequences over the held-out seeds: "
                 + ", ".join(f"seed {int(r.train_seed)}: {r.distinct_sequences} distinct of {r.episodes}" for r in d.itertuples())
                 + " (1 = a fixed schedule; more = the policy reacts to the state).")
    if calibration is not None and not calibration.empty:
        lines.append("Critic calibration (last updates, training episodes): "
                     + ", ".join(f"seed {int(r.train_seed)}: V(s0) {r.critic_value_s0:.3f} vs measured {r.measured_discounted_return:.3f} "
                                 f"({r.relative_error:+.0%})" for r in calibration.itertuples()) + ".")
    return "\n\n".join(lines)
