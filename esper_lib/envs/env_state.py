"""Capture and restore one env's full state, so a PPO checkpoint resumes an episode bit for bit.

An env opts in with ``get_state()`` / ``set_state(state)`` on its unwrapped core (the probes do).
Wrappers keep state of their own; the one that matters for resumption is the step counter of
``TimeLimit``-like wrappers (``_elapsed_steps``), which is captured per wrapper layer.

The captured state of one env is ``{"env": unwrapped.get_state(), "wrappers": [elapsed steps or
None, one per wrapper layer, outermost first]}``. The trainer stores a list of these (one per
sub-env); vector envs whose sub-envs live elsewhere (``RayVectorEnv``) run these functions where
the envs are.
"""
from __future__ import annotations

from typing import Any

import gymnasium as gym


def supports_env_state(env: gym.Env) -> bool:
    """Whether ``env``'s unwrapped core has callable ``get_state`` and ``set_state``."""
    core = env.unwrapped
    return callable(getattr(core, "get_state", None)) and callable(getattr(core, "set_state", None))


def capture_env_state(env: gym.Env) -> dict[str, Any]:
    """``{"env": unwrapped.get_state(), "wrappers": [...]}`` (see the module docstring)."""
    wrappers: list[int | None] = []
    layer: Any = env
    while isinstance(layer, gym.Wrapper):
        wrappers.append(getattr(layer, "_elapsed_steps", None))
        layer = layer.env
    return {"env": env.unwrapped.get_state(), "wrappers": wrappers}


def restore_env_state(env: gym.Env, state: dict[str, Any]) -> None:
    """Inverse of ``capture_env_state`` (the wrapper stack must be the same)."""
    env.unwrapped.set_state(state["env"])
    layer: Any = env
    for elapsed in state["wrappers"]:
        if not isinstance(layer, gym.Wrapper):
            raise ValueError(f"env state has {len(state['wrappers'])} wrapper layers; this env has fewer")
        if elapsed is not None and hasattr(layer, "_elapsed_steps"):
            layer._elapsed_steps = elapsed
        layer = layer.env
