"""Calibration cost against a plain eval pass: time and peak memory (issue 4's targets).

Issue 4 asks that ``graphsparse.calibrate`` keep memory flat (peak ≤ 1.1× a plain eval forward of the same
batch) and cost little time (≤ 1.1× a plain ``torch.no_grad`` eval pass over the same batches). This script
measures both on a timm model rewritten with the rule ``full`` (an operator before every activation and on
every residual-add output: the most sites, so the worst case), on random data:

- Time, one process: a plain ``torch.no_grad()`` eval pass of the *original* model over the batches, and
  ``graphsparse.calibrate(rewritten, batches)`` over the same batch list (hooks, float64 accumulators,
  per-batch NaN check and the final buffer copy all included). A warm-up of both first (it also compiles
  the operators' fast kernel), then the repeats interleaved (plain, calibrate, plain, calibrate, ...) so
  that load from other processes hits both alike; median (and min) of the repeats and their ratio.
  ``--decompose`` adds a third variant, a plain pass of the rewritten model (α = 0, no hooks): the part of
  the cost that comes from the operators themselves rather than from the statistics.
- Peak memory, one fresh subprocess per mode (this script with the hidden ``--mode plain|calibrate``), so
  neither mode inherits the other's heap. Each child builds its model (the calibrate child rewrites and
  drops the original) and the data, then measures the peak resident set size (RSS) above the RSS just
  before a pass, twice:

  * ``cold``: the first pass over one batch. Includes one-time costs (oneDNN primitive caches; in the
    calibrate child, loading torch.compile/inductor for the fast kernel).
  * ``warm`` (the figure compared with the target): a further pass over ``--mem-batches`` batches.

  Before each pass the peak RSS is reset (``echo 5 > /proc/self/clear_refs``, Linux ≥ 4.0, resets
  ``VmHWM``) and the current RSS taken as baseline; after it, ``VmHWM`` (``/proc/self/status``) minus that
  baseline is the figure. Not ``ru_maxrss``: ``getrusage`` reports the larger of ``VmHWM`` and a per-process
  maximum that the kernel seeds at ``exec`` from the memory it replaces, and ``subprocess`` starts the
  child with vfork, i.e. inside the parent's address space; so a child of this (large) parent inherits
  the parent's peak, ~0.9 GB, and ``clear_refs`` does not reset it (measured here: a plain resnet18 pass
  read 113 MiB through ``ru_maxrss``, 50 MiB through ``VmHWM``). Where ``clear_refs`` is not writable,
  the figures are those of ``VmHWM`` since the process started (valid only when the pass exceeds the
  construction peak) and are flagged ``peak_reset: false``.

  Before each baseline, ``gc.collect()`` and glibc's ``malloc_trim(0)`` return freed heap to the system,
  so that memory freed during construction cannot be reused by the pass unseen. The children run with
  ``MALLOC_MMAP_THRESHOLD_=65536`` (unless set already): every tensor above 64 KiB gets its own mapping,
  returned to the system when freed, so RSS follows the live tensor bytes. With glibc's default dynamic
  threshold, freed feature maps stay in the heap and fragment it, and the same plain resnet18 pass
  measured 56 to 80 MiB between runs; with the fixed threshold, runs agree within 0.3 MiB
  and match the arithmetic (plain resnet18 b8: 50 MiB = the first conv's 25.7 MB output and its
  BatchNorm's, both alive at once).

  Why RSS: the target is about the process's memory, and RSS is what the machine pays, allocator slack
  and library workspaces (oneDNN scratchpads) included. ``tracemalloc`` sees only Python-object
  allocations, not tensor storage (allocated in C++), so it would report ~0 for both modes.
  ``torch.profiler(profile_memory=True)`` records tensor allocations but not library workspaces, slows
  every op, and gives no peak without replaying the event stream. The price of RSS is granularity
  (pages, allocator caching), which the trim and the reset keep small next to the 50-100 MB feature maps
  measured here.

    python tools/bench_calibrate.py              # resnet50, batch 16, 224², 10 batches, 3 repeats
    python tools/bench_calibrate.py --quick      # resnet18, batch 8, 5 batches
    python tools/bench_calibrate.py --json calib_bench.json --decompose
    python tools/bench_calibrate.py --quick --no-memory --kernels   # + one map's moments: kernel vs var_mean

Threads: ``torch.set_num_threads(2)`` (``--threads``). Measured on 2 cores shared with another job: the
full run 140 s, the quick one 40 s (``--decompose`` adds a third of the timing part). Load from other
processes slows both modes alike (interleaved repeats), so the ratios hold better than the seconds.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (as in tools/bench_ops.py): on a shared machine spinning
# threads steal the core from the thread that issues the next operator. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphsparse as gs  # noqa: E402

RULE = "full"
TARGET = 1.1
IMAGE = 224
FULL = {"model": "resnet50", "batch": 16, "batches": 10}
QUICK = {"model": "resnet18", "batch": 8, "batches": 5}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- setup


def _batches(n: int, batch: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, IMAGE, IMAGE, generator=g) for _ in range(n)]


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def _rewritten(base: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gs.rewrite(base, RULE, torch.randn(1, 3, IMAGE, IMAGE))


def _plain_pass(model: nn.Module, batches: list[torch.Tensor]) -> None:
    model.eval()
    with torch.no_grad():
        for x in batches:
            model(x)


def _calibrate_pass(model: nn.Module, batches: list[torch.Tensor]) -> None:
    gs.calibrate(model, batches)


# --------------------------------------------------------------------------------------------- memory


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _peak_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(mode: str, model_name: str, batch: int, mem_batches: int) -> dict:
    """One mode's peak RSS above its baseline (KiB): printed as JSON on the last stdout line."""
    base = _model(model_name)
    if mode == "calibrate":
        model = _rewritten(base)
        del base
    else:
        model = base
    data = _batches(1 + mem_batches, batch)
    pass_fn = _calibrate_pass if mode == "calibrate" else _plain_pass

    def run(batches: list[torch.Tensor]) -> None:
        pass_fn(model, batches)

    figures = {}
    reset = True
    for name, batches in (("cold_kib", data[:1]), ("warm_kib", data[1:])):
        _trim()
        reset = _reset_peak() and reset
        baseline = _rss_kib()
        run(batches)
        figures[name] = _peak_kib() - baseline
    return {"mode": mode, **figures, "baseline_kib": baseline, "peak_reset": reset}


def measure_memory(args: argparse.Namespace, cfg: dict) -> dict:
    out = {}
    for mode in ("plain", "calibrate"):
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--mode",
            mode,
            "--model",
            cfg["model"],
            "--batch",
            str(cfg["batch"]),
            "--mem-batches",
            str(args.mem_batches),
            "--threads",
            str(args.threads),
        ]
        _log(f"memory: {mode} in a fresh process ...")
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {mode!r} failed:\n{proc.stderr[-3000:]}")
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["ratio"] = out["calibrate"]["warm_kib"] / out["plain"]["warm_kib"]
    out["ratio_cold"] = out["calibrate"]["cold_kib"] / out["plain"]["cold_kib"]
    return out


# ----------------------------------------------------------------------------------------------- time


def measure_time(cfg: dict, repeats: int, decompose: bool) -> dict:
    base = _model(cfg["model"])
    _log(f"rewriting {cfg['model']} with rule {RULE!r} ...")
    rewritten = _rewritten(base)
    sites = len(gs.operators(rewritten))
    data = _batches(cfg["batches"], cfg["batch"])
    variants: dict[str, Callable[[list[torch.Tensor]], None]] = {
        "plain": lambda d: _plain_pass(base, d),
        "calibrate": lambda d: _calibrate_pass(rewritten, d),
    }
    if decompose:
        variants["rewritten (alpha 0, no hooks)"] = lambda d: _plain_pass(rewritten, d)
    _log("warm-up ...")
    for fn in variants.values():
        fn(data[:2])
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn(data)
            times[name].append(time.perf_counter() - start)
            _log(f"  repeat {r + 1}/{repeats} {name}: {times[name][-1]:.2f} s")
    rows = {name: {"median_s": statistics.median(ts), "min_s": min(ts), "all_s": ts} for name, ts in times.items()}
    plain = rows["plain"]
    for row in rows.values():
        row["ratio"] = row["median_s"] / plain["median_s"]
        row["min_ratio"] = row["min_s"] / plain["min_s"]
    return {"sites": sites, "rows": rows}


# --------------------------------------------------------------------------------------------- output


def _verdict(ratio: float) -> str:
    return "ok" if ratio <= TARGET else f"MISS (+{(ratio - TARGET) / TARGET:.0%} over {TARGET}x)"


def _print(cfg: dict, timing: dict, memory: dict | None) -> None:
    shape = f"{cfg['batches']} x ({cfg['batch']}, 3, {IMAGE}, {IMAGE})"
    print(f"\n{cfg['model']}, rule {RULE!r} ({timing['sites']} sites), {shape}, {torch.get_num_threads()} threads")
    print(f"\n{'time (one pass over all batches)':<34} {'median s':>9} {'min s':>8} {'ratio':>7} {'min ratio':>9}")
    for name, r in timing["rows"].items():
        print(f"{name:<34} {r['median_s']:>9.2f} {r['min_s']:>8.2f} {r['ratio']:>7.3f} {r['min_ratio']:>9.3f}")
    ratio = timing["rows"]["calibrate"]["ratio"]
    print(f"time ratio calibrate/plain: {ratio:.3f}  (target <= {TARGET}: {_verdict(ratio)})")
    if memory is None:
        return
    print(f"\n{'peak RSS above baseline (MiB)':<34} {'cold':>9} {'warm':>8}")
    for mode in ("plain", "calibrate"):
        m = memory[mode]
        flag = "" if m["peak_reset"] else "  (peak not reset: since process start)"
        print(f"{mode:<34} {m['cold_kib'] / 1024:>9.1f} {m['warm_kib'] / 1024:>8.1f}{flag}")
    print(
        f"memory ratio calibrate/plain (warm): {memory['ratio']:.3f}  "
        f"(target <= {TARGET}: {_verdict(memory['ratio'])}); cold: {memory['ratio_cold']:.3f}"
    )


def moments_kernels(repeats: int = 30) -> dict[str, float]:
    """Median ms of one map's batch moments: the compiled two-pass kernel against ``torch.var_mean`` of a
    float64 copy (what calibration did before), on an 8×64×112×112 float32 map (resnet's stem output)."""
    from graphsparse.ops import fast
    from graphsparse.stats import moments

    x = torch.randn(8, 64, 112, 112, generator=torch.Generator().manual_seed(0)) * 3 + 5
    dims = [0, 2, 3]
    variants = {
        "compiled two-pass (graphsparse)": lambda: moments.batch_moments(x, 1),
        "var_mean of a float64 copy": lambda: torch.var_mean(x.double(), dim=dims, correction=0),
    }
    with fast.enabled(True):
        times: dict[str, list[float]] = {name: [] for name in variants}
        for fn in variants.values():
            fn()  # warm-up (compiles)
        for _ in range(repeats):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="resnet18, batch 8, 5 batches")
    parser.add_argument("--model", default=None, help="timm model name (default resnet50; quick resnet18)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 16; quick 8)")
    parser.add_argument("--batches", type=int, default=None, help="batches per pass (default 10; quick 5)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant (default 3)")
    parser.add_argument("--mem-batches", type=int, default=2, help="batches in the warm memory pass (default 2)")
    parser.add_argument("--decompose", action="store_true", help="also time the rewritten model without hooks")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--kernels", action="store_true", help="also time one map's batch moments, kernel vs var_mean")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    parser.add_argument("--mode", choices=("plain", "calibrate"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    preset = QUICK if args.quick else FULL
    cfg = {
        "model": args.model or preset["model"],
        "batch": args.batch or preset["batch"],
        "batches": args.batches or preset["batches"],
    }
    if args.mode is not None:
        print(json.dumps(child(args.mode, cfg["model"], cfg["batch"], args.mem_batches)))
        return 0

    start = time.perf_counter()
    timing = measure_time(cfg, args.repeats, args.decompose)
    memory = None if args.no_memory else measure_memory(args, cfg)
    wall = time.perf_counter() - start
    _print(cfg, timing, memory)
    kernels = moments_kernels() if args.kernels else None
    if kernels:
        print("\nbatch moments of one 8x64x112x112 float32 map, median ms")
        for name, ms in kernels.items():
            print(f"{name:<36} {ms:8.2f}")
    print(f"\nwall time {wall:.0f} s")
    if args.json is not None:
        result = {
            "config": {**cfg, "rule": RULE, "image": IMAGE, "repeats": args.repeats, "threads": args.threads},
            "mem_batches": args.mem_batches,
            "target": TARGET,
            "timing": timing,
            "memory": memory,
            "moments_kernels_ms": kernels,
            "wall_s": wall,
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "timm": timm.__version__,
                "graphsparse": gs.__version__,
            },
            "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()},
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
