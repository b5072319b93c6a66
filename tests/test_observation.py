"""The named observation layout and the shared Gymnasium spaces."""
from __future__ import annotations

import numpy as np
import pytest

from esper_lib.constants import DEFAULT_STATE_DIM, HEAD_NAMES, head_sizes, state_dim_for
from esper_lib.envs.spaces import action_space, action_to_dict, observation_space
from esper_lib.observation import OBS_LAYOUT, feature_index, feature_names, layout_table, observation_layout


def test_layout_covers_every_index_once() -> None:
    assert DEFAULT_STATE_DIM == 121
    covered = np.zeros(121, dtype=int)
    for f in OBS_LAYOUT:
        covered[f.slice] += 1
    assert (covered == 1).all()
    names = feature_names()
    assert len(names) == len(set(names)) == 121


@pytest.mark.parametrize("num_slots", [1, 3, 5])
def test_layout_size_follows_slots(num_slots: int) -> None:
    assert observation_layout(num_slots)[-1].stop == state_dim_for(num_slots) == 31 + 30 * num_slots


def test_feature_lookup() -> None:
    assert feature_index("epoch_progress") == 0
    assert feature_index("last_action_success") == 24
    assert feature_index("slot0.has_seed") == 31
    assert feature_index("slot2.interaction") == 120
    with pytest.raises(KeyError, match="unknown observation feature 'slot9.alpha'"):
        feature_index("slot9.alpha")
    table = layout_table()
    assert list(table.columns) == ["name", "start", "stop", "group", "normalisation"] and len(table) == 121


def test_spaces_match_heads() -> None:
    act = action_space()
    assert list(act.nvec) == list(head_sizes(3).values())
    obs = observation_space()
    sample = obs.sample()
    assert sample["state"].shape == (121,)
    assert set(sample["action_mask"].keys()) == set(HEAD_NAMES) | {"slot_by_op"}
    assert sample["action_mask"]["slot_by_op"].shape == (6, 3)
    assert action_to_dict(np.array([5, 2, 12, 3, 2, 2, 3, 4])) == dict(zip(HEAD_NAMES, [5, 2, 12, 3, 2, 2, 3, 4]))
    with pytest.raises(ValueError, match=r"action\[tempo\] = 4 is outside \[0, 2\]"):
        action_to_dict(np.arange(8))  # validated: the same check as every env's step
    with pytest.raises(ValueError, match="action must have shape"):
        action_to_dict(np.arange(7))
