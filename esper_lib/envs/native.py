"""C kernels for the env's tiny convolutions and 2x2 max-pool, built on first use, called through ctypes.

At the host's sizes (8x8 maps, 1-16 channels, minibatches of 64) oneDNN spends ~100 us in every
convolution call and ~330-450 us in every backward, far above the arithmetic (a few MFLOP); the
direct loops of ``native_kernels.c`` do the same work in tens of microseconds. The first call compiles
the source with the system C compiler (``cc``, or ``$CC``) into a cache folder
(``$ESPER_NATIVE_CACHE``, else ``~/.cache/esper_lib``; a file name per source, flags, compiler and CPU,
written atomically so parallel processes can race) and loads it.

Opt-in (off by default, so the env's trajectories stay those of every reported run): ``ESPER_NATIVE=1``
in the environment (read at import, inherited by worker processes) or ``native.enable(True)``. A failed
build warns once and leaves the torch path (``esper_lib.envs.small_ops``), which computes the same
functions up to float rounding. The kernels are compiled without ``-ffast-math``: every output is a
fixed sequence of IEEE operations, vectorised across independent outputs only, so the results do not
depend on the vector width the compiler picks (multiply-adds are fused on CPUs with FMA).

Functions (float32, contiguous, CPU; callers check): ``conv2d`` (autograd-aware, optional fused ReLU)
and ``max_pool2x2``.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native_kernels.c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared", "-std=gnu11")
_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


def _cpu_model() -> str:
    """The CPU's model and instruction-set flags (``-march=native`` compiles for them)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(dict.fromkeys(ln for ln in lines if ln.startswith(("model name", "flags"))))


def _cache_dir() -> Path:
    env = os.environ.get("ESPER_NATIVE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "esper_lib"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build() -> Path:
    """Compile ``SOURCE`` (once per source, flags, compiler and CPU) and return the shared library's path."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC or install cc/gcc)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(FLAGS), cc, version, platform.machine(), _cpu_model()]).encode()
    ).hexdigest()[:16]
    out_dir = _cache_dir()
    lib = out_dir / f"esper_native_{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed to build {SOURCE.name}: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


_enabled = os.environ.get("ESPER_NATIVE", "0").strip().lower() in ("1", "true", "yes", "on")


def enable(flag: bool) -> None:
    """Turn the native kernels on or off for this process (``SmallConv2d`` and ``max_pool2x2`` check it per call)."""
    global _enabled
    _enabled = bool(flag)


def enabled() -> bool:
    """True when the kernels are switched on and built (builds them on the first call)."""
    return _enabled and _library() is not None


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        warnings.warn(f"esper_lib native kernels unavailable, using the torch path: {exc}", RuntimeWarning, stacklevel=3)
        return None
    lib.conv2d_forward.argtypes = [_PTR] * 4 + [_I64] * 9
    lib.conv2d_forward.restype = ctypes.c_int
    lib.conv2d_backward.argtypes = [_PTR] * 7 + [_I64] * 8
    lib.conv2d_backward.restype = ctypes.c_int
    lib.maxpool2x2_forward.argtypes = [_PTR] * 3 + [_I64] * 3
    lib.maxpool2x2_forward.restype = None
    lib.maxpool2x2_backward.argtypes = [_PTR] * 3 + [_I64] * 3
    lib.maxpool2x2_backward.restype = None
    return lib


def available() -> bool:
    """True when the kernels can be built and loaded here (builds them on the first call), enabled or not."""
    return _library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def conv2d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, groups: int, relu: bool) -> torch.Tensor:
    """``[N, C, H, W] -> [N, O, H', W']``: ``conv2d`` (stride 1, zero ``padding``), then ReLU if ``relu``. No autograd."""
    lib = _library()
    n, c, h, w = x.shape
    o, _, k, _ = weight.shape
    y = torch.empty(n, o, h + 2 * padding - k + 1, w + 2 * padding - k + 1, dtype=torch.float32)
    if lib.conv2d_forward(_ptr(x), _ptr(weight), _ptr(bias), _ptr(y), n, c, h, w, o, k, padding, groups, int(relu)):
        raise MemoryError("conv2d_forward: out of memory")
    return y


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding: int, groups: int, relu: bool):  # type: ignore[override]
        y = conv2d_forward(x, weight, bias, padding, groups, relu)
        ctx.padding, ctx.groups, ctx.relu, ctx.has_bias = padding, groups, relu, bias is not None
        ctx.save_for_backward(x, weight, y if relu else None)
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, weight, y = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gy = gy.contiguous()
        gx = torch.empty_like(x) if need_x else None
        gw = torch.empty_like(weight) if need_w else None
        gb = torch.empty(weight.shape[0], dtype=torch.float32) if need_b and ctx.has_bias else None
        n, c, h, w = x.shape
        o, _, k, _ = weight.shape
        rc = _library().conv2d_backward(
            _ptr(x), _ptr(weight), _ptr(gy), _ptr(y), _ptr(gx), _ptr(gw), _ptr(gb), n, c, h, w, o, k, ctx.padding, ctx.groups
        )
        if rc:
            raise MemoryError("conv2d_backward: out of memory")
        return gx, gw, gb, None, None, None


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, groups: int = 1, relu: bool = False) -> torch.Tensor:
    """``conv2d`` (stride 1, square kernel, zero ``padding``), then ReLU if ``relu``; differentiable.

    Inputs: float32, contiguous, on the CPU (``x`` ``[N, C, H, W]``, ``weight`` ``[O, C/groups, K, K]``,
    ``bias`` ``[O]`` or None); the caller checks (``SmallConv2d`` does).
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _Conv2d.apply(x, weight, bias, padding, groups, relu)
    return conv2d_forward(x, weight, bias, padding, groups, relu)


class _MaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        n, c, h, w = x.shape
        y = torch.empty(n, c, h // 2, w // 2, dtype=torch.float32)
        idx = torch.empty(n, c, h // 2, w // 2, dtype=torch.uint8)
        _library().maxpool2x2_forward(_ptr(x), _ptr(y), _ptr(idx), n * c, h, w)
        ctx.save_for_backward(idx)
        ctx.shape = x.shape
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        (idx,) = ctx.saved_tensors
        n, c, h, w = ctx.shape
        gx = torch.empty(ctx.shape, dtype=torch.float32)
        _library().maxpool2x2_backward(_ptr(gy.contiguous()), _ptr(idx), _ptr(gx), n * c, h, w)
        return gx


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` of a float32 contiguous CPU ``[N, C, H, W]`` with even H, W; differentiable."""
    return _MaxPool2x2.apply(x)
