"""The Q(s, op) landscape: what the op-conditioned critic believes along a trajectory.

Three steps, each usable on its own:

1. ``record_trajectory(env, controller, seed, max_steps)`` plays one episode of any Gymnasium env
   with the Tamiyo observation spaces under any controller with ``reset()`` / ``act(obs)`` and
   returns a ``Trajectory`` (saved and loaded as ``.npz``).
2. ``landscape_frame(policy, trajectory)`` runs the policy's LSTM over the whole trajectory in one
   call (hidden state carried from a zero start, as in a rollout) and returns a tidy DataFrame with
   one row per (step, op): Q(s, op), pi(op | s), whether the op was valid, V(s) = sum_o pi(o|s) Q(s, o)
   and the spread max - min of Q over the valid ops.
3. ``feature_sweep(policy, trajectory, step, feature_name, values)`` varies one named observation
   feature (``esper_lib.observation``) at one step, holding the rest of the observation and the LSTM
   state carried to that step, and returns Q(s, op) and pi(op | s) per value.

An observation normaliser (from a PPO checkpoint) is applied to raw states before the network;
feature sweeps vary the *raw* feature, so the x axis is in the environment's units.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import pandas as pd
import torch

from esper_lib.constants import HEAD_NAMES, NUM_OPS, OP_NAMES, state_dim_for
from esper_lib.network import FactoredRecurrentActorCritic, Hidden
from esper_lib.observation import FEATURE_BOUND, feature_index, feature_names, observation_layout

MASK_KEYS: tuple[str, ...] = (*HEAD_NAMES, "slot_by_op")
_NPZ_FORMAT = "esper_lib.trajectory/1"


@runtime_checkable
class Controller(Protocol):
    """Anything that plays an env: ``act(obs) -> int array [8]``; ``reset()`` (optional) at episode start."""

    def reset(self) -> None: ...

    def act(self, obs: dict[str, Any]) -> np.ndarray: ...


ObsNormalizer = Any  # None, a callable [..., D] -> [..., D], or an object with normalize()


# --- trajectories -------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """One recorded episode (or its first ``max_steps`` steps).

    Attributes (T steps, D = state_dim, S = num_slots):
        states: ``[T, D]`` float32, the raw observation the action was chosen on.
        blueprint_indices: ``[T, S]`` int64, -1 = empty slot.
        masks: head -> ``[T, k]`` bool (True = valid), plus ``slot_by_op`` ``[T, NUM_OPS, S]``.
        actions: ``[T, 8]`` int64, in ``HEAD_NAMES`` order.
        rewards: ``[T]`` float32, reward received after each action.
        terminated, truncated: whether the episode ended by termination / time limit after the last step.
        meta: free-form JSON-able description (env, controller, seed).
    """

    states: np.ndarray
    blueprint_indices: np.ndarray
    masks: dict[str, np.ndarray]
    actions: np.ndarray
    rewards: np.ndarray
    terminated: bool = False
    truncated: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.states = np.asarray(self.states, dtype=np.float32)
        self.blueprint_indices = np.asarray(self.blueprint_indices, dtype=np.int64)
        self.actions = np.asarray(self.actions, dtype=np.int64)
        self.rewards = np.asarray(self.rewards, dtype=np.float32)
        self.masks = {k: np.asarray(v).astype(bool) for k, v in self.masks.items()}
        if self.states.ndim != 2:
            raise ValueError(f"states must have shape [T, state_dim], got {self.states.shape}")
        t = self.states.shape[0]
        if t == 0:
            raise ValueError("a trajectory needs at least one step (states has T = 0)")
        if self.blueprint_indices.ndim != 2 or self.blueprint_indices.shape[0] != t:
            raise ValueError(f"blueprint_indices must have shape [T={t}, num_slots], got {self.blueprint_indices.shape}")
        if self.actions.shape != (t, len(HEAD_NAMES)):
            raise ValueError(f"actions must have shape [T={t}, {len(HEAD_NAMES)}], got {self.actions.shape}")
        if self.rewards.shape != (t,):
            raise ValueError(f"rewards must have shape [T={t}], got {self.rewards.shape}")
        if "op" not in self.masks:
            raise ValueError(f"masks must hold at least the 'op' mask [T, {NUM_OPS}]; got keys {sorted(self.masks)}")
        for k, m in self.masks.items():
            if m.shape[0] != t:
                raise ValueError(f"masks[{k!r}] must start with T={t}, got shape {m.shape}")
        if self.masks["op"].shape != (t, NUM_OPS):
            raise ValueError(f"masks['op'] must have shape [T={t}, {NUM_OPS}], got {self.masks['op'].shape}")

    def __len__(self) -> int:
        return int(self.states.shape[0])

    @property
    def num_slots(self) -> int:
        return int(self.blueprint_indices.shape[1])

    @property
    def state_dim(self) -> int:
        return int(self.states.shape[1])

    @property
    def ops(self) -> np.ndarray:
        """``[T]`` int64: the op taken at each step."""
        return self.actions[:, HEAD_NAMES.index("op")]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the trajectory to ``path`` (``.npz``; parent folders are created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "format": np.array(_NPZ_FORMAT),
            "states": self.states,
            "blueprint_indices": self.blueprint_indices,
            "actions": self.actions,
            "rewards": self.rewards,
            "ended": np.array([self.terminated, self.truncated]),
            "meta": np.array(json.dumps(self.meta, default=str)),
            **{f"mask.{k}": v for k, v in self.masks.items()},
        }
        with open(path, "wb") as fh:  # a file handle keeps numpy from appending a second ".npz"
            np.savez_compressed(fh, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trajectory":
        """Read a trajectory written by ``save``; FileNotFoundError / ValueError otherwise."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"trajectory file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except Exception as exc:  # numpy raises several types for a damaged file
            raise ValueError(f"{path} is not a readable trajectory file ({type(exc).__name__}: {exc})") from exc
        if str(arrays.get("format", "")) != _NPZ_FORMAT:
            raise ValueError(f"{path} is not an esper_lib trajectory (format tag {_NPZ_FORMAT!r} missing)")
        masks = {k[len("mask."):]: v for k, v in arrays.items() if k.startswith("mask.")}
        ended = arrays["ended"]
        return cls(
            states=arrays["states"],
            blueprint_indices=arrays["blueprint_indices"],
            masks=masks,
            actions=arrays["actions"],
            rewards=arrays["rewards"],
            terminated=bool(ended[0]),
            truncated=bool(ended[1]),
            meta=json.loads(str(arrays["meta"])),
        )


def record_trajectory(
    env: Any, controller: Controller, seed: int | None = 0, max_steps: int = 64, progress: bool = False
) -> Trajectory:
    """Play one episode of ``env`` with ``controller`` and record it.

    ``env`` is any Gymnasium env with the Tamiyo Dict observation (``esper_lib.envs.spaces``);
    ``controller`` anything with ``act(obs) -> np.ndarray [8]`` on one unbatched observation (its
    ``reset()``, if any, is called first). Stops at termination, truncation or after ``max_steps`` steps. ``progress`` shows
    a tqdm bar (one tick per env step).
    """
    if not isinstance(max_steps, (int, np.integer)) or isinstance(max_steps, bool) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    if not callable(getattr(controller, "act", None)):
        raise TypeError(f"controller must have an act(obs) method, got {type(controller).__name__}")
    if callable(getattr(controller, "reset", None)):
        controller.reset()
    obs, _ = env.reset(seed=seed)
    _check_observation(obs)
    states, bps, actions, rewards = [], [], [], []
    masks: dict[str, list[np.ndarray]] = {k: [] for k in obs["action_mask"]}
    terminated = truncated = False
    bar = _progress_bar(int(max_steps), f"recording ({type(controller).__name__})") if progress else None
    for _ in range(int(max_steps)):
        if bar is not None:
            bar.update(1)
        states.append(np.asarray(obs["state"], dtype=np.float32).copy())
        bps.append(np.asarray(obs["blueprint_indices"], dtype=np.int64).copy())
        for k in masks:
            masks[k].append(np.asarray(obs["action_mask"][k]).astype(bool).copy())
        action = np.asarray(controller.act(obs), dtype=np.int64)
        if action.shape != (len(HEAD_NAMES),):
            raise ValueError(
                f"controller {type(controller).__name__}.act() must return an int array of shape ({len(HEAD_NAMES)},), "
                f"got shape {action.shape}"
            )
        actions.append(action)
        obs, reward, terminated, truncated, _ = env.step(action)
        rewards.append(float(reward))
        if terminated or truncated:
            break
    if bar is not None:
        if bar.total != bar.n:  # an episode that ends before max_steps still closes on a full bar
            bar.total = bar.n
        bar.close()
    meta = {"env": _describe_env(env), "controller": type(controller).__name__, "seed": seed, "max_steps": int(max_steps)}
    return Trajectory(
        states=np.stack(states),
        blueprint_indices=np.stack(bps),
        masks={k: np.stack(v) for k, v in masks.items()},
        actions=np.stack(actions),
        rewards=np.asarray(rewards, dtype=np.float32),
        terminated=bool(terminated),
        truncated=bool(truncated),
        meta=meta,
    )


def _progress_bar(total: int, desc: str) -> Any:
    from esper_lib.progress import progress_bar

    return progress_bar(total=total, desc=desc, unit="step")


def _check_observation(obs: Any) -> None:
    if not isinstance(obs, dict) or any(k not in obs for k in ("state", "blueprint_indices", "action_mask")):
        got = sorted(obs) if isinstance(obs, dict) else type(obs).__name__
        raise ValueError(
            f"env observations must be dicts with 'state', 'blueprint_indices' and 'action_mask' "
            f"(esper_lib.envs.spaces.observation_space), got {got}"
        )


def _describe_env(env: Any) -> str:
    spec = getattr(env, "spec", None)
    return getattr(spec, "id", None) or type(getattr(env, "unwrapped", env)).__name__


# --- policy / trajectory compatibility ----------------------------------------------------------


def check_compatible(policy: FactoredRecurrentActorCritic, trajectory: Trajectory) -> None:
    """Raise ValueError when the policy's input sizes differ from the trajectory's (e.g. a checkpoint for another env)."""
    if not isinstance(policy, FactoredRecurrentActorCritic):
        raise TypeError(f"policy must be a FactoredRecurrentActorCritic, got {type(policy).__name__}")
    if not isinstance(trajectory, Trajectory):
        raise TypeError(f"trajectory must be a Trajectory, got {type(trajectory).__name__}")
    diffs = []
    if policy.state_dim != trajectory.state_dim:
        diffs.append(f"state_dim: policy {policy.state_dim} vs trajectory {trajectory.state_dim}")
    if policy.num_slots != trajectory.num_slots:
        diffs.append(f"num_slots: policy {policy.num_slots} vs trajectory {trajectory.num_slots}")
    if diffs:
        raise ValueError(f"policy does not fit this environment's observations ({'; '.join(diffs)})")


def apply_normalizer(obs_normalizer: ObsNormalizer | None, states: torch.Tensor) -> torch.Tensor:
    """Normalise raw ``states [..., D]`` with ``obs_normalizer`` (None = unchanged).

    Accepts an object with a ``normalize`` / ``normalise`` method, or a plain callable, taking and
    returning a ``[..., D]`` tensor (or array). The result must keep the shape.
    """
    if obs_normalizer is None:
        return states
    fn = getattr(obs_normalizer, "normalize", None) or getattr(obs_normalizer, "normalise", None)
    if fn is None:
        if not callable(obs_normalizer):
            raise TypeError(
                f"obs_normalizer must be callable or have a normalize() method, got {type(obs_normalizer).__name__}"
            )
        fn = obs_normalizer
    out = torch.as_tensor(fn(states), dtype=states.dtype, device=states.device)
    if out.shape != states.shape:
        raise ValueError(f"obs_normalizer changed the state shape from {tuple(states.shape)} to {tuple(out.shape)}")
    return out


def resolve_normalizer(policy: FactoredRecurrentActorCritic, obs_normalizer: ObsNormalizer | None | bool) -> ObsNormalizer | None:
    """The normaliser to use: ``obs_normalizer`` if given; None -> the one a trainer attached as
    ``policy.obs_normalizer`` (if any, as ``esper_lib.ppo.PolicyController`` does); False -> none."""
    if obs_normalizer is False:
        return None
    if obs_normalizer is None:
        return getattr(policy, "obs_normalizer", None)
    return obs_normalizer


def _policy_device(policy: FactoredRecurrentActorCritic) -> torch.device:
    return next(policy.parameters()).device


def _network_inputs(
    policy: FactoredRecurrentActorCritic, trajectory: Trajectory, obs_normalizer: ObsNormalizer | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``([1, T, D] normalised states, [1, T, S] blueprint indices, [1, T, NUM_OPS] bool op mask)``."""
    device = _policy_device(policy)
    dtype = next(policy.parameters()).dtype
    states = torch.as_tensor(trajectory.states, device=device, dtype=dtype)
    states = apply_normalizer(resolve_normalizer(policy, obs_normalizer), states).unsqueeze(0)
    bps = torch.as_tensor(trajectory.blueprint_indices, device=device).unsqueeze(0)
    op_mask = torch.as_tensor(trajectory.masks["op"], device=device).unsqueeze(0)
    return states, bps, op_mask


# --- the landscape ------------------------------------------------------------------------------

LANDSCAPE_COLUMNS: tuple[str, ...] = (
    "step", "op", "op_index", "q", "pi", "valid", "V", "spread", "taken", "reward",
)


def _summaries(q: torch.Tensor, pi: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``V = sum_o pi Q`` and ``spread = max - min of Q over valid ops`` for ``[..., NUM_OPS]`` inputs -> ``[...]``."""
    v = (pi * q).sum(dim=-1)
    hi = q.masked_fill(~valid, -math.inf).amax(dim=-1)
    lo = q.masked_fill(~valid, math.inf).amin(dim=-1)
    return v, hi - lo


def landscape_frame(
    policy: FactoredRecurrentActorCritic, trajectory: Trajectory, obs_normalizer: ObsNormalizer | None | bool = None
) -> pd.DataFrame:
    """Q(s, op) for all six ops along ``trajectory``, one row per (step, op).

    The LSTM runs once over the whole ``[1, T, D]`` sequence from a zero hidden state (the state a
    controller starts an episode with); ``policy.q_values`` gives Q and pi(op | s) with the op mask.
    Raw states are normalised first (``resolve_normalizer``: None uses ``policy.obs_normalizer``
    when a trainer attached one, False uses none).

    Columns: ``step`` (int), ``op`` (ordered categorical of op names), ``op_index``, ``q`` = Q(s, op),
    ``pi`` = pi(op | s) (0 on masked ops), ``valid`` (op mask), ``V`` = sum_o pi(o|s) Q(s, o) and
    ``spread`` = max - min of Q over the valid ops (both per step, repeated on its six rows),
    ``taken`` (the op the controller chose) and ``reward`` (received after the step's action).
    """
    check_compatible(policy, trajectory)
    states, bps, op_mask = _network_inputs(policy, trajectory, obs_normalizer)
    q, pi, _ = policy.q_values(states, bps, hidden=None, action_mask={"op": op_mask})
    q, pi, valid = q[0].float().cpu(), pi[0].float().cpu(), op_mask[0].cpu()  # [T, NUM_OPS]
    t = len(trajectory)
    columns = _op_columns(q, pi, valid)
    return pd.DataFrame(
        {
            "step": np.repeat(np.arange(t), NUM_OPS),
            **columns,
            "taken": columns["op_index"] == np.repeat(trajectory.ops, NUM_OPS),
            "reward": np.repeat(trajectory.rewards, NUM_OPS),
        }
    )


def _op_columns(q: torch.Tensor, pi: torch.Tensor, valid: torch.Tensor) -> dict[str, Any]:
    """Long-format columns for ``[N, NUM_OPS]`` Q, pi and op mask: op, op_index, q, pi, valid, V, spread (N * 6 rows)."""
    v, spread = _summaries(q, pi, valid)
    op_index = np.tile(np.arange(NUM_OPS), q.shape[0])
    return {
        "op": pd.Categorical.from_codes(op_index, categories=list(OP_NAMES), ordered=True),
        "op_index": op_index,
        "q": q.numpy().reshape(-1),
        "pi": pi.numpy().reshape(-1),
        "valid": valid.numpy().reshape(-1),
        "V": np.repeat(v.numpy(), NUM_OPS),
        "spread": np.repeat(spread.numpy(), NUM_OPS),
    }


def step_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per step: V, spread, reward, the op taken and the greedy op by Q among valid ops."""
    require_columns(frame, LANDSCAPE_COLUMNS, "frame")
    per_step = frame.groupby("step", sort=True)
    out = per_step[["V", "spread", "reward"]].first()
    out["taken_op"] = frame[frame["taken"]].set_index("step")["op"].astype(str)
    valid_q = frame.assign(q=frame["q"].where(frame["valid"], -np.inf))
    out["argmax_q_op"] = valid_q.loc[valid_q.groupby("step")["q"].idxmax(), ["step", "op"]].set_index("step")["op"].astype(str)
    return out.reset_index()


def wide(frame: pd.DataFrame, column: str = "q") -> pd.DataFrame:
    """``column`` as a step x op table (index step, one column per op name, in op order)."""
    require_columns(frame, ("step", "op", column), "frame")
    table = frame.pivot(index="step", columns="op", values=column)
    return table.reindex(columns=list(OP_NAMES))


def require_columns(frame: pd.DataFrame, columns: Sequence[str], arg: str) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{arg} must be a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{arg} lacks columns {missing}; build it with landscape_frame() / feature_sweep()")


# --- feature sweep ------------------------------------------------------------------------------


def sweep_values(
    low: float, high: float, num: int = 21, bound: float = FEATURE_BOUND, *, names: tuple[str, str, str] = ("low", "high", "num")
) -> np.ndarray:
    """``num`` evenly spaced values in ``[low, high]``; a ValueError names the bad argument.

    Observations live in ``[-bound, bound]`` (``esper_lib.observation.FEATURE_BOUND``), so the
    range must stay inside it. ``names`` are the argument names used in error messages (a widget
    or a notebook passes the names its user sees).
    """
    low_name, high_name, num_name = names
    for name, x in ((low_name, low), (high_name, high)):
        if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)) or not math.isfinite(float(x)):
            raise ValueError(f"sweep range: {name} must be a finite number, got {x!r}")
        if abs(float(x)) > bound:
            raise ValueError(f"sweep range: {name} = {x} lies outside the observation bounds [-{bound}, {bound}]")
    if not float(low) < float(high):
        raise ValueError(f"sweep range: {low_name} ({low}) must be smaller than {high_name} ({high})")
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 2:
        raise ValueError(f"sweep range: {num_name} must be an int >= 2, got {num!r}")
    return np.linspace(float(low), float(high), int(num))


def recorded_range(
    trajectory: Trajectory, feature_name: str, margin: float = 0.1, min_width: float = 0.2, bound: float = FEATURE_BOUND
) -> tuple[float, float]:
    """The range ``feature_name`` takes over ``trajectory``, widened by ``margin`` of its width on each side.

    Features whose layout marks -1 as "not measured yet" (``esper_lib.observation``: "-1 before ...",
    "-1 without ...", "-1 never") ignore the -1 entries when the episode has real values, so an
    accuracy is swept over accuracies and not down to the flag. A feature that stays constant (or nearly) gets a range of ``min_width`` centred on its value, so a
    sweep still shows the neighbourhood. The result is clipped to the observation bounds. This is the
    default sweep range: sweeping a feature far outside the values it takes (an accuracy at -1) asks
    the critic about states it can never see.
    """
    index = resolve_feature(feature_name, trajectory.num_slots, trajectory.state_dim)
    column = trajectory.states[:, index].astype(np.float64)
    if _has_unobserved_sentinel(feature_name, trajectory.num_slots) and (column != -1.0).any():
        column = column[column != -1.0]  # "-1 = not measured yet" is a flag, not a value to sweep to
    low, high = float(column.min()), float(column.max())
    pad = max(margin * (high - low), (min_width - (high - low)) / 2, 0.0)
    low, high = max(low - pad, -bound), min(high + pad, bound)
    if not low < high:  # pinned at a bound
        low, high = (high - min_width, high) if high >= bound else (low, low + min_width)
    return round(low, 6), round(high, 6)


def _has_unobserved_sentinel(feature_name: str, num_slots: int) -> bool:
    for feature in observation_layout(num_slots):
        if feature.name == feature_name:
            return any(marker in feature.normalisation for marker in ("-1 before", "-1 without", "-1 never"))
    return False


def resolve_feature(feature_name: str, num_slots: int, state_dim: int) -> int:
    """Index of ``feature_name`` in the observation layout for ``num_slots`` slots (ValueError if unknown)."""
    if state_dim != state_dim_for(num_slots):
        raise ValueError(
            f"the named observation layout covers state_dim {state_dim_for(num_slots)} for {num_slots} slots; "
            f"this trajectory has state_dim {state_dim}, so features cannot be swept by name"
        )
    if not isinstance(feature_name, str):
        raise TypeError(f"feature_name must be a str (see esper_lib.observation.feature_names()), got {type(feature_name).__name__}")
    try:
        return feature_index(feature_name, num_slots)
    except KeyError:
        close = [n for n in feature_names(num_slots) if feature_name.split(".")[-1] in n][:5]
        hint = f"; did you mean one of {close}?" if close else ""
        raise ValueError(f"feature_name {feature_name!r} is not in the observation layout{hint}") from None


def sweep_states(trajectory: Trajectory, step: int, feature_name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    """``[N, D]`` raw states: the state at ``step`` with ``feature_name`` set to each of the N ``values``."""
    step = _check_step(trajectory, step)
    index = resolve_feature(feature_name, trajectory.num_slots, trajectory.state_dim)
    values = _check_values(values)
    states = np.repeat(trajectory.states[step][None, :], len(values), axis=0)
    states[:, index] = values
    return states


def hidden_at(
    policy: FactoredRecurrentActorCritic, trajectory: Trajectory, step: int, obs_normalizer: ObsNormalizer | None | bool = None
) -> Hidden:
    """LSTM state ``([1, 1, H], [1, 1, H])`` carried into ``step`` (after steps ``0..step-1``; zeros at step 0)."""
    step = _check_step(trajectory, step)
    check_compatible(policy, trajectory)
    if step == 0:
        return policy.initial_hidden(1)
    states, bps, _ = _network_inputs(policy, trajectory, obs_normalizer)
    _, _, hidden = policy.q_values(states[:, :step], bps[:, :step], hidden=None)
    return hidden


def feature_sweep(
    policy: FactoredRecurrentActorCritic,
    trajectory: Trajectory,
    step: int,
    feature_name: str,
    values: Sequence[float] | np.ndarray,
    obs_normalizer: ObsNormalizer | None | bool = None,
) -> pd.DataFrame:
    """Q(s, op) per op while one named feature of the state at ``step`` takes each of ``values``.

    Everything else is held: the rest of the observation, the blueprint indices, the op mask and the
    LSTM state carried to ``step`` (``hidden_at``). The N variants run as one batch ``[N, 1, D]``.

    Returns one row per (value, op): ``feature``, ``step``, ``value`` (raw, environment units),
    ``observed`` (the feature's recorded value at that step), ``op``, ``op_index``, ``q``, ``pi``,
    ``valid``, ``V`` and ``spread`` (per value).
    """
    states_np = sweep_states(trajectory, step, feature_name, values)
    values = states_np[:, resolve_feature(feature_name, trajectory.num_slots, trajectory.state_dim)]
    n = states_np.shape[0]
    hidden = hidden_at(policy, trajectory, step, obs_normalizer)
    device, dtype = _policy_device(policy), next(policy.parameters()).dtype
    normalizer = resolve_normalizer(policy, obs_normalizer)
    states = apply_normalizer(normalizer, torch.as_tensor(states_np, device=device, dtype=dtype)).unsqueeze(1)
    bps = torch.as_tensor(trajectory.blueprint_indices[step], device=device).expand(n, 1, -1).contiguous()
    op_mask = torch.as_tensor(trajectory.masks["op"][step], device=device).expand(n, 1, -1).contiguous()
    hidden = (hidden[0].expand(-1, n, -1).contiguous(), hidden[1].expand(-1, n, -1).contiguous())
    q, pi, _ = policy.q_values(states, bps, hidden=hidden, action_mask={"op": op_mask})
    q, pi, valid = q[:, 0].float().cpu(), pi[:, 0].float().cpu(), op_mask[:, 0].cpu()  # [N, NUM_OPS]
    observed = float(trajectory.states[int(step), resolve_feature(feature_name, trajectory.num_slots, trajectory.state_dim)])
    return pd.DataFrame(
        {
            "feature": feature_name,
            "step": int(step),
            "value": np.repeat(values.astype(np.float64), NUM_OPS),
            "observed": observed,
            **_op_columns(q, pi, valid),
        }
    )


def _check_step(trajectory: Trajectory, step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if not 0 <= step < len(trajectory):
        raise ValueError(f"step must lie in [0, {len(trajectory) - 1}] for this trajectory of {len(trajectory)} steps, got {step}")
    return int(step)


def _check_values(values: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence of numbers, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("values must all be finite")
    return arr


__all__ = [
    "OP_NAMES",
    "Controller",
    "Trajectory",
    "record_trajectory",
    "check_compatible",
    "apply_normalizer",
    "resolve_normalizer",
    "landscape_frame",
    "step_table",
    "wide",
    "sweep_values",
    "recorded_range",
    "resolve_feature",
    "sweep_states",
    "hidden_at",
    "feature_sweep",
    "LANDSCAPE_COLUMNS",
]
