"""The notebook-02 checks pass on the real network and fail on broken ones."""
from __future__ import annotations

import pytest
import torch

from esper_lib.network import FactoredRecurrentActorCritic
from esper_lib.notebooks.model_report import init_gain_frame, parameter_count_check, parameter_frame
from esper_lib.notebooks.shape_checks import (
    check_positive_ints,
    make_masks,
    masked_sampling_check,
    recurrence_check,
    shape_table,
    value_consistency_check,
)


def test_checks_pass_on_the_real_network(small_net: FactoredRecurrentActorCritic) -> None:
    table = shape_table(small_net, [1, 2], [1, 3])
    assert table["ok"].all() and len(table) > 100
    assert set(table["method"]) == {"forward", "evaluate_actions", "get_action", "get_value", "q_values"}
    assert masked_sampling_check(small_net, 500)["ok"].all()
    assert value_consistency_check(small_net)["ok"].all()
    assert recurrence_check(small_net)["ok"].all()


def test_masked_sampling_check_catches_a_mask_ignoring_policy(small_net: FactoredRecurrentActorCritic, monkeypatch: pytest.MonkeyPatch) -> None:
    original = small_net.get_action

    def ignore_masks(state, bp, hidden=None, action_mask=None, **kw):  # type: ignore[no-untyped-def]
        return original(state, bp, hidden, action_mask=None, **kw)

    monkeypatch.setattr(small_net, "get_action", ignore_masks)
    table = masked_sampling_check(small_net, 500)
    assert not table["ok"].all()


def test_value_check_catches_a_wrongly_conditioned_critic(small_net: FactoredRecurrentActorCritic, monkeypatch: pytest.MonkeyPatch) -> None:
    original_q_all = small_net._q_all
    monkeypatch.setattr(small_net, "_q_all", lambda h: original_q_all(h).flip(-1))  # ops in the wrong order
    table = value_consistency_check(small_net)
    assert not table["ok"].all() and table.loc[0, "ok"]  # forward/evaluate still agree
    monkeypatch.undo()
    original_forward = type(small_net).forward

    def unconditioned_forward(self, *args, **kw):  # type: ignore[no-untyped-def]
        out = original_forward(self, *args, **kw)
        return out._replace(value=out.value + 0.1)  # as if conditioned on another op

    monkeypatch.setattr(type(small_net), "forward", unconditioned_forward)
    table = value_consistency_check(small_net)
    assert not table.loc[0, "ok"]


def test_recurrence_check_catches_a_dropped_hidden_state(small_net: FactoredRecurrentActorCritic, monkeypatch: pytest.MonkeyPatch) -> None:
    original = small_net._trunk
    monkeypatch.setattr(small_net, "_trunk", lambda s, b, h, e=None: original(s, b, None, e))
    table = recurrence_check(small_net)
    assert not table["ok"].all()


def test_shape_table_flags_a_wrong_shape(small_net: FactoredRecurrentActorCritic, monkeypatch: pytest.MonkeyPatch) -> None:
    original = small_net.get_action

    def squeeze_value(*args, **kw):  # type: ignore[no-untyped-def]
        res = original(*args, **kw)
        return res._replace(value=res.value[:1])

    monkeypatch.setattr(small_net, "get_action", squeeze_value)
    table = shape_table(small_net, [3], [1], patterns=("none",))
    bad = table[~table["ok"]]
    assert list(bad["output"]) == ["value"] and list(bad["method"]) == ["get_action"]


def test_make_masks_keeps_a_valid_action_per_row() -> None:
    g = torch.Generator().manual_seed(0)
    for pattern in ("all_valid", "random", "single_valid", "slot_by_op"):
        masks = make_masks(pattern, (50, 3), 3, g)
        for name, m in masks.items():
            assert m.any(-1).all(), (pattern, name)
    assert make_masks("none", (2,), 3, g) is None
    with pytest.raises(ValueError, match="mask pattern"):
        make_masks("sometimes", (2,), 3, g)


def test_check_positive_ints_names_the_parameter() -> None:
    assert check_positive_ints("batch_sizes", [1, 2]) == [1, 2]
    for bad in ([], [0], [1.5], "3", [True]):
        with pytest.raises(ValueError, match="batch_sizes"):
            check_positive_ints("batch_sizes", bad)


def test_model_report_tables(small_net: FactoredRecurrentActorCritic) -> None:
    params = parameter_frame(small_net)
    total = params.loc[params["module"] == "TOTAL", "parameters"].item()
    assert total == sum(p.numel() for p in small_net.parameters())
    assert params.loc[params["module"] != "TOTAL", "parameters"].sum() == total
    counts = parameter_count_check(small_net)
    assert counts.loc[0, "parameters"] == counts.loc[1, "parameters"]
    gains = init_gain_frame(small_net)
    assert gains["ok"].all()
    with torch.no_grad():
        small_net.heads["op"][-1].weight.mul_(10)
    gains = init_gain_frame(small_net)
    assert list(gains.loc[~gains["ok"], "layer"]) == ["heads.op.2"]
