"""Cost of MeanSparse under autograd on CPU (what an exact-gradient or BPDA attack pays), side by side.

Three tables, one process, float32, ``--threads`` torch threads (default 1, as an attack on a shared machine):

- the exact gradient of one feature map (the demo model's ``after_addition`` site maps at batch 32, and one
  resnet50 stage-1 map 8x256x56x56): median ms of ATen's ``torch.where(inside, 0.0, grad)``, of graphsparse's
  C++ loop (``graphsparse::mean_sparse_cpu_grad``) into a new tensor and into the gradient itself (what the
  backward does when nothing else holds the gradient), each loop's ratio to ``where``, and whether all are
  bit-equal;
- the forward kernel writing the band mask, per map: rows of a 7x7 map used to run as scalar code;
- the demo model's forward and backward at batch 32 (what one APGD step costs), exact and straight-through
  (BPDA): the original model; the rewritten one (α = 0.2, calibrated) as it runs (forward and backward in
  C++, in place where the fusion pass allows); the same through a Python ``autograd.Function`` around the
  same kernels, writing new tensors (how float32 CPU ran before); and the view evaluate attacks (each residual
  addition and its operator in one pass, :mod:`graphsparse.planning.fuse_residual`), each against the original,
  interleaved rounds.

    python tools/bench_backward.py
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch

SHAPES = [(32, 16, 28, 28), (32, 32, 14, 14), (32, 64, 7, 7), (8, 256, 56, 56)]


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def _gradient_row(shape: tuple[int, ...], repeats: int) -> str:
    grad_op = torch.ops.graphsparse.mean_sparse_cpu_grad.default
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(shape, generator=g)
    inside = torch.rand(shape, generator=g) < 0.3
    work = grad.clone()
    with torch.no_grad():
        expected = torch.where(inside, 0.0, grad).view(torch.int32)
        out = torch.empty_like(grad)
        grad_op(grad, inside, out)
        grad_op(work, inside, work)
        same = torch.equal(out.view(torch.int32), expected) and torch.equal(work.view(torch.int32), expected)
        w = _median_ms(lambda: torch.where(inside, 0.0, grad), repeats)
        k = _median_ms(lambda: grad_op(grad, inside, torch.empty_like(grad)), repeats)
        i = _median_ms(lambda: grad_op(work, inside, work), repeats)  # idempotent: the band is zero already
    return (f"  {str(shape):18s} where {w:7.3f}   loop {k:7.3f} ({w / k:4.1f}x)   "
            f"in place {i:7.3f} ({w / i:4.1f}x)   bit-equal {same}")


def _mask_row(shape: tuple[int, ...], repeats: int) -> str:
    from graphsparse.ops import fast

    op = torch.ops.graphsparse.mean_sparse_cpu.default
    x = torch.randn(shape)
    mu, thr = torch.zeros(shape[1]), torch.full((shape[1],), 0.3)
    y, inside = torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)
    flat, out, mask = (fast.channels_view(t, 1) for t in (x, y, inside))
    plain = _median_ms(lambda: op(flat, mu, thr, out, None, 0, 0.0), repeats)
    masked = _median_ms(lambda: op(flat, mu, thr, out, mask, 0, 0.0), repeats)
    return f"  {str(shape):18s} output {plain:7.3f}   output and mask {masked:7.3f} ({masked / plain:4.2f}x)"


def kernel_tables(repeats: int) -> None:
    print("exact gradient of one map: where vs the C++ loop (median ms)")
    for shape in SHAPES:
        print(_gradient_row(shape, repeats))
    print("forward kernel per map, without and with the band mask (median ms)")
    for shape in SHAPES:
        print(_mask_row(shape, repeats))


def _python_function() -> type[torch.autograd.Function]:
    """How float32 CPU ran before its C++ autograd function: the Python ``autograd.Function`` that CUDA tensors
    still use (the same kernel, a new output tensor), with the C++ loop's gradient into a new tensor."""
    from graphsparse.ops import fast

    class PythonFunction(fast._FastMeanSparse):
        @staticmethod
        def backward(ctx, grad):
            if ctx.straight_through:
                return grad, None, None, None, None
            (inside,) = ctx.saved_tensors
            out = torch.empty_like(grad)
            torch.ops.graphsparse.mean_sparse_cpu_grad.default(grad, inside, out)
            return out, None, None, None, None

    return PythonFunction


@contextlib.contextmanager
def python_autograd() -> Iterator[None]:
    from graphsparse.ops import cpu_kernel

    native, function = cpu_kernel.launch_autograd, _python_function()
    cpu_kernel.launch_autograd = lambda kind, x, mu, thr, axis, inplace=False: function.apply(
        x, mu, thr, axis, kind == "forward_out"
    )
    try:
        yield
    finally:
        cpu_kernel.launch_autograd = native


def model_table(rounds: int) -> None:
    import graphsparse as gs
    from graphsparse.data import load_dataset, make_loader
    from graphsparse.demo.models import load_demo_model
    from graphsparse.planning.fuse_residual import fuse_residual_operators

    original = load_demo_model().eval()
    rewritten = gs.rewrite(load_demo_model().eval(), "after_addition", torch.zeros(1, 1, 28, 28))
    gs.calibrate(rewritten, make_loader(load_dataset("mnist5k", split="train"), 250))
    gs.set_alpha(rewritten, 0.2)
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))

    def step(model: torch.nn.Module, mode: str, python: bool) -> None:
        modes = gs.straight_through(model) if mode == "bpda" else contextlib.nullcontext()
        with modes, python_autograd() if python else contextlib.nullcontext():
            xx = x.clone().requires_grad_(True)
            torch.autograd.grad(torch.nn.functional.cross_entropy(model(xx), y), [xx])

    view = fuse_residual_operators(rewritten)
    cases = {"original": (original, "exact", False)}
    for mode in ("exact", "bpda"):
        cases[f"rewritten, {mode}"] = (rewritten, mode, False)
        cases[f"rewritten, {mode}, Python"] = (rewritten, mode, True)
        cases[f"rewritten, {mode}, attack view"] = (view, mode, False)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(3):
        for case in cases.values():
            step(*case)
    for _ in range(rounds):  # interleaved, so that load on the machine falls on every case alike
        for k, case in cases.items():
            t = time.perf_counter()
            step(*case)
            times[k].append(time.perf_counter() - t)
    base = statistics.median(times["original"])
    print("demo model, forward and backward at batch 32 (median ms)")
    for k, ts in times.items():
        m = statistics.median(ts)
        print(f"  {k:31s} {m * 1000:7.2f}   {m / base:5.3f}x original")


def main() -> None:
    from graphsparse.ops import cpu_kernel

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=50, help="timed calls per map")
    ap.add_argument("--rounds", type=int, default=100, help="interleaved rounds of the model table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_kernel.available():
        raise SystemExit(f"the C++ kernel is unavailable: {cpu_kernel.unavailable_reason()}")
    kernel_tables(args.repeats)
    model_table(args.rounds)


if __name__ == "__main__":
    main()
