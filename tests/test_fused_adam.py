"""FusedAdam (the env's optimizer) against torch.optim.Adam(fused=True): the same updates bit for bit."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from esper_lib.envs.fused_adam import FusedAdam


def _params(seed: int, shapes: list[tuple[int, ...]]) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _grads(seed: int, params: list[nn.Parameter], skip: set[int] = frozenset()) -> None:
    g = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        p.grad = None if i in skip else torch.randn(p.shape, generator=g)


def test_updates_equal_torch_fused_adam_bit_for_bit_with_skipped_params():
    shapes = [(4, 1, 3, 3), (4,), (8, 4, 3, 3), (10,)]
    ours, ref = _params(0, shapes), _params(0, shapes)
    opt, ref_opt = FusedAdam(ours, lr=5e-3), torch.optim.Adam(ref, lr=5e-3, fused=True)
    for k in range(6):
        skip = {1} if k in (0, 3) else set()  # a parameter without a gradient is skipped (no state, no step)
        _grads(k, ours, skip)
        _grads(k, ref, skip)
        opt.step()
        ref_opt.step()
        for a, b in zip(ours, ref):
            assert torch.equal(a, b)
    exp_avg, exp_avg_sq, step = opt.state_of(ours[1])
    assert float(step) == 4.0 and torch.equal(exp_avg, ref_opt.state[ref[1]]["exp_avg"])
    assert torch.equal(exp_avg_sq, ref_opt.state[ref[1]]["exp_avg_sq"])


def test_adopt_carries_moments_and_step_counts_like_the_env_did_with_torch_adam():
    """A seed trained by its own Adam joins the host's Adam with its state (the env's FOSSILIZE)."""
    host_shapes, seed_shapes = [(6,), (3, 2)], [(5,), (2, 2)]
    host, seed = _params(1, host_shapes), _params(2, seed_shapes)
    host_ref, seed_ref = _params(1, host_shapes), _params(2, seed_shapes)
    opt, seed_opt = FusedAdam(host, lr=1e-2), FusedAdam(seed, lr=3e-2)
    ref_opt, seed_ref_opt = torch.optim.Adam(host_ref, lr=1e-2, fused=True), torch.optim.Adam(seed_ref, lr=3e-2, fused=True)
    for k in range(3):  # the seed trains alone for three steps, the host for three
        for ps, o in ((host + seed, (opt, seed_opt)), (host_ref + seed_ref, (ref_opt, seed_ref_opt))):
            _grads(10 + k, ps)
            for x in o:
                x.step()
    opt.adopt(seed, seed_opt)
    ref_opt.add_param_group({"params": seed_ref})  # what the env did with torch.optim.Adam
    for p in seed_ref:
        ref_opt.state[p] = seed_ref_opt.state[p]
    for k in range(4):
        _grads(20 + k, host + seed)
        _grads(20 + k, host_ref + seed_ref)
        opt.step()
        ref_opt.step()
    for a, b in zip(host + seed, host_ref + seed_ref):
        assert torch.equal(a, b)
    assert float(opt.state_of(seed[0])[2]) == 7.0 and opt.state_of(nn.Parameter(torch.zeros(1))) is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"lr": 0.0}, "lr"), ({"lr": float("nan")}, "lr"), ({"lr": 1e-3, "betas": (0.9, 1.0)}, "betas"), ({"lr": 1e-3, "eps": 0.0}, "eps")],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedAdam(_params(0, [(2,)]), **kwargs)


def test_bad_parameters_are_named():
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="twice"):
        FusedAdam([p, p], lr=1e-3)
    with pytest.raises(ValueError, match="float32"):
        FusedAdam([nn.Parameter(torch.zeros(3, dtype=torch.float64))], lr=1e-3)
