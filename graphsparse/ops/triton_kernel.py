"""The MeanSparse CUDA kernel: one Triton kernel, launched directly from Python.

The fast path (:mod:`graphsparse.ops.fast`) runs CUDA tensors (float32, float16, bfloat16) through this
kernel. Why not the ``torch.compile`` kernel the CPU uses for half precision: on a GPU a compiled function's
dynamo guards and wrapper cost more than the kernel. Measured on an H100 with ``python tools/bench_ops.py
--device cuda`` (each call timed with a sync): on an 8×256×56×56 float32 map 0.090 ms a call launched
directly, 0.173 ms through the compiled function (a ReLU: 0.049 ms); resnet50's 49 fused in-place operators
at batch 8, 5.2 ms per forward against 8.9 ms (the in-place ReLUs they replace: 1.4 ms). What remains is
host time. Triton's ``kernel[grid](...)`` binds and specializes every argument in Python on each call (~35 µs
of host time on that machine, where ``torch.relu_`` costs 5-9 µs), so it only compiles a variant; later
launches of the variant call its launcher directly (~15 µs; ``python tools/host_overhead.py --device cuda``).

Bit-equal to the plain formula on the same device: ``x − μ`` is computed in float32 and rounded to the
input's dtype (what eager PyTorch's CUDA kernels do for float16/bfloat16), the band test compares exactly,
and the output selects the original bits. The fused activations are written as eager CUDA computes them:
``relu`` gives +0.0 for -0.0 (CUDA's ``clamp_min`` is ``fmaxf``; the CPU keeps -0.0) and keeps NaN bits,
``leaky_relu`` is ``y > 0 ? y : y·slope`` with the slope in float32.

Triton compiles each variant (dtype, activation, mask, and what it specializes on: pointer alignment, sizes
equal to 1 or multiples of 16) on its first launch. Where Triton is missing or
compiling fails, a one-line warning says why, once, and the fast path falls back to its compiled kernel.
Switch it off with :func:`set_enabled` / :func:`enabled` or ``GRAPHSPARSE_TRITON_KERNEL=0``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch

from graphsparse.ops.fused import ActivationSpec, kernel_activation
from graphsparse.ops.switch import Switch

__all__ = [
    "ACTIVATIONS",
    "FLOAT_BITS",
    "available",
    "enabled",
    "handles",
    "is_enabled",
    "launch",
    "set_enabled",
    "unavailable_reason",
]

ACTIVATIONS = {None: 0, "relu": 1, "leaky_relu": 2}
"""Activations the kernel applies in its own pass (name -> the kernel's code), None for none."""

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 1024
"""Elements per program: 8 per thread with 4 warps, two 16-byte loads of float32."""

FLOAT_BITS = {
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000),
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
}
"""dtype -> (integer dtype of its words, all bits but the sign, the bits of +inf): the CUDA relu works on
bits, here and in the compiled kernel (``fast._cuda_relu``)."""
_switch = Switch("GRAPHSPARSE_TRITON_KERNEL")
_kernel = None  # the triton.jit function, once Triton imported
_knobs = None  # triton.knobs (launch hooks), where this Triton has it
_stream = None  # device index -> its current CUDA stream, as Triton gets it
_failure: str | None = None
_direct: dict[tuple, tuple | None] = {}  # launch key -> (launcher, function, metadata) of a compiled variant
_NEVER = ("direct launches refused",)  # key present: this Triton's launcher takes other arguments
_log = logging.getLogger(__name__)
_current_device = torch.cuda.current_device  # the tests' CPU stand-ins replace it here, not in torch.cuda

# Whether the fast path may use the Triton kernel on CUDA: ``GRAPHSPARSE_TRITON_KERNEL``, or these.
is_enabled, set_enabled, enabled = _switch.is_enabled, _switch.set_enabled, _switch.enabled


def unavailable_reason() -> str | None:
    """Why importing Triton or compiling the kernel failed (None when it has not failed)."""
    return _failure


def _define():
    global _knobs, _stream
    import triton
    import triton.language as tl

    _knobs = getattr(triton, "knobs", None)
    _stream = triton.runtime.driver.active.get_current_stream

    @triton.jit
    def mean_sparse_kernel(
        x_ptr,
        out_ptr,
        inside_ptr,
        mu_ptr,
        thr_ptr,
        numel,
        channels,
        inner,  # elements per channel row: 1 for (M, C), L for (N, C, L)
        slope,
        ACTIVATION: tl.constexpr,
        MASK: tl.constexpr,
        WIDE: tl.constexpr,  # int64 offsets (numel >= 2**31)
        HALF: tl.constexpr,  # float16 / bfloat16 (16-bit words)
        ABS_MASK: tl.constexpr,  # all bits but the sign
        INF_BITS: tl.constexpr,  # the bits of +inf: larger magnitudes are NaN
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if WIDE:
            pid = pid.to(tl.int64)
        offsets = pid * BLOCK + tl.arange(0, BLOCK)
        valid = offsets < numel
        x = tl.load(x_ptr + offsets, mask=valid)
        channel = (offsets // inner) % channels
        mu = tl.load(mu_ptr + channel, mask=valid)
        thr = tl.load(thr_ptr + channel, mask=valid)
        diff = (x.to(tl.float32) - mu.to(tl.float32)).to(x.dtype)  # rounded as eager rounds it
        band = tl.abs(diff.to(tl.float32)) <= thr.to(tl.float32)
        y = tl.where(band, mu, x)
        if ACTIVATION == 1:
            # On the bits: a float select `y <= 0 ? 0 : y` is compiled to a max instruction, which returns a
            # canonical NaN instead of the input's (seen on an H100). Keeps positive values and every NaN.
            if HALF:
                bits = y.to(tl.int16, bitcast=True)
            else:
                bits = y.to(tl.int32, bitcast=True)
            keep = (bits > 0) | ((bits & ABS_MASK) > INF_BITS)
            y = tl.where(keep, bits, tl.zeros_like(bits)).to(x.dtype, bitcast=True)
        if ACTIVATION == 2:
            y = tl.where(y > 0, y, (y.to(tl.float32) * slope).to(x.dtype))
        tl.store(out_ptr + offsets, y, mask=valid)
        if MASK:
            tl.store(inside_ptr + offsets, band, mask=valid)

    return mean_sparse_kernel


def _fail(e: BaseException, stage: str) -> None:
    global _failure
    lines = str(e).strip().splitlines() or [type(e).__name__]
    _failure = f"{type(e).__name__}: {lines[0][:200]}"
    warnings.warn(
        f"graphsparse: the MeanSparse Triton kernel is unavailable ({stage}: {_failure}); "
        "using the torch.compile kernel on CUDA",
        RuntimeWarning,
        stacklevel=4,
    )


def available() -> bool:
    """Whether Triton imports (and no launch has failed) in this process."""
    global _kernel
    if _kernel is None and _failure is None:
        try:
            _kernel = _define()
        except Exception as e:  # noqa: BLE001 - no Triton, or a broken one: the compiled kernel takes over
            _fail(e, "import")
    return _kernel is not None and _failure is None


def handles(flat: torch.Tensor, activation: ActivationSpec | None) -> bool:
    """Whether the kernel runs on ``flat`` (a :func:`~graphsparse.ops.fast.channels_view`) with ``activation``."""
    return (
        _switch.on
        and flat.is_cuda
        and flat.dtype in DTYPES
        and (activation is None or activation[0] in ACTIVATIONS)
        and available()
    )


def _int_spec(value: int) -> tuple[bool, bool, bool]:
    """What Triton specializes an int argument on: equal to 1, a multiple of 16, past int32."""
    return value == 1, value % 16 == 0, value > 0x7FFFFFFF


def _hooks_set() -> bool:
    """Whether a Triton launch hook is installed (a profiler's): launches then go through Triton's own path,
    which calls them."""
    runtime = _knobs.runtime if _knobs is not None else None
    hooks = (getattr(runtime, "launch_enter_hook", None), getattr(runtime, "launch_exit_hook", None))
    return any(h is not None and getattr(h, "calls", True) for h in hooks)


def _remember(key: tuple, compiled, args: tuple) -> None:
    """Keep what a direct launch of ``compiled`` (Triton's CompiledKernel) needs, if this Triton exposes it as
    expected: its launcher taking every argument of the signature, constexprs included (as Triton 3.6 does)."""
    try:
        launcher, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
        arity = len(compiled.src.signature)
    except Exception:  # noqa: BLE001 - another Triton's internals: Triton's own launch path stays
        return
    if arity == len(args) and callable(launcher):
        _direct[key] = (launcher, function, metadata)


def launch(
    kind: str,
    flat: torch.Tensor,
    mu: torch.Tensor,
    thr: torch.Tensor,
    activation: ActivationSpec | None,
    out: torch.Tensor,
    inside: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Write ``activation(where(|flat − μ| <= thr, μ, flat))`` into ``out`` (``flat`` itself for in place),
    and the band mask into ``inside`` when given; returns ``out``, or None when compiling the kernel failed
    (the caller then uses another kernel). ``kind`` names the launch, as in :mod:`~graphsparse.ops.cpu_kernel`.

    The first launch of a variant goes through Triton's ``kernel[grid](...)``, which compiles it; later ones
    call the compiled kernel's launcher directly, keyed by everything Triton specializes on (dtypes, 16-byte
    alignment of each pointer, each int's value class): Triton's own path costs ~30 µs of host time a launch.
    """
    name, slope = kernel_activation(activation)
    numel = flat.numel()
    channels = flat.shape[1]
    inner = flat.shape[2] if flat.dim() == 3 else 1
    grid = (numel + BLOCK - 1) // BLOCK
    _, abs_mask, inf_bits = FLOAT_BITS[flat.dtype]
    masked = inside is not None
    mask_out = inside if masked else out
    code = ACTIVATIONS[name]
    wide = numel >= 2**31 - BLOCK
    # the kernel's parameters, in order
    args = (flat, out, mask_out, mu, thr, numel, channels, inner, slope)
    args += (code, masked, wide, flat.dtype != torch.float32, abs_mask, inf_bits, BLOCK)
    device = flat.device.index
    key = (
        device,
        flat.dtype,
        code,
        masked,
        wide,
        _int_spec(numel),
        _int_spec(channels),
        _int_spec(inner),
        flat.data_ptr() % 16 == 0,
        out.data_ptr() % 16 == 0,
        mask_out.data_ptr() % 16 == 0,
        mu.data_ptr() % 16 == 0,
        thr.data_ptr() % 16 == 0,
    )
    here = device == _current_device()  # a device switch costs more than this test
    try:
        with contextlib.nullcontext() if here else torch.cuda.device(flat.device):
            direct = _direct.get(key)
            if direct is not None and not _hooks_set():
                launcher, function, metadata = direct
                try:
                    launcher(grid, 1, 1, _stream(device), function, metadata, None, None, None, *args)
                    return out
                except TypeError as e:  # arguments parsed before anything runs: Triton's path instead
                    _log.debug("graphsparse: direct Triton launch refused (%s); using kernel[grid]", e)
                    _direct.clear()
                    _direct[_NEVER] = None
            compiled = _kernel[(grid,)](*args, num_warps=4)
            if _NEVER not in _direct:
                _remember(key, compiled, args)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - a compiler failure (an unsupported GPU, say): nothing was written
        _fail(e, "compile")
        return None
    return out
