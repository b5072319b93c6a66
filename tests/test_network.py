"""The V2 network: the plan's validation block, value conditioning, masks, recurrence, gradients."""
from __future__ import annotations

import math

import pytest
import torch

from esper_lib.constants import (
    CANONICAL_ACTION,
    HEAD_NAMES,
    HEAD_RELEVANCE,
    NUM_OPS,
    LifecycleOp,
    head_sizes,
)
from esper_lib import network
from esper_lib.network import (
    EvaluateOutput,
    FactoredRecurrentActorCritic,
    ForwardOutput,
    GetActionResult,
    expected_parameter_count,
)

SIZES = head_sizes(3)


def make_inputs(b: int = 2, t: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 121, generator=g), torch.randint(-1, 13, (b, t, 3), generator=g)


def random_actions(b: int, t: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randint(0, k, (b, t), generator=g) for name, k in SIZES.items()}


def test_plan_validation_block(capsys: pytest.CaptureFixture[str]) -> None:
    """The Phase 4 plan's validation snippet, at full size, with the shapes it promises."""
    net = FactoredRecurrentActorCritic(state_dim=121, num_slots=3)
    state = torch.randn(2, 5, 121)
    bp_idx = torch.randint(0, 13, (2, 5, 3))
    out = net(state, bp_idx)
    assert isinstance(out, ForwardOutput)
    print(f"Op logits: {out.op_logits.shape}")
    print(f"Value: {out.value.shape}")
    print(f"Sampled op: {out.sampled_op.shape}")
    eval_out = net.evaluate_actions(state, bp_idx, random_actions(2, 5))
    assert isinstance(eval_out, EvaluateOutput)
    print(f"Value (eval): {eval_out.value.shape}")
    n_params = sum(p.numel() for p in net.parameters())
    print(f"Params: {n_params}")
    printed = capsys.readouterr().out
    assert "Op logits: torch.Size([2, 5, 6])" in printed
    assert "Value: torch.Size([2, 5])" in printed
    assert "Sampled op: torch.Size([2, 5])" in printed
    assert "Value (eval): torch.Size([2, 5])" in printed
    # The plan says "~2.1M"; its own layer list gives this (design section 3).
    assert n_params == expected_parameter_count(121, 3, 512, 512) == 3_628_898
    assert out.blueprint_logits.shape == (2, 5, 13)
    assert out.slot_logits.shape == (2, 5, 3)
    assert out.hidden[0].shape == (1, 2, 512)


def test_parameter_table_sums_to_total(small_net: FactoredRecurrentActorCritic) -> None:
    assert sum(n for _, n in small_net.parameter_table()) == sum(p.numel() for p in small_net.parameters())
    assert sum(p.numel() for p in small_net.parameters()) == expected_parameter_count(121, 3, 32, 32)


def test_init_gains_and_forget_bias() -> None:
    net = FactoredRecurrentActorCritic(feature_dim=64, hidden_dim=64)
    for name, head in net.heads.items():
        last = head[-1].weight
        # Orthogonal with gain g: singular values all equal g.
        sv = torch.linalg.svdvals(last)
        assert torch.allclose(sv, torch.full_like(sv, 0.01), atol=1e-5), name
    first = net.heads["op"][0].weight
    assert torch.allclose(torch.linalg.svdvals(first), torch.full((32,), math.sqrt(2)), atol=1e-4)
    h = net.hidden_dim
    forget = net.lstm.bias_ih_l0[h : 2 * h] + net.lstm.bias_hh_l0[h : 2 * h]
    assert torch.equal(forget, torch.ones(h))
    other = torch.cat([net.lstm.bias_ih_l0[:h], net.lstm.bias_ih_l0[2 * h :]])
    assert torch.equal(other, torch.zeros(3 * h))


def test_forward_value_equals_evaluate_value_for_stored_op(small_net: FactoredRecurrentActorCritic) -> None:
    state, bp = make_inputs(3, 6)
    out = small_net(state, bp)
    actions = random_actions(3, 6)
    actions["op"] = out.sampled_op
    ev = small_net.evaluate_actions(state, bp, actions)
    assert torch.allclose(out.value, ev.value, atol=1e-5)


def test_changing_only_the_op_changes_q(small_net: FactoredRecurrentActorCritic) -> None:
    state, bp = make_inputs(2, 3)
    q = [small_net.get_value(state, bp, None, torch.full((2, 3), op)) for op in range(NUM_OPS)]
    for a in range(NUM_OPS):
        for b in range(a + 1, NUM_OPS):
            assert not torch.allclose(q[a], q[b]), (a, b)


def test_get_value_equals_q_values(small_net: FactoredRecurrentActorCritic) -> None:
    state, bp = make_inputs(2, 4)
    q_all, probs, _ = small_net.q_values(state, bp)
    assert q_all.shape == (2, 4, NUM_OPS) and probs.shape == (2, 4, NUM_OPS)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4), atol=1e-6)
    for op in range(NUM_OPS):
        v = small_net.get_value(state, bp, None, torch.full((2, 4), op))
        assert torch.allclose(v, q_all[..., op], atol=1e-5)


def test_q_values_respects_op_mask(small_net: FactoredRecurrentActorCritic) -> None:
    state, bp = make_inputs(1, 2)
    mask = torch.tensor([True, False, True, False, False, True]).expand(1, 2, 6)
    _, probs, _ = small_net.q_values(state, bp, action_mask={"op": mask})
    assert (probs[~mask] == 0).all()


def test_deterministic_get_action_is_argmax_of_valid_logits(small_net: FactoredRecurrentActorCritic) -> None:
    state, bp = make_inputs(4, 1)
    h = small_net.initial_hidden(4)
    g = torch.Generator().manual_seed(5)
    masks = {name: torch.rand(4, k, generator=g) < 0.6 for name, k in SIZES.items()}
    for name in masks:
        masks[name][:, 0] = True
    res = small_net.get_action(state, bp, h, action_mask=masks, deterministic=True)
    out = small_net(state, bp, h)
    op_logits = out.op_logits[:, 0].masked_fill(~masks["op"], -1e9)
    assert torch.equal(res.actions["op"], op_logits.argmax(-1))
    for i in range(4):
        op = LifecycleOp(int(res.actions["op"][i]))
        for name in HEAD_NAMES[1:]:
            logits = getattr(out, f"{name}_logits")[i, 0]
            if name in HEAD_RELEVANCE[op]:
                expected = logits.masked_fill(~masks[name][i], -1e9).argmax()
            else:
                expected = torch.tensor(CANONICAL_ACTION[name])
            assert res.actions[name][i].item() == expected.item(), (name, op)


def test_get_action_accepts_2d_and_3d_inputs(small_net: FactoredRecurrentActorCritic) -> None:
    state, bp = make_inputs(5, 1)
    h = small_net.initial_hidden(5)
    a = small_net.get_action(state[:, 0], bp[:, 0], h, deterministic=True)
    b = small_net.get_action(state, bp, h, deterministic=True)
    assert isinstance(a, GetActionResult)
    for name in HEAD_NAMES:
        assert torch.equal(a.actions[name], b.actions[name])
        assert a.actions[name].shape == (5,)
    assert torch.allclose(a.value, b.value)
    assert a.hidden[0].shape == (1, 5, 32)
    assert torch.equal(a.sampled_op, a.actions["op"])
    with pytest.raises(ValueError, match="one step"):
        small_net.get_action(*make_inputs(5, 2), h)


def test_get_action_never_samples_masked_and_canonicalises(small_net: FactoredRecurrentActorCritic) -> None:
    b = 512
    state, bp = make_inputs(b, 1, seed=3)
    g = torch.Generator().manual_seed(9)
    masks = {name: torch.rand(b, k, generator=g) < 0.5 for name, k in SIZES.items()}
    for name in masks:
        masks[name][torch.arange(b), torch.randint(0, SIZES[name], (b,), generator=g)] = True
    slot_by_op = torch.rand(b, NUM_OPS, 3, generator=g) < 0.5
    slot_by_op[..., 0] = True
    masks["slot"][:, 0] = True  # slot 0 valid in both, so the and-ed row is never empty
    masks["slot_by_op"] = slot_by_op
    res = small_net.get_action(state, bp, None, action_mask=masks, return_q_all=True, generator=g)
    op = res.actions["op"]
    assert masks["op"].gather(1, op[:, None]).all()
    slot_row = slot_by_op[torch.arange(b), op] & masks["slot"]
    for name in HEAD_NAMES[1:]:
        used = res.masks[name]
        assert used.gather(1, res.actions[name][:, None]).all(), name
        rel = torch.tensor([name in HEAD_RELEVANCE[LifecycleOp(int(o))] for o in op])
        given = slot_row if name == "slot" else masks[name]
        assert torch.equal(used[rel], given[rel]), name
        assert (used[~rel].sum(-1) == 1).all()
        assert torch.equal(res.log_probs[name][~rel], torch.zeros(int((~rel).sum())))
        assert (res.actions[name][~rel] == CANONICAL_ACTION[name]).all()
    assert torch.allclose(res.q_all.gather(1, op[:, None]).squeeze(1), res.value)
    assert torch.allclose(res.op_probs.sum(-1), torch.ones(b), atol=1e-6)


def test_evaluate_actions_canonical_heads_zero(small_net: FactoredRecurrentActorCritic) -> None:
    state, bp = make_inputs(2, 6)
    actions = random_actions(2, 6, seed=4)
    actions["op"] = torch.arange(6).expand(2, 6).clone()
    ev = small_net.evaluate_actions(state, bp, actions)
    for op in LifecycleOp:
        for name in HEAD_NAMES[1:]:
            lp, ent = ev.log_probs[name][:, int(op)], ev.entropy[name][:, int(op)]
            if name in HEAD_RELEVANCE[op]:
                assert (lp < 0).all() and (ent > 0).all(), (name, op)
            else:
                assert torch.equal(lp, torch.zeros(2)) and torch.equal(ent, torch.zeros(2)), (name, op)


def test_get_action_log_probs_match_evaluate_actions(small_net: FactoredRecurrentActorCritic) -> None:
    state, bp = make_inputs(6, 1, seed=2)
    h = small_net.initial_hidden(6)
    res = small_net.get_action(state, bp, h)
    ev = small_net.evaluate_actions(
        state, bp, {k: v[:, None] for k, v in res.actions.items()}, h, action_mask={k: v[:, None] for k, v in res.masks.items()}
    )
    for name in HEAD_NAMES:
        assert torch.allclose(res.log_probs[name], ev.log_probs[name][:, 0], atol=1e-5), name
    assert torch.allclose(res.value, ev.value[:, 0], atol=1e-5)


def test_blueprint_minus_one_uses_null_row(small_net: FactoredRecurrentActorCritic) -> None:
    emb = small_net.blueprint_embedding
    out = emb(torch.tensor([[-1, 0, 12]]))
    assert torch.equal(out[0, :4], emb.embedding.weight[13])
    assert torch.equal(out[0, 4:8], emb.embedding.weight[0])
    assert torch.equal(out[0, 8:], emb.embedding.weight[12])


@pytest.mark.parametrize("bad", [13, -2])
def test_blueprint_out_of_range_raises(small_net: FactoredRecurrentActorCritic, bad: int) -> None:
    state, bp = make_inputs(1, 2)
    bp[0, 1, 2] = bad
    with pytest.raises(ValueError, match=r"blueprint_indices must lie in \[-1, 12\]"):
        small_net(state, bp)


def test_bad_inputs_raise_with_argument_names(small_net: FactoredRecurrentActorCritic) -> None:
    state, bp = make_inputs(2, 3)
    with pytest.raises(ValueError, match=r"state must have shape \[B, T, 121\]"):
        small_net(state[..., :120], bp)
    with pytest.raises(ValueError, match="state must have shape"):
        small_net(state[0], bp)
    with pytest.raises(TypeError, match="state must be a floating-point"):
        small_net(state.long(), bp)
    with pytest.raises(TypeError, match="blueprint_indices must be an int64"):
        small_net(state, bp.int())
    with pytest.raises(ValueError, match="blueprint_indices must have shape"):
        small_net(state, bp[..., :2])
    with pytest.raises(TypeError, match=r"action_mask\['op'\] must be a bool"):
        small_net(state, bp, action_mask={"op": torch.ones(2, 3, 6)})
    with pytest.raises(ValueError, match=r"action_mask\['op'\] must have shape \(2, 3, 6\)"):
        small_net(state, bp, action_mask={"op": torch.ones(2, 3, 5, dtype=torch.bool)})
    with pytest.raises(ValueError, match="unknown head 'opp'"):
        small_net(state, bp, action_mask={"opp": torch.ones(2, 3, 6, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"op: mask has a row with no valid action"):
        small_net(state, bp, action_mask={"op": torch.zeros(2, 3, 6, dtype=torch.bool)})
    with pytest.raises(ValueError, match="hidden h must have shape"):
        small_net(state, bp, hidden=small_net.initial_hidden(3))
    actions = random_actions(2, 3)
    with pytest.raises(ValueError, match="missing heads"):
        small_net.evaluate_actions(state, bp, {"op": actions["op"]})
    bad = dict(actions, slot=torch.full((2, 3), 3))
    with pytest.raises(ValueError, match=r"actions\['slot'\] must lie in \[0, 2\]"):
        small_net.evaluate_actions(state, bp, bad)
    with pytest.raises(TypeError, match=r"actions\['tempo'\] must be an int64"):
        small_net.evaluate_actions(state, bp, dict(actions, tempo=actions["tempo"].float()))
    with pytest.raises(ValueError, match=r"actions\['op'\] must have shape \(2, 3\)"):
        small_net.evaluate_actions(state, bp, dict(actions, op=actions["op"][:, :2]))
    with pytest.raises(ValueError, match="op must lie in"):
        small_net.get_value(state, bp, None, torch.full((2, 3), 6))


def test_relevant_masked_stored_action_raises(small_net: FactoredRecurrentActorCritic) -> None:
    state, bp = make_inputs(1, 1)
    actions = {name: torch.zeros(1, 1, dtype=torch.long) for name in HEAD_NAMES}
    actions["op"] = torch.full((1, 1), int(LifecycleOp.GERMINATE))
    mask = {"blueprint": torch.tensor([[[False] + [True] * 12]])}
    with pytest.raises(ValueError, match="blueprint: log_prob asked for a masked"):
        small_net.evaluate_actions(state, bp, actions, action_mask=mask)


def test_gradients_reach_every_part(small_net: FactoredRecurrentActorCritic) -> None:
    state, bp = make_inputs(3, 4)
    actions = random_actions(3, 4, seed=7)
    actions["op"] = torch.tensor([[1, 2, 3, 1]] * 3)  # GERMINATE, SET_ALPHA_TARGET, PRUNE: every head relevant somewhere
    ev = small_net.evaluate_actions(state, bp, actions)
    loss = sum(v.sum() for v in ev.log_probs.values()) + sum(v.sum() for v in ev.entropy.values()) + ev.value.sum()
    loss.backward()
    for name, p in small_net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_step_by_step_equals_sequence_call(small_net: FactoredRecurrentActorCritic) -> None:
    state, bp = make_inputs(3, 7, seed=11)
    actions = random_actions(3, 7, seed=12)
    actions["op"] = torch.full((3, 7), int(LifecycleOp.GERMINATE))
    h0 = (torch.randn(1, 3, 32) * 0.1, torch.randn(1, 3, 32) * 0.1)
    seq = small_net(state, bp, h0)
    ev = small_net.evaluate_actions(state, bp, actions, h0)
    hidden = h0
    for t in range(7):
        step = small_net(state[:, t : t + 1], bp[:, t : t + 1], hidden)
        for field in ("op_logits", "blueprint_logits", "alpha_curve_logits"):
            assert torch.allclose(getattr(step, field)[:, 0], getattr(seq, field)[:, t], atol=1e-5)
        q = small_net.get_value(state[:, t : t + 1], bp[:, t : t + 1], hidden, actions["op"][:, t])
        assert torch.allclose(q[:, 0], ev.value[:, t], atol=1e-5)
        hidden = step.hidden
    assert torch.allclose(hidden[0], seq.hidden[0], atol=1e-5)
    assert torch.allclose(hidden[1], seq.hidden[1], atol=1e-5)


def test_episode_starts_reset_hidden_inside_sequence(small_net: FactoredRecurrentActorCritic) -> None:
    state, bp = make_inputs(2, 6, seed=13)
    starts = torch.zeros(2, 6, dtype=torch.bool)
    starts[0, 3] = True
    starts[1, 4] = True
    h0 = (torch.randn(1, 2, 32), torch.randn(1, 2, 32))
    joint = small_net(state, bp, h0, episode_starts=starts)
    # Row 0 after the reset equals a fresh run from step 3 with zero state.
    fresh = small_net(state[:1, 3:], bp[:1, 3:])
    assert torch.allclose(joint.op_logits[0, 3:], fresh.op_logits[0], atol=1e-5)
    before = small_net(state[:1, :3], bp[:1, :3], (h0[0][:, :1], h0[1][:, :1]))
    assert torch.allclose(joint.op_logits[0, :3], before.op_logits[0], atol=1e-5)
    fresh1 = small_net(state[1:, 4:], bp[1:, 4:])
    assert torch.allclose(joint.op_logits[1, 4:], fresh1.op_logits[0], atol=1e-5)
    with pytest.raises(ValueError, match="episode_starts"):
        small_net(state, bp, episode_starts=starts.float())


def test_state_dict_round_trip_and_float64(small_net: FactoredRecurrentActorCritic) -> None:
    state, bp = make_inputs(2, 3)
    other = FactoredRecurrentActorCritic(feature_dim=32, hidden_dim=32)
    other.load_state_dict(small_net.state_dict())
    q1, _, _ = small_net.q_values(state, bp)
    q2, _, _ = other.q_values(state, bp)
    assert torch.equal(q1, q2)
    double = FactoredRecurrentActorCritic(feature_dim=32, hidden_dim=32)
    double.load_state_dict(small_net.state_dict())
    double = double.to(torch.float64)
    q64, _, h = double.q_values(state.double(), bp)
    assert q64.dtype == torch.float64 and h[0].dtype == torch.float64
    assert torch.allclose(q64.float(), q1, atol=1e-5)
    res = double.get_action(state[:, :1].double(), bp[:, :1], double.initial_hidden(2))
    assert res.value.dtype == torch.float64


def test_constructor_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="hidden_dim"):
        FactoredRecurrentActorCritic(hidden_dim=0)
    with pytest.raises(ValueError, match="num_slots"):
        FactoredRecurrentActorCritic(num_slots=-1)


def test_validation_switch_off_skips_checks(small_net: FactoredRecurrentActorCritic) -> None:
    state, bp = make_inputs(1, 1)
    small_net.validate_inputs = False
    out = small_net(state, bp)  # still runs, without the checks
    assert out.value.shape == (1, 1)


@pytest.mark.parametrize("reset_every", [2, 7, 40])
def test_lstm_paths_with_resets_agree(small_net: FactoredRecurrentActorCritic, reset_every: int) -> None:
    """Step-by-step cell and per-segment nn.LSTM give the same outputs, final state and gradients."""
    b, t = 3, 20
    x = torch.randn(b, t, small_net.feature_dim, requires_grad=True)
    starts = torch.zeros(b, t, dtype=torch.bool)
    for row in range(b):
        starts[row, (torch.arange(t) + row) % reset_every == 0] = True
    hidden = (torch.randn(1, b, 32), torch.randn(1, b, 32))
    bounds = sorted(set([0, *starts.any(0).nonzero().flatten().tolist(), t]))
    out_seg, (h_seg, c_seg) = small_net._lstm_by_segment(x, hidden, starts, bounds)
    grad_seg = torch.autograd.grad(out_seg.square().sum(), x)[0]
    out_step, (h_step, c_step) = small_net._lstm_by_step(x, hidden, starts)
    grad_step = torch.autograd.grad(out_step.square().sum(), x)[0]
    assert torch.allclose(out_seg, out_step, atol=1e-5)
    assert torch.allclose(h_seg, h_step, atol=1e-5) and torch.allclose(c_seg, c_step, atol=1e-5)
    assert torch.allclose(grad_seg, grad_step, atol=1e-5)
    # A row's output right after its reset does not depend on the state before it.
    first_reset = int(starts[0].nonzero()[0]) if starts[0].any() else None
    if first_reset is not None:
        other = (hidden[0] * 3, hidden[1] * 3)
        out_other, _ = small_net._lstm_by_step(x, other, starts)
        assert torch.allclose(out_other[0, first_reset:], out_step[0, first_reset:], atol=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_state_raises_naming_state(small_net: FactoredRecurrentActorCritic, bad: float) -> None:
    state, bp = make_inputs(2, 3)
    state[1, 2, 7] = bad
    with pytest.raises(ValueError, match=r"state contains a non-finite value.*\[1, 2, 7\]"):
        small_net(state, bp)
    with pytest.raises(ValueError, match="state contains a non-finite value"):
        small_net.get_action(state[:, 2], bp[:, 2])
    h, c = small_net.initial_hidden(2)
    c[0, 1, 0] = bad
    with pytest.raises(ValueError, match="hidden c contains a non-finite value"):
        small_net(*make_inputs(2, 3), hidden=(h, c))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_state_or_hidden_of_another_dtype_raises_naming_the_expected_dtype(small_net: FactoredRecurrentActorCritic, dtype: torch.dtype) -> None:
    state, bp = make_inputs(2, 3)
    with pytest.raises(TypeError, match=r"state must have the network's dtype torch\.float32.*got " + str(dtype)):
        small_net(state.to(dtype), bp)
    with pytest.raises(TypeError, match=r"state must have the network's dtype torch\.float32"):
        small_net.get_action(state[:, 0].to(dtype), bp[:, 0])
    h, c = small_net.initial_hidden(2, dtype=dtype)
    with pytest.raises(TypeError, match=r"hidden h must have the network's dtype torch\.float32"):
        small_net(state, bp, hidden=(h, c))
    bf16_net = FactoredRecurrentActorCritic(feature_dim=32, hidden_dim=32).to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"dtype torch\.bfloat16"):
        bf16_net(state, bp)


def test_zero_length_sequence_raises(small_net: FactoredRecurrentActorCritic) -> None:
    state, bp = make_inputs(2, 3)
    with pytest.raises(ValueError, match="T = 0 steps"):
        small_net(state[:, :0], bp[:, :0])
    with pytest.raises(ValueError, match="T = 0 steps"):
        small_net.evaluate_actions(state[:, :0], bp[:, :0], random_actions(2, 0))
    with pytest.raises(ValueError, match="T = 0 steps"):
        small_net.q_values(state[:, :0], bp[:, :0])


@pytest.mark.parametrize("seed", range(3))
def test_allowed_op_without_a_valid_slot_raises_on_every_call(small_net: FactoredRecurrentActorCritic, seed: int) -> None:
    """PRUNE is allowed but its slot_by_op row is empty: raise deterministically, whichever op is drawn."""
    state, bp = make_inputs(2, 1)
    by_op = torch.ones(2, NUM_OPS, 3, dtype=torch.bool)
    by_op[1, int(LifecycleOp.PRUNE)] = False
    masks = {"op": torch.ones(2, NUM_OPS, dtype=torch.bool), "slot_by_op": by_op}
    g = torch.Generator().manual_seed(seed)
    with pytest.raises(ValueError, match=r"allows op PRUNE but its slot_by_op row leaves no valid slot \(first at index \[1\]\)"):
        small_net.get_action(state[:, 0], bp[:, 0], action_mask=masks, generator=g)
    with pytest.raises(ValueError, match="allows op PRUNE"):
        small_net(state, bp, action_mask={k: v.unsqueeze(1) for k, v in masks.items()})
    # with the slot mask and-ed in: slot_by_op allows slot 0 for GERMINATE, the slot mask does not
    by_op = torch.ones(2, NUM_OPS, 3, dtype=torch.bool)
    by_op[0, int(LifecycleOp.GERMINATE)] = torch.tensor([True, False, False])
    slot = torch.tensor([[False, True, True], [True, True, True]])
    with pytest.raises(ValueError, match="allows op GERMINATE but its slot_by_op row and the slot mask"):
        small_net.get_action(state[:, 0], bp[:, 0], action_mask={"slot_by_op": by_op, "slot": slot})
    # fine once the op is masked out, and for WAIT, which uses no slot
    masks["op"][1, int(LifecycleOp.PRUNE)] = False
    masks["slot_by_op"][:, int(LifecycleOp.WAIT)] = False
    small_net.get_action(state[:, 0], bp[:, 0], action_mask=masks)


def test_plan_head_names_are_the_registered_heads_without_copies() -> None:
    """The plan's ``self.op_head`` ... ``self.value_head`` work, with one module each and the same parameters."""
    net = FactoredRecurrentActorCritic()
    for name in HEAD_NAMES:
        assert getattr(net, f"{name}_head") is net.heads[name], name
    assert net.op_head is net.heads["op"]
    assert isinstance(net.value_head[0], torch.nn.Linear) and net.value_head[0].in_features == 512 + NUM_OPS
    params = list(net.parameters())
    assert sum(p.numel() for p in params) == 3_628_898
    assert len({id(p) for p in params}) == len(params) == len(dict(net.named_parameters()))
    assert not any(k.split(".")[0].endswith("_head") and k.split(".")[0] != "value_head" for k in net.state_dict())
    # assigning by the plan's name replaces the head in place (no second module registered)
    new_tempo = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.ReLU(), torch.nn.Linear(256, 3))
    net.tempo_head = new_tempo
    assert net.heads["tempo"] is new_tempo and "tempo_head" not in net._modules
    assert sum(p.numel() for p in net.parameters()) == 3_628_898


def test_init_blueprint_head_reinitialises_with_the_plans_gains(small_net: FactoredRecurrentActorCritic) -> None:
    with torch.no_grad():
        for p in small_net.parameters():
            p.fill_(0.5)
    small_net._init_blueprint_head()
    layers = [m for m in small_net.blueprint_head if isinstance(m, torch.nn.Linear)]
    assert len(layers) == 3
    for layer, gain in zip(layers, (math.sqrt(2), math.sqrt(2), 0.01)):
        sv = torch.linalg.svdvals(layer.weight)
        assert torch.allclose(sv, torch.full_like(sv, gain), atol=1e-5)
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    # other heads untouched
    assert (small_net.op_head[-1].weight == 0.5).all()


# --- get_action's fused path (fused_heads=True, the default) against the plain per-head path ---------


def _random_step_masks(b: int, seed: int, num_slots: int = 3) -> dict[str, torch.Tensor]:
    """Random masks for one step with at least one valid action per head and a valid slot for every op."""
    g = torch.Generator().manual_seed(seed)
    masks = {name: torch.rand(b, k, generator=g) < 0.5 for name, k in head_sizes(num_slots).items()}
    for name, m in masks.items():
        m[torch.arange(b), torch.randint(0, m.shape[1], (b,), generator=g)] = True
    masks["slot"][:, 0] = True
    masks["slot_by_op"] = torch.rand(b, NUM_OPS, num_slots, generator=g) < 0.5
    masks["slot_by_op"][..., 0] = True
    return masks


def _both_paths(net: FactoredRecurrentActorCritic, *args, seed: int = 0, **kwargs) -> tuple[GetActionResult, GetActionResult]:
    out = []
    for fused in (False, True):
        net.fused_heads = fused
        out.append(net.get_action(*args, generator=torch.Generator().manual_seed(seed), **kwargs))
    net.fused_heads = True
    return out[0], out[1]


def _assert_same_step(plain: GetActionResult, fast: GetActionResult, atol: float = 1e-5) -> None:
    for name in HEAD_NAMES:
        assert torch.equal(plain.actions[name], fast.actions[name]), name
        assert torch.equal(plain.masks[name], fast.masks[name]), name
        assert torch.allclose(plain.log_probs[name], fast.log_probs[name], atol=atol), name
    for field in ("value", "op_probs", "q_all"):
        a, b = getattr(plain, field), getattr(fast, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert torch.allclose(a, b, atol=atol), field
    assert torch.equal(fast.sampled_op, fast.actions["op"])
    for a, b in zip(plain.hidden, fast.hidden):
        assert torch.allclose(a, b, atol=atol)


@pytest.mark.parametrize("batch", [1, 8, 64])  # below and above FUSED_CELL_MIN_BATCH
@pytest.mark.parametrize("with_masks", [True, False])
@pytest.mark.parametrize("deterministic", [False, True])
def test_fused_get_action_equals_the_per_head_path(batch: int, with_masks: bool, deterministic: bool) -> None:
    torch.manual_seed(3)
    net = FactoredRecurrentActorCritic()  # full size: 512/512, heads 256
    state, bp = make_inputs(batch, 1, seed=batch)
    g = torch.Generator().manual_seed(1)
    hidden = (torch.randn(1, batch, 512, generator=g), torch.randn(1, batch, 512, generator=g))
    masks = _random_step_masks(batch, seed=batch) if with_masks else None
    plain, fast = _both_paths(net, state[:, 0], bp[:, 0], hidden, masks, deterministic=deterministic, return_q_all=True)
    _assert_same_step(plain, fast)
    # every sampled action is valid under the mask actually used, and canonicalised heads have log-prob 0
    for name in HEAD_NAMES:
        assert fast.masks[name].gather(1, fast.actions[name][:, None]).all(), name
    rel = torch.stack([torch.tensor([n in HEAD_RELEVANCE[LifecycleOp(int(o))] for n in HEAD_NAMES]) for o in fast.sampled_op])
    log_probs = torch.stack([fast.log_probs[n] for n in HEAD_NAMES], dim=1)
    assert torch.equal(log_probs[~rel], torch.zeros(int((~rel).sum())))


def test_fused_get_action_samples_the_same_actions_many_times(small_net: FactoredRecurrentActorCritic) -> None:
    """Same generator, same draws: over many rows both paths pick the same actions (same random stream)."""
    b = 512
    state, bp = make_inputs(b, 1, seed=11)
    plain, fast = _both_paths(small_net, state, bp, None, _random_step_masks(b, seed=12), seed=5, return_q_all=True)
    _assert_same_step(plain, fast)
    assert len(set(fast.actions["op"].tolist())) == NUM_OPS  # every op was drawn: the comparison covers them all


def test_fused_get_action_in_float64(small_net: FactoredRecurrentActorCritic) -> None:
    net = small_net.double()
    state, bp = make_inputs(6, 1)
    plain, fast = _both_paths(net, state.double(), bp, None, _random_step_masks(6, seed=2), return_q_all=True)
    _assert_same_step(plain, fast, atol=1e-12)
    assert fast.value.dtype == torch.float64


def test_fused_weights_follow_optimizer_steps_loads_and_replaced_heads(small_net: FactoredRecurrentActorCritic) -> None:
    net = small_net
    state, bp = make_inputs(8, 1, seed=4)
    masks = _random_step_masks(8, seed=4)
    _assert_same_step(*_both_paths(net, state, bp, None, masks, return_q_all=True))  # builds the cache
    # optimizer steps change every parameter in place; the fused Adam (the trainer's) without bumping versions
    actions = random_actions(8, 1, seed=3)
    actions["op"] = torch.tensor([[1], [2], [3], [1], [2], [3], [1], [2]])
    for fused in (False, True):
        opt = torch.optim.Adam(net.parameters(), lr=1e-2, fused=fused)
        net.zero_grad()
        ev = net.evaluate_actions(state, bp, actions)
        (sum(v.sum() for v in ev.log_probs.values()) + ev.value.sum()).backward()
        opt.step()
        _assert_same_step(*_both_paths(net, state, bp, None, masks, return_q_all=True))
    # a state_dict load
    torch.manual_seed(9)
    net.load_state_dict(FactoredRecurrentActorCritic(state_dim=121, num_slots=3, feature_dim=32, hidden_dim=32).state_dict())
    _assert_same_step(*_both_paths(net, state, bp, None, masks, return_q_all=True))
    # a replaced head, then a non-standard one (the fused path steps aside for it)
    net.blueprint_head = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 13))
    _assert_same_step(*_both_paths(net, state, bp, None, masks, return_q_all=True))
    net.style_head = torch.nn.Linear(32, 4)
    assert net._fast_weights() is None
    _assert_same_step(*_both_paths(net, state, bp, None, masks, return_q_all=True))
    # a layer removed from a head (no registration hook fires) is noticed too
    net.style_head = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    assert net._fast_weights() is not None
    del net.heads["tempo"][1]  # Linear, Linear: not the standard head
    assert net._fast_weights() is None
    _assert_same_step(*_both_paths(net, state, bp, None, masks, return_q_all=True))
    # a parameter replaced in place of another (setattr) is noticed by identity
    net.heads["tempo"] = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    _assert_same_step(*_both_paths(net, state, bp, None, masks, return_q_all=True))
    net.heads["tempo"][2].weight = torch.nn.Parameter(torch.randn(3, 16))
    _assert_same_step(*_both_paths(net, state, bp, None, masks, return_q_all=True))


def test_gradients_reach_every_head_parameter_after_fused_steps(small_net: FactoredRecurrentActorCritic) -> None:
    """The fused copies are no_grad side buffers: evaluate_actions still trains every head's own parameters."""
    state, bp = make_inputs(3, 4)
    small_net.get_action(state[:, 0], bp[:, 0])  # builds the fused copy
    actions = random_actions(3, 4, seed=7)
    actions["op"] = torch.tensor([[1, 2, 3, 1]] * 3)
    ev = small_net.evaluate_actions(state, bp, actions)
    (sum(v.sum() for v in ev.log_probs.values()) + sum(v.sum() for v in ev.entropy.values()) + ev.value.sum()).backward()
    for name, p in small_net.named_parameters():
        if name.startswith(("heads.", "value_head.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert not any(t.requires_grad for t in small_net._fast_cache[2:] if torch.is_tensor(t))
    assert set(small_net.state_dict()) == {n for n, _ in small_net.named_parameters()} | {n for n, _ in small_net.named_buffers()}


def test_fused_get_action_validation_errors_match_the_per_head_path(small_net: FactoredRecurrentActorCritic) -> None:
    state, bp = make_inputs(4, 1)
    masks = _random_step_masks(4, seed=1)
    masks["style"][2] = False
    errors = []
    for fused in (False, True):
        small_net.fused_heads = fused
        with pytest.raises(ValueError) as err:
            small_net.get_action(state, bp, None, {**masks, "op": torch.tensor([[False, True, False, False, False, False]] * 4)})
        errors.append(str(err.value))
    assert errors[0] == errors[1] == "style: mask has a row with no valid action (first at index [2])"


def test_copies_and_pickles_leave_the_fused_copy_behind(small_net: FactoredRecurrentActorCritic) -> None:
    import copy
    import pickle

    state, bp = make_inputs(5, 1)
    small_net.get_action(state, bp)
    assert small_net._fast_cache is not None
    for clone in (copy.deepcopy(small_net), pickle.loads(pickle.dumps(small_net))):
        assert clone._fast_cache is None
        _assert_same_step(*_both_paths(clone, state, bp, None, _random_step_masks(5, seed=3), return_q_all=True))
        _assert_same_step(_both_paths(small_net, state, bp, None, _random_step_masks(5, seed=3), return_q_all=True)[1],
                          _both_paths(clone, state, bp, None, _random_step_masks(5, seed=3), return_q_all=True)[1])


# --- get_action's fused step: MKL-packed weights, one flat random draw, the checks of its fast entry ---------


def _call_until_packed(net: FactoredRecurrentActorCritic, batch: int) -> None:
    """Call get_action at ``batch`` until its plan has decided on packing (MKL_PACK_AFTER_CALLS calls)."""
    state, bp = make_inputs(batch, 1, seed=21)
    state = state.to(net.lstm_norm.weight.dtype)
    for _ in range(network.MKL_PACK_AFTER_CALLS):
        net.get_action(state[:, 0], bp[:, 0], None, _random_step_masks(batch, seed=21))


def test_fused_get_action_with_mkl_packed_weights_equals_the_per_head_path() -> None:
    torch.manual_seed(3)
    net = FactoredRecurrentActorCritic()  # full size, float32: the packed path's case
    batch = 8
    _call_until_packed(net, batch)
    plan = net._fast_cache.batches[batch]
    if network._mkl_pack(net._fast_cache.first_wt, batch) is None:
        pytest.skip("MKL packed GEMM is not available in this torch build")
    assert plan.packed is not None
    state, bp = make_inputs(batch, 1, seed=5)
    g = torch.Generator().manual_seed(2)
    hidden = (torch.randn(1, batch, 512, generator=g), torch.randn(1, batch, 512, generator=g))
    for seed in range(3):
        _assert_same_step(*_both_paths(net, state[:, 0], bp[:, 0], hidden, _random_step_masks(batch, seed=seed), seed=seed, return_q_all=True))
    # a weight change drops the packed copies with the rest of the fused layout; they come back after enough calls
    with torch.no_grad():
        net.heads["op"][0].weight.mul_(1.5)
    _assert_same_step(*_both_paths(net, state[:, 0], bp[:, 0], hidden, _random_step_masks(batch, seed=7), return_q_all=True))
    assert net._fast_cache.batches[batch].packed is None
    _call_until_packed(net, batch)
    assert net._fast_cache.batches[batch].packed is not None
    _assert_same_step(*_both_paths(net, state[:, 0], bp[:, 0], hidden, _random_step_masks(batch, seed=8), return_q_all=True))


def test_mkl_packing_is_bounded_and_skips_batches_below_its_minimum(small_net: FactoredRecurrentActorCritic) -> None:
    for batch in (1, 2, 3, 4):
        _call_until_packed(small_net, batch)
    plans = small_net._fast_cache.batches
    assert plans[1].packed is None  # below MKL_PACKED_MIN_BATCH
    assert sum(p.packed is not None for p in plans.values()) <= network.MKL_PACKED_MAX_BATCH_SIZES
    small_net.double()  # float64: never packed
    _call_until_packed(small_net, 2)
    assert small_net._fast_cache.batches[2].packed is None


@pytest.mark.parametrize("deterministic", [False, True])
def test_one_flat_draw_and_per_head_draws_give_the_same_step(small_net: FactoredRecurrentActorCritic, monkeypatch: pytest.MonkeyPatch, deterministic: bool) -> None:
    """The fused step's single exponential_ draw reproduces the per-head draws (checked per batch size at run time);
    where it would not, the step draws head by head. Both give the plain path's actions."""
    batch = 64
    state, bp = make_inputs(batch, 1, seed=9)
    masks = _random_step_masks(batch, seed=9)
    one_draw = _both_paths(small_net, state, bp, None, masks, seed=4, deterministic=deterministic, return_q_all=True)
    assert small_net._fast_cache.batches[batch].race_index is not None  # the CPU generator draws value by value
    _assert_same_step(*one_draw)
    monkeypatch.setattr(network, "_one_draw_matches_per_head", lambda *args: False)
    small_net.invalidate_fast_weights()
    per_head = _both_paths(small_net, state, bp, None, masks, seed=4, deterministic=deterministic, return_q_all=True)
    assert small_net._fast_cache.batches[batch].race_index is None
    _assert_same_step(*per_head)
    for name in HEAD_NAMES:
        assert torch.equal(one_draw[1].actions[name], per_head[1].actions[name])
        assert torch.equal(one_draw[1].log_probs[name], per_head[1].log_probs[name])


def _bad_step_inputs(net: FactoredRecurrentActorCritic) -> dict[str, tuple]:
    """get_action arguments that fail one check each (B = 3)."""
    state, bp = make_inputs(3, 1, seed=2)
    state, bp = state[:, 0], bp[:, 0]
    h, c = net.initial_hidden(3)
    masks = _random_step_masks(3, seed=2)
    dead = dict(masks, slot_by_op=masks["slot_by_op"].clone())
    dead["op"] = torch.ones(3, NUM_OPS, dtype=torch.bool)
    dead["slot_by_op"][2, int(LifecycleOp.FOSSILIZE)] = False

    def bad(t: torch.Tensor, value: float, index: tuple) -> torch.Tensor:
        t = t.clone()
        t[index] = value
        return t

    return {
        "state nan": (bad(state, math.nan, (1, 4)), bp, (h, c), masks),
        "state inf": (bad(state, math.inf, (2, 0)), bp, (h, c), masks),
        "hidden h inf": (state, bp, (bad(h, -math.inf, (0, 1, 3)), c), masks),
        "hidden c nan": (state, bp, (h, bad(c, math.nan, (0, 2, 5))), masks),
        "hidden shape": (state, bp, net.initial_hidden(4), masks),
        "hidden dtype": (state, bp, (h.double(), c), masks),
        "hidden not a pair": (state, bp, [h], masks),
        "state dtype": (state.double(), bp, (h, c), masks),
        "state width": (state[:, :120], bp, (h, c), masks),
        "blueprint 13": (state, bad(bp, 13, (0, 1)), (h, c), masks),
        "blueprint -2": (state, bad(bp, -2, (2, 2)), (h, c), masks),
        "blueprint dtype": (state, bp.int(), (h, c), masks),
        "mask dtype": (state, bp, (h, c), dict(masks, style=masks["style"].float())),
        "mask shape": (state, bp, (h, c), dict(masks, tempo=masks["tempo"][:, :2])),
        "mask key": (state, bp, (h, c), dict(masks, tempos=masks["tempo"])),
        "masks not a dict": (state, bp, (h, c), list(masks.values())),
        "dead slot row": (state, bp, (h, c), dead),
        "empty mask row": (state, bp, (h, c), dict(masks, alpha_curve=torch.zeros(3, 5, dtype=torch.bool), op=torch.tensor([[False, False, True, False, False, False]] * 3))),
    }


@pytest.mark.parametrize("case", list(_bad_step_inputs(FactoredRecurrentActorCritic(feature_dim=32, hidden_dim=32))))
def test_fused_entry_checks_raise_what_the_full_checks_raise(small_net: FactoredRecurrentActorCritic, case: str) -> None:
    """The fused step's fast entry checks (one reduction for state and hidden, ...) accept nothing the full checks
    reject: every bad input raises the same error, with the same message, on both paths."""
    args = _bad_step_inputs(small_net)[case]
    errors = []
    for fused in (False, True):
        small_net.fused_heads = fused
        with pytest.raises((ValueError, TypeError)) as err:
            small_net.get_action(*args, generator=torch.Generator().manual_seed(0))
        errors.append((type(err.value), str(err.value)))
    small_net.fused_heads = True
    assert errors[0] == errors[1]


def test_fused_entry_takes_step_masks_with_a_time_axis(small_net: FactoredRecurrentActorCritic) -> None:
    state, bp = make_inputs(4, 1, seed=3)
    masks = _random_step_masks(4, seed=3)
    flat = small_net.get_action(state[:, 0], bp[:, 0], None, masks, generator=torch.Generator().manual_seed(1), return_q_all=True)
    timed = small_net.get_action(state, bp, None, {k: v.unsqueeze(1) for k, v in masks.items()}, generator=torch.Generator().manual_seed(1), return_q_all=True)
    _assert_same_step(flat, timed, atol=0.0)


def test_fused_get_action_at_batch_zero_and_beyond_the_kept_plans(small_net: FactoredRecurrentActorCritic) -> None:
    for batch in (0, network._PLAN_MAX_BATCH + 1):  # no rows; a batch whose plan is made per call (draws head by head)
        state, bp = make_inputs(batch, 1, seed=6)
        plain, fast = _both_paths(small_net, state, bp, None, _random_step_masks(batch, seed=6) if batch else None, return_q_all=True)
        _assert_same_step(plain, fast)
        assert fast.q_all.shape == (batch, NUM_OPS) and fast.hidden[0].shape == (1, batch, 32)
    assert network._PLAN_MAX_BATCH + 1 not in small_net._fast_cache.batches


def test_fused_step_plans_and_packing_leave_the_default_generator_alone(small_net: FactoredRecurrentActorCritic) -> None:
    """Making a batch plan (its draw check) and packing weights use scratch generators: with generator=None,
    the fused path draws from the global generator exactly as the per-head path does, call after call."""
    batch = 4
    state, bp = make_inputs(batch, 1, seed=13)
    masks = _random_step_masks(batch, seed=13)
    runs = []
    for fused in (False, True):
        small_net.fused_heads = fused
        small_net.invalidate_fast_weights()  # a fresh plan: its draw check (and packing) happen inside the calls
        torch.manual_seed(123)
        runs.append([small_net.get_action(state, bp, None, masks, return_q_all=True) for _ in range(network.MKL_PACK_AFTER_CALLS + 2)])
    small_net.fused_heads = True
    for plain, fast in zip(*runs):
        _assert_same_step(plain, fast)
