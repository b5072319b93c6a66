"""Shared fixtures: small networks, deterministic seeds, headless matplotlib."""
from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

from esper_lib.network import FactoredRecurrentActorCritic


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def small_net() -> FactoredRecurrentActorCritic:
    """A V2 network at test size: full observation and heads, narrow trunk."""
    torch.manual_seed(1)
    return FactoredRecurrentActorCritic(state_dim=121, num_slots=3, feature_dim=32, hidden_dim=32)
