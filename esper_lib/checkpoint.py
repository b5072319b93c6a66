"""Saving and loading policies (and, for training, optimizer, normaliser and config) by path.

A checkpoint is a ``torch.save`` dict with a ``schema_version``; loading a file of another schema,
of another network size, or a corrupt file raises a ``ValueError`` that names the file and says which.

Integrity (schema 2): ``digest`` is the sha256 of every tensor in the payload (model, optimizer,
normaliser, trainer state), walked in a fixed order (dict insertion order, list order), each
contributing its key path, dtype, shape and raw bytes. ``torch.save`` does not protect tensor bytes
(a flipped byte in a weight loads silently), so ``read_payload`` recomputes the digest and raises
on a mismatch. Schema 1 files (written before the digest) still load, unverified. On load, model
weights and normaliser statistics must be finite, and ``model_kwargs`` must be the network's
constructor sizes (positive ints). A save writes a temporary file next to the target and renames it
(atomic); a save that fails removes the temporary file.
"""
from __future__ import annotations

import hashlib
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from esper_lib.network import FactoredRecurrentActorCritic

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # 1: no digest (read unverified)
_REQUIRED_KEYS = ("schema_version", "model_kwargs", "model_state")
_MODEL_KWARGS = tuple(n for n in inspect.signature(FactoredRecurrentActorCritic.__init__).parameters if n not in ("self", "validate_inputs"))


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
    payload["digest"] = payload_digest(payload)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint
    except BaseException:
        tmp.unlink(missing_ok=True)  # an unpicklable object or a full disk leaves nothing behind
        raise
    return path


def payload_digest(payload: dict[str, Any]) -> str:
    """sha256 (hex) over every tensor in ``payload`` but its ``digest`` key: key path, dtype, shape, bytes."""
    h = hashlib.sha256()
    _hash_tensors(h, "", {k: v for k, v in payload.items() if k != "digest"})
    return h.hexdigest()


def _hash_tensors(h: "hashlib._Hash", key: str, value: Any) -> None:
    if torch.is_tensor(value):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}|{t.dtype}|{tuple(value.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    elif isinstance(value, dict):
        for k, v in value.items():
            _hash_tensors(h, f"{key}/{k}", v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _hash_tensors(h, f"{key}[{i}]", v)


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
    schema = payload["schema_version"]
    if schema not in READABLE_SCHEMAS:
        raise ValueError(f"{path} has checkpoint schema {schema!r}; this esper_lib reads schemas {READABLE_SCHEMAS}")
    if schema >= 2:
        if not isinstance(payload.get("digest"), str):
            raise ValueError(f"{path} is corrupt: a schema {schema} checkpoint must hold its sha256 digest")
        if payload_digest(payload) != payload["digest"]:
            raise ValueError(f"{path} is corrupt: the sha256 digest of its tensors does not match the one written on save")
    return payload


def load_checkpoint(
    path: str | os.PathLike, expect: FactoredRecurrentActorCritic | dict[str, Any] | None = None
) -> Checkpoint:
    """Rebuild the model saved at ``path``.

    ``expect`` (a model or its ``constructor_kwargs()``): raise ValueError naming each size that
    differs, instead of loading a network of another shape.
    """
    payload = read_payload(path)
    kwargs = _checked_model_kwargs(path, payload["model_kwargs"])
    _check_finite_tensors(path, "model_state", payload["model_state"])
    norm = payload.get("obs_normalizer_state")
    if isinstance(norm, dict):
        _check_finite_tensors(path, "obs_normalizer_state", {k: v for k, v in norm.items() if torch.is_tensor(v)})
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


def _checked_model_kwargs(path: str | os.PathLike, kwargs: Any) -> dict[str, int]:
    """``model_kwargs`` as stored, checked: known constructor sizes, each a positive int (ValueError naming the key)."""
    if not isinstance(kwargs, dict):
        raise ValueError(f"{path}: model_kwargs must be a dict of network sizes, got {type(kwargs).__name__}")
    for key, value in kwargs.items():
        if key not in _MODEL_KWARGS:
            raise ValueError(f"{path}: model_kwargs has unknown key {key!r}; expected keys from {_MODEL_KWARGS}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{path}: model_kwargs[{key!r}] must be a positive int, got {value!r}")
    return dict(kwargs)


def _check_finite_tensors(path: str | os.PathLike, what: str, tensors: Any) -> None:
    if not isinstance(tensors, dict):
        raise ValueError(f"{path}: {what} must be a dict of tensors, got {type(tensors).__name__}")
    for key, t in tensors.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: {what}[{key!r}] holds a non-finite value (NaN or inf); refusing to load it")


def load_policy(path: str | os.PathLike) -> FactoredRecurrentActorCritic:
    """Just the model of a checkpoint, in eval mode."""
    return load_checkpoint(path).model.eval()
