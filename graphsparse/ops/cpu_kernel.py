"""The MeanSparse CPU kernel: a C++ loop, built on first use, registered as ``graphsparse::mean_sparse_cpu``;
under autograd, forward and backward as one C++ autograd function (:func:`launch_autograd`).

The fast path (:mod:`graphsparse.ops.fast`) runs float32 CPU tensors through this kernel, CUDA tensors
through a Triton kernel (:mod:`graphsparse.ops.triton_kernel`) and half precision on CPU through its
``torch.compile`` kernels. Why a second kernel: on CPU, inductor's
code for this elementwise op is 2-3× an in-place ReLU on 7×7 and 14×14 maps (masked tail loads) and costs
~20 µs of dispatch a call; the C++ loop costs about what an in-place ReLU costs. Measured with
``python tools/bench_ops.py`` (2 CPU cores): resnet50's 49 fused in-place operators at batch 8, each timed
alone, 9.3 ms per forward with this kernel, 14.0 ms with the compiled one (the in-place ReLUs they replace:
5.6 ms); the fused resnet50 1.00-1.06× the original across five runs, 1.5-3 points below the same model
through the compiled kernel in each run.

The source (``csrc/meansparse_cpu.cpp``) is compiled by :func:`torch.utils.cpp_extension.load` the first
time a process needs it (9-23 s measured on 2 cores; a C++ compiler and ``ninja`` are needed) and cached under
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), keyed by the source's hash, so later
processes only load it; concurrent builds (several workers) wait on the builder's file lock. If building
fails, a one-line warning says why, once, and the compiled kernels are used instead.

Switch it off with :func:`set_enabled` / :func:`enabled` or ``GRAPHSPARSE_CPU_KERNEL=0`` (the fast path then uses its
``torch.compile`` kernel on CPU too).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path

import torch

from graphsparse.ops.fused import ActivationSpec, kernel_activation
from graphsparse.ops.switch import Switch

__all__ = [
    "ACTIVATIONS",
    "available",
    "enabled",
    "handles",
    "is_enabled",
    "launch",
    "launch_add",
    "launch_autograd",
    "set_enabled",
    "unavailable_reason",
]

SOURCE = Path(__file__).with_name("csrc") / "meansparse_cpu.cpp"
ACTIVATIONS = {None: 0, "relu": 1, "leaky_relu": 2}
"""Activations the kernel applies in its own pass (name -> the C++ code), None for none."""

_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mprefer-vector-width=512"],
    "AVX2": ["-mavx2"],
}
_log = logging.getLogger(__name__)
_switch = Switch("GRAPHSPARSE_CPU_KERNEL")
_op = None  # torch.ops.graphsparse.mean_sparse_cpu.default, once loaded
_autograd_op = None  # torch.ops.graphsparse.mean_sparse_cpu_autograd.default
_add_op = None  # torch.ops.graphsparse.mean_sparse_cpu_add_autograd.default
_failure: str | None = None


is_enabled = _switch.is_enabled
"""Whether the fast path may use the C++ kernel on CPU (``GRAPHSPARSE_CPU_KERNEL``, :func:`set_enabled`)."""
set_enabled = _switch.set_enabled
"""``set_enabled(flag)``: turn the switch on (True) or off (False)."""
enabled = _switch.enabled
"""``with enabled(flag):`` the switch set to ``flag`` inside the block, restored after it."""


def unavailable_reason() -> str | None:
    """Why building or loading the kernel failed (None when it has not failed)."""
    return _failure


class _NoCudaHomeNotice(logging.Filter):
    """Drops torch's ``No CUDA runtime is found, using CUDA_HOME=...``, which the first import of
    ``torch.utils.cpp_extension`` logs on every CPU machine that has a CUDA toolkit. graphsparse causes that
    import twice: building this CPU-only kernel, and inductor compiling its CPU kernels (``torch.compile`` in
    :mod:`graphsparse.ops.fast` and :mod:`graphsparse.moments`); CUDA_HOME matters to neither. Only that
    record is dropped; every other one of that logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def _quiet_cuda_home_notice() -> None:
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaHomeNotice) for f in logger.filters):
        logger.addFilter(_NoCudaHomeNotice())


_quiet_cuda_home_notice()


def _build() -> None:
    global _op, _autograd_op, _add_op, _failure
    from torch.utils import cpp_extension

    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    # at::parallel_for is an inline template: with torch's OpenMP backend, this file must be compiled with
    # OpenMP for it to run on more than one thread (it then joins torch's own OpenMP runtime).
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    # Vector instructions as far as ATen itself uses them on this CPU (a build per capability: a cache
    # shared by machines of different CPUs stays safe). Measured: AVX-512 loops ~2x the speed of SSE2 ones.
    capability = torch.backends.cpu.get_cpu_capability()
    isa = _ISA_FLAGS.get(capability, [])
    _log.info("graphsparse: building the MeanSparse CPU kernel (once per machine, 10-30 s)")
    try:
        cpp_extension.load(
            name=f"graphsparse_meansparse_cpu_{digest}_{capability.lower()}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp-simd", *isa, *openmp],
            extra_ldflags=openmp,
            is_python_module=False,
            verbose=False,
        )
        _op = torch.ops.graphsparse.mean_sparse_cpu.default
        _autograd_op = torch.ops.graphsparse.mean_sparse_cpu_autograd.default
        _add_op = torch.ops.graphsparse.mean_sparse_cpu_add_autograd.default
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a read-only cache: use the compiled kernel
        lines = str(e).strip().splitlines() or [type(e).__name__]
        _failure = f"{type(e).__name__}: {lines[0][:200]}"
        warnings.warn(
            f"graphsparse: the MeanSparse CPU kernel could not be built ({_failure}); "
            "using the torch.compile kernel on CPU",
            RuntimeWarning,
            stacklevel=3,
        )


def available() -> bool:
    """Whether the kernel is loaded or loads now (building it on the first call of a process)."""
    if _op is None and _failure is None:
        _build()
    return _op is not None


def handles(flat: torch.Tensor, activation: ActivationSpec | None) -> bool:
    """Whether the kernel runs on ``flat`` (a :func:`~graphsparse.ops.fast.channels_view`) with ``activation``."""
    return (
        _switch.on
        and flat.is_cpu
        and flat.dtype == torch.float32
        and (activation is None or activation[0] in ACTIVATIONS)
        and available()
    )


def launch(
    kind: str,
    flat: torch.Tensor,
    mu: torch.Tensor,
    thr: torch.Tensor,
    activation: ActivationSpec | None,
    out: torch.Tensor,
    inside: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write ``activation(where(|flat − μ| <= thr, μ, flat))`` into ``out`` (``flat`` itself for in place),
    and the band mask into ``inside`` when given; returns ``out``. ``kind`` names the launch, as the compiled
    kernels' keys do (``forward``, ``forward_inplace``, ``forward_out``, ``forward_mask``)."""
    name, slope = kernel_activation(activation)
    _op(flat, mu, thr, out, inside, ACTIVATIONS[name], slope)
    return out


def launch_autograd(
    kind: str, x: torch.Tensor, mu: torch.Tensor, thr: torch.Tensor, axis: int, inplace: bool = False
) -> torch.Tensor:
    """MeanSparse of ``x`` under autograd, forward and backward in C++ (``graphsparse::mean_sparse_cpu_autograd``).

    ``kind`` ``forward_mask`` records the exact gradient, ``forward_out`` the straight-through one (identity).
    The exact gradient is ``torch.where(inside, 0.0, grad)`` bit for bit (-0.0, NaN and inf included), by a
    branch-free loop (``graphsparse::mean_sparse_cpu_grad``; ATen's CPU ``where`` with a bool condition is
    9-23× slower on float32 maps, ``python tools/bench_backward.py``), written into the incoming gradient when
    nothing else holds it; a double backward gets ``where`` itself, which is differentiable. ``inplace``
    writes the output into ``x`` (the caller checks that ``x`` is neither a leaf nor a view; autograd's
    version counter catches a backward that would still need it). Only for inputs :func:`handles` (with no
    activation) in a layout :func:`~graphsparse.ops.fast.channels_view` can view."""
    return _autograd_op(x, mu, thr, axis, kind == "forward_out", inplace)


def launch_add(
    kind: str,
    a: torch.Tensor,
    b: torch.Tensor,
    mu: torch.Tensor,
    thr: torch.Tensor,
    axis: int,
    into: int,
    inplace: bool = False,
) -> torch.Tensor:
    """MeanSparse of the residual sum ``a + b`` in one pass (``graphsparse::mean_sparse_cpu_add_autograd``), with
    :func:`launch_autograd`'s autograd rule when autograd records; the sum's gradient goes to both operands.

    ``kind`` as for :func:`launch_autograd` (``forward``/``forward_inplace`` when nothing records). ``inplace``
    writes the result into operand ``into`` (0: ``a``, 1: ``b``), which the caller has checked that nothing
    else reads and, under autograd, that no backward needs. ``a`` and ``b``: float32 CPU tensors of one shape
    and layout that :func:`~graphsparse.ops.fast.channels_view` can view."""
    return _add_op(a, b, mu, thr, axis, into, kind == "forward_out", inplace)
