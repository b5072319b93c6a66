"""``PPOConfig``: every hyperparameter of recurrent PPO, validated on construction.

A bad value raises ``ValueError`` whose message starts with ``PPOConfig.<field>``. The config is a
frozen dataclass of plain Python values, so it round-trips through ``to_dict`` / ``from_dict``
(that is how checkpoints store it).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from esper_lib.constants import ENTROPY_COEF_PER_HEAD, FEATURE_DIM, HEAD_NAMES, LSTM_HIDDEN_DIM

BOOTSTRAP_MODES = ("expected", "sampled", "greedy")
OP_ADVANTAGE_MODES = ("expected", "q")
DEVICE_TYPES = ("cpu", "cuda", "mps")
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")  # where autocast_bf16 is offered
HEAD_LOSS_DENOMINATORS = ("valid_steps", "relevant_steps")  # what each head's loss terms are averaged over
ENTROPY_FLOOR_UNITS = ("nats", "max_fraction")  # a floor in nats, or a fraction of ln(valid choices) at each step
VECTOR_ENV_KINDS = ("sync", "async", "ray")  # where PPOTrainer runs the envs it builds from env_fn


@dataclass(frozen=True)
class PPOConfig:
    """Hyperparameters of recurrent PPO for the factored V2 policy.

    Rollout: ``num_envs`` envs x ``num_steps`` steps per update; training length is
    ``total_updates`` updates, or ``ceil(total_env_steps / (num_envs * num_steps))`` when
    ``total_env_steps`` is set (it then takes precedence).

    Update: ``epochs`` passes over the rollout cut into sequences (chunks) of ``seq_len`` steps
    (``num_steps`` must be a multiple of ``seq_len``), ``minibatch_sequences`` chunks per minibatch.

    Estimators (design section 4): ``bootstrap_mode`` "expected" bootstraps with
    sum_o pi(o|s') Q(s', o), "sampled" with Q(s', sampled op) (the plan's), "greedy" with the max over
    valid ops of Q(s', o) (optimistic: the value of s' if the best op were taken there); ``op_advantage``
    "expected" gives the op head A + Q(s, op_t) - sum_o pi(o|s) Q(s, o), "q" gives it the same
    advantage as every other head (the plan's).

    Shared env seeds (common random numbers): with ``seed_group_size = g > 1`` the envs form
    ``num_envs / g`` groups of ``g`` consecutive envs; the envs of a group are reset with the same
    seed, so (for an env whose unseeded resets follow its seed, as ``MorphoEnv``'s do) they play the
    same sequence of episodes (on the morpho env: the same host init and data order), and each
    step's advantages (every head's, the op head's too) are measured against the mean of the other
    envs of its group at the same step (``center_advantages_in_groups``). The episode-to-episode
    luck they share cancels; what is left is the effect of the actions. 1 = independent envs.

    Entropy: the bonus is ``ent_coef * sum_h entropy_coef_per_head[h] * mean relevant entropy_h``;
    ``entropy_coef_per_head`` maps head names to coefficients (missing heads keep the design's
    ``ENTROPY_COEF_PER_HEAD``; None = all the design's).

    Entropy floors: ``entropy_floor_per_head`` maps head names to a floor in nats; at every step where
    such a head is relevant and its entropy is below the floor, the loss adds
    ``entropy_floor_coef * (floor - entropy)`` (averaged like the entropy bonus). Unlike the bonus it
    does nothing above the floor, so it keeps a head exploring without flattening it (e.g. the op
    head, whose early collapse onto WAIT decides many runs; docs/ppo_morpho.md). None = no floor.
    ``entropy_floor_updates`` = N keeps the floors for updates 0..N-1 only (None: every update), so a
    head can be held open while the others learn and then let go. ``entropy_floor_unit`` "nats" reads
    the floors in nats; "max_fraction" reads them as a fraction (0-1) of the most entropy the step's
    mask allows, ``ln(valid choices)``. A floor in nats above ``ln k`` can never be met at a step with
    ``k`` valid choices (on the morpho env: 0.8 nats where only WAIT and GERMINATE are valid, max
    ln 2 = 0.69), so it pulls such a step towards uniform however the other choices compare; a
    fraction is met at every step and keeps each valid choice at a minimum probability instead.

    Op-head warm-up: for updates ``0..op_warmup_updates - 1`` the op head's surrogate, entropy bonus
    and floor are left out of the loss (its metrics are still reported). The op policy then stays near
    its initial, near-uniform distribution (only the shared trunk moves it) while the argument heads
    and the critic learn from seeds germinated at every epoch; then the op head learns with them.
    0 = off (the design's loss from the first update).

    Argument-head warm-up: for updates ``0..argument_warmup_updates - 1`` the seven argument heads'
    surrogates, entropy bonuses and floors are left out of the loss instead, so the op head (and the
    critic) learn first. On the morpho env an untrained policy follows a germination with random ops
    (SET_ALPHA_TARGET restyles the seed, PRUNE removes it), and under such follow-ups the arguments
    that pay most with a good follow-up (LINEAR_MULTIPLY) pay least (``scripts/follow_through_probe.py``):
    arguments learned in the first updates learn the wrong lesson. 0 = off.

    Per-head averaging: ``head_loss_denominator`` "valid_steps" divides each head's surrogate,
    entropy bonus and floor by the minibatch's valid steps (a head relevant at few steps, e.g.
    blueprint at GERMINATE steps only, gets a gradient scaled down by how seldom it is relevant);
    "relevant_steps" divides them by the steps where that head is relevant, so every head learns at
    the same strength whatever its op's frequency (docs/ppo.md, "Per-head averaging").

    Optional knobs: ``value_clip`` (None = unclipped value loss), ``target_kl`` (None = no early
    stop; otherwise the update stops at the first minibatch whose approximate KL, measured before
    its gradient step, exceeds it), ``num_threads`` (None = leave torch's thread count alone; else
    set while the trainer runs and restored by ``PPOTrainer.close``), ``autocast_bf16`` (run the
    update's forward and backward under ``torch.autocast(dtype=torch.bfloat16)`` on "cpu" or "cuda":
    matmuls and the LSTM in bfloat16, the losses, their reduction and the optimizer in float32;
    worth it where the hardware has bf16 matmuls, i.e. CPUs with AMX / AVX512-BF16 and recent GPUs).

    ``device`` is parsed when the config is built ("cpu", "cuda", "cuda:N", "mps"); whether that
    device exists on this machine is checked when the trainer is built.

    Where the envs run when the trainer builds them from ``env_fn``: ``vector_env`` "sync" (this
    process), "async" (one subprocess per env) or "ray" (Ray actors, one env each; needs the ``ray``
    extra). For other layouts build the vector env with ``make_vector_env`` and pass it instead.
    """

    # rollout
    num_envs: int = 8
    num_steps: int = 128
    total_updates: int = 100
    total_env_steps: int | None = None
    # returns and advantages
    gamma: float = 0.99
    gae_lambda: float = 0.95
    bootstrap_mode: str = "expected"
    op_advantage: str = "expected"
    normalize_advantages: bool = True
    seed_group_size: int = 1
    # update
    epochs: int = 4
    seq_len: int = 16
    minibatch_sequences: int = 8
    lr: float = 3e-4
    anneal_lr: bool = False
    adam_eps: float = 1e-5
    clip_coef: float = 0.2
    value_clip: float | None = None
    ent_coef: float = 0.01
    entropy_coef_per_head: dict[str, float] | None = None
    entropy_floor_per_head: dict[str, float] | None = None
    entropy_floor_coef: float = 0.1
    entropy_floor_updates: int | None = None
    entropy_floor_unit: str = "nats"
    op_warmup_updates: int = 0
    argument_warmup_updates: int = 0
    head_loss_denominator: str = "valid_steps"
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    target_kl: float | None = 0.03
    # observations
    normalize_obs: bool = True
    obs_clip: float = 10.0
    # network
    feature_dim: int = FEATURE_DIM
    hidden_dim: int = LSTM_HIDDEN_DIM
    validate_inputs: bool = False
    autocast_bf16: bool = False
    # run
    seed: int = 0
    device: str = "cpu"
    num_threads: int | None = None
    vector_env: str = "sync"

    def __post_init__(self) -> None:
        self.validate()

    # --- validation -------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("num_envs", "num_steps", "total_updates", "epochs", "seq_len", "minibatch_sequences", "feature_dim", "hidden_dim"):
            _positive_int(name, getattr(self, name))
        if self.total_env_steps is not None:
            _positive_int("total_env_steps", self.total_env_steps)
        _positive_int("seed_group_size", self.seed_group_size)
        if self.num_envs % self.seed_group_size:
            raise ValueError(f"PPOConfig.seed_group_size ({self.seed_group_size}) must divide num_envs ({self.num_envs}): every env belongs to one group")
        if self.num_threads is not None:
            _positive_int("num_threads", self.num_threads)
        if self.hidden_dim < 2:
            raise ValueError(f"PPOConfig.hidden_dim must be >= 2, got {self.hidden_dim}")
        _int("seed", self.seed)
        if self.seed < 0:
            raise ValueError(f"PPOConfig.seed must be >= 0, got {self.seed}")
        _unit_interval("gamma", self.gamma, closed_right=False)
        _unit_interval("gae_lambda", self.gae_lambda, closed_right=True)
        for name in ("lr", "clip_coef", "adam_eps", "max_grad_norm", "obs_clip"):
            _positive_float(name, getattr(self, name))
        for name in ("ent_coef", "vf_coef"):
            _nonneg_float(name, getattr(self, name))
        for name in ("value_clip", "target_kl"):
            if getattr(self, name) is not None:
                _positive_float(name, getattr(self, name))
        for name in ("normalize_advantages", "normalize_obs", "anneal_lr", "validate_inputs", "autocast_bf16"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"PPOConfig.{name} must be a bool, got {getattr(self, name)!r}")
        _per_head("entropy_coef_per_head", self.entropy_coef_per_head, "coefficient")
        _per_head("entropy_floor_per_head", self.entropy_floor_per_head, "floor in nats")
        _nonneg_float("entropy_floor_coef", self.entropy_floor_coef)
        if self.entropy_floor_updates is not None:
            _positive_int("entropy_floor_updates", self.entropy_floor_updates)
        if self.bootstrap_mode not in BOOTSTRAP_MODES:
            raise ValueError(f"PPOConfig.bootstrap_mode must be one of {BOOTSTRAP_MODES}, got {self.bootstrap_mode!r}")
        for name in ("op_warmup_updates", "argument_warmup_updates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"PPOConfig.{name} must be an int >= 0 (0 = off), got {value!r}")
        if self.entropy_floor_unit not in ENTROPY_FLOOR_UNITS:
            raise ValueError(f"PPOConfig.entropy_floor_unit must be one of {ENTROPY_FLOOR_UNITS}, got {self.entropy_floor_unit!r}")
        if self.entropy_floor_unit == "max_fraction":
            over = {h: f for h, f in (self.entropy_floor_per_head or {}).items() if isinstance(f, (int, float)) and f > 1}
            if over:
                raise ValueError(f"PPOConfig.entropy_floor_per_head must be fractions in [0, 1] with entropy_floor_unit='max_fraction', got {over}")
        if self.head_loss_denominator not in HEAD_LOSS_DENOMINATORS:
            raise ValueError(f"PPOConfig.head_loss_denominator must be one of {HEAD_LOSS_DENOMINATORS}, got {self.head_loss_denominator!r}")
        if self.op_advantage not in OP_ADVANTAGE_MODES:
            raise ValueError(f"PPOConfig.op_advantage must be one of {OP_ADVANTAGE_MODES}, got {self.op_advantage!r}")
        device = _device("device", self.device)
        if self.autocast_bf16 and device.type not in AUTOCAST_DEVICE_TYPES:
            raise ValueError(f"PPOConfig.autocast_bf16 needs a device of type {AUTOCAST_DEVICE_TYPES}, got device {self.device!r}")
        if self.vector_env not in VECTOR_ENV_KINDS:
            raise ValueError(f"PPOConfig.vector_env must be one of {VECTOR_ENV_KINDS}, got {self.vector_env!r}")
        if self.num_steps % self.seq_len:
            raise ValueError(
                f"PPOConfig.seq_len ({self.seq_len}) must divide num_steps ({self.num_steps}): the rollout is cut into whole sequences"
            )
        if self.minibatch_sequences > self.num_sequences:
            raise ValueError(
                f"PPOConfig.minibatch_sequences ({self.minibatch_sequences}) exceeds the number of sequences per rollout "
                f"(num_envs * num_steps / seq_len = {self.num_sequences})"
            )

    # --- derived ----------------------------------------------------------------------------

    @property
    def num_sequences(self) -> int:
        """Sequences (chunks of ``seq_len`` steps) per rollout."""
        return self.num_envs * (self.num_steps // self.seq_len)

    @property
    def head_entropy_coefs(self) -> dict[str, float]:
        """The per-head entropy coefficients in effect (design defaults overridden by ``entropy_coef_per_head``)."""
        return {**ENTROPY_COEF_PER_HEAD, **(self.entropy_coef_per_head or {})}

    @property
    def head_entropy_floors(self) -> dict[str, float]:
        """The per-head entropy floors in effect (0 = none)."""
        return {h: float((self.entropy_floor_per_head or {}).get(h, 0.0)) for h in HEAD_NAMES}

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        """Updates to run: from ``total_env_steps`` when set, else ``total_updates``."""
        if self.total_env_steps is not None:
            return math.ceil(self.total_env_steps / self.steps_per_update)
        return self.total_updates

    # --- (de)serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PPOConfig":
        """Rebuild from ``to_dict()``; unknown keys raise ``ValueError`` naming them."""
        if not isinstance(data, dict):
            raise ValueError(f"PPOConfig.from_dict needs a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"PPOConfig has no field(s) {unknown}")
        return cls(**data)

    def replace(self, **changes: Any) -> "PPOConfig":
        """A copy with ``changes`` applied (validated again)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"PPOConfig has no field(s) {unknown}")
        return dataclasses.replace(self, **changes)


def _device(name: str, value: Any) -> torch.device:
    """Parse a device string as torch does; only the types in ``DEVICE_TYPES`` (whether present is checked by the trainer)."""
    hint = "a device string such as 'cpu', 'cuda', 'cuda:1' or 'mps'"
    if not isinstance(value, str) or not value:
        raise ValueError(f"PPOConfig.{name} must be {hint}, got {value!r}")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"PPOConfig.{name} must be {hint}, got {value!r}") from exc
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"PPOConfig.{name} must be {hint} (types {DEVICE_TYPES}), got {value!r}")
    return device


def _per_head(name: str, value: Any, what: str) -> None:
    """None, or a dict from head names (``HEAD_NAMES``) to numbers >= 0."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise ValueError(f"PPOConfig.{name} must be a dict head -> {what} or None, got {value!r}")
    unknown = sorted(set(value) - set(HEAD_NAMES))
    if unknown:
        raise ValueError(f"PPOConfig.{name} has unknown head(s) {unknown}; heads: {list(HEAD_NAMES)}")
    for head, number in value.items():
        _nonneg_float(f"{name}[{head!r}]", number)


def _int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"PPOConfig.{name} must be an int, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    _int(name, value)
    if value < 1:
        raise ValueError(f"PPOConfig.{name} must be >= 1, got {value}")


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"PPOConfig.{name} must be a finite number, got {value!r}")
    return float(value)


def _positive_float(name: str, value: Any) -> None:
    if _float(name, value) <= 0:
        raise ValueError(f"PPOConfig.{name} must be > 0, got {value}")


def _nonneg_float(name: str, value: Any) -> None:
    if _float(name, value) < 0:
        raise ValueError(f"PPOConfig.{name} must be >= 0, got {value}")


def _unit_interval(name: str, value: Any, closed_right: bool) -> None:
    v = _float(name, value)
    ok = 0.0 <= v <= 1.0 if closed_right else 0.0 <= v < 1.0
    if not ok:
        raise ValueError(f"PPOConfig.{name} must lie in [0, 1{']' if closed_right else ')'}, got {value}")
