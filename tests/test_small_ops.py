"""The env's small-map convolution and max-pool compute what nn.Conv2d and F.max_pool2d compute."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esper_lib.envs.small_ops import TOEPLITZ_MAX_ENTRIES, SmallConv2d, max_pool2x2


@pytest.mark.parametrize(
    "c_in, c_out, size, kernel, padding, groups",
    [
        (1, 4, 8, 3, 1, 1),  # host block 0 (Toeplitz)
        (4, 8, 8, 3, 1, 1),  # host block 1 (too large: conv2d)
        (8, 8, 4, 3, 1, 1),  # host block 2 (Toeplitz)
        (4, 4, 8, 3, 1, 4),  # depthwise seed
        (8, 2, 4, 1, 0, 1),  # 1x1
        (2, 1, 4, 3, 1, 1),  # attention's spatial map
        (8, 4, 1, 1, 0, 1),  # attention's squeeze-excitation on the pooled map
    ],
)
def test_small_conv_matches_conv2d_values_and_gradients(c_in, c_out, size, kernel, padding, groups):
    torch.manual_seed(0)
    small = SmallConv2d(c_in, c_out, kernel, padding=padding, groups=groups)
    torch.manual_seed(0)
    ref = nn.Conv2d(c_in, c_out, kernel, padding=padding, groups=groups)
    assert all(torch.equal(a, b) for a, b in zip(small.parameters(), ref.parameters()))  # same init draws
    x = torch.randn(16, c_in, size, size, requires_grad=True)
    y, y_ref = small(x), ref(x)
    g = torch.randn_like(y_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    gx, gw, gb = torch.autograd.grad(y, (x, small.weight, small.bias), g)
    rx, rw, rb = torch.autograd.grad(y_ref, (x, ref.weight, ref.bias), g)
    for a, b in ((gx, rx), (gw, rw), (gb, rb)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(small(x), y_ref, rtol=1e-5, atol=1e-5)


def test_toeplitz_limit_covers_every_default_host_conv_but_the_widest():
    entries = {(1, 4, 8): 64 * 256, (4, 8, 8): 256 * 512, (8, 8, 4): 128 * 128}
    assert [n <= TOEPLITZ_MAX_ENTRIES for n in entries.values()] == [True, False, True]


def test_max_pool_matches_max_pool2d_with_and_without_autograd():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(8, 3, 8, 8))  # ReLU zeros make ties, as in the host
    x.requires_grad_(True)
    y, y_ref = max_pool2x2(x), F.max_pool2d(x, 2)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (rx,) = torch.autograd.grad(y_ref, x, g)
    assert torch.equal(gx, rx)  # ties resolved like max_pool2d (first maximum of the window)
    with torch.inference_mode():
        assert torch.equal(max_pool2x2(x.detach()), y_ref.detach())
