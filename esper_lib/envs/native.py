"""C kernels for the env's host training, built on first use, called through ctypes.

At the host's sizes (8x8 maps, 1-16 channels, minibatches of 64) oneDNN spends ~100 us in every
convolution call and ~330-450 us in every backward, far above the arithmetic (a few MFLOP); the
direct loops of ``native_kernels.c`` do the same work in tens of microseconds. Around them, a host
minibatch was ~40 small torch ops (pooling, head, loss, clipping, Adam); the kernels here take several
of them in one call each. The first call compiles the source with the system C compiler (``cc``, or
``$CC``) into a cache folder (``$ESPER_NATIVE_CACHE``, else ``~/.cache/esper_lib``; a file name per
source, flags, compiler and CPU, written atomically so parallel processes can race) and loads it.

On by default wherever they build: ``ESPER_NATIVE=0`` in the environment (read at import, inherited by
worker processes) or ``native.enable(False)`` (which sets the variable for the processes started after it)
picks the torch path (``esper_lib.envs.small_ops``), which computes the same functions up to float rounding
(the same MDP: ``scripts/kernel_paths_study.py`` plays the same actions on both). A failed build (no C
compiler) warns once and leaves the torch path. The kernels are compiled without ``-ffast-math``: every output is a
fixed sequence of IEEE operations, vectorised across independent outputs only, so the results do not
depend on the vector width the compiler picks (multiply-adds are fused on CPUs with FMA).

Functions (contiguous float32 CPU tensors only; anything else raises ValueError):

- ``conv2d``: autograd-aware, optional fused ReLU and 2x2 max-pool; ``max_pool2x2``;
- ``head_loss``: the host's mean-pool, linear classifier and cross-entropy, forward and backward in one
  call each;
- ``clip_adam_``: gradient clipping and an Adam step over a list of parameters in one call;
  ``grad_norm``: the global norm of a list of gradients;
- ``host_epoch``: a whole epoch of minibatch training (forward, backward, clipping, Adam) of the host with
  the seeds in its slots (every CNN blueprint), in one call; without seeds the same results as the calls above
  bit for bit; ``host_forward``: the host's logits with every set of ablated slots the counterfactuals need,
  in one call;
- ``available()``, ``enable()``, ``enabled()``, ``switched_on()``, ``path_label()``.
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
from dataclasses import dataclass, field
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


OFF_VALUES = ("0", "false", "no", "off")
_enabled = os.environ.get("ESPER_NATIVE", "1").strip().lower() not in OFF_VALUES  # on unless switched off


def enable(flag: bool) -> None:
    """Turn the native kernels on or off for this process (``SmallConv2d`` and ``max_pool2x2`` check it per call)
    and for the processes it starts from now on: ``ESPER_NATIVE`` is set to match, so spawned workers (training
    and evaluation pools, ``AsyncVectorEnv(context="spawn")``) run the same path."""
    global _enabled
    _enabled = bool(flag)
    os.environ["ESPER_NATIVE"] = "1" if _enabled else "0"


def switched_on() -> bool:
    """Whether the kernels are switched on (``ESPER_NATIVE`` or ``enable``), built or not (no build)."""
    return _enabled


def enabled() -> bool:
    """True when the kernels are switched on and built (builds them on the first call)."""
    return _enabled and _library() is not None


def path_label() -> str:
    """Which path computes the env's host training in this process, for the lines reports write about their runs."""
    return "the C kernels" if enabled() else "the torch path"


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
    lib.head_loss_forward.argtypes = [_PTR] * 8 + [_I64] * 4
    lib.head_loss_forward.restype = ctypes.c_int
    lib.head_loss_backward.argtypes = [ctypes.c_float] + [_PTR] * 7 + [_I64] * 4
    lib.head_loss_backward.restype = ctypes.c_int
    lib.clip_adam.argtypes = [_I64] + [_PTR] * 6 + [ctypes.c_double] * 5 + [_PTR]
    lib.clip_adam.restype = None
    lib.grad_norm.argtypes = [_I64, _PTR, _PTR]
    lib.grad_norm.restype = ctypes.c_float
    lib.host_epoch.argtypes = (
        [_PTR] * 2 + [_I64] * 6 + [_PTR, _I64, _I64] + [_PTR] * 6 + [_PTR] * 3 + [_PTR] * 5 + [ctypes.c_double] * 5 + [_PTR] * 4
    )
    lib.host_epoch.restype = ctypes.c_int
    lib.host_forward.argtypes = [_PTR] * 2 + [_I64] * 5 + [_PTR, _I64] + [_PTR] * 4 + [_I64] + [_PTR] * 2
    lib.host_forward.restype = ctypes.c_int
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
    return _conv_forward(x, weight, bias, padding, groups, relu)


def _conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, groups: int, relu: bool) -> torch.Tensor:
    """``conv2d_forward`` for inputs already checked (``_check_conv``, or ``SmallConv2d``'s own checks)."""
    n, c, h, w = x.shape
    o, _, k, _ = weight.shape
    y = torch.empty(n, o, h + 2 * padding - k + 1, w + 2 * padding - k + 1, dtype=torch.float32)
    if _lib().conv2d_forward(x.data_ptr(), weight.data_ptr(), _ptr(bias), y.data_ptr(), n, c, h, w, o, k, padding, groups, int(relu)):
        raise MemoryError("conv2d_forward: out of memory")
    return y


def _pool_forward(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2x2 max-pool of a contiguous float32 ``[N, C, H, W]``: the pooled map and each window's argmax (0-3)."""
    n, c, h, w = y.shape
    out = torch.empty(n, c, h // 2, w // 2, dtype=torch.float32)
    idx = torch.empty(n, c, h // 2, w // 2, dtype=torch.uint8)
    _lib().maxpool2x2_forward(y.data_ptr(), out.data_ptr(), idx.data_ptr(), n * c, h, w)
    return out, idx


def _pool_backward(gout: torch.Tensor, idx: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    n, c, h, w = shape
    gout = gout.contiguous()  # held by a name: a temporary could be freed before the kernel reads it
    gx = torch.empty(shape, dtype=torch.float32)
    _lib().maxpool2x2_backward(gout.data_ptr(), idx.data_ptr(), gx.data_ptr(), n * c, h, w)
    return gx


class _Conv2d(torch.autograd.Function):
    """Convolution (checked inputs), optional fused ReLU, optional 2x2 max-pool of the result."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding: int, groups: int, relu: bool, pool: bool = False):  # type: ignore[override]
        y = _conv_forward(x, weight, bias, padding, groups, relu)
        ctx.padding, ctx.groups, ctx.has_bias, ctx.y_shape = padding, groups, bias is not None, y.shape
        if not pool:
            ctx.save_for_backward(x, weight, y if relu else None, None)
            return y
        out, idx = _pool_forward(y)
        ctx.save_for_backward(x, weight, y if relu else None, idx)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):  # type: ignore[override]
        x, weight, y, idx = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gy = _pool_backward(gy, idx, ctx.y_shape) if idx is not None else gy.contiguous()
        gx = torch.empty_like(x) if need_x else None
        gw = torch.empty_like(weight) if need_w else None
        gb = torch.empty(weight.shape[0], dtype=torch.float32) if need_b and ctx.has_bias else None
        n, c, h, w = x.shape
        o, _, k, _ = weight.shape
        rc = _lib().conv2d_backward(
            x.data_ptr(), weight.data_ptr(), gy.data_ptr(), _ptr(y), _ptr(gx), _ptr(gw), _ptr(gb), n, c, h, w, o, k, ctx.padding, ctx.groups
        )
        if rc:
            raise MemoryError("conv2d_backward: out of memory")
        return gx, gw, gb, None, None, None, None


def conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, groups: int = 1, relu: bool = False, pool: bool = False
) -> torch.Tensor:
    """``conv2d`` (stride 1, 1x1 or 3x3 kernel, zero ``padding``), then ReLU if ``relu``, then ``max_pool2x2`` if
    ``pool`` (an output of even height and width); differentiable once.

    Inputs: contiguous float32 CPU tensors, ``x`` ``[N, C, H, W]``, ``weight`` ``[O, C/groups, K, K]``, ``bias``
    ``[O]`` or None; anything else raises ValueError (``SmallConv2d`` falls back to torch before that).
    """
    _check_conv(x, weight, bias, padding, groups)
    h, w = x.shape[2] + 2 * padding - weight.shape[2] + 1, x.shape[3] + 2 * padding - weight.shape[3] + 1
    if pool and (h % 2 or w % 2):
        raise ValueError(f"pool=True needs an output of even height and width, got {h}x{w}")
    return _conv2d(x, weight, bias, padding, groups, relu, pool)


def _conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, groups: int, relu: bool, pool: bool
) -> torch.Tensor:
    """``conv2d`` for checked inputs (``SmallConv2d`` checks them itself, per call)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _Conv2d.apply(x, weight, bias, padding, groups, relu, pool)
    y = _conv_forward(x, weight, bias, padding, groups, relu)
    return _pool_forward(y)[0] if pool else y


class _NativeMaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        y, idx = _pool_forward(x)
        ctx.save_for_backward(idx)
        ctx.shape = x.shape
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):  # type: ignore[override]
        (idx,) = ctx.saved_tensors
        return _pool_backward(gy, idx, ctx.shape)


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` (floor mode) of a contiguous float32 CPU ``[N, C, H, W]``; differentiable once."""
    _check("x", x, 4)
    return _NativeMaxPool2x2.apply(x)


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, y):  # type: ignore[override]
        n, c, hh, ww = h.shape
        k = weight.shape[0]
        hmean = torch.empty(n, c, dtype=torch.float32)
        logits = torch.empty(n, k, dtype=torch.float32)
        probs = torch.empty(n, k, dtype=torch.float32)
        loss = torch.empty((), dtype=torch.float32)
        rc = _lib().head_loss_forward(
            h.data_ptr(), weight.data_ptr(), _ptr(bias), y.data_ptr(), hmean.data_ptr(), logits.data_ptr(),
            probs.data_ptr(), loss.data_ptr(), n, c, hh * ww, k,
        )
        if rc:
            raise ValueError(f"y must hold class indices in [0, {k}), got values in [{int(y.min())}, {int(y.max())}]")
        ctx.save_for_backward(probs, y, hmean, weight)
        ctx.h_shape, ctx.has_bias = h.shape, bias is not None
        ctx.mark_non_differentiable(logits)
        return loss, logits

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gloss, _glogits):  # type: ignore[override]
        probs, y, hmean, weight = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, c, hh, ww = ctx.h_shape
        k = weight.shape[0]
        gh = torch.empty(ctx.h_shape, dtype=torch.float32) if need_h else None
        gw = torch.empty_like(weight) if need_w else None
        gb = torch.empty(k, dtype=torch.float32) if need_b and ctx.has_bias else None
        if _lib().head_loss_backward(
            float(gloss), probs.data_ptr(), y.data_ptr(), hmean.data_ptr(), weight.data_ptr(), _ptr(gh), _ptr(gw), _ptr(gb), n, c, hh * ww, k
        ):
            raise MemoryError("head_loss_backward: out of memory")
        return gh, gw, gb, None


def head_loss(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The host's classifier and its loss in one call: ``(F.cross_entropy(logits, y), logits)`` with
    ``logits = F.linear(h.mean(dim=(2, 3)), weight, bias)``; the loss is differentiable once, the logits are not.

    ``h`` ``[N, C, H, W]``, ``weight`` ``[K, C]``, ``bias`` ``[K]`` or None: contiguous float32 CPU; ``y`` ``[N]``
    int64 class indices in ``[0, K)``. Anything else raises ValueError.
    """
    _check("h", h, 4)
    _check("weight", weight, 2)
    _check("bias", bias, 1)
    if h.shape[0] < 1 or weight.shape[1] != h.shape[1] or (bias is not None and bias.shape[0] != weight.shape[0]):
        raise ValueError(
            f"shapes do not match: h {tuple(h.shape)} (N >= 1), weight {tuple(weight.shape)} [K, C], bias "
            f"{None if bias is None else tuple(bias.shape)} [K]"
        )
    if y.dtype != torch.int64 or y.device.type != "cpu" or not y.is_contiguous() or y.shape != (h.shape[0],):
        raise ValueError(f"y must be a contiguous int64 CPU tensor of shape ({h.shape[0]},), got {y.dtype} {tuple(y.shape)}")
    return _head_loss(h, weight, bias, y)


def _head_loss(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``head_loss`` for checked inputs (``HostCNN.train_loss`` checks them itself)."""
    return _HeadLoss.apply(h, weight, bias, y)


def _pointers(tensors: list[torch.Tensor]) -> ctypes.Array:
    return (_PTR * len(tensors))(*[t.data_ptr() for t in tensors])


def clip_adam_(
    params: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    max_norm: float,
    *,
    check: bool = True,
) -> torch.Tensor:
    """Clip the gradients of ``params`` to global norm ``max_norm``, then one Adam step, in one call; returns the
    norm before clipping (0-dim float32). The state lists are ``FusedAdam``'s (moments, 0-dim step counts).

    Every parameter must have a gradient; all tensors contiguous float32 CPU, each state entry shaped like its
    parameter (anything else raises ValueError; ``check=False`` skips these checks, for ``FusedAdam``, which keeps
    its state valid and checks the gradients itself). The same updates as ``clip_grad_norm_`` then
    ``torch.optim.Adam`` up to float rounding.
    """
    if check:
        if not (len(params) == len(exp_avgs) == len(exp_avg_sqs) == len(steps)):
            raise ValueError("params, exp_avgs, exp_avg_sqs and steps must have one entry per parameter")
        for p, m, v, t in zip(params, exp_avgs, exp_avg_sqs, steps):
            if p.grad is None:
                raise ValueError("clip_adam_: every parameter needs a gradient (skip those without one)")
            for name, a in (("param", p), ("grad", p.grad), ("exp_avg", m), ("exp_avg_sq", v)):
                _check(name, a)
                if a.shape != p.shape:
                    raise ValueError(f"{name} has shape {tuple(a.shape)}, its parameter {tuple(p.shape)}")
            _check("step", t, 0)
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    norm = torch.empty((), dtype=torch.float32)
    sizes = (ctypes.c_int64 * len(params))(*[p.numel() for p in params])
    _lib().clip_adam(
        len(params), _pointers(params), _pointers([p.grad for p in params]), _pointers(exp_avgs), _pointers(exp_avg_sqs),
        _pointers(steps), sizes, float(lr), float(betas[0]), float(betas[1]), float(eps), float(max_norm), norm.data_ptr(),
    )
    return norm


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Euclidean norm of ``grads`` together (0-dim float32), as ``clip_grad_norm_`` measures it, in one call;
    contiguous float32 CPU tensors (anything else raises ValueError), at least one."""
    if not grads:
        raise ValueError("grad_norm needs at least one tensor")
    for g in grads:
        _check("grad", g)
    return _grad_norm(grads)


def _grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """``grad_norm`` for checked inputs."""
    sizes = (ctypes.c_int64 * len(grads))(*[g.numel() for g in grads])
    return torch.tensor(_lib().grad_norm(len(grads), _pointers(grads), sizes), dtype=torch.float32)


MAX_SEED_LAYERS = 4  # as in native_kernels.c
_SLOT_INTS = 6 + 4 * MAX_SEED_LAYERS
_SLOT_MODES = {"training": 1, "stream": 2, "fossil": 3}


@dataclass(frozen=True)
class SlotSeed:
    """A seed in a host slot, for ``host_epoch``: a NORM seed (``blueprints.NormSeed``: GroupNorm, eps 1e-5, affine),
    a chain of size-preserving convolutions, each optionally followed by a ReLU (the convolution blueprints), or an
    ATTENTION seed (``blueprints.AttentionSeed``).

    Attributes:
        mode: ``"training"`` (TRAINING: learns, the host does not see it), ``"stream"`` (in the stream with
            ``alpha`` and learning) or ``"fossil"`` (in the stream, its parameters in the host's optimizer).
        style: the ``GerminationStyle`` value (0 LINEAR_ADD, 1 LINEAR_MULTIPLY, 2 SIGMOID_ADD, 3 GATED_GATE).
        alpha: the blend weight (ignored while training).
        params: the body's parameters (``[gamma, beta]``; ``[w_0, b_0, w_1, b_1, ...]``; ATTENTION's ``[scale, w1, b1,
            w2, b2, spatial_w, spatial_b]``), then the gate's ``[gate_w [1, C, 1, 1], gate_b [1, C, 1, 1]]``: the seed
            optimizer's order.
        body: ``"norm"``, ``"convs"`` or ``"attention"``.
        groups: the GroupNorm's groups (NORM seeds).
        layers: per convolution ``(groups, relu)`` (convolution seeds; weight shapes give the rest).
        exp_avgs, exp_avg_sqs, steps: the seed's own Adam state for ``params`` (learning seeds; empty for a fossil).
        lr: the seed's Adam learning rate (learning seeds).
    """

    mode: str
    style: int
    alpha: float
    params: list[torch.Tensor]
    body: str = "norm"
    groups: int = 1
    layers: tuple[tuple[int, bool], ...] = ()
    exp_avgs: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = field(default_factory=list)
    steps: list[torch.Tensor] = field(default_factory=list)
    lr: float = 0.0

    @property
    def stepped(self) -> int:
        """How many of ``params`` get gradients: the body's, and the gate's under GATED_GATE."""
        return len(self.params) - (0 if self.style == 3 else 2)


def _seed_ints(i: int, seed: SlotSeed, c: int, check: bool = True) -> list[int]:
    """Check one slot's seed against its block's ``c`` channels (``check=False``: its shapes only, not each tensor's
    dtype and layout); its ``_SLOT_INTS`` integers for the C call."""
    if seed.mode not in _SLOT_MODES:
        raise ValueError(f"slots[{i}].mode must be one of {sorted(_SLOT_MODES)}, got {seed.mode!r}")
    if seed.style not in (0, 1, 2, 3):
        raise ValueError(f"slots[{i}].style must be 0-3, got {seed.style!r}")
    n_body = len(seed.params) - 2
    for k, t in enumerate(seed.params if check else ()):
        _check(f"slots[{i}].params[{k}]", t)
    for k, t in enumerate(seed.params[n_body:]):
        if t.numel() != c:
            raise ValueError(f"slots[{i}]: the gate's tensors must have {c} entries (the block's channels), got {t.numel()}")
    layer_ints: list[int] = []
    if seed.body == "norm":
        if n_body != 2 or any(t.numel() != c for t in seed.params[:2]):
            raise ValueError(f"slots[{i}]: a NORM seed's params must be [gamma [{c}], beta [{c}], gate_w, gate_b]")
        if not isinstance(seed.groups, int) or seed.groups < 1 or c % seed.groups:
            raise ValueError(f"slots[{i}].groups must divide the {c} channels, got {seed.groups!r}")
        body, small = 0, seed.groups
    elif seed.body == "attention":
        mid = seed.params[1].shape[0] if n_body == 7 else 0
        shapes = [(1, c, 1, 1), (mid, c, 1, 1), (mid,), (c, mid, 1, 1), (c,), (1, 2, 3, 3), (1,)]
        if n_body != 7 or [tuple(t.shape) for t in seed.params[:7]] != shapes or not 1 <= mid <= 64 or c > 64:
            raise ValueError(
                f"slots[{i}]: an ATTENTION seed's params must be [scale, w1, b1, w2, b2, spatial_w, spatial_b] shaped {shapes} "
                f"(mid and C at most 64), then the gate's"
            )
        body, small = 2, mid
    elif seed.body == "convs":
        if not 1 <= len(seed.layers) <= MAX_SEED_LAYERS or n_body != 2 * len(seed.layers):
            raise ValueError(f"slots[{i}]: a convolution seed has 1-{MAX_SEED_LAYERS} layers and a weight and bias for each")
        cin = c
        for j, (groups, relu) in enumerate(seed.layers):
            w, b = seed.params[2 * j], seed.params[2 * j + 1]
            if w.dim() != 4 or w.shape[2] != w.shape[3] or w.shape[2] not in (1, 3) or groups < 1 or cin % groups or w.shape[0] % groups:
                raise ValueError(f"slots[{i}] layer {j}: weight {tuple(w.shape)} must be [O, C/groups, K, K] with K 1 or 3 (groups {groups})")
            if w.shape[1] != cin // groups or b.shape != (w.shape[0],):
                raise ValueError(f"slots[{i}] layer {j}: weight {tuple(w.shape)} and bias {tuple(b.shape)} do not take {cin} channels")
            layer_ints += [w.shape[0], w.shape[2], groups, int(bool(relu))]
            cin = w.shape[0]
        if cin != c:
            raise ValueError(f"slots[{i}]: the last layer must give back the block's {c} channels, gives {cin}")
        body, small = 1, 1
    else:
        raise ValueError(f"slots[{i}].body must be 'norm', 'convs' or 'attention', got {seed.body!r}")
    layer_ints += [0] * (4 * MAX_SEED_LAYERS - len(layer_ints))
    return [_SLOT_MODES[seed.mode], int(seed.style), body, int(small), len(seed.layers), 0, *layer_ints]


def _slot_arrays(
    slots: list[SlotSeed | None],
    params: list[torch.Tensor],
    grads: list[torch.Tensor] | None,
    channels: list[int],
    check: bool = True,
) -> tuple[list[int], list[float], list[float], list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Check ``slots`` and lay them out for the C call: (slot_spec, alphas, lrs, [seed params, seed grads], [Adam
    m, v, steps]): each seed's tensors one after another, from the offset its integers give. ``grads=None``: a forward pass (no gradients, no
    Adam state; every seed in the stream)."""
    spec: list[int] = []
    alphas, lrs = [], []
    arrays: list[list[torch.Tensor]] = [[], [], [], [], []]
    host_grad = {id(p): g for p, g in zip(params, grads or [])}
    scratch = torch.zeros(1)
    for i, (seed, c) in enumerate(zip(slots, channels)):
        if seed is None:
            spec += [0] * _SLOT_INTS
            alphas.append(0.0)
            lrs.append(0.0)
            continue
        if not isinstance(seed, SlotSeed):
            raise ValueError(f"slots[{i}] must be a SlotSeed or None, got {seed!r}")
        ints = _seed_ints(i, seed, c, check)
        ints[5] = len(arrays[0])
        spec += ints
        n = len(seed.params)
        if grads is None:
            seed_grads = [scratch] * n
            state = [[scratch] * n, [scratch] * n, [scratch] * n]
        elif seed.mode == "fossil":
            if any(id(t) not in host_grad for t in seed.params[: seed.stepped]):
                raise ValueError(f"slots[{i}]: a fossil's parameters must be among params (the host optimizer's)")
            seed_grads = [host_grad[id(t)] if k < seed.stepped else scratch for k, t in enumerate(seed.params)]
            state = [[scratch] * n, [scratch] * n, [scratch] * n]
        else:
            if not (len(seed.exp_avgs) == len(seed.exp_avg_sqs) == len(seed.steps) == n):
                raise ValueError(f"slots[{i}]: a learning seed needs the Adam state of each of its {n} parameters")
            for k, t in enumerate(seed.params):
                if check:
                    _check(f"slots[{i}].exp_avgs[{k}]", seed.exp_avgs[k])
                    _check(f"slots[{i}].exp_avg_sqs[{k}]", seed.exp_avg_sqs[k])
                    _check(f"slots[{i}].steps[{k}]", seed.steps[k], 0)
                if seed.exp_avgs[k].shape != t.shape or seed.exp_avg_sqs[k].shape != t.shape or seed.steps[k].numel() != 1:
                    raise ValueError(f"slots[{i}]: the Adam state of params[{k}] must have its shape {tuple(t.shape)}")
            if not seed.lr > 0:
                raise ValueError(f"slots[{i}].lr must be > 0, got {seed.lr!r}")
            seed_grads = [_grad_buffer(t) for t in seed.params]
            state = [list(seed.exp_avgs), list(seed.exp_avg_sqs), list(seed.steps)]
        alphas.append(float(seed.alpha))
        lrs.append(float(seed.lr))
        for a, ts in zip(arrays, [list(seed.params), seed_grads, *state]):
            a += ts
    return spec, alphas, lrs, arrays[:2], arrays[2:]


def _grad_buffer(p: torch.Tensor) -> torch.Tensor:
    """``p.grad`` when the kernels can overwrite it in place (float32, contiguous, ``p``'s shape), else a new tensor."""
    g = p.grad
    if g is not None and g.dtype == torch.float32 and g.shape == p.shape and g.is_contiguous() and g.device.type == "cpu":
        return g
    return torch.empty_like(p, memory_format=torch.contiguous_format)


def _host_spec(x: torch.Tensor, params: list[torch.Tensor], blocks: list[tuple[int, bool]]) -> tuple[list[int], list[int], int]:
    """Check the host's blocks and head for ``x``: (4 integers per block for the C calls, each block's output
    channels, the number of classes)."""
    channels, spec, block_channels = x.shape[1], [], []
    for i, (pad, pool) in enumerate(blocks):
        w, b = params[2 * i], params[2 * i + 1]
        _check(f"params[{2 * i}]", w, 4)
        _check(f"params[{2 * i + 1}]", b, 1)
        o, c, k, k2 = w.shape
        if c != channels or k != k2 or k not in (1, 3) or b.shape != (o,) or not isinstance(pad, int) or pad < 0:
            raise ValueError(
                f"block {i}: weight {tuple(w.shape)} must be [O, {channels}, K, K] with K 1 or 3, bias [O], padding an int >= 0; "
                f"got bias {tuple(b.shape)}, padding {pad!r}"
            )
        spec += [o, k, pad, int(bool(pool))]
        channels = o
        block_channels.append(o)
    hw, hb = params[2 * len(blocks)], params[2 * len(blocks) + 1]
    _check("head weight", hw, 2)
    _check("head bias", hb, 1)
    if hw.shape[1] != channels or hb.shape != (hw.shape[0],):
        raise ValueError(f"head weight {tuple(hw.shape)} must be [Kc, {channels}] and head bias [Kc], got {tuple(hb.shape)}")
    return spec, block_channels, hw.shape[0]


def host_epoch(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    params: list[torch.Tensor],
    blocks: list[tuple[int, bool]],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    max_norm: float,
    slots: list[SlotSeed | None] | None = None,
    *,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One epoch of minibatch Adam of the host in one call: per minibatch of ``batch_size`` consecutive rows (the
    last may be shorter), each block's convolution + ReLU (+ 2x2 max-pool) then its slot, the head's mean-pool,
    linear classifier and cross-entropy, their backward, each fossil's gradient norm, then ``clip_adam_`` of the
    host and of each learning seed at ``max_norm``.

    Args:
        x: ``[N, C, H, W]`` images in minibatch order; y: ``[N]`` int64 labels.
        params: the host optimizer's parameters: ``[w_0, b_0, ..., w_{L-1}, b_{L-1}, head_w, head_b]`` (conv
            weights ``[O, C, K, K]``, K 1 or 3, groups 1; biases ``[O]``; the head's ``[Kc, C_L]`` and ``[Kc]``), then
            any fossilized seed's; updated in place.
        blocks: per block ``(padding, pool)``.
        exp_avgs, exp_avg_sqs, steps: the Adam state of each parameter (``FusedAdam``'s), updated in place.
        slots: per block, the ``SlotSeed`` in its slot or None (the slot passes its input through); None: no seeds.
        check: ``False`` skips checking each parameter and state tensor's dtype and layout (``FusedAdam`` and the
            env keep theirs valid); shapes are checked either way (the kernels write every state tensor).

    Returns ``(losses [nb], norms [nb], seed_norms [L, nb], logits [N, Kc])``: each minibatch's mean loss and the
    host's gradient norm before clipping, each fossil's or learning seed's gradient norm (0 for other slots), the
    logits. Every parameter that got a gradient holds the last minibatch's clipped gradient in ``.grad``. Without
    seeds, the same values bit for bit as ``HostCNN.train_loss``, ``backward`` and ``FusedAdam.native_clip_and_step``
    per minibatch with the kernels on; with seeds, the same up to float rounding as ``SeedSlot`` on the autograd path
    (``tests/test_native_kernels.py``). Bad input raises ValueError.
    """
    n_blocks = len(blocks)
    slots = [None] * n_blocks if slots is None else list(slots)
    if n_blocks < 1 or n_blocks > 16 or len(params) < 2 * n_blocks + 2 or len(slots) != n_blocks:
        raise ValueError(
            f"params must start with 2 tensors per block and 2 for the head (1-16 blocks) and slots have one entry per "
            f"block, got {len(params)} params and {len(slots)} slots for {n_blocks} blocks"
        )
    if not (len(exp_avgs) == len(exp_avg_sqs) == len(steps) == len(params)):
        raise ValueError("params, exp_avgs, exp_avg_sqs and steps must have one entry per parameter")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    _check("x", x, 4)
    if x.shape[0] < 1:
        raise ValueError("x must hold at least one image")
    if y.dtype != torch.int64 or y.device.type != "cpu" or not y.is_contiguous() or y.shape != (x.shape[0],):
        raise ValueError(f"y must be a contiguous int64 CPU tensor of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
    spec, block_channels, n_classes = _host_spec(x, params, blocks)
    for i, (p, m, v, t) in enumerate(zip(params, exp_avgs, exp_avg_sqs, steps)):
        if check:
            _check(f"params[{i}]", p)
            _check(f"exp_avgs[{i}]", m)
            _check(f"exp_avg_sqs[{i}]", v)
            _check(f"steps[{i}]", t, 0)
        if m.shape != p.shape or v.shape != p.shape or t.numel() != 1:  # checked either way: the C code writes them
            raise ValueError(f"the Adam state of params[{i}] must have its shape {tuple(p.shape)} and one step count")
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    grads = [_grad_buffer(p) for p in params]
    slot_spec, alphas, lrs, (seed_params, seed_grads), seed_state = _slot_arrays(slots, params, grads, block_channels, check)
    n = x.shape[0]
    nb = -(-n // batch_size)
    losses = torch.empty(nb, dtype=torch.float32)
    norms = torch.empty(nb, dtype=torch.float32)
    seed_norms = torch.zeros(n_blocks, nb, dtype=torch.float32)
    logits = torch.empty(n, n_classes, dtype=torch.float32)
    rc = _lib().host_epoch(
        x.data_ptr(), y.data_ptr(), n, batch_size, x.shape[1], x.shape[2], x.shape[3], n_blocks, (_I64 * len(spec))(*spec),
        n_classes, len(params), (_I64 * len(params))(*[p.numel() for p in params]),
        _pointers(params), _pointers(grads), _pointers(exp_avgs), _pointers(exp_avg_sqs), _pointers(steps),
        (_I64 * len(slot_spec))(*slot_spec), (ctypes.c_double * n_blocks)(*alphas), (ctypes.c_double * n_blocks)(*lrs),
        _pointers(seed_params), _pointers(seed_grads), *[_pointers(a) for a in seed_state],
        float(lr), float(betas[0]), float(betas[1]), float(eps), float(max_norm),
        losses.data_ptr(), norms.data_ptr(), seed_norms.data_ptr(), logits.data_ptr(),
    )
    if rc == 1:
        raise MemoryError("host_epoch: out of memory")
    if rc == 2:
        raise ValueError(f"host_epoch: a block leaves no output, or a pooled block an odd map (blocks {blocks}, x {tuple(x.shape)})")
    if rc == 3:
        raise ValueError(f"y must hold class indices in [0, {n_classes}), got values in [{int(y.min())}, {int(y.max())}]")
    with torch.no_grad():
        for p, g in zip(params, grads):
            if p.grad is not g:
                p.grad = g
        for i, seed in enumerate(slots):
            if seed is not None and seed.mode != "fossil":
                at = slot_spec[_SLOT_INTS * i + 5]
                for k, t in enumerate(seed.params):
                    g = seed_grads[at + k] if k < seed.stepped else None
                    if t.grad is not g:
                        t.grad = g
    return losses, norms, seed_norms, logits


def host_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    params: list[torch.Tensor],
    blocks: list[tuple[int, bool]],
    slots: list[SlotSeed | None],
    ablations: list[int],
) -> torch.Tensor:
    """The host's logits on ``x`` without gradients, once per entry of ``ablations``: ``[len(ablations), N, Kc]``.

    Args:
        x: ``[N, C, H, W]`` images; y: ``[N]`` int64 labels in ``[0, Kc)`` (read by the head kernel, unused).
        params: ``[w_0, b_0, ..., head_w, head_b]`` as for ``host_epoch`` (more entries are ignored).
        blocks: per block ``(padding, pool)``.
        slots: per block, the seed in the stream there (``SlotSeed``; its mode, Adam state and learning rate are not
            read) or None (the slot passes its input through, as a TRAINING seed does without gradients).
        ablations: bit masks of the slots to leave out (bit ``l``: slot ``l``'s seed as at alpha 0); 0 = the full pass.

    A block's pass that several ablations share is computed once (as ``HostCNN.forward_ablations`` does). The same
    values as ``HostCNN.forward_ablations`` up to float rounding (``tests/test_native_kernels.py``). Bad input
    raises ValueError.
    """
    n_blocks = len(blocks)
    if n_blocks < 1 or n_blocks > 16 or len(params) < 2 * n_blocks + 2 or len(slots) != n_blocks:
        raise ValueError(
            f"params must start with 2 tensors per block and 2 for the head (1-16 blocks) and slots have one entry per "
            f"block, got {len(params)} params and {len(slots)} slots for {n_blocks} blocks"
        )
    if not 1 <= len(ablations) <= 64 or any(not isinstance(a, int) or not 0 <= a < 2**n_blocks for a in ablations):
        raise ValueError(f"ablations must be 1-64 bit masks in [0, {2**n_blocks}), got {ablations!r}")
    _check("x", x, 4)
    if x.shape[0] < 1:
        raise ValueError("x must hold at least one image")
    spec, block_channels, n_classes = _host_spec(x, params, blocks)
    if y.dtype != torch.int64 or y.device.type != "cpu" or not y.is_contiguous() or y.shape != (x.shape[0],):
        raise ValueError(f"y must be a contiguous int64 CPU tensor of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise ValueError(f"y must hold class indices in [0, {n_classes}), got values in [{int(y.min())}, {int(y.max())}]")
    slot_spec, alphas, _, (seed_params, _), _ = _slot_arrays(slots, params, None, block_channels)
    logits = torch.empty(len(ablations), x.shape[0], n_classes, dtype=torch.float32)
    rc = _lib().host_forward(
        x.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], x.shape[2], x.shape[3], n_blocks, (_I64 * len(spec))(*spec),
        n_classes, _pointers(params), (_I64 * len(slot_spec))(*slot_spec), (ctypes.c_double * n_blocks)(*alphas),
        _pointers(seed_params), len(ablations), (_I64 * len(ablations))(*ablations), logits.data_ptr(),
    )
    if rc == 1:
        raise MemoryError("host_forward: out of memory")
    if rc:
        raise ValueError(f"host_forward: a block leaves no output, or a pooled block an odd map (blocks {blocks}, x {tuple(x.shape)})")
    return logits
