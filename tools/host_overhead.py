"""Host time per call of the eager fast path's pieces: what a MeanSparse costs the Python side.

Each call is repeated without a sync inside the loop (one sync after it), so on a GPU this measures the host
work of issuing the kernels, which is what bounds eager models at small batches; on CPU it includes the
kernels themselves (a small map keeps them short). One 8×256×14×14 float32 map, a fused in-place ReLU.

    python tools/host_overhead.py --device cuda
    python tools/host_overhead.py                  # CPU: the C++ kernel
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphsparse.ops import MeanSparse, cpu_kernel, fast, triton_kernel  # noqa: E402
from graphsparse.ops.meansparse import _mean_and_threshold  # noqa: E402


def per_call_us(fn: Callable[[], object], calls: int, sync: Callable[[], None]) -> float:
    """Microseconds per call of ``fn`` over ``calls`` calls after 100 warm-up calls, one sync at the end."""
    for _ in range(100):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1e6


def pieces(device: torch.device) -> dict[str, Callable[[], object]]:
    """The calls timed, from a plain ReLU up to the whole operator (plain path last)."""
    fast.MIN_NUMEL = 1
    op = MeanSparse(256, 1, 0.5)
    op.var.fill_(1.0)
    op.activation, op.inplace = "relu", True
    op.to(device)
    x = torch.randn(8, 256, 14, 14, device=device)
    mu, thr, _ = _mean_and_threshold(op.mean, op.var, op.alpha, torch.float32)
    flat, relu = x.view(8, 256, -1), ("relu", ())
    kernel = triton_kernel if device.type == "cuda" else cpu_kernel
    if not kernel.available():
        raise SystemExit(f"the {kernel.__name__} kernel is unavailable: {kernel.unavailable_reason()}")

    def plain() -> torch.Tensor:
        with fast.enabled(False):
            return op(x)

    return {
        "torch.relu_": lambda: torch.relu_(x),
        "torch.where(x <= 0, 0, x)": lambda: torch.where(x <= 0, 0.0, x),
        f"{kernel.__name__.rsplit('.', 1)[1]}.launch": lambda: kernel.launch(
            "forward_inplace", flat, mu, thr, relu, flat
        ),
        "fast.applies": lambda: fast.applies(x),
        "fast.mean_sparse": lambda: fast.mean_sparse(x, mu, thr, 1, activation=relu, inplace=True),
        "_mean_and_threshold (cached)": lambda: _mean_and_threshold(op.mean, op.var, op.alpha, torch.float32),
        "MeanSparse + relu, in place": lambda: op(x),
        "the same, plain path": plain,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--calls", type=int, default=3000, help="timed calls per piece")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for name, fn in pieces(device).items():
            print(f"{name:<36} {per_call_us(fn, args.calls, sync):8.1f} µs")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{where}, torch {torch.__version__}, {args.calls} calls each, {args.threads} thread(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
