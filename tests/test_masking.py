"""MaskedCategorical against a reference, canonicalisation and causal masks."""
from __future__ import annotations

import math

import pytest
import torch

from esper_lib.constants import (
    CANONICAL_ACTION,
    HEAD_NAMES,
    HEAD_RELEVANCE,
    MASK_FILL_VALUE,
    LifecycleOp,
    head_sizes,
)
from esper_lib.masking import (
    MaskedCategorical,
    canonicalise_actions,
    canonicalise_mask,
    causal_masks,
)


def random_mask(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random bool mask with at least one valid action per row."""
    mask = torch.rand(shape, generator=generator) < 0.5
    forced = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    mask.scatter_(-1, forced.unsqueeze(-1), True)
    return mask


@pytest.mark.parametrize("head,k", list(head_sizes(3).items()))
def test_masked_actions_never_sampled(head: str, k: int) -> None:
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(4000, k, generator=g) * 3
    mask = random_mask((4000, k), g)
    dist = MaskedCategorical(logits, mask, head=head)
    draws = dist.sample(generator=g)
    assert draws.shape == (4000,)
    assert mask.gather(-1, draws.unsqueeze(-1)).all(), f"{head}: a masked action was sampled"


def test_sample_frequencies_match_renormalised_probs() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5])
    mask = torch.tensor([True, False, True, True, False])
    dist = MaskedCategorical(logits.expand(40000, 5), mask.expand(40000, 5))
    freq = torch.bincount(dist.sample(generator=g), minlength=5).float() / 40000
    ref = torch.softmax(logits[mask], dim=-1)
    assert freq[~mask].sum() == 0
    assert torch.allclose(freq[mask], ref, atol=0.01)


def test_log_prob_matches_reference_over_valid_logits() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(256, 13, generator=g)
    mask = random_mask((256, 13), g)
    dist = MaskedCategorical(logits, mask)
    actions = dist.sample(generator=g)
    got = dist.log_prob(actions)
    for i in range(0, 256, 17):
        valid = mask[i].nonzero().flatten()
        ref = torch.log_softmax(logits[i, valid], dim=-1)
        j = (valid == actions[i]).nonzero().item()
        assert got[i].item() == pytest.approx(ref[j].item(), abs=1e-6)


def test_entropy_ignores_masked_actions() -> None:
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.0]])
    mask = torch.tensor([[True, False, True, False]])
    dist = MaskedCategorical(logits, mask)
    p = torch.softmax(torch.tensor([0.3, 2.0]), dim=-1)
    assert dist.entropy().item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-6)
    # Changing a masked logit changes nothing.
    logits2 = logits.clone()
    logits2[0, 1] = 50.0
    assert torch.equal(MaskedCategorical(logits2, mask).entropy(), dist.entropy())


def test_normalised_entropy() -> None:
    logits = torch.zeros(3, 4)
    mask = torch.tensor([[True, False, False, False], [True, True, False, False], [True, True, True, True]])
    ne = MaskedCategorical(logits, mask).normalized_entropy()
    assert ne[0].item() == 0.0  # one valid action
    assert ne[1].item() == pytest.approx(1.0)  # uniform over 2
    assert ne[2].item() == pytest.approx(1.0)
    skewed = MaskedCategorical(torch.tensor([[5.0, 0.0, 0.0, 0.0]]), torch.ones(1, 4, dtype=torch.bool))
    assert 0.0 < skewed.normalized_entropy().item() < 0.5


def test_all_false_row_raises_naming_head() -> None:
    mask = torch.tensor([[True, False], [False, False]])
    with pytest.raises(ValueError, match="blueprint.*no valid action"):
        MaskedCategorical(torch.zeros(2, 2), mask, head="blueprint")


def test_log_prob_of_masked_action_raises() -> None:
    dist = MaskedCategorical(torch.zeros(1, 3), torch.tensor([[True, False, True]]), head="slot")
    with pytest.raises(ValueError, match="slot.*masked"):
        dist.log_prob(torch.tensor([1]))
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        dist.log_prob(torch.tensor([3]))
    with pytest.raises(TypeError, match="int64"):
        dist.log_prob(torch.tensor([1.0]))


def test_bad_mask_dtype_and_shape() -> None:
    with pytest.raises(TypeError, match="bool"):
        MaskedCategorical(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="shape"):
        MaskedCategorical(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))


def test_masked_probs_exactly_zero_and_fill_finite() -> None:
    logits = torch.randn(5, 6, requires_grad=True)
    mask = torch.tensor([True, False, True, False, True, False]).expand(5, 6)
    dist = MaskedCategorical(logits, mask)
    assert (dist.probs[~mask] == 0).all()
    assert dist.masked_logits.min().item() == MASK_FILL_VALUE
    (dist.entropy().sum() + dist.log_prob(torch.zeros(5, dtype=torch.long)).sum()).backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[~mask] == 0).all()


def test_mode_is_argmax_of_valid_logits() -> None:
    logits = torch.tensor([[5.0, 1.0, 2.0]])
    mask = torch.tensor([[False, True, True]])
    assert MaskedCategorical(logits, mask).mode().item() == 2


@pytest.mark.parametrize("op", list(LifecycleOp))
def test_canonicalised_heads_have_zero_log_prob_and_entropy(op: LifecycleOp) -> None:
    sizes = head_sizes(3)
    ops = torch.full((7,), int(op))
    for name in HEAD_NAMES[1:]:
        logits = torch.randn(7, sizes[name])
        mask = canonicalise_mask(name, torch.ones(7, sizes[name], dtype=torch.bool), ops)
        dist = MaskedCategorical(logits, mask, head=name)
        if name in HEAD_RELEVANCE[op]:
            assert mask.all()
            assert (dist.entropy() > 0).all()
        else:
            assert mask.sum(-1).eq(1).all() and mask[:, CANONICAL_ACTION[name]].all()
            action = torch.full((7,), CANONICAL_ACTION[name])
            assert torch.equal(dist.log_prob(action), torch.zeros(7))
            assert torch.equal(dist.entropy(), torch.zeros(7))


def test_causal_masks_follow_relevance_table() -> None:
    ops = torch.arange(6)
    masks = causal_masks(ops)
    for op in LifecycleOp:
        for name in HEAD_NAMES:
            assert bool(masks[name][int(op)]) == (name in HEAD_RELEVANCE[op])
    assert masks["op"].all()


def test_canonicalise_actions_replaces_only_irrelevant_heads() -> None:
    actions = {name: torch.full((2,), 2 if name != "slot" else 1) for name in HEAD_NAMES}
    actions["op"] = torch.tensor([int(LifecycleOp.WAIT), int(LifecycleOp.GERMINATE)])
    out = canonicalise_actions(actions)
    for name in HEAD_NAMES[1:]:
        assert out[name][0].item() == CANONICAL_ACTION[name]
        expected = actions[name][1].item() if name in HEAD_RELEVANCE[LifecycleOp.GERMINATE] else CANONICAL_ACTION[name]
        assert out[name][1].item() == expected


def test_max_entropy_of_uniform() -> None:
    dist = MaskedCategorical(torch.zeros(1, 13), torch.ones(1, 13, dtype=torch.bool))
    assert dist.entropy().item() == pytest.approx(math.log(13), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 1e3, 1e5])
def test_masked_action_has_probability_zero_at_any_logit_scale(dtype: torch.dtype, scale: float) -> None:
    if dtype == torch.float16 and scale > 1e4:
        pytest.skip("float16 cannot hold logits of 1e5")
    # valid logits far below the masked one: without the shift by the valid max, the masked action wins
    logits = torch.tensor([[-1.0, -2.0, 0.0], [2.0, 1.0, 3.0]], dtype=torch.float64).mul(scale).to(dtype)
    mask = torch.tensor([[True, True, False], [True, True, False]])
    dist = MaskedCategorical(logits, mask)
    probs = dist.probs
    assert probs.dtype == dtype
    assert (probs[~mask] == 0).all()
    assert torch.isfinite(dist.log_probs_all).all() and torch.isfinite(dist.entropy()).all()
    assert dist.mode().tolist() == [0, 0]
    g = torch.Generator().manual_seed(0)
    big = MaskedCategorical(logits.repeat(2000, 1), mask.repeat(2000, 1))
    draws = big.sample(generator=g)
    assert not bool((draws == 2).any())


def test_masked_fill_keeps_gradients_finite_at_large_scale() -> None:
    logits = (torch.tensor([[-1.0, -2.0, 0.0, -1.5]]) * 1e5).requires_grad_()
    mask = torch.tensor([[True, True, False, True]])
    dist = MaskedCategorical(logits, mask)
    (dist.entropy().sum() + dist.log_prob(torch.tensor([1])).sum()).backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0, 2] == 0
    assert dist.log_prob(torch.tensor([0])).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_logits_raise_when_validating(bad: float) -> None:
    logits = torch.zeros(2, 4)
    logits[1, 2] = bad
    with pytest.raises(ValueError, match=r"blueprint: logits contains a non-finite value \(.*\) at index \[1, 2\]"):
        MaskedCategorical(logits, torch.ones(2, 4, dtype=torch.bool), head="blueprint")
    MaskedCategorical(logits, torch.ones(2, 4, dtype=torch.bool), validate=False)  # hot path: no check
