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
from esper_lib.envs.blueprints import BottleneckSeed, ConvHeavySeed
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
    "n, c_in, c_out, h, w, kernel, padding, groups, relu, bias",
    [
        (64, 1, 4, 8, 8, 3, 1, 1, True, True),  # host block 0
        (64, 4, 8, 8, 8, 3, 1, 1, True, True),  # host block 1
        (16, 8, 8, 4, 4, 3, 1, 1, False, True),  # 4x4 maps: whole-plane vectors
        (16, 8, 8, 4, 4, 3, 1, 1, True, False),  # ... without bias
        (16, 8, 8, 4, 4, 3, 1, 8, True, True),  # depthwise on 4x4
        (16, 8, 4, 4, 4, 1, 0, 1, True, True),  # 1x1 on 4x4
        (8, 3, 5, 12, 12, 3, 1, 1, True, True),  # 12-wide rows (vector width 4)
        (16, 4, 4, 8, 8, 3, 1, 4, True, True),  # depthwise
        (16, 8, 2, 8, 8, 1, 0, 1, False, True),  # 1x1
        (4, 2, 3, 8, 8, 1, 1, 1, False, True),  # 1x1 with padding: the map grows
        (5, 6, 9, 5, 5, 3, 1, 3, True, True),  # odd sizes, groups of 2 -> 3 (vector width 1)
        (7, 2, 3, 6, 6, 3, 0, 1, False, True),  # no padding: the map shrinks
        (3, 4, 6, 5, 10, 3, 1, 2, True, True),  # not square
        (2, 3, 3, 7, 12, 1, 0, 1, False, False),  # not square, 1x1
        (2, 2, 4, 16, 8, 3, 1, 1, True, True),  # taller than wide, 8-wide rows
    ],
)
def test_conv2d_matches_torch_values_and_gradients(n, c_in, c_out, h, w, kernel, padding, groups, relu, bias):
    torch.manual_seed(0)
    x = torch.randn(n, c_in, h, w, requires_grad=True)
    wt = torch.randn(c_out, c_in // groups, kernel, kernel, requires_grad=True)
    b = torch.randn(c_out, requires_grad=True) if bias else None
    ref = F.conv2d(x, wt, b, padding=padding, groups=groups)
    ref = F.relu(ref) if relu else ref
    out = native.conv2d(x, wt, b, padding, groups, relu)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    inputs = (x, wt) if b is None else (x, wt, b)
    for got, want in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the no-autograd call gives the same values
        assert torch.equal(native.conv2d(x, wt, b, padding, groups, relu), out.detach())


@pytest.mark.parametrize("wanted", ["x", "weight", "bias"])
def test_conv2d_computes_each_gradient_alone(wanted):
    torch.manual_seed(8)
    tensors = {"x": torch.randn(6, 4, 8, 8), "weight": torch.randn(8, 4, 3, 3), "bias": torch.randn(8)}
    tensors[wanted].requires_grad_(True)
    g = torch.randn(6, 8, 8, 8)
    out = native.conv2d(tensors["x"], tensors["weight"], tensors["bias"], 1, 1, True)
    ref = F.relu(F.conv2d(tensors["x"], tensors["weight"], tensors["bias"], padding=1))
    (got,) = torch.autograd.grad(out, tensors[wanted], g)
    (want,) = torch.autograd.grad(ref, tensors[wanted], g)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_direct_calls_refuse_what_the_kernels_cannot_read():
    x, w = torch.randn(2, 4, 8, 8), torch.randn(8, 4, 3, 3)
    with pytest.raises(ValueError, match="bias must be a 1-d contiguous float32 CPU tensor"):
        native.conv2d(x, w, torch.randn(8, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match="x must be a 4-d contiguous float32"):
        native.conv2d(x.transpose(2, 3), w, None, 1)
    with pytest.raises(ValueError, match="1x1 or 3x3 kernel"):
        native.conv2d(x, torch.randn(8, 4, 5, 5), None, 2)
    with pytest.raises(ValueError, match="groups=2"):
        native.conv2d(x, torch.randn(8, 4, 3, 3), None, 1, groups=2)
    with pytest.raises(ValueError, match="x must be a 4-d contiguous float32"):
        native.max_pool2x2(x.double())


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


@pytest.mark.parametrize("h, w", [(8, 8), (7, 9), (4, 6)])
def test_max_pool_equals_max_pool2d_bit_for_bit_with_ties_nan_and_inf(h, w):
    torch.manual_seed(3)
    x = torch.relu(torch.randn(8, 3, h, w))  # ReLU zeros make ties
    x[0, 0, 0, 1] = float("nan")
    x[0, 0, 1, 0] = float("nan")  # a second NaN in the same window: the later one wins, as in max_pool2d
    x[1, 1, :2, :2] = float("-inf")  # a window of -inf only
    x[2, 2, 0, 0] = float("inf")
    x.requires_grad_(True)
    y, ref = native.max_pool2x2(x), F.max_pool2d(x, 2)
    assert type(y.grad_fn).__name__ == "_NativeMaxPool2x2Backward"
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.nan_to_num(), ref.nan_to_num())
    g = torch.randn_like(ref)
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_small_ops_use_the_kernels_only_when_switched_on(native_on):
    torch.manual_seed(4)
    conv = SmallConv2d(4, 8, 3, padding=1)
    x = torch.randn(16, 4, 8, 8, requires_grad=True)
    on = conv.forward_relu(x)
    assert type(on.grad_fn).__name__ == "_Conv2dBackward"  # the native autograd node
    native.enable(False)
    off = conv.forward_relu(x)
    assert "Relu" in type(off.grad_fn).__name__
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-5)
    native.enable(True)
    pooled = max_pool2x2(on)
    assert type(pooled.grad_fn).__name__ == "_NativeMaxPool2x2Backward"
    torch.testing.assert_close(pooled, F.max_pool2d(on, 2), rtol=0, atol=0)


def test_run_sequential_equals_the_sequential_bit_for_bit_on_the_torch_path():
    native.enable(False)
    torch.manual_seed(5)
    seed = ConvHeavySeed(8)
    nn.init.normal_(seed[2].weight)  # the zero-initialised last layer would hide the first one
    x = torch.randn(16, 8, 4, 4)
    assert torch.equal(run_sequential(seed, x), nn.Sequential.forward(seed, x))


@pytest.mark.parametrize("module", ["host", "bottleneck_seed", "conv_heavy_seed"])
def test_host_and_seeds_agree_with_the_torch_path(native_on, module):
    torch.manual_seed(6)
    if module == "host":  # blocks with fused conv + ReLU (+ the native max-pool)
        net, x = HostCNN((4, 8, 8)), torch.randn(64, 1, 8, 8)
        loss_of = lambda out: F.cross_entropy(out, torch.arange(64) % 10)  # noqa: E731
    else:  # two fused pairs, or one, on an 8x8 map (the native path)
        net = BottleneckSeed(8) if module == "bottleneck_seed" else ConvHeavySeed(4)
        for p in net.parameters():
            nn.init.normal_(p, std=0.5)  # the zero-initialised last layer would hide the others' gradients
        x = torch.randn(16, net[0].in_channels, 8, 8)
        loss_of = lambda out: (out**2).mean()  # noqa: E731
    grads = []
    for flag in (True, False):
        native.enable(flag)
        net.zero_grad()
        loss_of(net(x)).backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "make, x",
    [
        (lambda: SmallConv2d(4, 8, 3, padding=1), torch.randn(2, 4, 8, 8).transpose(2, 3)),  # not contiguous
        (lambda: SmallConv2d(4, 8, 3, padding=1).double(), torch.randn(2, 4, 8, 8, dtype=torch.float64)),
        (lambda: SmallConv2d(4, 8, 3, padding=1, stride=2), torch.randn(2, 4, 8, 8)),
        (lambda: SmallConv2d(4, 8, 3, padding=1, padding_mode="reflect"), torch.randn(2, 4, 8, 8)),
        (lambda: SmallConv2d(4, 8, 5, padding=2), torch.randn(2, 4, 8, 8)),
    ],
)
def test_small_conv_falls_back_to_torch_where_the_kernels_do_not_apply(native_on, make, x):
    torch.manual_seed(9)
    conv = make()
    x = x.requires_grad_(True)
    out = conv.forward_relu(x)
    assert type(out.grad_fn).__name__ != "_Conv2dBackward"  # not the native node
    native.enable(False)
    torch.testing.assert_close(out, conv.forward_relu(x), rtol=0, atol=0)  # the same torch computation


def test_small_conv_falls_back_when_the_bias_is_not_float32(native_on):
    conv = SmallConv2d(4, 8, 3, padding=1)
    conv.bias = nn.Parameter(conv.bias.detach().double())
    with pytest.raises(RuntimeError):  # torch's conv2d refuses mixed dtypes, instead of the kernels misreading the bias
        conv.forward_relu(torch.randn(2, 4, 8, 8))


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


@pytest.mark.parametrize("compiler", ["missing", "false"])
def test_failed_build_warns_and_leaves_the_torch_path(monkeypatch, tmp_path, compiler):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler") if compiler == "missing" else "false")  # false: exits 1
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


def _run_kernels(lib, x, w, b, gy, pad, groups):
    """Forward (with ReLU) and all gradients of one convolution, and the max-pool, through ``lib``."""
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    ho, wo = h + 2 * pad - k + 1, wd + 2 * pad - k + 1
    y = torch.empty(n, o, ho, wo)
    assert lib.conv2d_forward(x.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(), n, c, h, wd, o, k, pad, groups, 1) == 0
    gx, gw, gb = torch.empty_like(x), torch.empty_like(w), torch.empty_like(b)
    assert lib.conv2d_backward(x.data_ptr(), w.data_ptr(), gy.data_ptr(), y.data_ptr(), gx.data_ptr(), gw.data_ptr(),
                               gb.data_ptr(), n, c, h, wd, o, k, pad, groups) == 0
    pooled = torch.empty(n, o, ho // 2, wo // 2)
    idx = torch.empty(n, o, ho // 2, wo // 2, dtype=torch.uint8)
    lib.maxpool2x2_forward(y.data_ptr(), pooled.data_ptr(), idx.data_ptr(), n * o, ho, wo)
    return y, gx, gw, gb, pooled, idx


def _avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not _avx512(), reason="needs a CPU with AVX-512 to compare 512-bit and 256-bit code")
def test_results_do_not_depend_on_the_vector_width(tmp_path, monkeypatch):
    """The same source built for AVX-512 and for AVX2 (both with FMA) gives bit-identical results."""
    monkeypatch.setenv("ESPER_NATIVE_CACHE", str(tmp_path))
    wide = native._load(native._build())
    narrow = native._load(native._build((*native.FLAGS, "-mno-avx512f")))
    torch.manual_seed(7)
    for n, c, o, size, k, pad, groups in [(64, 4, 8, 8, 3, 1, 1), (16, 8, 8, 4, 3, 1, 1), (16, 8, 8, 4, 3, 1, 8), (9, 6, 6, 12, 1, 0, 2)]:
        x, w, b = torch.randn(n, c, size, size), torch.randn(o, c // groups, k, k), torch.randn(o)
        gy = torch.randn(n, o, size + 2 * pad - k + 1, size + 2 * pad - k + 1)
        for a, z in zip(_run_kernels(wide, x, w, b, gy, pad, groups), _run_kernels(narrow, x, w, b, gy, pad, groups)):
            assert torch.equal(a, z)


@pytest.mark.parametrize("value, expected", [("1", True), ("on", True), ("0", False), ("", False), (None, False)])
def test_the_environment_variable_switches_the_kernels_at_import(value, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ESPER_NATIVE"}
    if value is not None:
        env["ESPER_NATIVE"] = value
    out = subprocess.run([sys.executable, "-c", "from esper_lib.envs import native; print(native._enabled)"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(expected)


def test_max_pool_picks_the_window_element_max_pool2d_picks_for_every_tie_and_nan_pattern():
    """All 4^4 windows over {0, 1, 2, NaN}: the same value and the same gradient route as max_pool2d."""
    import itertools

    vals = [0.0, 1.0, 2.0, float("nan")]
    windows = torch.tensor(list(itertools.product(vals, repeat=4)))  # [256, 4] in row-major window order
    x = windows.view(16, 16, 2, 2).permute(0, 2, 1, 3).reshape(1, 1, 32, 32).contiguous().requires_grad_(True)
    y, ref = native.max_pool2x2(x), F.max_pool2d(x, 2)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.nan_to_num(), ref.nan_to_num())
    g = torch.arange(1.0, 257.0).view(1, 1, 16, 16)  # distinct gradients show which element each window picked
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_a_damaged_cached_library_is_rebuilt_and_the_cache_is_readable(monkeypatch, tmp_path):
    import stat

    monkeypatch.setenv("ESPER_NATIVE_CACHE", str(tmp_path))
    native._library.cache_clear()
    try:
        path = native._build()
        assert path.stat().st_mode & stat.S_IROTH  # other users of a shared cache can load it
        path.write_bytes(b"not a shared library")
        assert native.available()  # the damaged file is replaced by a fresh build
        assert path.read_bytes() != b"not a shared library"
    finally:
        monkeypatch.undo()
        native._library.cache_clear()


def test_a_compiler_command_with_arguments_is_split(monkeypatch, tmp_path):
    import shutil

    cc = shutil.which("cc") or shutil.which("gcc")
    monkeypatch.setenv("CC", f"{cc} -pipe")
    monkeypatch.setenv("ESPER_NATIVE_CACHE", str(tmp_path))
    assert native._compiler() == [cc, "-pipe"]
    assert native._load(native._build()).conv2d_forward is not None
