"""The opt-in C kernels (esper_lib.envs.native) compute what conv2d, ReLU and max_pool2d compute.

Values and gradients against torch's kernels (float rounding apart), the first-maximum rule of the
max-pool bit for bit, determinism, the switch, the fallback when the build fails, and a MorphoEnv
episode with the kernels on: deterministic per seed, and close to the torch path's episode.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esper_lib.envs import native
from esper_lib.envs.blueprints import ConvHeavySeed
from esper_lib.envs.host import HostCNN
from esper_lib.envs.morpho import MorphoEnv
from esper_lib.envs.small_ops import SmallConv2d, max_pool2x2, run_sequential

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler here: the native kernels cannot be built")


@pytest.fixture(autouse=True)
def restore_switch():
    before = native._enabled
    yield
    native.enable(before)


@pytest.fixture
def native_on():
    native.enable(True)


@pytest.mark.parametrize(
    "n, c_in, c_out, size, kernel, padding, groups, relu",
    [
        (64, 1, 4, 8, 3, 1, 1, True),  # host block 0
        (64, 4, 8, 8, 3, 1, 1, True),  # host block 1
        (16, 8, 8, 4, 3, 1, 1, False),  # 4x4 maps: whole-plane vectors
        (16, 8, 8, 4, 3, 1, 8, True),  # depthwise on 4x4
        (16, 8, 4, 4, 1, 0, 1, True),  # 1x1 on 4x4
        (8, 3, 5, 12, 3, 1, 1, True),  # 12-wide rows (vector width 4)
        (16, 4, 4, 8, 3, 1, 4, True),  # depthwise
        (16, 8, 2, 8, 1, 0, 1, False),  # 1x1
        (5, 6, 9, 5, 3, 1, 3, True),  # odd sizes, groups of 2 -> 3 (vector width 1)
        (7, 2, 3, 6, 3, 0, 1, False),  # no padding: the map shrinks
    ],
)
def test_conv2d_matches_torch_values_and_gradients(n, c_in, c_out, size, kernel, padding, groups, relu):
    torch.manual_seed(0)
    x = torch.randn(n, c_in, size, size, requires_grad=True)
    w = torch.randn(c_out, c_in // groups, kernel, kernel, requires_grad=True)
    b = torch.randn(c_out, requires_grad=True)
    ref = F.conv2d(x, w, b, padding=padding, groups=groups)
    ref = F.relu(ref) if relu else ref
    out = native.conv2d(x, w, b, padding, groups, relu)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the no-autograd call gives the same values
        assert torch.equal(native.conv2d(x, w, b, padding, groups, relu), out.detach())


def test_conv2d_gradients_only_where_needed_and_without_bias():
    torch.manual_seed(1)
    x = torch.randn(8, 4, 8, 8)  # the host's input: no gradient wanted
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    out = native.conv2d(x, w, None, 1, 1, True)
    (gw,) = torch.autograd.grad(out.sum(), (w,))
    (rw,) = torch.autograd.grad(F.relu(F.conv2d(x, w, None, padding=1)).sum(), (w,))
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-4)


def test_conv2d_is_deterministic():
    torch.manual_seed(2)
    x = torch.randn(64, 4, 8, 8, requires_grad=True)
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    g = torch.randn(64, 8, 8, 8)
    runs = []
    for _ in range(2):
        y = native.conv2d(x, w, b, 1, 1, True)
        runs.append((y, *torch.autograd.grad(y, (x, w, b), g)))
    assert all(torch.equal(a, c) for a, c in zip(*runs))


def test_max_pool_equals_max_pool2d_bit_for_bit_with_ties_and_nan():
    torch.manual_seed(3)
    x = torch.relu(torch.randn(8, 3, 8, 8))  # ReLU zeros make ties
    x[0, 0, 0, 1] = float("nan")
    x.requires_grad_(True)
    y, ref = native.max_pool2x2(x), F.max_pool2d(x, 2)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.nan_to_num(), ref.nan_to_num())
    g = torch.randn_like(ref)
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_small_ops_use_the_kernels_only_when_switched_on(native_on):
    torch.manual_seed(4)
    conv = SmallConv2d(4, 8, 3, padding=1)
    x = torch.randn(16, 4, 8, 8, requires_grad=True)
    on = conv.forward_relu(x)
    assert on.grad_fn is not None and "Conv2d" in type(on.grad_fn).__name__  # the native autograd node
    native.enable(False)
    off = conv.forward_relu(x)
    assert "Relu" in type(off.grad_fn).__name__
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-5)
    native.enable(True)
    torch.testing.assert_close(max_pool2x2(on), F.max_pool2d(on, 2), rtol=0, atol=0)


def test_run_sequential_equals_the_sequential_bit_for_bit_on_the_torch_path():
    native.enable(False)
    torch.manual_seed(5)
    seed = ConvHeavySeed(8)
    nn.init.normal_(seed[2].weight)  # the zero-initialised last layer would hide the first one
    x = torch.randn(16, 8, 4, 4)
    assert torch.equal(run_sequential(seed, x), nn.Sequential.forward(seed, x))


def test_host_and_seed_agree_with_the_torch_path(native_on):
    torch.manual_seed(6)
    host = HostCNN((4, 8, 8))
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    grads = []
    for flag in (True, False):
        native.enable(flag)
        host.zero_grad()
        F.cross_entropy(host(x), y).backward()
        grads.append([p.grad.clone() for p in host.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _episode(seed: int, steps: int) -> tuple[list[float], list[torch.Tensor]]:
    env = MorphoEnv(max_epochs=steps, train_size=128, val_size=64)
    env.reset(seed=seed)
    action = np.zeros(8, dtype=np.int64)
    accs = []
    for _ in range(steps):
        _, _, _, _, info = env.step(action)
        accs.append(info["val_accuracy"])
    return accs, [p.detach().clone() for p in env.host.parameters()]


def test_env_episode_with_the_kernels_is_deterministic_and_close_to_the_torch_path(native_on):
    acc_a, w_a = _episode(3, 3)
    acc_b, w_b = _episode(3, 3)
    assert acc_a == acc_b and all(torch.equal(a, b) for a, b in zip(w_a, w_b))
    native.enable(False)
    acc_t, w_t = _episode(3, 3)
    assert np.max(np.abs(np.subtract(acc_a, acc_t))) <= 2 / 64  # at most a couple of validation images flip
    for a, b in zip(w_a, w_t):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_failed_build_warns_and_leaves_the_torch_path(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("ESPER_NATIVE_CACHE", str(tmp_path / "cache"))
    native._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="native kernels unavailable"):
            assert not native.available()
        native.enable(True)
        assert not native.enabled()
        conv = SmallConv2d(4, 8, 3, padding=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = conv(torch.randn(2, 4, 8, 8))  # the torch path
        assert out.shape == (2, 8, 8, 8)
    finally:
        monkeypatch.undo()
        native._library.cache_clear()
    assert native.available()
