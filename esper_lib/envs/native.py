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

Functions: ``conv2d`` (autograd-aware, optional fused ReLU) and ``max_pool2x2``; contiguous float32 CPU
tensors only (anything else raises ValueError); ``available()``, ``enable()``, ``enabled()``.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
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


def _compiler() -> list[str] | None:
    """The compiler command (``$CC`` may carry arguments, e.g. ``ccache gcc``), or None."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def _build(flags: tuple[str, ...] = FLAGS) -> Path:
    """Compile ``SOURCE`` with ``flags`` (once per source, flags, compiler and CPU) and return the library's path."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC or install cc/gcc)")
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(flags), " ".join(cc), version, platform.machine(), _cpu_model()]).encode()
    ).hexdigest()[:16]
    out_dir = _cache_dir()
    lib = out_dir / f"esper_native_{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([*cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cc)} failed to build {SOURCE.name}: {proc.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)  # mkstemp made it private; a shared cache must be readable by its other users
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


def switched_on() -> bool:
    """Whether the kernels are switched on (``ESPER_NATIVE`` or ``enable``), built or not (no build)."""
    return _enabled


def enabled() -> bool:
    """True when the kernels are switched on and built (builds them on the first call)."""
    return _enabled and _library() is not None


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    try:
        path = _build()
        try:
            return _load(path)
        except OSError:  # a damaged cached file: rebuild once
            path.unlink(missing_ok=True)
            return _load(_build())
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        warnings.warn(f"esper_lib native kernels unavailable, using the torch path: {exc}", RuntimeWarning, stacklevel=3)
        return None


def _load(path: Path) -> ctypes.CDLL:
    """Load a built library and declare its functions' argument types."""
    lib = ctypes.CDLL(str(path))
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


def _lib() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("the esper_lib native kernels are not available here (see the earlier warning); use the torch path")
    return lib


def _check(name: str, t: torch.Tensor | None, dim: int | None = None) -> None:
    """The kernels read raw float32 memory: refuse anything else with a named error."""
    if t is None:
        return
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or (dim is not None and t.dim() != dim):
        shape = f"{dim}-d " if dim is not None else ""
        raise ValueError(
            f"{name} must be a {shape}contiguous float32 CPU tensor, got {t.dtype} on {t.device}, shape {tuple(t.shape)}, "
            f"contiguous={t.is_contiguous()}"
        )


def _check_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, groups: int) -> None:
    _check("x", x, 4)
    _check("weight", weight, 4)
    _check("bias", bias, 1)
    o, cg, kh, kw = weight.shape
    if kh != kw or kh not in (1, 3):
        raise ValueError(f"weight must have a 1x1 or 3x3 kernel, got {kh}x{kw}")
    if groups < 1 or x.shape[1] != cg * groups or o % groups:
        raise ValueError(f"channels do not match groups={groups}: x has {x.shape[1]}, weight {tuple(weight.shape)}")
    if bias is not None and bias.shape[0] != o:
        raise ValueError(f"bias must have {o} entries, got {bias.shape[0]}")
    if padding < 0 or min(x.shape[2], x.shape[3]) + 2 * padding < kh:
        raise ValueError(f"padding must be >= 0 and leave an output: got {padding} for a {tuple(x.shape[2:])} map and a {kh}x{kh} kernel")


def conv2d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, groups: int, relu: bool) -> torch.Tensor:
    """``[N, C, H, W] -> [N, O, H', W']``: ``conv2d`` (stride 1, zero ``padding``), then ReLU if ``relu``. No autograd."""
    _check_conv(x, weight, bias, padding, groups)
    n, c, h, w = x.shape
    o, _, k, _ = weight.shape
    y = torch.empty(n, o, h + 2 * padding - k + 1, w + 2 * padding - k + 1, dtype=torch.float32, device="cpu")
    if _lib().conv2d_forward(_ptr(x), _ptr(weight), _ptr(bias), _ptr(y), n, c, h, w, o, k, padding, groups, int(relu)):
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
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):  # type: ignore[override]
        x, weight, y = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gy = gy.contiguous()
        gx = torch.empty_like(x) if need_x else None
        gw = torch.empty_like(weight) if need_w else None
        gb = torch.empty(weight.shape[0], dtype=torch.float32, device="cpu") if need_b and ctx.has_bias else None
        n, c, h, w = x.shape
        o, _, k, _ = weight.shape
        rc = _lib().conv2d_backward(
            _ptr(x), _ptr(weight), _ptr(gy), _ptr(y), _ptr(gx), _ptr(gw), _ptr(gb), n, c, h, w, o, k, ctx.padding, ctx.groups
        )
        if rc:
            raise MemoryError("conv2d_backward: out of memory")
        return gx, gw, gb, None, None, None


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, groups: int = 1, relu: bool = False) -> torch.Tensor:
    """``conv2d`` (stride 1, 1x1 or 3x3 kernel, zero ``padding``), then ReLU if ``relu``; differentiable once.

    Inputs: contiguous float32 CPU tensors, ``x`` ``[N, C, H, W]``, ``weight`` ``[O, C/groups, K, K]``, ``bias``
    ``[O]`` or None; anything else raises ValueError (``SmallConv2d`` falls back to torch before that).
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _Conv2d.apply(x, weight, bias, padding, groups, relu)
    return conv2d_forward(x, weight, bias, padding, groups, relu)


class _NativeMaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        n, c, h, w = x.shape
        y = torch.empty(n, c, h // 2, w // 2, dtype=torch.float32, device="cpu")
        idx = torch.empty(n, c, h // 2, w // 2, dtype=torch.uint8, device="cpu")
        _lib().maxpool2x2_forward(_ptr(x), _ptr(y), _ptr(idx), n * c, h, w)
        ctx.save_for_backward(idx)
        ctx.shape = x.shape
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):  # type: ignore[override]
        (idx,) = ctx.saved_tensors
        n, c, h, w = ctx.shape
        gx = torch.empty(ctx.shape, dtype=torch.float32, device="cpu")
        _lib().maxpool2x2_backward(_ptr(gy.contiguous()), _ptr(idx), _ptr(gx), n * c, h, w)
        return gx


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` (floor mode) of a contiguous float32 CPU ``[N, C, H, W]``; differentiable once."""
    _check("x", x, 4)
    return _NativeMaxPool2x2.apply(x)
