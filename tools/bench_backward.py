"""Cost of MeanSparse's exact gradient on CPU: ATen's ``where`` against graphsparse's C++ loop, side by side.

Two tables, one process, float32, ``--threads`` torch threads (default 1, as an attack on a shared machine):

- per feature map (the demo model's six ``after_addition`` site maps at batch 32, and one resnet50 stage-1 map
  8x256x56x56): median ms of ``torch.where(inside, 0.0, grad)`` and of ``cpu_kernel.band_gradient(grad,
  inside)``, the ratio, and whether the two are bit-equal;
- the demo model's forward and backward at batch 32 (what one APGD step costs): the original model, the
  rewritten one (α = 0.2, calibrated) with the loop, and with ``where`` (the loop switched off here), each
  against the original, interleaved rounds.

    python tools/bench_backward.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def maps_table(repeats: int) -> None:
    from graphsparse.ops import cpu_kernel

    shapes = [(32, 16, 28, 28)] * 2 + [(32, 32, 14, 14)] * 2 + [(32, 64, 7, 7)] * 2 + [(8, 256, 56, 56)]
    print("exact gradient of one map: where vs the C++ loop (median ms)")
    for shape in dict.fromkeys(shapes):
        g = torch.Generator().manual_seed(0)
        grad = torch.randn(shape, generator=g)
        inside = torch.rand(shape, generator=g) < 0.3
        with torch.no_grad():
            same = torch.equal(cpu_kernel.band_gradient(grad, inside).view(torch.int32),
                               torch.where(inside, 0.0, grad).view(torch.int32))
            w = _median_ms(lambda g=grad, i=inside: torch.where(i, 0.0, g), repeats)
            k = _median_ms(lambda g=grad, i=inside: cpu_kernel.band_gradient(g, i), repeats)
        print(f"  {str(shape):22s} where {w:7.3f}   loop {k:7.3f}   {w / k:4.1f}x faster   bit-equal {same}")


def model_table(rounds: int) -> None:
    import graphsparse as gs
    from graphsparse.data import load_dataset, make_loader
    from graphsparse.demo.models import load_demo_model
    from graphsparse.ops import cpu_kernel

    original = load_demo_model().eval()
    rewritten = gs.rewrite(load_demo_model().eval(), "after_addition", torch.zeros(1, 1, 28, 28))
    gs.calibrate(rewritten, make_loader(load_dataset("mnist5k", split="train"), 250))
    gs.set_alpha(rewritten, 0.2)
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    loop = cpu_kernel.band_gradient

    def step(model: torch.nn.Module, use_loop: bool) -> None:
        cpu_kernel.band_gradient = loop if use_loop else (lambda grad, inside: None)
        try:
            xx = x.clone().requires_grad_(True)
            torch.autograd.grad(torch.nn.functional.cross_entropy(model(xx), y), [xx])
        finally:
            cpu_kernel.band_gradient = loop

    cases = {"original": (original, True), "rewritten, loop": (rewritten, True), "rewritten, where": (rewritten, False)}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(3):
        for model, use_loop in cases.values():
            step(model, use_loop)
    for _ in range(rounds):  # interleaved, so that load on the machine falls on every case alike
        for k, (model, use_loop) in cases.items():
            t = time.perf_counter()
            step(model, use_loop)
            times[k].append(time.perf_counter() - t)
    base = statistics.median(times["original"])
    print("demo model, forward and backward at batch 32 (median ms)")
    for k, ts in times.items():
        m = statistics.median(ts)
        print(f"  {k:18s} {m * 1000:7.2f}   {m / base:5.3f}x original")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=50, help="timed calls per map")
    ap.add_argument("--rounds", type=int, default=60, help="interleaved rounds of the model table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    maps_table(args.repeats)
    model_table(args.rounds)


if __name__ == "__main__":
    main()
