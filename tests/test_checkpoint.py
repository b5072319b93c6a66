"""Checkpoint save/load round trip and its error messages."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from esper_lib.checkpoint import SCHEMA_VERSION, load_checkpoint, load_policy, payload_digest, read_payload, save_checkpoint
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


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _resave(path: Path, payload: dict) -> None:
    """Write a tampered payload with a valid digest (what a bug, not a disk, would produce)."""
    payload["digest"] = payload_digest(payload)
    torch.save(payload, path)


def test_flipped_byte_in_the_weights_is_caught_by_the_digest(tmp_path: Path, small_net: FactoredRecurrentActorCritic) -> None:
    path = save_checkpoint(tmp_path / "m.pt", small_net)
    weight = small_net.state_dict()["feature_net.0.weight"]
    start = path.read_bytes().find(weight.numpy().tobytes())
    assert start > 0
    _flip(path, start + weight.numel() * 2)  # a byte in the middle of that tensor: torch.load alone would accept it
    with pytest.raises(ValueError, match=r"m\.pt is corrupt: the sha256 digest"):
        load_checkpoint(path)


def test_flipped_byte_in_the_middle_of_a_trainer_checkpoint(tmp_path: Path, small_net: FactoredRecurrentActorCritic) -> None:
    opt = torch.optim.Adam(small_net.parameters())
    small_net(torch.randn(1, 2, 121), torch.zeros(1, 2, 3, dtype=torch.long)).value.sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path / "t.pt", small_net, optimizer_state=opt.state_dict())
    _flip(path, path.stat().st_size // 2)
    with pytest.raises(ValueError, match=r"t\.pt (is corrupt|is not a readable checkpoint)"):
        load_checkpoint(path)


def test_damaged_zip_raises_naming_the_file(tmp_path: Path, small_net: FactoredRecurrentActorCritic) -> None:
    path = save_checkpoint(tmp_path / "cut.pt", small_net)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.pt is not a readable checkpoint"):
        load_checkpoint(path)


def test_schema_1_checkpoint_without_digest_still_loads(tmp_path: Path, small_net: FactoredRecurrentActorCritic) -> None:
    path = save_checkpoint(tmp_path / "m.pt", small_net)
    payload = read_payload(path)
    del payload["digest"]
    payload["schema_version"] = 1
    torch.save(payload, path)
    model = load_checkpoint(path).model
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), small_net.state_dict().values()))
    payload["schema_version"] = 2  # a schema 2 file without its digest is damaged
    torch.save(payload, path)
    with pytest.raises(ValueError, match="must hold its sha256 digest"):
        load_checkpoint(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_rejected_on_load(tmp_path: Path, small_net: FactoredRecurrentActorCritic, bad: float) -> None:
    path = save_checkpoint(tmp_path / "m.pt", small_net)
    payload = read_payload(path)
    payload["model_state"]["heads.blueprint.4.bias"][3] = bad
    _resave(path, payload)
    with pytest.raises(ValueError, match=r"m\.pt: model_state\['heads\.blueprint\.4\.bias'\] holds a non-finite value"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"depth": 3}, r"model_kwargs has unknown key 'depth'"),
        ({"hidden_dim": "32"}, r"model_kwargs\['hidden_dim'\] must be a positive int, got '32'"),
        ({"num_slots": 3.0}, r"model_kwargs\['num_slots'\] must be a positive int"),
        ({"feature_dim": True}, r"model_kwargs\['feature_dim'\] must be a positive int"),
        ({"state_dim": -1}, r"model_kwargs\['state_dim'\] must be a positive int"),
    ],
)
def test_unknown_or_ill_typed_model_kwargs_raise_naming_the_key(tmp_path: Path, small_net: FactoredRecurrentActorCritic, change: dict, match: str) -> None:
    path = save_checkpoint(tmp_path / "m.pt", small_net)
    payload = read_payload(path)
    payload["model_kwargs"].update(change)
    _resave(path, payload)
    with pytest.raises(ValueError, match=match):
        load_checkpoint(path)


def test_failed_save_leaves_no_temporary_file(tmp_path: Path, small_net: FactoredRecurrentActorCritic, monkeypatch: pytest.MonkeyPatch) -> None:
    good = save_checkpoint(tmp_path / "good.pt", small_net)
    before = good.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(good, small_net, extra={"callback": lambda: None})  # unpicklable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.pt"]
    assert good.read_bytes() == before  # the last good checkpoint is intact

    def failing_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path / "new.pt", small_net)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.pt"]
