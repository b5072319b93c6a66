"""Shape and consistency checks of the V2 network over a grid of inputs (notebook 02).

Every check returns a DataFrame with an ``ok`` column, so a notebook can show the table and
assert on it; each can fail (tests feed them deliberately broken networks).
"""
from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from esper_lib.constants import HEAD_NAMES, NUM_OPS, LifecycleOp, head_sizes
from esper_lib.network import FactoredRecurrentActorCritic

MASK_PATTERNS: tuple[str, ...] = ("none", "all_valid", "random", "single_valid", "slot_by_op")


def check_positive_ints(name: str, values: object) -> list[int]:
    """``values`` as a non-empty list of positive ints, or a ValueError naming ``name``."""
    if not isinstance(values, (list, tuple)) or not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"{name} must be a non-empty list of positive ints, got {values!r}")
    return list(values)


def make_masks(
    pattern: str, lead: tuple[int, ...], num_slots: int, generator: torch.Generator
) -> dict[str, torch.Tensor] | None:
    """Masks of one pattern for leading shape ``lead`` (``[B]`` or ``[B, T]``); every row keeps a valid action."""
    if pattern not in MASK_PATTERNS:
        raise ValueError(f"mask pattern must be one of {MASK_PATTERNS}, got {pattern!r}")
    if pattern == "none":
        return None
    sizes = head_sizes(num_slots)
    masks: dict[str, torch.Tensor] = {}
    for name, k in sizes.items():
        if pattern == "all_valid":
            m = torch.ones(*lead, k, dtype=torch.bool)
        elif pattern == "single_valid":
            m = torch.zeros(*lead, k, dtype=torch.bool)
            m.scatter_(-1, torch.randint(0, k, (*lead, 1), generator=generator), True)
        else:
            m = torch.rand(*lead, k, generator=generator) < 0.5
            m.scatter_(-1, torch.randint(0, k, (*lead, 1), generator=generator), True)
        masks[name] = m
    if pattern == "slot_by_op":
        by_op = torch.rand(*lead, NUM_OPS, num_slots, generator=generator) < 0.5
        by_op.scatter_(-1, torch.randint(0, num_slots, (*lead, NUM_OPS, 1), generator=generator), True)
        masks["slot_by_op"] = by_op
        masks["slot"] = torch.ones(*lead, num_slots, dtype=torch.bool)
    return masks


def _random_inputs(net: FactoredRecurrentActorCritic, b: int, t: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(b, t, net.state_dim, generator=g), torch.randint(-1, 13, (b, t, net.num_slots), generator=g)


def _valid_actions(masks: dict[str, torch.Tensor] | None, sizes: dict[str, int], lead: tuple[int, ...], g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random stored actions that respect ``masks`` (slot taken from the op's slot_by_op row)."""
    actions = {}
    for name, k in sizes.items():
        m = masks[name] if masks is not None else torch.ones(*lead, k, dtype=torch.bool)
        if masks is not None and name == "slot" and "slot_by_op" in masks:
            row = masks["slot_by_op"].gather(-2, actions["op"][..., None, None].expand(*lead, 1, m.shape[-1])).squeeze(-2)
            m = m & row
        actions[name] = torch.multinomial(m.reshape(-1, k).float(), 1, generator=g).reshape(lead)
    return actions


def shape_table(
    net: FactoredRecurrentActorCritic,
    batch_sizes: Sequence[int],
    seq_lens: Sequence[int],
    patterns: Sequence[str] = MASK_PATTERNS,
    seed: int = 0,
) -> pd.DataFrame:
    """Expected vs actual output shapes of every method over the grid; one row per output."""
    g = torch.Generator().manual_seed(seed)
    sizes = head_sizes(net.num_slots)
    h = net.hidden_dim
    rows: list[tuple] = []

    def record(method: str, b: int, t: int, pattern: str, output: str, expected: tuple, actual: torch.Tensor) -> None:
        rows.append((method, b, t, pattern, output, expected, tuple(actual.shape), tuple(actual.shape) == expected))

    for b in check_positive_ints("batch_sizes", list(batch_sizes)):
        for t in check_positive_ints("seq_lens", list(seq_lens)):
            for pattern in patterns:
                state, bp = _random_inputs(net, b, t, g)
                masks = make_masks(pattern, (b, t), net.num_slots, g)
                out = net(state, bp, action_mask=masks)
                for name in HEAD_NAMES:
                    record("forward", b, t, pattern, f"{name}_logits", (b, t, sizes[name]), getattr(out, f"{name}_logits"))
                record("forward", b, t, pattern, "value", (b, t), out.value)
                record("forward", b, t, pattern, "sampled_op", (b, t), out.sampled_op)
                record("forward", b, t, pattern, "hidden.h", (1, b, h), out.hidden[0])
                actions = _valid_actions(masks, sizes, (b, t), g)
                ev = net.evaluate_actions(state, bp, actions, action_mask=masks)
                for name in HEAD_NAMES:
                    record("evaluate_actions", b, t, pattern, f"log_probs.{name}", (b, t), ev.log_probs[name])
                    record("evaluate_actions", b, t, pattern, f"entropy.{name}", (b, t), ev.entropy[name])
                record("evaluate_actions", b, t, pattern, "value", (b, t), ev.value)
                q, probs, _ = net.q_values(state, bp, action_mask=masks)
                record("q_values", b, t, pattern, "q", (b, t, NUM_OPS), q)
                record("q_values", b, t, pattern, "op_probs", (b, t, NUM_OPS), probs)
                record("get_value", b, t, pattern, "value", (b, t), net.get_value(state, bp, None, actions["op"]))
            # get_action is single-step: once per batch size and pattern.
            for pattern in patterns:
                state, bp = _random_inputs(net, b, 1, g)
                masks = make_masks(pattern, (b,), net.num_slots, g)
                res = net.get_action(state[:, 0], bp[:, 0], net.initial_hidden(b), action_mask=masks, return_q_all=True)
                for name in HEAD_NAMES:
                    record("get_action", b, 1, pattern, f"actions.{name}", (b,), res.actions[name])
                    record("get_action", b, 1, pattern, f"log_probs.{name}", (b,), res.log_probs[name])
                    record("get_action", b, 1, pattern, f"masks.{name}", (b, sizes[name]), res.masks[name])
                record("get_action", b, 1, pattern, "value", (b,), res.value)
                record("get_action", b, 1, pattern, "q_all", (b, NUM_OPS), res.q_all)
                record("get_action", b, 1, pattern, "hidden.c", (1, b, h), res.hidden[1])
    return pd.DataFrame(rows, columns=["method", "batch", "seq", "mask", "output", "expected", "actual", "ok"]).drop_duplicates(
        subset=["method", "batch", "seq", "mask", "output"]
    )


def masked_sampling_check(net: FactoredRecurrentActorCritic, num_draws: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Draw ``num_draws`` actions under random masks; count draws of masked actions per head (must be 0)."""
    g = torch.Generator().manual_seed(seed)
    state, bp = _random_inputs(net, num_draws, 1, g)
    masks = make_masks("slot_by_op", (num_draws,), net.num_slots, g)
    res = net.get_action(state[:, 0], bp[:, 0], None, action_mask=masks, generator=g)
    op = res.actions["op"]
    rows = []
    for name in HEAD_NAMES:
        given = masks[name]
        if name == "slot":
            given = given & masks["slot_by_op"][torch.arange(num_draws), op]
        used_ok = res.masks[name].gather(1, res.actions[name][:, None]).squeeze(1)
        relevant = torch.tensor([name in _relevant_heads(int(o)) for o in op]) if name != "op" else torch.ones(num_draws, dtype=torch.bool)
        given_ok = given.gather(1, res.actions[name][:, None]).squeeze(1)
        bad = int((~used_ok).sum()) + int((relevant & ~given_ok).sum())
        rows.append((name, num_draws, int(relevant.sum()), bad, bad == 0))
    return pd.DataFrame(rows, columns=["head", "draws", "relevant_draws", "masked_draws", "ok"])


def _relevant_heads(op: int) -> frozenset[str]:
    from esper_lib.constants import HEAD_RELEVANCE

    return HEAD_RELEVANCE[LifecycleOp(op)]


def value_consistency_check(net: FactoredRecurrentActorCritic, batch: int = 4, seq: int = 6, seed: int = 0, atol: float = 1e-5) -> pd.DataFrame:
    """Q(s, sampled op) from ``forward`` vs ``evaluate_actions`` for that op, and ``get_value`` vs ``q_values``."""
    g = torch.Generator().manual_seed(seed)
    state, bp = _random_inputs(net, batch, seq, g)
    out = net(state, bp)
    actions = _valid_actions(None, head_sizes(net.num_slots), (batch, seq), g)
    actions["op"] = out.sampled_op
    ev = net.evaluate_actions(state, bp, actions)
    q, _, _ = net.q_values(state, bp)
    rows = [("forward value vs evaluate_actions value (stored op)", (out.value - ev.value).abs().max().item())]
    for op in range(NUM_OPS):
        v = net.get_value(state, bp, None, torch.full((batch, seq), op))
        rows.append((f"get_value(op={LifecycleOp(op).name}) vs q_values[..., {op}]", (v - q[..., op]).abs().max().item()))
    df = pd.DataFrame(rows, columns=["check", "max_abs_diff"])
    df["ok"] = df["max_abs_diff"] <= atol
    return df


def recurrence_check(net: FactoredRecurrentActorCritic, batch: int = 3, seq: int = 8, seed: int = 0, atol: float = 1e-5) -> pd.DataFrame:
    """Step-by-step calls with the carried hidden state vs one sequence call."""
    g = torch.Generator().manual_seed(seed)
    state, bp = _random_inputs(net, batch, seq, g)
    seq_out = net(state, bp)
    hidden, diffs = None, {name: 0.0 for name in HEAD_NAMES}
    value_diff = 0.0
    for t in range(seq):
        step = net(state[:, t : t + 1], bp[:, t : t + 1], hidden)
        for name in HEAD_NAMES:
            d = (getattr(step, f"{name}_logits")[:, 0] - getattr(seq_out, f"{name}_logits")[:, t]).abs().max().item()
            diffs[name] = max(diffs[name], d)
        q_step = net.get_value(state[:, t : t + 1], bp[:, t : t + 1], hidden, seq_out.sampled_op[:, t])
        value_diff = max(value_diff, (q_step[:, 0] - seq_out.value[:, t]).abs().max().item())
        hidden = step.hidden
    rows = [(f"{name}_logits", d) for name, d in diffs.items()]
    rows.append(("Q(s, op)", value_diff))
    rows.append(("final hidden h", (hidden[0] - seq_out.hidden[0]).abs().max().item()))
    rows.append(("final hidden c", (hidden[1] - seq_out.hidden[1]).abs().max().item()))
    df = pd.DataFrame(rows, columns=["output", "max_abs_diff"])
    df["ok"] = df["max_abs_diff"] <= atol
    return df
