"""Saving and loading policies (and, for training, optimizer, normaliser and config) by path.

A checkpoint is a ``torch.save`` dict with a ``schema_version``; loading a file of another schema,
of another network size, or a corrupt file raises a ``ValueError`` that says which.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from esper_lib.network import FactoredRecurrentActorCritic

SCHEMA_VERSION = 1
_REQUIRED_KEYS = ("schema_version", "model_kwargs", "model_state")


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` returns: the rebuilt model plus whatever training state was saved."""

    model: FactoredRecurrentActorCritic
    optimizer_state: dict[str, Any] | None = None
    obs_normalizer_state: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def save_checkpoint(
    path: str | os.PathLike,
    model: FactoredRecurrentActorCritic,
    *,
    optimizer_state: dict[str, Any] | None = None,
    obs_normalizer_state: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint to ``path`` (parent folders are created); returns the path."""
    if not isinstance(model, FactoredRecurrentActorCritic):
        raise TypeError(f"model must be a FactoredRecurrentActorCritic, got {type(model).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "schema_version": SCHEMA_VERSION,
        "model_kwargs": model.constructor_kwargs(),
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer_state": optimizer_state,
        "obs_normalizer_state": obs_normalizer_state,
        "config": config,
        "extra": extra or {},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint
    return path


def read_payload(path: str | os.PathLike) -> dict[str, Any]:
    """The raw checkpoint dict, validated for schema; raises FileNotFoundError / ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise ValueError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or any(k not in payload for k in _REQUIRED_KEYS):
        raise ValueError(f"{path} is not an esper_lib checkpoint (expected keys {_REQUIRED_KEYS})")
    if payload["schema_version"] != SCHEMA_VERSION:
        raise ValueError(
            f"{path} has checkpoint schema {payload['schema_version']!r}; this esper_lib reads schema {SCHEMA_VERSION}"
        )
    return payload


def load_checkpoint(
    path: str | os.PathLike, expect: FactoredRecurrentActorCritic | dict[str, Any] | None = None
) -> Checkpoint:
    """Rebuild the model saved at ``path``.

    ``expect`` (a model or its ``constructor_kwargs()``): raise ValueError naming each size that
    differs, instead of loading a network of another shape.
    """
    payload = read_payload(path)
    kwargs = dict(payload["model_kwargs"])
    if expect is not None:
        want = expect.constructor_kwargs() if isinstance(expect, FactoredRecurrentActorCritic) else dict(expect)
        diffs = [f"{k}: checkpoint {kwargs.get(k)!r} vs expected {v!r}" for k, v in want.items() if kwargs.get(k) != v]
        if diffs:
            raise ValueError(f"{path} holds a network of another size ({'; '.join(diffs)})")
    model = FactoredRecurrentActorCritic(**kwargs)
    try:
        model.load_state_dict(payload["model_state"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: model weights do not fit the stored network sizes ({exc})") from exc
    return Checkpoint(
        model=model,
        optimizer_state=payload.get("optimizer_state"),
        obs_normalizer_state=payload.get("obs_normalizer_state"),
        config=payload.get("config"),
        extra=payload.get("extra") or {},
        path=Path(path),
    )


def load_policy(path: str | os.PathLike) -> FactoredRecurrentActorCritic:
    """Just the model of a checkpoint, in eval mode."""
    return load_checkpoint(path).model.eval()
