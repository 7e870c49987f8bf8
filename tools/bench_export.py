"""Latency of an exported rewritten model in its runtime against the eager original and the eager rewritten model.

    python tools/bench_export.py                                   # resnet18, batch 8, 224², onnx/pt2/torchscript
    python tools/bench_export.py --model convnext_tiny --batch 8 --rounds 21

The model is a timm model (random init) rewritten with rule ``full``, calibrated on random batches, α = 0.25
(about a fifth of the values at each site replaced), exported with ``graphsparse.export`` and timed in one process
on the same inputs: each round runs every variant once (after warm-up), starting one variant later each round;
a ratio is the variant's time over the original's in the same round, and the table gives the median over rounds
(and the median time). onnxruntime gets the same thread count as torch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _timed(fn, x) -> float:
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet18", help="timm model name (default resnet18)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--alpha", type=float, default=0.25)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--formats", default="onnx,pt2,torchscript")
    ap.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: torch's)")
    args = ap.parse_args()

    import timm

    import graphsparse as gs

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    original = timm.create_model(args.model).eval()
    rewritten = gs.rewrite(original, "full", x[:1])
    gs.calibrate(rewritten, torch.randn(4 * args.batch, 3, args.size, args.size, generator=g))
    gs.set_alpha(rewritten, args.alpha)
    rewritten.eval()

    variants = {"eager original": original, "eager rewritten": rewritten}
    with torch.no_grad():
        want = rewritten(x)
    diffs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in [f for f in args.formats.split(",") if f]:
            path = Path(tmp) / f"m.{fmt}"
            t = time.perf_counter()
            report = gs.export(rewritten, path, fmt, input_shape=tuple(x.shape))
            print(f"{fmt}: exported and verified in {time.perf_counter() - t:.1f} s ({report.bytes:,} bytes); "
                  + report.verification.message)
            if fmt == "onnx":
                import onnxruntime as ort

                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                name = session.get_inputs()[0].name
                variants["onnxruntime"] = lambda b, s=session, n=name: torch.from_numpy(s.run(None, {n: b.numpy()})[0])
            elif fmt == "pt2":
                variants["torch.export (.pt2)"] = torch.export.load(str(path)).module()
                # the same format without MeanSparse: what the format costs apart from the operators
                plain = Path(tmp) / "original.pt2"
                gs.export(original, plain, "pt2", input_shape=tuple(x.shape), verify=False)
                variants["torch.export (.pt2) of the original"] = torch.export.load(str(plain)).module()
            else:
                variants["TorchScript (traced)"] = torch.jit.load(str(path))
        names = list(variants)
        with torch.no_grad():
            for name in names:
                out = variants[name](x)
                diffs[name] = float((out - want).abs().max()) if "original" not in name else float("nan")
                for _ in range(args.warmup):
                    variants[name](x)
            times: dict[str, list[float]] = {n: [] for n in names}
            for r in range(args.rounds):
                order = names[r % len(names):] + names[: r % len(names)]
                for name in order:
                    times[name].append(_timed(variants[name], x))
    base = times["eager original"]
    print(f"\n{args.model}, batch {args.batch}, {args.size}², α = {args.alpha}, {threads} threads, "
          f"{args.rounds} rounds (torch {torch.__version__.split('+')[0]})")
    print("| variant | median ms | ratio to eager original | max abs diff to eager rewritten |")
    print("|---|---|---|---|")
    for name in names:
        ratio = statistics.median(t / b for t, b in zip(times[name], base))
        diff = "" if "original" in name else f"{diffs[name]:.2g}"
        print(f"| {name} | {1000 * statistics.median(times[name]):.1f} | {ratio:.2f} | {diff} |")


if __name__ == "__main__":
    main()
