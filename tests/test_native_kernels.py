"""The C kernels (esper_lib.envs.native, on by default where they build) compute what conv2d, ReLU and max_pool2d compute.

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
        (13, 8, 6, 4, 4, 3, 1, 2, True, True),  # 4x4 planes: a partial chunk of images for the weight gradient
        (3, 4, 5, 2, 2, 1, 1, 1, False, True),  # 1x1, padding 1: a 4x4 output whose input gradient takes the plane path
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


@pytest.mark.parametrize("value, expected", [("1", True), ("on", True), (None, True), ("", True), ("0", False), ("Off", False), ("no", False)])
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


@pytest.mark.parametrize("flag", [False, True])
def test_enable_reaches_the_processes_started_after_it(monkeypatch, flag):
    """Spawned workers (training and evaluation pools) re-import ``native`` and read ESPER_NATIVE: enable sets it."""
    import subprocess
    import sys

    monkeypatch.delenv("ESPER_NATIVE", raising=False)  # unset: the workers' default would be on
    native.enable(flag)
    out = subprocess.run([sys.executable, "-c", "from esper_lib.envs import native; print(native._enabled)"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(flag)


@pytest.mark.parametrize("width", [32, 8])  # 8: the host's maps, a vectorised path (65 row pairs: one left over)
def test_max_pool_picks_the_window_element_max_pool2d_picks_for_every_tie_and_nan_pattern(width):
    """All 4^4 windows over {0, 1, 2, NaN}: the same value and the same gradient route as max_pool2d."""
    import itertools

    vals = [0.0, 1.0, 2.0, float("nan")]
    windows = torch.tensor(list(itertools.product(vals, repeat=4)))  # [256, 4] in row-major window order
    per_row = width // 2
    x = windows.view(256 // per_row, per_row, 2, 2).permute(0, 2, 1, 3).reshape(1, 1, 512 // per_row, width)
    if width == 8:  # one more row pair: an odd number of row pairs
        x = torch.cat([x, windows[:4].view(4, 2, 2).permute(1, 0, 2).reshape(1, 1, 2, 8)], dim=2)
    x = x.contiguous().requires_grad_(True)
    y, ref = native.max_pool2x2(x), F.max_pool2d(x, 2)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.nan_to_num(), ref.nan_to_num())
    g = torch.arange(1.0, ref.numel() + 1.0).view(ref.shape)  # distinct gradients show which element each window picked
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


def test_conv_relu_pool_in_one_node_equals_conv_relu_then_pool_bit_for_bit():
    """``pool=True`` (host block 1: conv, ReLU, max-pool as one autograd node) changes no value or gradient."""
    torch.manual_seed(11)
    x = torch.randn(64, 4, 8, 8, requires_grad=True)
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    fused = native.conv2d(x, w, b, 1, 1, True, pool=True)
    apart = native.max_pool2x2(native.conv2d(x, w, b, 1, 1, True))
    assert type(fused.grad_fn).__name__ == "_Conv2dBackward" and torch.equal(fused, apart)
    g = torch.randn_like(fused)
    for a, c in zip(torch.autograd.grad(fused, (x, w, b), g), torch.autograd.grad(apart, (x, w, b), g)):
        assert torch.equal(a, c)
    with torch.no_grad():
        assert torch.equal(native.conv2d(x, w, b, 1, 1, True, pool=True), apart)
    with pytest.raises(ValueError, match="even height and width"):
        native.conv2d(torch.randn(2, 4, 7, 7), w, b, 1, 1, True, pool=True)


def test_host_block_with_a_pool_runs_as_one_native_node(native_on):
    host = HostCNN((4, 8, 8))
    out = run_sequential(host.blocks[1], torch.randn(8, 4, 8, 8, requires_grad=True))
    assert out.shape == (8, 8, 4, 4) and type(out.grad_fn).__name__ == "_Conv2dBackward"


@pytest.mark.parametrize("bias", [True, False])
def test_head_loss_matches_mean_pool_linear_and_cross_entropy(bias):
    torch.manual_seed(12)
    h = torch.randn(64, 8, 4, 4, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    b = torch.randn(10, requires_grad=True) if bias else None
    y = torch.randint(0, 10, (64,))
    loss, logits = native.head_loss(h, w, b, y)
    ref_logits = F.linear(h.mean(dim=(2, 3)), w, b)
    ref = F.cross_entropy(ref_logits, y)
    assert not logits.requires_grad and loss.shape == ()
    torch.testing.assert_close(logits, ref_logits.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    inputs = (h, w) if b is None else (h, w, b)
    for a, c in zip(torch.autograd.grad(3.0 * loss, inputs), torch.autograd.grad(3.0 * ref, inputs)):  # a scaled loss too
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)


def test_head_loss_refuses_bad_labels_and_shapes():
    h, w, b = torch.randn(4, 8, 4, 4), torch.randn(10, 8), torch.randn(10)
    with pytest.raises(ValueError, match=r"class indices in \[0, 10\)"):
        native.head_loss(h, w, b, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="y must be a contiguous int64"):
        native.head_loss(h, w, b, torch.tensor([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="shapes do not match"):
        native.head_loss(h, torch.randn(10, 7), b, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="h must be a 4-d contiguous float32"):
        native.head_loss(h.double(), w, b, torch.zeros(4, dtype=torch.int64))


def test_train_loss_is_forward_then_cross_entropy_bit_for_bit_on_the_torch_path_and_close_with_the_kernels():
    torch.manual_seed(13)
    host, x, y = HostCNN((4, 8, 8)), torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    native.enable(False)
    loss, logits = host.train_loss(x, y)
    assert torch.equal(logits, host(x)) and torch.equal(loss, F.cross_entropy(host(x), y))
    native.enable(True)
    loss_n, logits_n = host.train_loss(x, y)
    assert type(loss_n.grad_fn).__name__ == "_HeadLossBackward"
    torch.testing.assert_close(loss_n, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits_n, logits.detach(), rtol=1e-5, atol=1e-5)


def _clip_adam_case(seed: int, scale: float) -> tuple[list[nn.Parameter], list[list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 1, 3, 3), (4,), (8, 4, 3, 3), (10, 8)]
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    grads = [[scale * torch.randn(s, generator=g) for s in shapes] for _ in range(5)]
    return params, grads


@pytest.mark.parametrize("scale", [0.01, 10.0])  # gradients below and above the clip norm
def test_clip_adam_matches_clip_grad_norm_then_torch_adam(scale):
    from esper_lib.envs.fused_adam import FusedAdam

    ours, grads = _clip_adam_case(1, scale)
    ref, _ = _clip_adam_case(1, scale)
    opt, ref_opt = FusedAdam(ours, lr=5e-3), torch.optim.Adam(ref, lr=5e-3)
    for step_grads in grads:
        for p, q, gr in zip(ours, ref, step_grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        st = [opt.state_of(p) for p in ours]
        norm = native.clip_adam_(ours, [s[0] for s in st], [s[1] for s in st], [s[2] for s in st], 5e-3, (0.9, 0.999), 1e-8, 5.0)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, 5.0)
        ref_opt.step()
        torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)  # clipped in place, as clip_grad_norm_ does
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-6)  # steps of ~lr = 5e-3
    assert float(opt.state_of(ours[0])[2]) == 5.0


def test_clip_adam_refuses_what_it_cannot_read():
    p = nn.Parameter(torch.randn(3))
    m, v, t = torch.zeros(3), torch.zeros(3), torch.zeros(())
    with pytest.raises(ValueError, match="needs a gradient"):
        native.clip_adam_([p], [m], [v], [t], 1e-3, (0.9, 0.999), 1e-8, 5.0)
    p.grad = torch.randn(3)
    with pytest.raises(ValueError, match="exp_avg has shape"):
        native.clip_adam_([p], [torch.zeros(4)], [v], [t], 1e-3, (0.9, 0.999), 1e-8, 5.0)
    with pytest.raises(ValueError, match="one entry per parameter"):
        native.clip_adam_([p], [m], [v], [], 1e-3, (0.9, 0.999), 1e-8, 5.0)
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        native.clip_adam_([p], [m], [v], [t], 1e-3, (0.9, 0.999), 1e-8, 0.0)


def test_fused_adam_native_clip_and_step_only_with_the_kernels_on_and_skips_parameters_without_gradients():
    from esper_lib.envs.fused_adam import FusedAdam

    params = [nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(2, 3))]
    opt = FusedAdam(params, lr=1e-2)
    params[0].grad = torch.randn(4)
    native.enable(False)
    assert opt.native_clip_and_step(5.0) is None and float(opt.state_of(params[0])[2]) == 0.0
    native.enable(True)
    before = params[1].detach().clone()
    norm = opt.native_clip_and_step(5.0)
    torch.testing.assert_close(norm, params[0].grad.norm(), rtol=1e-6, atol=0)
    assert float(opt.state_of(params[0])[2]) == 1.0 and float(opt.state_of(params[1])[2]) == 0.0
    assert torch.equal(params[1].detach(), before)  # no gradient: untouched, as in FusedAdam.step
    params[1].grad = torch.randn(3, 2).t()  # not contiguous: left to the torch path
    assert opt.native_clip_and_step(5.0) is None


def test_grad_norm_is_the_global_euclidean_norm():
    grads = [torch.randn(3, 3), torch.randn(7), torch.randn(1)]
    torch.testing.assert_close(native.grad_norm(grads), torch.cat([g.flatten() for g in grads]).norm(), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="at least one"):
        native.grad_norm([])


def _host_epoch_reference(host: HostCNN, opt, x: torch.Tensor, y: torch.Tensor, batch_size: int):
    """The minibatch loop of ``MorphoEnv._train_epoch`` for a plain host, with the kernels on."""
    losses, norms, logits = [], [], []
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        loss, lg = host.train_loss(xb, yb)
        for p in opt.params:
            p.grad = None
        loss.backward()
        norms.append(opt.native_clip_and_step(5.0))
        losses.append(loss.detach())
        logits.append(lg)
    return torch.stack(losses), torch.stack(norms), torch.cat(logits)


@pytest.mark.parametrize(
    "channels, pool_after, n, batch_size",
    [
        ((4, 8, 8), (1,), 200, 64),  # the env's host; a last minibatch of 8
        ((16, 32, 32), (1,), 128, 64),  # HostCNN's defaults
        ((3, 5), (0,), 37, 16),  # two blocks, the pool after the first, odd sizes
        ((4, 6, 6, 5), (0, 1), 50, 50),  # two pools (8x8 -> 4x4 -> 2x2), one minibatch
    ],
)
def test_host_epoch_equals_the_minibatch_loop_bit_for_bit(native_on, channels, pool_after, n, batch_size):
    from esper_lib.envs.fused_adam import FusedAdam

    torch.manual_seed(0)
    host_a = HostCNN(channels, pool_after)
    host_b = HostCNN(channels, pool_after)
    host_b.load_state_dict(host_a.state_dict())
    opt_a, opt_b = FusedAdam(host_a.host_parameters(), 5e-3), FusedAdam(host_b.host_parameters(), 5e-3)
    blocks = host_a.native_blocks()
    assert blocks == [(1, i in pool_after) for i in range(len(channels))]
    for epoch in range(3):
        x = torch.randn(n, 1, 8, 8) * (1 + 10 * (epoch == 1))  # epoch 1: gradients above the clip norm
        y = torch.randint(0, 10, (n,))
        ref = _host_epoch_reference(host_a, opt_a, x, y, batch_size)
        losses, norms, seed_norms, logits = opt_b.native_host_epoch(x, y, batch_size, blocks, 5.0)
        for r, o in zip(ref, (losses, norms, logits)):
            assert torch.equal(r, o)
        assert not seed_norms.any()
        for pa, pb in zip(opt_a.params, opt_b.params):
            assert torch.equal(pa.detach(), pb.detach()) and torch.equal(pa.grad, pb.grad)
            sa, sb = opt_a.state_of(pa), opt_b.state_of(pb)
            assert all(torch.equal(u, v) for u, v in zip(sa, sb))
    assert float(opt_b.state_of(opt_b.params[0])[2]) == 3 * -(-n // batch_size)


def test_host_epoch_refuses_bad_input_before_any_update(native_on):
    from esper_lib.envs.fused_adam import FusedAdam

    host = HostCNN((4, 8, 8))
    opt = FusedAdam(host.host_parameters(), 5e-3)
    blocks = host.native_blocks()
    before = [p.detach().clone() for p in opt.params]
    x, y = torch.randn(20, 1, 8, 8), torch.randint(0, 10, (20,))
    with pytest.raises(ValueError, match=r"class indices in \[0, 10\)"):
        opt.native_host_epoch(x, torch.cat([y[:-1], torch.tensor([10])]), 8, blocks, 5.0)
    assert all(torch.equal(p.detach(), b) for p, b in zip(opt.params, before))  # the bad label is in the last minibatch
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        opt.native_host_epoch(x, y, 0, blocks, 5.0)
    with pytest.raises(ValueError, match="y must be a contiguous int64"):
        opt.native_host_epoch(x, y.int(), 8, blocks, 5.0)
    with pytest.raises(ValueError, match="x must be a 4-d contiguous float32"):
        opt.native_host_epoch(x.double(), y, 8, blocks, 5.0)
    state = (opt._exp_avgs, opt._exp_avg_sqs, opt._steps)
    with pytest.raises(ValueError, match="start with 2 tensors per block"):
        native.host_epoch(x, y, 8, opt.params[:5], blocks, *[a[:5] for a in state], 5e-3, (0.9, 0.999), 1e-8, 5.0)
    with pytest.raises(ValueError, match="slots have one entry per block"):
        opt.native_host_epoch(x, y, 8, blocks, 5.0, slots=[None, None])
    for mode, groups, message in [
        ("blending", 4, r"slots\[1\].mode must be one of"),
        ("stream", 3, r"groups must divide the 8 channels"),
        ("stream", 4, r"the Adam state of each of its 4 parameters"),  # a learning seed without its Adam state
        ("fossil", 4, r"a fossil's parameters must be among params"),
    ]:
        bad = native.SlotSeed(mode, 0, 0.5, [torch.zeros(8)] * 4, groups=groups)
        with pytest.raises(ValueError, match=message):
            opt.native_host_epoch(x, y, 8, blocks, 5.0, slots=[None, bad, None])
    with pytest.raises(ValueError, match=r"block 0: weight \(4, 1, 3, 3\) must be \[O, 3, K, K\]"):
        native.host_epoch(torch.randn(4, 3, 8, 8), y[:4], 2, opt.params, blocks, *state, 5e-3, (0.9, 0.999), 1e-8, 5.0)
    with pytest.raises(ValueError, match="odd map"):
        opt.native_host_epoch(torch.randn(4, 1, 5, 5), y[:4], 2, blocks, 5.0)  # block 1 pools a 5x5 map
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        opt.native_host_epoch(x, y, 8, blocks, 0.0)
    native.enable(False)
    assert opt.native_host_epoch(x, y, 8, blocks, 5.0) is None


def test_native_blocks_take_conv_relu_and_pool_blocks_only():
    assert HostCNN((4, 8, 8)).native_blocks() == [(1, False), (1, True), (1, False)]
    assert HostCNN((4, 8), pool_after=()).native_blocks() == [(1, False), (1, False)]
    host = HostCNN((4, 8, 8))
    host.head = nn.Linear(8, 10, bias=False)
    assert host.native_blocks() is None
    host = HostCNN((4, 8, 8))
    host.blocks[2][0] = SmallConv2d(8, 8, 3, padding=1, groups=2)
    assert host.native_blocks() is None
    host = HostCNN((4, 8, 8))
    host.blocks[1] = nn.Sequential(SmallConv2d(4, 8, 3, padding=1), nn.Tanh())
    assert host.native_blocks() is None


def test_native_slots_describe_each_stage_of_a_seed_and_refuse_unknown_modules():
    from esper_lib.constants import AlphaCurveAction, BlueprintAction, GerminationStyle, TempoAction
    from esper_lib.envs.blueprints import AttentionSeed, ChannelGate, NormSeed
    from esper_lib.envs.fused_adam import FusedAdam
    from esper_lib.envs.lifecycle import SeedSlot
    from esper_lib.envs.native_slots import stream_seed, training_seed

    host_opt = FusedAdam([nn.Parameter(torch.zeros(3))], 1e-3)
    slot = SeedSlot(1, 8)
    assert slot.passes_through and training_seed(slot, host_opt) is None  # empty
    seed, gate = NormSeed(8), ChannelGate(8)
    slot.germinate(seed, gate, BlueprintAction.NORM, GerminationStyle.SIGMOID_ADD, TempoAction.STANDARD, 1.0)
    slot.optimizer = FusedAdam([*seed.parameters(), *gate.parameters()], 0.05)
    assert slot.passes_through and training_seed(slot, host_opt) is None  # GERMINATED: not trained, not in the stream
    slot.advance(3)
    spec = training_seed(slot, host_opt)
    assert not slot.passes_through and (spec.mode, spec.style, spec.groups, spec.lr) == ("training", 2, 4, 0.05)
    assert stream_seed(slot) is None  # without gradients a TRAINING seed changes nothing
    assert spec.params == [seed.norm.weight, seed.norm.bias, gate.weight, gate.bias]
    slot.advance(3)
    assert slot.alpha == 0.0 and slot.passes_through and training_seed(slot, host_opt) is False  # learns, no gradient
    slot.begin_epoch()
    spec = training_seed(slot, host_opt)
    assert spec.mode == "stream" and spec.alpha == slot.alpha > 0
    assert stream_seed(slot).alpha == slot.alpha and stream_seed(slot).params == spec.params
    slot.optimizer = FusedAdam([*seed.parameters(), *gate.parameters()], 0.05, betas=(0.8, 0.9))
    assert training_seed(slot, host_opt) is False  # one Adam setting for all (the env's)
    slot.prune(0, AlphaCurveAction.LINEAR)
    assert slot.passes_through and training_seed(slot, host_opt) is None
    for seed, layers in ((BottleneckSeed(8), ((1, True), (1, True), (1, False))), (AttentionSeed(8), ())):
        other, gate = SeedSlot(0, 8), ChannelGate(8)
        other.germinate(seed, gate, BlueprintAction.CONV_LIGHT, GerminationStyle.LINEAR_ADD, TempoAction.FAST, 1.0)
        other.optimizer = FusedAdam([*seed.parameters(), *gate.parameters()], 0.05)
        other.advance(3)
        spec = training_seed(other, host_opt)
        assert spec.layers == layers and spec.params == [*seed.parameters(), gate.weight, gate.bias]
        assert spec.body == ("convs" if layers else "attention") and spec.stepped == (6 if layers else 7)
    from esper_lib.envs.native_slots import seed_body

    assert seed_body(AttentionSeed(64)) is not None and seed_body(AttentionSeed(72)) is None  # at most 64 channels in C
    other.seed = nn.Identity()  # a seed module the kernels do not know: the minibatch loop
    assert training_seed(other, host_opt) is False
    other.advance(3)
    other.begin_epoch()
    assert other.in_stream and stream_seed(other) is False  # ... and the torch passes


def test_env_trains_a_plain_host_in_one_call_with_the_results_of_the_minibatch_loop(native_on, monkeypatch):
    def episode() -> list:
        env = MorphoEnv(max_epochs=6, train_size=150, val_size=64)
        env.reset(seed=11)
        out, done = [], False
        while not done:
            obs, reward, term, trunc, info = env.step(np.zeros(8, dtype=np.int64))  # WAIT
            done = term or trunc
            out += [repr(obs), reward, info["val_accuracy"], *[p.detach().clone() for p in env.host.parameters()]]
        return out

    plain_epochs = []
    original = MorphoEnv._native_epoch
    monkeypatch.setattr(MorphoEnv, "_native_epoch", lambda self, x, y: plain_epochs.append(original(self, x, y)) or plain_epochs[-1])
    fused = episode()
    monkeypatch.setattr(MorphoEnv, "_native_epoch", lambda self, x, y: False)
    loop = episode()
    assert plain_epochs == [True] * 6 and len(fused) == len(loop)
    for a, b in zip(fused, loop):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def _seeded_env(blueprint: str, style: int, seed_lr: float) -> MorphoEnv:
    """An env whose slots hold ``blueprint`` seeds of ``style``, trained a few epochs (the minibatch loop): slot 0
    TRAINING, slot 1 BLENDING (alpha between 0 and 1), slot 2 FOSSILIZED at alpha 0.7."""
    from esper_lib.constants import AlphaSpeedAction, AlphaTargetAction, BlueprintAction, LifecycleOp, TempoAction

    env = MorphoEnv(max_epochs=30, train_size=100, val_size=32, seed_lr=seed_lr)
    env.reset(seed=7)
    env._native_epoch = lambda x, y: False  # the setup runs the minibatch loop
    act = {"blueprint": int(BlueprintAction[blueprint]), "style": style, "tempo": int(TempoAction.STANDARD),
           "alpha_target": int(AlphaTargetAction.SEVENTY), "alpha_speed": int(AlphaSpeedAction.INSTANT), "alpha_curve": 0}
    for k in range(3):
        env._execute(LifecycleOp.GERMINATE, {**act, "slot": k})
        env._execute(LifecycleOp.ADVANCE, {**act, "slot": k})
    for _ in range(2):
        env._train_epoch()
    for k in (1, 2):
        env._execute(LifecycleOp.ADVANCE, {**act, "slot": k})
        env.host.slots[k].begin_epoch()
    env._train_epoch()
    env._execute(LifecycleOp.SET_ALPHA_TARGET, {**act, "slot": 2})
    env._execute(LifecycleOp.FOSSILIZE, {**act, "slot": 2})
    del env._native_epoch
    return env


@pytest.mark.parametrize(
    "blueprint, style",  # styles: 0 LINEAR_ADD, 1 LINEAR_MULTIPLY, 2 SIGMOID_ADD, 3 GATED_GATE
    [("NORM", 0), ("NORM", 1), ("NORM", 2), ("NORM", 3), ("CONV_LIGHT", 1), ("CONV_SMALL", 3), ("CONV_HEAVY", 0),
     ("DEPTHWISE", 2), ("BOTTLENECK", 1), ("ATTENTION", 0), ("ATTENTION", 1), ("ATTENTION", 3)],
)
def test_host_epoch_with_seeds_matches_the_minibatch_loop(native_on, blueprint, style):
    from esper_lib.constants import SeedStage

    fused, loop = _seeded_env(blueprint, style, 0.05), _seeded_env(blueprint, style, 0.05)
    stages = [s.stage for s in fused.host.slots]
    assert stages == [SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.FOSSILIZED]
    assert 0 < fused.host.slots[1].alpha < 1 and fused.host.slots[2].alpha == pytest.approx(0.7)
    last = [list(s.seed.parameters())[-1] for s in fused.host.slots]  # zero at germination
    assert all(float(p.detach().abs().max()) > 1e-3 for p in last)  # the seeds have learned
    loop._native_epoch = lambda x, y: False
    calls = []
    original = fused._native_epoch
    fused._native_epoch = lambda x, y: calls.append(original(x, y)) or calls[-1]
    for _ in range(2):
        fused._train_epoch()
        loop._train_epoch()
    assert calls == [True, True]
    assert fused._train_loss == pytest.approx(loop._train_loss, rel=1e-5)
    assert fused._train_acc == loop._train_acc
    assert fused._host_grad_norm == pytest.approx(loop._host_grad_norm, rel=1e-4)
    for a, b in zip(fused.host.slots, loop.host.slots):
        assert a.stats.grad_norm == pytest.approx(b.stats.grad_norm, rel=1e-4, abs=1e-7)
        pa, pb = a.seed_parameters(), b.seed_parameters()
        assert [p.grad is None for p in pa] == [p.grad is None for p in pb]
        for p, q in zip(pa, pb):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    for p, q in zip(fused._opt.params, loop._opt.params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    for a, b in ((fused._opt, loop._opt), (fused.host.slots[1].optimizer, loop.host.slots[1].optimizer)):
        for p, q in zip(a.params, b.params):
            for u, v in zip(a.state_of(p), b.state_of(q)):
                torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("blueprint, style", [("NORM", 1), ("CONV_HEAVY", 2), ("BOTTLENECK", 3), ("ATTENTION", 0), ("DEPTHWISE", 1)])
def test_host_forward_matches_forward_ablations(native_on, blueprint, style):
    env = _seeded_env(blueprint, style, 0.05)  # slot 0 TRAINING (no effect without gradients), 1 BLENDING, 2 fossil
    host, x, y = env.host, env._data.x_val, env._data.y_val
    ablations = [{1}, {2}, {1, 2}]
    with torch.inference_mode():
        passes = env._native_forward(x, y, ablations)
        logits, cache = host.forward_cached(x)
        reference = [logits, *host.forward_ablations(cache, ablations)]
    assert passes.shape == (4, len(y), 10)
    for ours, ref in zip(passes, reference):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(reference[0], reference[3], atol=1e-4)  # the seeds change the logits


def test_env_evaluation_with_host_forward_matches_the_torch_passes(native_on):
    fused, plain = _seeded_env("CONV_SMALL", 1, 0.05), _seeded_env("CONV_SMALL", 1, 0.05)
    plain._native_forward = lambda x, y, ablations: None
    calls = []
    original = fused._native_forward
    fused._native_forward = lambda x, y, ablations: calls.append(ablations) or original(x, y, ablations)
    loss_a, acc_a = fused._evaluate()
    loss_b, acc_b = plain._evaluate()
    assert calls == [[{1}, {2}, {1, 2}]]  # the in-stream slots, alone and in pairs
    assert loss_a == pytest.approx(loss_b, rel=1e-5) and abs(acc_a - acc_b) <= 1 / len(fused._data.y_val)
    for a, b in zip(fused.host.slots, plain.host.slots):
        assert (a.stats.contribution is None) == (b.stats.contribution is None)
        if a.stats.contribution is not None:
            assert abs(a.stats.contribution - b.stats.contribution) <= 2 / len(fused._data.y_val)
            assert a.stats.freshness == b.stats.freshness


def test_host_forward_refuses_bad_input(native_on):
    host = HostCNN((4, 8, 8))
    params, blocks = host.host_parameters(), host.native_blocks()
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    with pytest.raises(ValueError, match="ablations must be 1-64 bit masks in"):
        native.host_forward(x, y, params, blocks, [None] * 3, [8])
    with pytest.raises(ValueError, match="class indices"):
        native.host_forward(x, y + 10, params, blocks, [None] * 3, [0])
    with pytest.raises(ValueError, match="slots have one entry per block"):
        native.host_forward(x, y, params, blocks, [None] * 2, [0])
    out = native.host_forward(x, y, params, blocks, [None] * 3, [0, 7])
    with torch.no_grad():
        torch.testing.assert_close(out[0], host(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(out[0], out[1])  # no seed: ablating empty slots changes nothing


@pytest.mark.skipif(not _avx512(), reason="needs a CPU with AVX-512 to compare 512-bit and 256-bit code")
@pytest.mark.parametrize("blueprint, style", [("NORM", 3), ("ATTENTION", 2), ("BOTTLENECK", 1)])
def test_whole_epochs_and_passes_do_not_depend_on_the_vector_width(tmp_path, monkeypatch, blueprint, style):
    monkeypatch.setenv("ESPER_NATIVE_CACHE", str(tmp_path))
    builds = [native._load(native._build()), native._load(native._build((*native.FLAGS, "-mno-avx512f")))]
    native.enable(True)
    results = []
    for lib in builds:
        monkeypatch.setattr(native, "_library", lambda lib=lib: lib)
        env = _seeded_env(blueprint, style, 0.05)  # its setup runs the minibatch loop on this build too
        for _ in range(2):
            env._train_epoch()
        results.append((env._evaluate(), [p.detach().clone() for p in env.host.parameters()], env._train_loss))
    (eval_a, params_a, loss_a), (eval_b, params_b, loss_b) = results
    assert eval_a == eval_b and loss_a == loss_b
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))


def test_host_forward_takes_64_masks_on_16_blocks(native_on):
    torch.manual_seed(0)
    host = HostCNN((2,) * 16, pool_after=())
    params, blocks = host.host_parameters(), host.native_blocks()
    slots = [native.SlotSeed("stream", 0, 0.5, [torch.randn(2), torch.randn(2), torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1)], groups=2)
             for _ in range(16)]
    masks = [0, *torch.randint(1, 2**16, (63,), generator=torch.Generator().manual_seed(1)).tolist()]
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    out = native.host_forward(x, y, params, blocks, slots, masks)  # up to 2 cached maps per mask and block
    assert out.shape == (64, 4, 10) and torch.isfinite(out).all()
    torch.testing.assert_close(out[5], native.host_forward(x, y, params, blocks, slots, [masks[5]])[0], rtol=0, atol=0)


def test_unchecked_host_epoch_still_refuses_state_of_the_wrong_shape(native_on):
    from esper_lib.envs.fused_adam import FusedAdam

    host = HostCNN((4, 8, 8))
    opt = FusedAdam(host.host_parameters(), 5e-3)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    bad = [torch.zeros(1)] + opt._exp_avgs[1:]
    with pytest.raises(ValueError, match=r"the Adam state of params\[0\] must have its shape"):
        native.host_epoch(x, y, 4, opt.params, host.native_blocks(), bad, opt._exp_avg_sqs, opt._steps, 5e-3, (0.9, 0.999), 1e-8,
                          5.0, check=False)
    seed = native.SlotSeed("training", 0, 0.0, [torch.zeros(8), torch.zeros(8), torch.zeros(1, 8, 1, 1), torch.zeros(1, 8, 1, 1)],
                           groups=4, exp_avgs=[torch.zeros(1)] * 4, exp_avg_sqs=[torch.zeros(8)] * 4, steps=[torch.zeros(())] * 4, lr=0.1)
    with pytest.raises(ValueError, match=r"slots\[1\]: the Adam state of params\[0\] must have its shape"):
        opt.native_host_epoch(x, y, 4, host.native_blocks(), 5.0, [None, seed, None])
    with pytest.raises(ValueError, match=r"slots\[2\] must be a SlotSeed or None, got False"):
        opt.native_host_epoch(x, y, 4, host.native_blocks(), 5.0, [None, None, False])


@pytest.mark.parametrize("kind", ["best_schedule", "random_masked"])
def test_both_paths_pose_the_same_decision_problem(kind):
    """The kernels are the default because they pose the same MDP: the same actions on held-out seeds give the
    same returns up to a few validation images flipped by rounding (100 seeds per controller: mean difference
    within +-0.01 of 0, largest 0.16, README), never a systematic shift. Played by scripts/kernel_paths_study.py."""
    from script_support import load_script

    study = load_script("kernel_paths_study")
    pairs = study.play_both_paths(MorphoEnv, range(10_000, 10_006), names=(kind,))  # default-size episodes
    assert len(pairs) == 6 and pairs.same_actions.all()  # every head of every action agreed: the masks agreed
    assert pairs["diff"].abs().max() <= 0.3 and abs(pairs["diff"].mean()) <= 0.04, pairs["diff"]
    assert pairs.return_kernels.std() > 0.01  # episodes differ from one another: the comparison is not between constants
    with pytest.raises(ValueError, match=r"names: unknown controller\(s\) \['nope'\]"):
        study.play_both_paths(MorphoEnv, range(2), names=("nope",))
