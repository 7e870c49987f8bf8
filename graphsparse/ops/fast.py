"""The fast MeanSparse path: one kernel that reads ``x`` once and writes ``y`` once.

The plain formula ``where(|x − μ| <= thr, μ, x)`` makes four memory passes with three temporaries; the
kernel makes one, applies a fused ReLU / LeakyReLU in the same pass, and for an in-place operator writes no
new tensor at all. Three kernels, one semantics:

- float32 on CPU: a C++ loop (:mod:`graphsparse.ops.cpu_kernel`, the ``graphsparse::mean_sparse_cpu``
  operator, built on first use). With a fused in-place ReLU it costs about what the in-place ReLU it
  replaces costs, on every map size (the "site maps" rows of ``python tools/bench_ops.py``).
- CUDA, all three dtypes: a Triton kernel launched directly (:mod:`graphsparse.ops.triton_kernel`); a
  compiled function's guards and wrapper cost more than the kernel on a GPU.
- everything else (float16/bfloat16 on CPU; and whatever the other two cannot run: no C++ compiler, no
  Triton): ``torch.compile`` (inductor, dynamic shapes) of the elementwise function. On CPU it costs ~20 µs of
  dispatch a call, and on maps whose spatial size is not a multiple of the vector width (7×7, 14×14) its
  masked tail loads make it 2-3× an in-place ReLU; hence the C++ kernel. A ``torch.library`` custom op
  around the compiled kernel adds dispatch cost and nothing else, so it is called directly.

All three are bit-equal to the plain formula: the same operations on the same per-channel ``μ`` and threshold
(computed by eager PyTorch, whose ``sqrt`` can differ from a compiled one in the last bit), a select of
the original bits, and (compiled) float16/bfloat16 compared and selected on their bits (``_in_band``,
``_select``), so that ``x − μ`` rounds as in eager mode on every torch release, plus
``emulate_precision_casts`` for the activations' intermediates. Gradients: exact (zero inside the band,
from the band mask saved by the kernel) or straight-through (identity), as the plain path; for float32 on
CPU, forward and backward are one C++ autograd function
(:func:`graphsparse.ops.cpu_kernel.launch_autograd`).

The path applies in eager mode to plain tensors of at least :data:`MIN_NUMEL` elements, contiguous or
channels-last with the channel axis 1. Whenever ``torch.compile``, ``torch.export``, ``torch.jit`` or a
functorch transform is tracing, or a dispatch mode / autocast is active, the caller uses the plain formula
instead (inductor fuses that into its own kernels). If compilation fails (no C++ compiler, no Triton),
a one-line warning is issued once and the plain path is used from then on.

Switch it with :func:`set_enabled` / :func:`enabled`, or ``GRAPHSPARSE_FAST=0`` in the environment
(``GRAPHSPARSE_CPU_KERNEL=0`` / ``GRAPHSPARSE_TRITON_KERNEL=0`` keep the path but use the compiled kernel on
CPU / CUDA).
The same machinery (:func:`run_kernel`, :func:`channels_view`, :func:`applies`) compiles the float64
batch-moment reduction of calibration (:mod:`graphsparse.moments`), under the same switch.
"""

from __future__ import annotations

import contextlib
import math
import types
import warnings
from collections.abc import Callable

import torch

from graphsparse.ops import cpu_kernel, triton_kernel
from graphsparse.ops.fused import KERNEL_EXACT, ActivationSpec, apply_activation
from graphsparse.ops.switch import Switch

__all__ = [
    "MIN_NUMEL",
    "applies",
    "tracing",
    "is_enabled",
    "set_enabled",
    "enabled",
    "mean_sparse",
    "run_kernel",
    "channels_view",
    "unavailable_reason",
]

MIN_NUMEL = 1 << 15
"""Smaller inputs use the plain formula: below this a compiled call's overhead outweighs the saving."""

_switch = Switch("GRAPHSPARSE_FAST")
_broken: dict[str, str] = {}  # device type -> why compiling failed there
_kernels: dict[tuple, Callable[..., torch.Tensor]] = {}


is_enabled = _switch.is_enabled
"""Whether MeanSparse operators may use the fast path's kernels (``GRAPHSPARSE_FAST``, :func:`set_enabled`)."""
set_enabled = _switch.set_enabled
"""``set_enabled(flag)``: turn the switch on (True) or off (False)."""
enabled = _switch.enabled
"""``with enabled(flag):`` the switch set to ``flag`` inside the block, restored after it."""


def unavailable_reason(device_type: str = "cpu") -> str | None:
    """Why compiling the kernel failed on ``device_type`` (None when it has not failed)."""
    return _broken.get(device_type)


# ------------------------------------------------------------------------------------------- kernels
# The elementwise part of ``meansparse._mean_sparse``; μ and the threshold come in per channel, computed
# by eager PyTorch (see ``_mean_and_threshold`` there).


# Half precision is handled on the bits, which is what makes the compiled kernels bit-equal to eager mode on
# every torch release: a bit view needs the value rounded to its dtype, so inductor cannot skip rounding
# ``x − μ`` (torch 2.11's did on CPU, ``emulate_precision_casts`` notwithstanding), and a select of bits keeps
# NaN payloads that a trip through float32 would canonicalize (seen in bfloat16 on CPU).
_HALF_BITS = {dtype: bits[:2] for dtype, bits in triton_kernel.FLOAT_BITS.items() if dtype != torch.float32}


def _in_band(x, mu, thr) -> torch.Tensor:
    """``|x − μ| <= thr``, ``x − μ`` rounded to ``x``'s dtype as eager mode rounds it. In half precision the
    magnitudes compare as integers: for non-negative floats the order is the same, NaN's bits lie above
    +inf's, and an empty band's -1 is negative."""
    if x.dtype not in _HALF_BITS:
        return (x - mu).abs() <= thr
    words, abs_mask = _HALF_BITS[x.dtype]
    return ((x - mu).view(words) & abs_mask) <= thr.view(words)


def _select(band, mu, x) -> torch.Tensor:
    """``where(band, μ, x)``, the original bits of either."""
    if x.dtype not in _HALF_BITS:
        return torch.where(band, mu, x)
    words = _HALF_BITS[x.dtype][0]
    return torch.where(band, mu.view(words), x.view(words)).view(x.dtype)


def _forward(x, mu, thr, act: ActivationSpec | None) -> torch.Tensor:
    y = _select(_in_band(x, mu, thr), mu, x)
    if act is not None and act[0] == "relu" and y.device.type == "cuda":
        return _cuda_relu(y)
    return y if act is None else apply_activation(act, y)


def _cuda_relu(y: torch.Tensor) -> torch.Tensor:
    """Eager CUDA's relu, bit for bit: +0.0 for -0.0 (inductor's relu keeps -0.0) and NaN kept with its bits
    (a float select ``y <= 0 ? 0 : y`` is compiled to a max instruction, which returns a canonical NaN)."""
    words, abs_mask, inf_bits = triton_kernel.FLOAT_BITS[y.dtype]
    bits = y.view(words)
    keep = (bits > 0) | ((bits & abs_mask) > inf_bits)
    return torch.where(keep, bits, 0).view(y.dtype)


def _forward_inplace(x, mu, thr, act: ActivationSpec | None) -> torch.Tensor:
    return x.copy_(_forward(x, mu, thr, act))


def _forward_out(x, mu, thr, act: ActivationSpec | None, out) -> torch.Tensor:
    return out.copy_(_forward(x, mu, thr, act))


def _forward_mask(x, mu, thr, act: None, out, inside) -> tuple[torch.Tensor, torch.Tensor]:
    mask = _in_band(x, mu, thr)
    return out.copy_(_select(mask, mu, x)), inside.copy_(mask)


_KERNELS = {
    "forward": _forward,  # a new output
    "forward_inplace": _forward_inplace,  # into x
    "forward_out": _forward_out,  # into a given output
    "forward_mask": _forward_mask,  # into a given output, and the band mask (no activation)
}


def _compiled(fn: Callable, key: tuple) -> Callable:
    compiled = _kernels.get(key)
    if compiled is None:
        # A copy of ``fn`` with its own code object: dynamo keeps its compiled variants (and its limit of
        # 8 of them) per code object, so each (kernel, dtype, layout, activation) gets a cache of its own.
        copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__)
        compiled = torch.compile(copy, dynamic=True, options={"emulate_precision_casts": True})
        _kernels[key] = compiled
    return compiled


def run_kernel(fn: Callable, key: tuple, *args):
    """``fn(*args)`` compiled (one compiled function per ``key``); on a compilation failure the notice is
    given once per device and ``fn`` runs eagerly, there and from then on."""
    device = args[0].device.type
    if device not in _broken:
        try:
            return _compiled(fn, key)(*args)
        except Exception as e:  # noqa: BLE001 - any failure of the compiler stack means "not available"
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            _broken[device] = f"{type(e).__name__}: {reason}"
            warnings.warn(
                f"graphsparse: the compiled MeanSparse kernel is unavailable on {device} "
                f"({_broken[device]}); using the plain path",
                RuntimeWarning,
                stacklevel=2,
            )
    return fn(*args)


# -------------------------------------------------------------------------------------------- layout


def channels_view(t: torch.Tensor, axis: int) -> torch.Tensor | None:
    """``t`` viewed as ``(M, C)`` (channels innermost) or ``(N, C, L)``, L > 1; None for other layouts."""
    channels = t.shape[axis]
    if t.is_contiguous():
        inner = math.prod(t.shape[axis + 1 :])
        return t.view(-1, channels) if inner == 1 else t.view(-1, channels, inner)
    if axis == 1 and t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).view(-1, channels)  # the permuted tensor is contiguous
    return None


def _unflat(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.is_contiguous():
        return y.view(like.shape)
    n, c, h, w = like.shape
    return y.view(n, h, w, c).permute(0, 3, 1, 2)


def _kernel_args(flat: torch.Tensor, mu: torch.Tensor, thr: torch.Tensor) -> tuple:
    shape = (-1,) if flat.dim() == 2 else (-1, 1)
    return flat, mu.view(shape), thr.view(shape)


def _key(kind: str, flat: torch.Tensor, act: ActivationSpec | None = None) -> tuple:
    return (kind, flat.dtype, flat.device.type, flat.dim(), act)


def _launch(
    kind: str, flat: torch.Tensor, mu: torch.Tensor, thr: torch.Tensor, act: ActivationSpec | None, *outs
) -> torch.Tensor:
    """One launch of kernel ``kind`` (see ``_KERNELS``) on ``flat`` = :func:`channels_view` of the input:
    the C++ kernel for float32 on CPU (:mod:`graphsparse.ops.cpu_kernel`), the Triton kernel on CUDA
    (:mod:`graphsparse.ops.triton_kernel`), the compiled one otherwise or when Triton fails to compile.
    Returns the output (``flat`` itself in place)."""
    native = cpu_kernel if cpu_kernel.handles(flat, act) else None
    if native is None and triton_kernel.handles(flat, act):
        native = triton_kernel
    if native is not None:
        into = outs
        if kind == "forward_inplace":
            into = (flat,)
        elif kind == "forward":
            into = (torch.empty_like(flat),)
        if native.launch(kind, flat, mu, thr, act, *into) is not None:
            if into[0] is flat:
                torch.autograd.graph.increment_version(flat)  # an in-place write, as copy_ would have recorded
            return into[0]
    result = run_kernel(_KERNELS[kind], _key(kind, flat, act), *_kernel_args(flat, mu, thr), act, *outs)
    return result[0] if kind == "forward_mask" else result


# ---------------------------------------------------------------------------------------- entry point


def is_exporting() -> bool:
    """Whether ``torch.export`` is tracing the caller (False under ``torch.compile``).

    Reads the flag ``torch.export`` sets rather than calling ``torch.compiler.is_exporting()``: up to torch 2.11
    at least, dynamo folds that call to True under ``torch.compile`` too (seen with 2.11.0; 2.13 reads the
    flag), which made compiled CPU models trace the threshold formula instead of calling the
    ``graphsparse::mean_and_threshold`` operator, and land values on band edges otherwise than eager mode."""
    return getattr(torch.compiler, "_is_exporting_flag", False)


def tracing() -> bool:
    """Whether ``torch.compile``, ``torch.export`` or ``torch.jit.trace`` is tracing the caller."""
    return torch.compiler.is_compiling() or is_exporting() or torch.jit.is_tracing()


def applies(x: torch.Tensor) -> bool:
    """Whether the compiled kernel may run on ``x`` now (eager mode, plain tensor, nothing tracing)."""
    if not _switch.on or type(x) is not torch.Tensor or tracing():
        return False
    # is_cpu / is_cuda: x.device.type makes two new objects (this runs once per operator call)
    device = "cpu" if x.is_cpu else "cuda" if x.is_cuda else None
    return (
        device is not None
        and x.numel() >= MIN_NUMEL
        and device not in _broken
        and not torch._C._are_functorch_transforms_active()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch.is_autocast_enabled(device)
    )


class _FastMeanSparse(torch.autograd.Function):
    """The kernel with an autograd rule: exact (zero inside the band, from the saved band mask, as the
    plain formula's ``where`` does) or straight-through (identity). Float32 CPU tensors take the same rule in
    C++ instead (:func:`graphsparse.ops.cpu_kernel.launch_autograd`)."""

    @staticmethod
    def forward(ctx, x, mu, thr, axis: int, straight_through: bool):
        # The kernel writes into tensors shaped like x: an output that is a view (of a flat kernel output)
        # could not be modified in place afterwards (e.g. by the ReLU(inplace=True) that follows).
        ctx.straight_through = straight_through
        flat = channels_view(x.detach(), axis)
        y = torch.empty_like(x)
        if straight_through:
            _launch("forward_out", flat, mu, thr, None, channels_view(y, axis))
            return y
        inside = torch.empty_like(x, dtype=torch.bool)
        _launch("forward_mask", flat, mu, thr, None, channels_view(y, axis), channels_view(inside, axis))
        ctx.save_for_backward(inside)
        return y

    @staticmethod
    def backward(ctx, grad):
        if ctx.straight_through:
            return grad, None, None, None, None
        (inside,) = ctx.saved_tensors
        return torch.where(inside, 0.0, grad), None, None, None, None


def mean_sparse(
    x: torch.Tensor,
    mu: torch.Tensor,
    thr: torch.Tensor,
    axis: int,
    *,
    straight_through: bool = False,
    activation: ActivationSpec | None = None,
    inplace: bool = False,
    activation_inplace: bool = False,
) -> torch.Tensor | None:
    """MeanSparse of ``x`` (then ``activation``) by the compiled kernel; None where it does not apply.

    Args:
        x: the input.
        mu: per-channel mean, shape ``[C]``, in ``x``'s dtype.
        thr: per-channel threshold ``α·σ``, shape ``[C]``, in ``x``'s dtype, -1 where the band is empty.
        axis: the channel axis of ``x``, in ``[0, x.dim())``.
        straight_through: identity gradient (BPDA) instead of the exact one.
        activation: applied to the result; inside the kernel for :data:`~graphsparse.ops.fused.KERNEL_EXACT`.
        inplace: ``x`` may be overwritten: MeanSparse's result is written into it, and the activation (if
            any and not in the kernel) then runs in place where it can. When no gradient is recorded; under
            autograd too on the C++ kernel's path (float32 on CPU) when ``x`` is neither a leaf nor a view,
            autograd's version counter then guarding any backward that still needs ``x``.
        activation_inplace: under autograd, apply the activation in place on the kernel's output (as an
            unfused in-place activation would; see :attr:`~graphsparse.ops.MeanSparse.activation_inplace`).
    """
    if not applies(x) or mu.device != x.device:  # mixed devices: the plain formula says so clearly
        return None
    flat = channels_view(x, axis)
    if flat is None:
        return None
    grad_mode = torch.is_grad_enabled()
    if grad_mode and x.requires_grad:
        if cpu_kernel.handles(flat, None):  # the autograd rule in C++ too
            kind = "forward_out" if straight_through else "forward_mask"
            # not into a leaf (autograd forbids it) or a view (its base would have to be rewritten)
            y = cpu_kernel.launch_autograd(kind, x, mu, thr, axis, inplace and not x.is_leaf and x._base is None)
        else:
            y = _FastMeanSparse.apply(x, mu, thr, axis, straight_through)
        return y if activation is None else apply_activation(activation, y, inplace=activation_inplace)
    in_kernel = activation if activation is not None and activation[0] in KERNEL_EXACT else None
    # no_grad: one compiled variant (dynamo guards on grad mode); skipped when already off (~1 µs a call)
    with torch.no_grad() if grad_mode else contextlib.nullcontext():
        if inplace:
            _launch("forward_inplace", flat, mu, thr, in_kernel)
            y = x
        else:
            y = _unflat(_launch("forward", flat, mu, thr, in_kernel), x)
        if activation is not None and in_kernel is None:
            y = apply_activation(activation, y, inplace=True)  # y is ours (x may be overwritten): no new tensor
    return y
