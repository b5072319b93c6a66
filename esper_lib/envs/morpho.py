"""The morphogenetic environment: Tamiyo grows seeds in the slots of a CNN host while it trains.

One ``step`` = apply the action (if valid) -> advance alpha ramps -> one host training epoch ->
validation pass and counterfactuals -> automatic lifecycle transitions -> reward and observation.
The host is ``HostCNN`` (``esper_lib.envs.host``) on scikit-learn's 8x8 digits; the lifecycle
rules, gates and durations are in ``esper_lib.envs.lifecycle``; the blueprints in
``esper_lib.envs.blueprints``. Spaces are ``esper_lib.envs.spaces``; the state vector follows
``esper_lib.observation`` (every one of its features is filled here).

Epoch. A full pass over the train split in shuffled minibatches of ``batch_size`` (or, with
``batches_per_epoch=k``, the first ``k`` minibatches of a fresh shuffle: a cheaper "epoch" for
quick runs), Adam on the host (``lr``) and one Adam per seed (``seed_lr``), gradients clipped at
norm 5. Then one validation pass (the whole validation split in one batch). The Adams call the fused
CPU kernel directly (``esper_lib.envs.fused_adam``) and the statistics of the epoch (loss, accuracy,
gradient norms) stay tensors until it ends: at this host's size a step's cost is per-op overhead,
not arithmetic.

Counterfactuals. For every slot whose seed is in the host stream with alpha > 0 (BLENDING,
HOLDING, PRUNING, FOSSILIZED), the validation accuracy with that slot's alpha forced to 0 is
measured (``contribution = acc - acc_without``); with two or more such slots, each pair is also
ablated and ``interaction_i = sum_j (acc - acc_-i - acc_-j + acc_-ij)``. Ablated passes restart
from cached activations at the first ablated slot, and a partial pass several ablations share is computed
once (``HostCNN.forward_ablations``). ``counterfactual_every=k`` measures every
``k``-th epoch only (freshness then decays by 0.8 per epoch).

Reward (each term in ``info["reward_terms"]``; the reward is their sum):
- ``accuracy_delta = acc_t - acc_{t-1}`` (validation accuracy as a fraction; ``acc_{-1}`` is the
  untrained host's accuracy measured at reset). It telescopes: an episode's sum is
  ``final - initial`` accuracy, whatever the path.
- ``rent = -rent_coef * seed_params / host_params / max_epochs`` per epoch, on every seed present
  during the epoch (GERMINATED to PRUNING, and FOSSILIZED), whatever its alpha, ``host_params``
  being the original host's (a seed pruned INSTANTly pays nothing for that epoch). ``rent_coef`` is thus the total rent of carrying seeds as large as the host for a
  whole episode, independent of ``max_epochs``.
- ``terminal = terminal_coef * final validation accuracy`` on the last step (termination), else 0.

Known exploits and what the env does against them:
- Germinate / prune churn (collecting noise-driven accuracy gains, or the dip-and-recover of
  adding and removing a seed): the accuracy term telescopes, so churn cannot farm it; rent is
  charged from GERMINATED on, the seed budget (``seed_budget`` germinations per episode) caps it and
  a pruned slot is unavailable for 5 epochs (PRUNED, EMBARGOED, RESETTING).
- Parking seeds at alpha 0 (leaving them in GERMINATED/TRAINING, or retargeting them low) to keep
  options open for free: rent does not depend on alpha, so a parked seed costs as much as a
  blended one. The SET_ALPHA_TARGET targets never go below 0.5, so alpha 0 means pruning.
- Fossilizing to stop paying: fossilized seeds keep paying rent (they are permanent compute).
- Left open: the terminal term rewards final accuracy only, so a policy may ignore anything after
  the last epoch (e.g. keep a seed it would prune on a longer run).

Masks (``action_masks()``): WAIT always; GERMINATE iff a DORMANT slot exists and the budget is not
spent; ADVANCE / PRUNE / FOSSILIZE / SET_ALPHA_TARGET iff a slot passes that op's gate. PRUNE is
further limited, by default, to seeds in the host stream (BLENDING, HOLDING): pruning is the
decision taken on a seed's measured counterfactual contribution, which exists only once it is
blended. Before that a seed has no effect on the host and costs only its rent, so pruning it early
has nothing to judge on. This gate is what made the env learnable in a short PPO budget: with
PRUNE open from GERMINATED on, an untrained policy prunes most seeds before they blend (each
epoch's op is uniform over the valid ones), so growth looks useless and PPO settled on WAIT in
every run we made (7,680 and 10,240 env steps, greedy policy = always-WAIT); with the gate, the same
PPO found a growth policy within 7,680 steps. ``prune_before_blending=True`` restores early pruning.
``slot_by_op[op]`` lists the slots where ``op`` is valid (all zeros for an invalid op; all ones for
WAIT, whose slot is irrelevant). ``slot`` is the union of the rows of the valid ops other than WAIT
(all ones when only WAIT is valid). ``blueprint`` allows the CNN blueprints only; style, tempo,
alpha_target, alpha_speed and alpha_curve are all valid. Heads irrelevant for the chosen op (see
``HEAD_RELEVANCE``) are ignored; in particular the blend that ADVANCE starts from TRAINING uses the
tempo and alpha target chosen at germination and a LINEAR curve (the germinate op has no curve head).

An action outside the masks is not executed: ``info["action_valid"] = False`` and the next state
has ``last_action_success = 0``; the epoch still runs. An action outside the action space (wrong
shape, out-of-range index) is a programming error and raises ValueError.

Defaults (chosen so the env poses a real decision, design section 5; measured in docs/headroom.md):
a narrow host (channels 4/8/8, 1,010 parameters) trained for 16 epochs on 500 images at lr 5e-3
reaches ~0.66 validation accuracy alone and is capacity-limited, so a well-chosen seed adds accuracy
that outweighs its rent (the best fixed schedule beats always-WAIT far outside the noise), while
careless growth (random blueprints, slots, styles, prunes) costs rent and disturbs the host (the
random masked policy loses to WAIT). The small host also keeps an epoch cheap (tens of ms on CPU).
The earlier defaults (16/32/32 channels, every train image, 150 epochs at lr 1e-3) left the host at
~96% alone: seeds had nothing to add and no fixed schedule beat WAIT.

Episodes end at ``max_epochs`` with ``terminated=True``: the host's training run has a fixed length, its
last epoch is the end of the task (where the terminal term is paid), so PPO must not bootstrap past
it. ``truncated`` is always False here; a cut of an episode whose task goes on (a ``TimeLimit``
wrapper shorter than the run, a rollout boundary) is the wrapper's or the buffer's business.
Reproducibility: ``reset(seed=s)`` seeds ``np_random``, from which every torch seed of the episode
(host init, minibatch order, seed-module init) is drawn. It also seeds the env's stream of episode
seeds: each later ``reset()`` without a seed (a vector env's autoreset) seeds the new episode from
that stream, never from what the previous episode's actions consumed, so two envs reset with the
same ``s`` play the same sequence of hosts (init, data order) whatever they do (what
``PPOConfig.seed_group_size`` relies on); torch runs with ``num_threads`` threads
(default 1) inside ``reset``/``step`` only and the global thread count is restored afterwards.
"""
from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from esper_lib.constants import (
    ALPHA_SPEED_EPOCHS,
    ALPHA_TARGET_VALUES,
    HEAD_NAMES,
    NUM_OPS,
    TEMPO_EPOCHS,
    AlphaCurveAction,
    AlphaSpeedAction,
    AlphaTargetAction,
    BlueprintAction,
    GerminationStyle,
    LifecycleOp,
    SeedStage,
    TempoAction,
    head_sizes,
    state_dim_for,
)
from esper_lib.envs import native
from esper_lib.envs.blueprints import ChannelGate, blueprint_mask, build_blueprint
from esper_lib.envs.fused_adam import FusedAdam
from esper_lib.envs.host import DigitsSplit, HostCNN, load_digits_split
from esper_lib.envs.lifecycle import SeedSlot
from esper_lib.envs.native_slots import stream_seed, training_seed
from esper_lib.envs.spaces import action_space, action_to_dict, observation_space
from esper_lib.observation import FEATURE_BOUND, HISTORY_LEN, observation_layout, symlog

MAX_GRAD_NORM = 5.0
# Gradient health of a seed, from its mean per-minibatch gradient norm (before clipping): 1 inside
# [HEALTHY_LOW, HEALTHY_HIGH], falling linearly in log10 to 0 three decades outside; flagged vanishing
# below VANISHING and exploding above EXPLODING (10x the clip norm). Seeds here typically show
# 1e-3 to 3 (zero-initialised last layers start low and grow while they train).
HEALTHY_LOW, HEALTHY_HIGH = 1e-4, MAX_GRAD_NORM
VANISHING, EXPLODING = 1e-6, 10 * MAX_GRAD_NORM
FRESHNESS_DECAY = 0.8
_SEED_MAX = 2**31 - 1


def grad_health(norm: float) -> float:
    """Health in [0, 1] of a gradient norm (1 in the healthy band, 0 for non-finite)."""
    if not math.isfinite(norm):
        return 0.0
    if norm <= 0.0:
        return 0.0
    lg = math.log10(norm)
    dist = max(0.0, math.log10(HEALTHY_LOW) - lg, lg - math.log10(HEALTHY_HIGH))
    return max(0.0, 1.0 - dist / 3.0)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads and restore the previous count (None: unchanged)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    if old != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if old != n:
            torch.set_num_threads(old)


def _check_int(name: str, value: Any, low: int, high: int | None = None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    ok = ok and value >= low and (high is None or value <= high)
    if not ok:
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {'None or ' if allow_none else ''}an int {rng}, got {value!r}")


def _check_float(name: str, value: Any, low: float, strict: bool = False) -> None:
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    ok = ok and math.isfinite(float(value)) and (float(value) > low if strict else float(value) >= low)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}")


class MorphoEnv(gym.Env):
    """Gymnasium env: a CNN host on 8x8 digits whose slots Tamiyo fills with seeds.

    Args:
        max_epochs: episode length in host epochs (the last one terminates the episode).
        num_slots: seed slots (one after each host block); must equal ``len(host_channels)``.
        host_channels: channels of the host blocks.
        seed_budget: germinations allowed per episode.
        rent_coef: weight of the parameter rent (see the module docstring); >= 0.
        terminal_coef: weight of the final-accuracy term; >= 0.
        lr, seed_lr: Adam learning rates of the host and of each seed. A sequence ``seed_lr`` makes
            episodes differ (issue 12, item 8): each ``reset`` draws one of its values uniformly with
            the episode's seed (after every other draw of the reset, so the host and data are those of
            the fixed-lr env with the same seed) and reports it in ``info["seed_lr"]``. No feature
            shows it directly: a seed's gradient telemetry (``slot<i>.grad_norm``) reveals it after the
            seed's first TRAINING epoch (the second epoch after its germination).
        batch_size: minibatch size.
        batches_per_epoch: None for a full pass, else this many minibatches per epoch.
        train_size, val_size: sizes of the train (None = all the rest) and validation splits.
        data_seed: seed of the train/validation split (fixed for the env); None draws it from each
            ``reset`` seed.
        counterfactual_every: measure the counterfactuals every this many epochs.
        num_threads: torch threads inside ``reset``/``step`` (None leaves torch's setting alone).
        prune_before_blending: also allow PRUNE in GERMINATED and TRAINING (the lifecycle's full
            ``PRUNABLE_STAGES``). Default False: PRUNE only for a seed in the host stream (BLENDING,
            HOLDING), i.e. once its counterfactual contribution is measured (module docstring).
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        max_epochs: int = 16,
        num_slots: int = 3,
        host_channels: Sequence[int] = (4, 8, 8),
        seed_budget: int = 6,
        rent_coef: float = 0.05,
        terminal_coef: float = 1.0,
        lr: float = 5e-3,
        seed_lr: float | Sequence[float] = 5e-3,
        batch_size: int = 64,
        batches_per_epoch: int | None = None,
        train_size: int | None = 500,
        val_size: int = 360,
        data_seed: int | None = 0,
        counterfactual_every: int = 1,
        num_threads: int | None = 1,
        prune_before_blending: bool = False,
    ):
        super().__init__()
        _check_int("max_epochs", max_epochs, 1)
        _check_int("num_slots", num_slots, 1)
        if (
            not isinstance(host_channels, (tuple, list))
            or not host_channels
            or not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 1 for c in host_channels)
        ):
            raise ValueError(f"host_channels must be a non-empty sequence of positive ints, got {host_channels!r}")
        if len(host_channels) != num_slots:
            raise ValueError(
                f"num_slots ({num_slots}) must equal len(host_channels) ({len(host_channels)}): one slot per host block"
            )
        _check_int("seed_budget", seed_budget, 0)
        _check_float("rent_coef", rent_coef, 0.0)
        _check_float("terminal_coef", terminal_coef, 0.0)
        _check_float("lr", lr, 0.0, strict=True)
        if isinstance(seed_lr, (tuple, list, np.ndarray)):
            if len(seed_lr) == 0:
                raise ValueError("seed_lr must be a positive number or a non-empty sequence of them, got []")
            for k, value in enumerate(seed_lr):
                _check_float(f"seed_lr[{k}]", value, 0.0, strict=True)
        else:
            _check_float("seed_lr", seed_lr, 0.0, strict=True)
        _check_int("batch_size", batch_size, 1)
        _check_int("batches_per_epoch", batches_per_epoch, 1, allow_none=True)
        _check_int("val_size", val_size, 10)
        _check_int("train_size", train_size, 10, allow_none=True)
        _check_int("data_seed", data_seed, 0, allow_none=True)
        _check_int("counterfactual_every", counterfactual_every, 1)
        _check_int("num_threads", num_threads, 1, allow_none=True)
        if not isinstance(prune_before_blending, bool):
            raise ValueError(f"prune_before_blending must be True or False, got {prune_before_blending!r}")

        self.max_epochs = int(max_epochs)
        self.num_slots = int(num_slots)
        self.host_channels = tuple(int(c) for c in host_channels)
        self.seed_budget = int(seed_budget)
        self.rent_coef = float(rent_coef)
        self.terminal_coef = float(terminal_coef)
        self.lr = float(lr)
        self.seed_lr_choices = tuple(float(v) for v in seed_lr) if isinstance(seed_lr, (tuple, list, np.ndarray)) else (float(seed_lr),)
        self.seed_lr = self.seed_lr_choices[0]  # this episode's (drawn at each reset when there are several)
        self.batch_size = int(batch_size)
        self.batches_per_epoch = None if batches_per_epoch is None else int(batches_per_epoch)
        self.train_size = None if train_size is None else int(train_size)
        self.val_size = int(val_size)
        self.data_seed = data_seed
        self.counterfactual_every = int(counterfactual_every)
        self.num_threads = num_threads
        self.prune_before_blending = prune_before_blending
        self.render_mode = None

        self.observation_space = observation_space(self.num_slots)
        self.action_space = action_space(self.num_slots)
        self._head_sizes = head_sizes(self.num_slots)
        self._fi = {f.name: f.start for f in observation_layout(self.num_slots)}
        self._state_dim = state_dim_for(self.num_slots)
        self._data: DigitsSplit | None = None
        if data_seed is not None:  # validates the sizes now, and the split is fixed for the env
            self._data = load_digits_split(self.val_size, self.train_size, int(data_seed))
        self.host: HostCNN | None = None
        self._layout_of: HostCNN | None = None  # the host _native_layout describes
        self._layout: tuple[list[tuple[int, bool]], list[nn.Parameter]] | None = None
        self._episode_seeds: np.random.Generator | None = None  # seeds of the unseeded resets (reset docstring)

    # ------------------------------------------------------------------ gymnasium API

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        """Fresh host and empty slots. Returns ``(obs, info)``; info has ``initial_val_accuracy``.

        ``seed``: seeds this episode and the stream that seeds the later unseeded resets (module docstring).
        """
        if seed is not None:
            self._episode_seeds = np.random.default_rng(seed)
        elif self._episode_seeds is not None:
            seed = int(self._episode_seeds.integers(_SEED_MAX))
        super().reset(seed=seed)
        if self._episode_seeds is None:  # first reset without any seed: a random stream
            self._episode_seeds = np.random.default_rng(self._draw_seed())
        if self.data_seed is None:
            self._data = load_digits_split(self.val_size, self.train_size, self._draw_seed())
        with torch_threads(self.num_threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._draw_seed())
            self.host = HostCNN(self.host_channels)
        self._gen = torch.Generator().manual_seed(self._draw_seed())
        self._host_params = self.host.host_parameters()
        self._opt = _adam(self._host_params, self.lr)
        if len(self.seed_lr_choices) > 1:  # drawn last: a single value leaves the env's draws as they were
            self.seed_lr = self.seed_lr_choices[int(self.np_random.integers(len(self.seed_lr_choices)))]

        self._epoch = 0
        self._germinations = self._fossilizations = self._prunes = 0
        self._val_loss_hist: deque[float] = deque(maxlen=HISTORY_LEN)
        self._val_acc_hist: deque[float] = deque(maxlen=HISTORY_LEN)
        self._best_acc: float | None = None
        self._epochs_since_improvement: int | None = None
        self._train_loss: float | None = None
        self._train_acc: float | None = None
        self._host_grad_norm: float | None = None
        self._last_op: int | None = None
        self._last_success: bool | None = None
        with torch_threads(self.num_threads), torch.inference_mode():
            logits = self.host(self._data.x_val)
            self._initial_acc = float((logits.argmax(1) == self._data.y_val).float().mean())
        self._prev_acc = self._initial_acc
        self._masks = self.action_masks()
        info = {"epoch": 0, "initial_val_accuracy": self._initial_acc, "seed_lr": self.seed_lr, "seed_stages": self._stages()}
        return self._observation(), info

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        """One host epoch under ``action`` (MultiDiscrete, ``HEAD_NAMES`` order)."""
        if self.host is None:
            raise RuntimeError("call reset() before step()")
        if self._epoch >= self.max_epochs:
            raise RuntimeError("episode is over (max_epochs reached): call reset()")
        a = action_to_dict(action, self.num_slots)
        op = LifecycleOp(a["op"])
        valid = self._is_valid(a)
        with torch_threads(self.num_threads):
            if valid:
                self._execute(op, a)
            for slot in self.host.slots:
                slot.begin_epoch()
            self._train_epoch()
            val_loss, val_acc = self._evaluate()
        epoch_seed_params = self._seed_param_total()  # the seeds this epoch trained with pay its rent
        for slot in self.host.slots:
            slot.end_epoch()
        self._epoch += 1
        self._last_op, self._last_success = int(op), valid

        if self._best_acc is None or val_acc > self._best_acc + 1e-12:
            self._best_acc, self._epochs_since_improvement = val_acc, 0
        else:
            self._epochs_since_improvement += 1
        self._val_loss_hist.append(val_loss)
        self._val_acc_hist.append(val_acc)

        terminated = self._epoch >= self.max_epochs
        rent = self.rent_coef * epoch_seed_params / self.host.base_param_count / self.max_epochs
        terms = {
            "accuracy_delta": val_acc - self._prev_acc,
            "rent": -rent if rent else 0.0,
            "terminal": self.terminal_coef * val_acc if terminated else 0.0,
        }
        self._prev_acc = val_acc
        reward = float(sum(terms.values()))
        self._masks = self.action_masks()
        info = {
            "epoch": self._epoch,
            "val_accuracy": val_acc,
            "val_loss": val_loss,
            "train_loss": self._train_loss,
            "train_accuracy": self._train_acc,
            "best_val_accuracy": self._best_acc,
            "reward_terms": terms,
            "seed_stages": self._stages(),
            "op": int(op),
            "action_valid": valid,
            "action_executed": valid,
            "germinations": self._germinations,
            "fossilizations": self._fossilizations,
            "prunes": self._prunes,
            "seed_params": self._seed_param_total(),
            "host_params": self.host.param_count(),
        }
        return self._observation(), reward, terminated, False, info

    # ------------------------------------------------------------------ actions and masks

    def _draw_seed(self) -> int:
        return int(self.np_random.integers(_SEED_MAX))

    def _is_valid(self, a: dict[str, int]) -> bool:
        m = self._masks
        op = a["op"]
        if not m["op"][op]:
            return False
        if op == LifecycleOp.WAIT:
            return True
        if not m["slot_by_op"][op, a["slot"]]:
            return False
        return op != LifecycleOp.GERMINATE or bool(m["blueprint"][a["blueprint"]])

    def action_masks(self) -> dict[str, np.ndarray]:
        """Masks of every head and ``slot_by_op`` ``[NUM_OPS, num_slots]`` (int8, 1 = valid) from the slot states."""
        slots = self.host.slots
        by_op = np.zeros((NUM_OPS, self.num_slots), dtype=np.int8)
        by_op[LifecycleOp.WAIT] = 1
        budget_left = self._germinations < self.seed_budget
        for i, s in enumerate(slots):
            by_op[LifecycleOp.GERMINATE, i] = budget_left and s.can_germinate()
            by_op[LifecycleOp.SET_ALPHA_TARGET, i] = s.can_set_alpha_target()
            by_op[LifecycleOp.PRUNE, i] = s.can_prune() and (self.prune_before_blending or s.in_stream)
            by_op[LifecycleOp.FOSSILIZE, i] = s.can_fossilize()
            by_op[LifecycleOp.ADVANCE, i] = s.can_advance()
        op_mask = by_op.any(axis=1).astype(np.int8)
        slot_mask = by_op[1:][op_mask[1:].astype(bool)].any(axis=0).astype(np.int8)
        if not slot_mask.any():
            slot_mask[:] = 1
        masks = {name: np.ones(self._head_sizes[name], dtype=np.int8) for name in HEAD_NAMES}
        masks["op"], masks["slot"], masks["blueprint"] = op_mask, slot_mask, blueprint_mask()
        masks["slot_by_op"] = by_op
        return masks

    def _execute(self, op: LifecycleOp, a: dict[str, int]) -> None:
        if op == LifecycleOp.WAIT:
            return
        slot: SeedSlot = self.host.slots[a["slot"]]
        if op == LifecycleOp.GERMINATE:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self._draw_seed())
                module = build_blueprint(a["blueprint"], slot.channels)
                gate = ChannelGate(slot.channels)
            slot.germinate(
                module,
                gate,
                BlueprintAction(a["blueprint"]),
                GerminationStyle(a["style"]),
                TempoAction(a["tempo"]),
                ALPHA_TARGET_VALUES[AlphaTargetAction(a["alpha_target"])],
            )
            slot.optimizer = _adam([*module.parameters(), *gate.parameters()], self.seed_lr)
            self._germinations += 1
        elif op == LifecycleOp.ADVANCE:
            slot.advance(TEMPO_EPOCHS[slot.tempo])
        elif op == LifecycleOp.SET_ALPHA_TARGET:
            slot.set_alpha_target(
                ALPHA_TARGET_VALUES[AlphaTargetAction(a["alpha_target"])],
                ALPHA_SPEED_EPOCHS[AlphaSpeedAction(a["alpha_speed"])],
                AlphaCurveAction(a["alpha_curve"]),
                GerminationStyle(a["style"]),
            )
        elif op == LifecycleOp.PRUNE:
            slot.prune(ALPHA_SPEED_EPOCHS[AlphaSpeedAction(a["alpha_speed"])], AlphaCurveAction(a["alpha_curve"]))
            self._prunes += 1
        elif op == LifecycleOp.FOSSILIZE:
            params = slot.seed_parameters()
            # keep the seed's Adam moments and step counts: the host optimizer takes over smoothly
            self._opt.adopt(params, slot.optimizer)
            self._host_params = [*self._host_params, *params]
            slot.optimizer = None
            slot.fossilize()
            self._fossilizations += 1

    # ------------------------------------------------------------------ training and evaluation

    def _batches(self) -> list[torch.Tensor]:
        n = len(self._data.y_train)
        perm = torch.randperm(n, generator=self._gen)
        if self.batches_per_epoch is not None:
            need = self.batches_per_epoch * self.batch_size
            if need > n:
                reps = -(-need // n)
                perm = torch.cat([perm] + [torch.randperm(n, generator=self._gen) for _ in range(reps - 1)])
            perm = perm[:need]
        return list(torch.split(perm, self.batch_size))

    @torch.enable_grad()  # callers (e.g. a PPO rollout) may step the env inside torch.no_grad()
    def _train_epoch(self) -> None:
        """One epoch of minibatch Adam; per-minibatch statistics stay tensors until the epoch ends.

        Per minibatch: forward, backward, the fossils' gradient norms (before the host clip rescales
        them), the host's clip and Adam step, then each learning seed's norm, clip and Adam step (the
        parameter sets are disjoint, so the order does not matter).
        The epoch's minibatches are gathered in one indexing op and split into views. With the C kernels on,
        the whole epoch is one call instead (``_native_epoch``).
        """
        host, data = self.host, self._data
        if not host.training:  # _evaluate leaves it in training mode; the module walk costs ~65 us
            host.train()
        learning = [s for s in host.slots if s.learning]
        fossils = [s for s in host.slots if s.stage == SeedStage.FOSSILIZED]
        host_params = self._host_params
        seed_params = {s.index: s.seed_parameters() for s in learning + fossils}
        # every parameter of a learning seed's optimizer (its gate too, even while the style ignores it)
        seed_opt_params = {s.index: s.optimizer.params for s in learning}
        seed_norms: dict[int, list[torch.Tensor]] = {i: [] for i in seed_params}
        host_norms: list[torch.Tensor] = []
        losses: list[torch.Tensor] = []
        logits_all: list[torch.Tensor] = []
        perm = torch.cat(self._batches())
        x_epoch, y_epoch = data.x_train[perm], data.y_train[perm]
        if self._native_epoch(x_epoch, y_epoch):
            return
        xs, ys = x_epoch.split(self.batch_size), y_epoch.split(self.batch_size)
        for xb, yb in zip(xs, ys):
            loss, logits = host.train_loss(xb, yb)
            _zero_grad(host_params)
            for s in learning:
                _zero_grad(seed_opt_params[s.index])
            loss.backward()
            for s in fossils:  # measured before the host clip rescales them
                seed_norms[s.index].append(_grad_norm(seed_params[s.index]))
            host_norms.append(_clip_and_step(self._opt, host_params))
            for s in learning:
                seed_norms[s.index].append(_clip_and_step(s.optimizer, seed_params[s.index]))
            losses.append(loss.detach() * len(yb))
            logits_all.append(logits.detach())
        n_seen, nb = len(perm), len(xs)
        correct = (torch.cat(logits_all).argmax(1) == y_epoch).sum()
        self._train_loss = float(torch.stack(losses).sum()) / n_seen
        self._train_acc = float(correct) / n_seen
        self._host_grad_norm = float(torch.stack(host_norms).sum()) / nb
        for s in host.slots:
            st = s.stats
            if s.index in seed_norms:
                norm = float(torch.stack(seed_norms[s.index]).sum()) / nb
                st.prev_grad_health = st.grad_health
                st.grad_norm, st.grad_health = norm, grad_health(norm)

    def _native_epoch(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """The epoch in one call of the C kernels (``FusedAdam.native_host_epoch``) when every slot passes its
        input through or holds a seed the kernels know (``native_slots.training_seed``); True when done. Without seeds the same results as the
        minibatch loop of ``_train_epoch`` with the kernels on bit for bit, with NORM seeds up to float rounding.

        ``x`` ``[N, 1, 8, 8]``, ``y`` ``[N]``: the epoch's images and labels in minibatch order.
        """
        if not native.enabled():
            return False
        layout = self._native_layout()
        if layout is None:
            return False
        blocks, host_params = layout  # the host's parameters come first in its optimizer, then the fossils' (C reads them so)
        slots = [training_seed(s, self._opt) for s in self.host.slots]
        if any(s is False for s in slots):
            return False
        fossil_params = [p for s in slots if s and s.mode == "fossil" for p in s.params[: s.stepped]]
        opt_params = self._opt.params
        if list(map(id, opt_params[: len(host_params)])) != list(map(id, host_params)) or sorted(
            map(id, opt_params[len(host_params) :])
        ) != sorted(map(id, fossil_params)):
            return False
        out = self._opt.native_host_epoch(x, y, self.batch_size, blocks, MAX_GRAD_NORM, slots)
        if out is None:
            return False
        losses, norms, seed_norms, logits = out
        sizes = torch.tensor([len(t) for t in y.split(self.batch_size)], dtype=torch.float32)
        n_seen, nb = len(y), len(norms)
        self._train_loss = float((losses * sizes).sum()) / n_seen
        self._train_acc = float((logits.argmax(1) == y).sum()) / n_seen
        self._host_grad_norm = float(norms.sum()) / nb
        for s, native_slot in zip(self.host.slots, slots):
            if native_slot is not None:
                st = s.stats
                norm = float(seed_norms[s.index].sum()) / nb
                st.prev_grad_health = st.grad_health
                st.grad_norm, st.grad_health = norm, grad_health(norm)
        return True

    @torch.inference_mode()
    def _evaluate(self) -> tuple[float, float]:
        """Validation loss and accuracy, and the counterfactuals of the slots in the stream."""
        host, x, y = self.host, self._data.x_val, self._data.y_val
        active = [s.index for s in host.slots if s.in_stream]
        measure = self._epoch % self.counterfactual_every == 0
        pairs = [(i, j) for k, i in enumerate(active) for j in active[k + 1 :]] if measure else []
        ablations = [{i} for i in active] + [{i, j} for i, j in pairs] if measure else []
        passes = self._native_forward(x, y, ablations)  # the C kernels do not run the modules: no mode switch
        if passes is not None:
            logits, ablated = passes[0], list(passes[1:])
        else:
            host.eval()
            logits, cache = host.forward_cached(x)
            ablated = host.forward_ablations(cache, ablations) if ablations else []
            host.train()
        loss = float(F.cross_entropy(logits, y))
        acc = _accuracy(logits, y)
        for s in host.slots:
            st = s.stats
            if measure and s.index in active:
                continue
            if st.freshness is not None:
                st.freshness *= FRESHNESS_DECAY
        if measure and active:
            without = {i: _accuracy(out, y) for i, out in zip(active, ablated)}
            inter = dict.fromkeys(active, 0.0)
            for (i, j), out in zip(pairs, ablated[len(active) :]):
                both = _accuracy(out, y)
                term = acc - without[i] - without[j] + both
                inter[i] += term
                inter[j] += term
            for i in active:
                st = host.slots[i].stats
                st.prev_contribution = st.contribution
                st.contribution = acc - without[i]
                st.interaction = inter[i]
                st.freshness = 1.0
        return loss, acc

    def _native_forward(self, x: torch.Tensor, y: torch.Tensor, ablations: list[set[int]]) -> torch.Tensor | None:
        """The validation passes in one call of the C kernels (``native.host_forward``): the logits of the full
        pass then of each ablation ``[1 + len(ablations), N, 10]``; None when the kernels are off or a slot's seed is
        not one the kernels know (``native_slots``; then ``HostCNN.forward_cached`` and ``forward_ablations`` run)."""
        if not native.enabled():
            return None
        layout = self._native_layout()
        if layout is None:
            return None
        blocks, host_params = layout
        slots = [stream_seed(s) for s in self.host.slots]
        if any(s is False for s in slots):
            return None
        masks = [0] + [sum(1 << i for i in a) for a in ablations]
        return native.host_forward(x, y, host_params, blocks, slots, masks)

    def _native_layout(self) -> tuple[list[tuple[int, bool]], list[nn.Parameter]] | None:
        """``(HostCNN.native_blocks(), HostCNN.host_parameters())`` of the current host, or None when the kernels
        cannot run its blocks; worked out once per host (reset makes a new one; its blocks and head never change)."""
        if self._layout_of is not self.host:
            blocks = self.host.native_blocks()
            self._layout = None if blocks is None else (blocks, self.host.host_parameters())
            self._layout_of = self.host
        return self._layout

    # ------------------------------------------------------------------ observation

    def _stages(self) -> np.ndarray:
        return np.array([int(s.stage) for s in self.host.slots], dtype=np.int64)

    def _seed_param_total(self) -> int:
        return sum(s.param_count() for s in self.host.slots)

    def _observation(self) -> dict[str, Any]:
        state = np.full(self._state_dim, -1.0, dtype=np.float64)
        fi = self._fi
        slots = self.host.slots
        host_params = self.host.base_param_count

        state[fi["epoch_progress"]] = self._epoch / self.max_epochs
        if self._val_acc_hist:
            state[fi["val_loss"]] = symlog(self._val_loss_hist[-1]) / 7.0
            state[fi["val_accuracy"]] = self._val_acc_hist[-1]
        for k, (loss, acc) in enumerate(zip(self._val_loss_hist, self._val_acc_hist)):
            offset = HISTORY_LEN - len(self._val_acc_hist) + k  # oldest first, right-aligned
            state[fi[f"val_loss_hist_{offset}"]] = symlog(loss) / 7.0
            state[fi[f"val_accuracy_hist_{offset}"]] = acc
        if self._best_acc is not None:
            state[fi["best_accuracy"]] = self._best_acc
            state[fi["epochs_since_improvement"]] = min(self._epochs_since_improvement / 10.0, 10.0)
        stages = [s.stage for s in slots]
        state[fi["seeds_training"]] = stages.count(SeedStage.TRAINING) / self.num_slots
        state[fi["seeds_blending"]] = stages.count(SeedStage.BLENDING) / self.num_slots
        state[fi["seeds_holding_or_fossilized"]] = (
            stages.count(SeedStage.HOLDING) + stages.count(SeedStage.FOSSILIZED)
        ) / self.num_slots
        state[fi["seed_budget_used"]] = self._germinations / self.seed_budget if self.seed_budget else 1.0
        state[fi["seed_param_ratio"]] = min(self._seed_param_total() / host_params, 10.0)
        if self._train_loss is not None:
            state[fi["train_loss"]] = symlog(self._train_loss) / 7.0
            state[fi["train_accuracy"]] = self._train_acc
            state[fi["host_grad_norm"]] = symlog(self._host_grad_norm) / 7.0
        state[fi["host_lr"]] = 1.0  # constant learning rate: lr / initial lr

        if self._last_success is not None:
            state[fi["last_action_success"]] = float(self._last_success)
            for op in LifecycleOp:
                state[fi[f"last_op_{op.name.lower()}"]] = float(op == self._last_op)

        for i, s in enumerate(slots):
            self._fill_slot(state, f"slot{i}.", s, host_params)

        state = np.clip(np.nan_to_num(state, nan=-1.0), -FEATURE_BOUND, FEATURE_BOUND).astype(np.float32)
        bp = np.array(
            [int(s.blueprint) if s.has_seed and s.blueprint is not None else -1 for s in slots], dtype=np.int64
        )
        return {
            "state": state,
            "blueprint_indices": bp,
            "action_mask": {k: v.copy() for k, v in self._masks.items()},
        }

    def _fill_slot(self, state: np.ndarray, p: str, s: SeedSlot, host_params: int) -> None:
        fi, st = self._fi, s.stats
        state[fi[p + "has_seed"]] = float(s.has_seed)
        for stage in SeedStage:
            state[fi[f"{p}stage_{stage.name.lower()}"]] = float(s.stage == stage)
        state[fi[p + "alpha"]] = s.alpha
        state[fi[p + "alpha_target"]] = s.alpha_target if s.has_seed else 0.0
        state[fi[p + "alpha_mode"]] = float(s.ramp.direction) if s.ramp is not None else 0.0
        state[fi[p + "alpha_steps_left"]] = s.ramp.steps_left / 8.0 if s.ramp is not None else 0.0
        if st.contribution is not None:
            state[fi[p + "contribution"]] = np.clip(st.contribution * 100.0 / 10.0, -1.0, 1.0)
        if st.contribution is not None and st.prev_contribution is not None:
            velocity = (st.contribution - st.prev_contribution) * 100.0 / 10.0
            state[fi[p + "contribution_velocity"]] = np.clip(velocity, -1.0, 1.0)
        if s.has_seed:
            state[fi[p + "tempo"]] = int(s.tempo) / 2.0
            state[fi[p + "style"]] = int(s.style) / 3.0
            state[fi[p + "seed_age"]] = min(s.age / 10.0, 10.0)
        if s.curve is not None:
            state[fi[p + "alpha_curve"]] = int(s.curve) / 4.0
        state[fi[p + "epochs_in_stage"]] = min(s.epochs_in_stage / 10.0, 10.0)
        state[fi[p + "seed_param_ratio"]] = min(s.param_count() / host_params, 10.0)
        if st.grad_norm is not None:
            state[fi[p + "grad_norm"]] = symlog(st.grad_norm) / 7.0
            state[fi[p + "grad_health"]] = st.grad_health
            state[fi[p + "grad_vanishing"]] = float(st.grad_norm < VANISHING)
            state[fi[p + "grad_exploding"]] = float(not math.isfinite(st.grad_norm) or st.grad_norm > EXPLODING)
        if st.prev_grad_health is not None:
            state[fi[p + "prev_grad_health"]] = st.prev_grad_health
        if st.freshness is not None:
            state[fi[p + "counterfactual_freshness"]] = st.freshness
        state[fi[p + "interaction"]] = np.clip(st.interaction * 100.0 / 10.0, -1.0, 1.0)


def _zero_grad(params: list[torch.nn.Parameter]) -> None:
    for p in params:
        p.grad = None


def _grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Euclidean norm of all the gradients of ``params`` (0 when none has a gradient)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if native.enabled() and all(g.dtype == torch.float32 and g.is_contiguous() for g in grads):
        return native._grad_norm(grads)  # one call instead of three ops (the C kernels)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (norm 2, foreach) without its Python overhead; returns the norm."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def _clip_and_step(opt: FusedAdam, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Clip the gradients of ``params`` (``opt``'s parameters, in its order) at ``MAX_GRAD_NORM``, then step ``opt``;
    returns the norm before clipping. One C call when the C kernels are on (``FusedAdam.native_clip_and_step``)."""
    norm = opt.native_clip_and_step(MAX_GRAD_NORM)
    if norm is not None:
        return norm
    norm = _clip_grad_norm_(params, MAX_GRAD_NORM)
    opt.step()
    return norm


def _adam(params: list[torch.nn.Parameter], lr: float) -> FusedAdam:
    """Adam with the fused CPU kernel, called directly (``esper_lib.envs.fused_adam``): the same updates
    as ``torch.optim.Adam(fused=True)`` without its per-step overhead, a large share of a minibatch here."""
    return FusedAdam(params, lr)


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def make_morpho_env(**kwargs: Any) -> MorphoEnv:
    """Factory for ``env_fn`` arguments and vector envs: ``functools.partial(make_morpho_env, max_epochs=20)``."""
    return MorphoEnv(**kwargs)


MORPHO_ENV_ID = "esper/Morpho-v0"
if MORPHO_ENV_ID not in gym.registry:
    gym.register(id=MORPHO_ENV_ID, entry_point="esper_lib.envs.morpho:MorphoEnv")
