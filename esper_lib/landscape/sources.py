"""Where the landscape's inputs come from: the model (checkpoint or fresh), the env and the controller.

Resolved by name so a notebook parameter or a widget dropdown can pick them:

- ``load_model(path, fresh_if_missing=...)``: a checkpoint (with its observation normaliser when
  the PPO package can rebuild one), or a fresh network when the file is missing and allowed.
- ``make_env(name, max_epochs=..., **env_kwargs)``: ``"morpho"`` (the morphogenetic env; short
  episodes and ``batches_per_epoch`` keep it fast) or ``"probe:<name>"`` (a PPO probe env). Any
  other Gymnasium env with the Tamiyo spaces can be used by passing a factory to the explorer.
- ``controller_factories()`` / ``make_controller(name, context)``: ``"policy"`` (samples from the
  network, ``esper_lib.ppo.PolicyController`` seeded with the env seed), ``"policy_greedy"``
  (argmax), and the baselines ``"random"``, ``"heuristic"``, ``"wait"`` (``esper_lib.evaluation.baselines``).

The team's modules (``esper_lib.envs.morpho``, ``esper_lib.evaluation.baselines``, ``esper_lib.ppo``) are
imported lazily, so this module imports even where one of them is missing; asking for something
that needs a missing module raises a ValueError that says which.
"""
from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import torch

from esper_lib.checkpoint import load_checkpoint
from esper_lib.landscape.core import Controller, resolve_normalizer, sweep_values
from esper_lib.network import FactoredRecurrentActorCritic
from esper_lib.observation import FEATURE_BOUND, feature_names

DEFAULT_CHECKPOINT = "artefacts/01_build_v2_model/tamiyo_v2.pt"
ENV_NAMES: tuple[str, ...] = ("morpho",)
# Cheap host "epochs" (8 minibatches each) for interactive use; a full pass is ~8x slower per step.
QUICK_ENV_KWARGS: dict[str, Any] = {"batches_per_epoch": 8}
CONTROLLER_NAMES: tuple[str, ...] = ("policy", "policy_greedy", "random", "heuristic", "wait")


# --- model -------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A policy to inspect and how it was obtained."""

    policy: FactoredRecurrentActorCritic
    obs_normalizer: Any | None
    source: str  # "checkpoint" or "fresh"
    message: str  # one sentence for the reader
    label: str = ""  # short name of the model for figure titles: fresh or trained, path, PPO updates
    updates: int | None = None  # PPO updates behind the weights (None: not recorded in the checkpoint)


def load_model(
    checkpoint_path: str | os.PathLike | None,
    *,
    fresh_if_missing: bool = False,
    fresh_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Load the policy at ``checkpoint_path``; a missing file builds a fresh network if allowed.

    Raises FileNotFoundError (missing and not ``fresh_if_missing``) or ValueError (corrupt file,
    another schema, weights of another size), with the path in the message.
    """
    path = Path(checkpoint_path) if checkpoint_path not in (None, "") else None
    if path is None or not path.is_file():
        if not fresh_if_missing:
            raise FileNotFoundError(f"checkpoint not found: {checkpoint_path!r}")
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(seed)
            policy = FactoredRecurrentActorCritic(**(fresh_kwargs or {})).eval()
        where = f"{checkpoint_path} does not exist" if path is not None else "no checkpoint path given"
        label = f"FRESH untrained network (seed {seed}; {where})"
        return LoadedModel(policy, None, "fresh", f"{where}: inspecting a FRESH, untrained network (seed {seed}).", label, 0)
    ckpt = load_checkpoint(path)
    policy = ckpt.model.eval()
    normalizer, note = normalizer_from_checkpoint(ckpt)
    updates = checkpoint_updates(ckpt)
    label = model_label(path, updates)
    return LoadedModel(policy, normalizer, "checkpoint", f"loaded {path}; {label}; {note}", label, updates)


def checkpoint_updates(ckpt: Any) -> int | None:
    """PPO updates behind a checkpoint: the ``update_index`` ``PPOTrainer.save`` stores, else None."""
    ppo = ckpt.extra.get("ppo") if isinstance(getattr(ckpt, "extra", None), dict) else None
    if isinstance(ppo, dict) and isinstance(ppo.get("update_index"), int):
        return int(ppo["update_index"])
    return None


def model_label(path: str | os.PathLike, updates: int | None) -> str:
    """One line naming a checkpoint for titles: trained (with its PPO updates) or untrained, and its path."""
    from esper_lib.notebooks.helpers import display_path

    shown = display_path(path)
    if updates is None:
        return f"untrained checkpoint {shown} (no PPO training state)"
    if updates == 0:
        return f"checkpoint {shown} (0 PPO updates: untrained)"
    return f"TRAINED checkpoint {shown} ({updates} PPO update{'s' if updates != 1 else ''})"


def normalizer_from_checkpoint(ckpt: Any) -> tuple[Any | None, str]:
    """The checkpoint's observation normaliser, rebuilt by ``esper_lib.ppo.RunningObsNormalizer``.

    Returns ``(normalizer or None, note)``; the note says whether states are normalised. A stored
    state the loader rejects raises its ValueError. (``esper_lib.ppo.load_trained`` does the same
    but also insists on a PPO config, which notebook 01's checkpoint does not carry.)
    """
    state = getattr(ckpt, "obs_normalizer_state", None)
    if not state:
        return None, "no observation normaliser stored: raw observations go to the network."
    cls = _team_module("esper_lib.ppo", "the checkpoint's observation normaliser").RunningObsNormalizer
    return cls.from_state_dict(state), f"observation normaliser applied ({cls.__name__}, {state.get('count', 0):.0f} observations)."


# --- envs --------------------------------------------------------------------------------------


def make_env(name: str = "morpho", *, max_epochs: int = 12, **kwargs: Any) -> gym.Env:
    """A fresh env by name: ``"morpho"`` (episodes of ``max_epochs`` host epochs, ``kwargs`` go to
    ``make_morpho_env``) or ``"probe:<probe>"`` (``esper_lib.envs.probes.make_probe``; the probe
    fixes its own episode length, ``max_epochs`` is ignored)."""
    check_env_name(name)
    if name == "morpho":
        morpho = _team_module("esper_lib.envs.morpho", "env 'morpho'")
        return morpho.make_morpho_env(max_epochs=max_epochs, **kwargs)
    probes = _team_module("esper_lib.envs.probes", f"env {name!r}")
    return probes.make_probe(name.split(":", 1)[1], **kwargs)


def check_env_name(name: str) -> str:
    """Return ``name`` if ``make_env`` knows it, else ValueError naming the choices."""
    if name in ENV_NAMES:
        return name
    if isinstance(name, str) and name.startswith("probe:"):
        probes = _team_module("esper_lib.envs.probes", f"env {name!r}")
        if name.split(":", 1)[1] in probes.PROBES:
            return name
    choices = list(ENV_NAMES) + [f"probe:{p}" for p in _probe_names()]
    raise ValueError(f"env must be one of {choices}, got {name!r}")


def _probe_names() -> list[str]:
    try:
        return sorted(importlib.import_module("esper_lib.envs.probes").PROBES)
    except (ImportError, AttributeError):
        return []


def _team_module(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"{what} needs {module}, which cannot be imported ({exc})") from exc


def env_factory(name: str = "morpho", *, max_epochs: int = 12, **kwargs: Any) -> Callable[[], gym.Env]:
    """A zero-argument factory for ``make_env(name, ...)`` (what the explorer takes); checks the name now."""
    check_env_name(name)
    return lambda: make_env(name, max_epochs=max_epochs, **kwargs)


# --- controllers -------------------------------------------------------------------------------


@dataclass
class ControllerContext:
    """What a controller factory may use to build a controller for one recording."""

    env: gym.Env
    policy: FactoredRecurrentActorCritic
    obs_normalizer: Any | None
    seed: int


ControllerFactory = Callable[[ControllerContext], Controller]


def _policy_controller(deterministic: bool) -> ControllerFactory:
    def build(ctx: ControllerContext) -> Controller:
        cls = _team_module("esper_lib.ppo", "controller 'policy'").PolicyController
        # The same normaliser as the landscape uses (False, not None, when there is none).
        normalizer = resolve_normalizer(ctx.policy, ctx.obs_normalizer)
        return cls(ctx.policy, normalizer if normalizer is not None else False, deterministic, seed=ctx.seed)

    return build


def _baselines() -> Any:
    return _team_module("esper_lib.evaluation.baselines", "the baseline controllers")


def _random(ctx: ControllerContext) -> Controller:
    return _baselines().RandomMaskedController(seed=ctx.seed)


def _heuristic(ctx: ControllerContext) -> Controller:
    return _baselines().HeuristicController(num_slots=int(ctx.env.observation_space["blueprint_indices"].shape[0]))


def _wait(ctx: ControllerContext) -> Controller:
    return _baselines().AlwaysWaitController()


def controller_factories() -> dict[str, ControllerFactory]:
    """Factories for ``CONTROLLER_NAMES`` (the baselines are only looked up when built)."""
    return {
        "policy": _policy_controller(deterministic=False),
        "policy_greedy": _policy_controller(deterministic=True),
        "random": _random,
        "heuristic": _heuristic,
        "wait": _wait,
    }


def check_controller_name(name: str, factories: dict[str, ControllerFactory] | None = None) -> str:
    """Return ``name`` if it is a known controller, else ValueError naming the parameter."""
    names = tuple(factories or controller_factories())
    if name not in names:
        raise ValueError(f"controller must be one of {names}, got {name!r}")
    return name


def make_controller(name: str, context: ControllerContext, factories: dict[str, ControllerFactory] | None = None) -> Controller:
    """Build the controller called ``name`` for ``context``."""
    factories = factories or controller_factories()
    check_controller_name(name, factories)
    return factories[name](context)


def check_notebook_parameters(
    *,
    env_name: str,
    controller: str,
    seed: int,
    max_epochs: int,
    batches_per_epoch: int,
    sweep_feature: str,
    sweep_low: float | None,
    sweep_high: float | None,
    sweep_points: int,
    sweep_step: int,
) -> None:
    """Validate notebook 03's parameters; each ValueError names the offending parameter."""
    try:
        check_env_name(env_name)
    except ValueError as exc:
        raise ValueError(f"parameter env_name: {exc}") from None
    if controller not in CONTROLLER_NAMES:
        raise ValueError(f"parameter controller must be one of {CONTROLLER_NAMES}, got {controller!r}")
    checks = (("seed", seed, 0), ("max_epochs", max_epochs, 1), ("batches_per_epoch", batches_per_epoch, 0), ("sweep_step", sweep_step, -1))
    for name, value, low in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"parameter {name} must be an int >= {low}, got {value!r}")
    if sweep_feature not in feature_names():
        raise ValueError(f"parameter sweep_feature must be a name of esper_lib.observation.feature_names(), got {sweep_feature!r}")
    # None: that end comes from the recorded episode (landscape.recorded_range); check what is given now.
    names = ("sweep_low", "sweep_high", "sweep_points")
    if sweep_low is not None and sweep_high is not None:
        sweep_values(sweep_low, sweep_high, sweep_points, names=names)
        return
    for name, value in (("sweep_low", sweep_low), ("sweep_high", sweep_high)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise ValueError(f"sweep range: {name} must be a finite number or None, got {value!r}")
        if abs(float(value)) > FEATURE_BOUND:
            raise ValueError(f"sweep range: {name} = {value} lies outside the observation bounds [-{FEATURE_BOUND}, {FEATURE_BOUND}]")
    sweep_values(-1.0, 1.0, sweep_points, names=names)  # checks sweep_points


__all__ = [
    "check_notebook_parameters",
    "DEFAULT_CHECKPOINT",
    "ENV_NAMES",
    "CONTROLLER_NAMES",
    "QUICK_ENV_KWARGS",
    "LoadedModel",
    "load_model",
    "normalizer_from_checkpoint",
    "checkpoint_updates",
    "model_label",
    "make_env",
    "env_factory",
    "check_env_name",
    "ControllerContext",
    "ControllerFactory",
    "controller_factories",
    "check_controller_name",
    "make_controller",
]
