"""Checkpoint save/load round trip and its error messages."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from esper_lib.checkpoint import SCHEMA_VERSION, load_checkpoint, load_policy, read_payload, save_checkpoint
from esper_lib.network import FactoredRecurrentActorCritic


def test_round_trip_gives_identical_outputs(tmp_path: Path, small_net: FactoredRecurrentActorCritic) -> None:
    path = save_checkpoint(tmp_path / "sub" / "m.pt", small_net, config={"lr": 1e-3}, extra={"note": "x"})
    ckpt = load_checkpoint(path, expect=small_net)
    state, bp = torch.randn(2, 3, 121), torch.randint(-1, 13, (2, 3, 3))
    assert torch.equal(small_net.q_values(state, bp)[0], ckpt.model.q_values(state, bp)[0])
    assert ckpt.config == {"lr": 1e-3} and ckpt.extra == {"note": "x"}
    assert not load_policy(path).training


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_corrupt_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(bad)


def test_foreign_dict_and_other_schema(tmp_path: Path, small_net: FactoredRecurrentActorCritic) -> None:
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    with pytest.raises(ValueError, match="not an esper_lib checkpoint"):
        load_checkpoint(foreign)
    path = save_checkpoint(tmp_path / "m.pt", small_net)
    payload = read_payload(path)
    payload["schema_version"] = SCHEMA_VERSION + 1
    torch.save(payload, path)
    with pytest.raises(ValueError, match=f"schema {SCHEMA_VERSION + 1}"):
        load_checkpoint(path)


def test_other_network_size(tmp_path: Path, small_net: FactoredRecurrentActorCritic) -> None:
    path = save_checkpoint(tmp_path / "m.pt", small_net)
    with pytest.raises(ValueError, match="hidden_dim: checkpoint 32 vs expected 64"):
        load_checkpoint(path, expect={"hidden_dim": 64})
    payload = read_payload(path)
    payload["model_kwargs"]["hidden_dim"] = 64
    torch.save(payload, path)
    with pytest.raises(ValueError, match="do not fit"):
        load_checkpoint(path)
