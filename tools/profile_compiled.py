"""Compiled models on a GPU: kernels and CUDA time per forward, by where the thresholds come from.

Under ``torch.compile`` on a GPU the per-channel pair (μ, α·σ) is traced with the operator, so inductor fuses
it into the kernel that applies it; on CPU it comes from the ``graphsparse::mean_and_threshold`` operator
(see ``graphsparse/ops/meansparse.py``). This script measures that choice on the GPU, each variant compiled
with the default mode and profiled with ``torch.profiler`` (CUDA activity only, so host overhead is left out;
``tools/bench_ops.py`` gives wall-clock ratios):

- ``original``: the model as built;
- ``graphsparse fused``: the rewritten, fused model as shipped (thresholds traced);
- ``thresholds from the op``: the same with the thresholds from the library operator, as on CPU;
- ``constant thresholds``: each operator replaced by the same formula on precomputed per-channel buffers
  (what no per-call computation costs);
- ``activations only``: each operator replaced by the activation it absorbed.

    python tools/profile_compiled.py                       # resnet50 b8, WRN-28-10 b128
    python tools/profile_compiled.py --models convnext_tiny --batch convnext_tiny=64
    python tools/profile_compiled.py --kernels 12          # and each variant's 12 costliest kernels

``--kernels N`` lists, per variant, the N kernels that take the most CUDA time per forward (convolutions and
matrix products summed into one line): where a variant's extra time goes, e.g. a kernel inductor splits off
(an intermediate it writes to memory) or a fused kernel that grew slower.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_ops  # noqa: E402

import graphsparse.ops.meansparse as meansparse  # noqa: E402
from graphsparse.ops import MeanSparse  # noqa: E402
from graphsparse.ops.fused import apply_activation  # noqa: E402


class ConstantThresholds(nn.Module):
    """A fused operator's formula on per-channel μ and threshold computed once, kept as buffers."""

    def __init__(self, op: MeanSparse) -> None:
        super().__init__()
        with torch.no_grad():
            mu, thr = meansparse._compute_mean_and_threshold(op.mean, op.var, op.alpha, torch.float32)
        shape = [-1, 1, 1] if op.channel_axis == 1 else [-1]  # NCHW maps, or channels last
        self.register_buffer("mu", mu.view(shape))
        self.register_buffer("thr", thr.view(shape))
        self.activation = op.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.where((x - self.mu).abs() <= self.thr, self.mu, x)
        return y if self.activation is None else apply_activation(self.activation, y)


@contextlib.contextmanager
def thresholds_from_the_op():
    """Compiled operators take their thresholds from ``graphsparse::mean_and_threshold`` on every device."""
    traced = meansparse._mean_and_threshold

    def from_op(mean, var, alpha, dtype):
        if torch.compiler.is_compiling():
            mu, thr = torch.ops.graphsparse.mean_and_threshold(mean, var, alpha, dtype)
            return mu, thr, False
        return traced(mean, var, alpha, dtype)

    meansparse._mean_and_threshold = from_op
    try:
        yield
    finally:
        meansparse._mean_and_threshold = traced


LIBRARY_KERNELS = ("conv", "gemm", "cutlass", "xmma", "sm80_", "sm90_", "sm100_", "implicit")
"""Substrings of kernel names from cuDNN / cuBLAS / CUTLASS, summed as one "convolutions and products" line."""


def kernel_breakdown(events, repeats: int) -> list[tuple[str, float, float]]:
    """(kernel name, CUDA µs per forward, launches per forward) over profiler ``events``, costliest first;
    library convolution and matrix-product kernels summed into one row."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for event in events:
        name = event.name
        if any(part in name.lower() for part in LIBRARY_KERNELS):
            name = "convolutions and products (cuDNN / cuBLAS)"
        totals[name][0] += event.device_time
        totals[name][1] += 1
    rows = [(name, us / repeats, count / repeats) for name, (us, count) in totals.items()]
    return sorted(rows, key=lambda row: -row[1])


def cuda_profile(fn, repeats: int) -> tuple[float, float, list]:
    """(kernels, CUDA milliseconds, CUDA kernel events) per call of ``fn``, after three warm-up calls."""
    with torch.no_grad():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                fn()
            torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(events) / repeats, sum(e.device_time for e in events) / repeats / 1e3, events


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,wrn28_10", help=f"subset of {', '.join(bench_ops.CASES)}")
    parser.add_argument("--batch", action="append", default=[], metavar="MODEL=N", help="batch size of a model")
    parser.add_argument("--repeats", type=int, default=5, help="profiled forwards per variant")
    parser.add_argument("--kernels", type=int, default=0, metavar="N", help="list each variant's N costliest kernels")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("a CUDA device is needed: this script profiles GPU kernels")
    batches = {"resnet50": 8, "wrn28_10": 128, "convnext_tiny": 8}
    for item in args.batch:
        name, _, value = item.partition("=")
        if name not in bench_ops.CASES or not value.isdigit():
            parser.error(f"--batch {item!r}: expected MODEL=N with MODEL one of {', '.join(bench_ops.CASES)}")
        batches[name] = int(value)
    device = torch.device("cuda")
    print(f"{'model':<20} {'variant':<26} {'kernels':>8} {'CUDA ms':>9} {'ratio':>7}")
    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        ready = bench_ops.prepare(bench_ops.CASES[name], batches[name], device)
        base, fused, x = ready.base, ready.fused, ready.x
        variants = [
            ("original", base, contextlib.nullcontext),
            ("graphsparse fused", fused, contextlib.nullcontext),
            ("thresholds from the op", fused, thresholds_from_the_op),
            ("constant thresholds", bench_ops._replace_operators(fused, ConstantThresholds), contextlib.nullcontext),
            ("activations only", bench_ops._replace_operators(fused, bench_ops.ActivationOnly), contextlib.nullcontext),
        ]
        baseline = None
        for label, model, context in variants:
            torch._dynamo.reset()
            with context():
                compiled = torch.compile(model)
                kernels, ms, events = cuda_profile(lambda compiled=compiled, x=x: compiled(x), args.repeats)
            baseline = baseline or ms
            case = f"{name} b{batches[name]}"
            print(f"{case:<20} {label:<26} {kernels:>8.0f} {ms:>9.3f} {ms / baseline:>7.3f}")
            for kernel, us, count in kernel_breakdown(events, args.repeats)[: args.kernels]:
                print(f"{'':<20} {us:>9.1f} µs  ×{count:<5g} {kernel[:100]}")
    print(f"\n{torch.cuda.get_device_name(device)}, torch {torch.__version__}, {args.repeats} profiled forwards")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
