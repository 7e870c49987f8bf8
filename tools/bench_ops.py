"""Operator speed: MeanSparse paths side by side, eager and under ``torch.compile`` (issue 8, DESIGN §8).

Three tables, all from one process, medians of repeated runs after a warm-up, runs interleaved round-robin
over the variants (so that load from other processes hits them alike), ``torch.no_grad``, eval mode:

1. Kernels: one resnet50-sized feature map (8×256×56×56, float32): a ReLU (the cost of one memory pass),
   the reference formula, graphsparse's plain formula, the compiled kernel called directly and through a
   ``torch.library`` custom op, the C++ CPU kernel (``graphsparse::mean_sparse_cpu``) or the Triton kernel
   (CUDA), and the fast path with a fused ReLU (out of place / in place; also in place through the
   compiled kernel). Also the per-call overhead on a small map. This is the measurement behind the choice
   of the fast path.
2. Site maps: the fused in-place MeanSparse + ReLU on the input map of each of a rewritten resnet50's 49
   sites (batch 8), each timed alone and summed per forward, against the in-place ReLUs it replaces; C++
   (or Triton) and compiled kernels. The operators' own cost, without the rest of the model's noise.
3. Models, same weights and inputs for every variant: the original; the reference formula
   ``torch.where(|x − μ| < α·σ, μ, x)`` as a plain module at the same sites; graphsparse eager (plain
   path, kernel off), graphsparse fast (the fast path's kernel: C++ for float32 on CPU, Triton on CUDA),
   graphsparse fused (``fuse_activations``), ``rewrite() default`` (the model ``gs.rewrite`` gives
   by default, which is the fused form; the other graphsparse variants use ``fuse=False``), the fused model
   through the compiled kernel (``fused, compiled kernel``); and the original, reference, graphsparse and
   fused models under ``torch.compile`` (inside a compiled model the operator always uses the plain formula,
   so "plain" and "fast" are one compiled variant). Ratios are to the original (compiled ones to the compiled
   original). Statistics are computed from the model's own features on the probe batch (per-channel
   mean and variance, so the band looks calibrated), α = 0.25.
   ``ratio`` is the median over rounds of (variant's time / the original's time in the same round): each
   round runs every variant once, so a slow stretch of a shared machine hits a round's pair alike, and
   starts one variant later than the one before, so no variant always follows the same one; ``min
   ratio`` is the best time over the original's best time. ``faults``: minor page faults per forward.
   ``fused graph, α = 0``: the fused model with every α at 0, where the operators return their input (the
   activation still runs, in place): what executing the rewritten ``torch.fx`` graph costs by itself.
   ``graph, activations only`` (compiled): the fused model with each operator replaced by the activation it
   absorbed, since a compiled operator runs its formula whatever α; the gap between it and ``graphsparse
   fused`` is the operator's own arithmetic.
   ``exact``: every graphsparse variant's output against the reference formula in its ``<=`` form
   (graphsparse's band is inclusive, the reference's is not): ``bit-equal`` or the largest difference.

    python tools/bench_ops.py                    # full: resnet50 b8, WRN-28-10 b32, convnext_tiny b8
    python tools/bench_ops.py --quick            # sanity run: small batches, 2 repeats
    python tools/bench_ops.py --batch wrn28_10=128 --json bench.json
    python tools/bench_ops.py --models resnet50 --no-compile
    python tools/bench_ops.py --device cuda --batch wrn28_10=128   # on a GPU machine

By default the benchmark tells glibc's malloc to keep freed memory (``--malloc keep``, see
:func:`keep_freed_memory`): with glibc's defaults every forward re-faults its pages, in numbers that depend
on the process's allocation history rather than on the variant timed.
``--malloc system`` measures with the allocator as it is (or as ``LD_PRELOAD`` made it).

WRN-28-10 at batch 128 takes ~20 s a forward on 2 loaded cores, so the full run uses batch 32 to stay near
10 minutes (ratios barely depend on the batch); ``--batch wrn28_10=128`` runs the issue's size.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning. On a shared machine with more runnable threads than cores,
# spinning threads steal the core from the thread that issues the next operator, and every small serial
# op after a parallel one then waits a scheduler tick (4-8 ms measured here). Set OMP_WAIT_POLICY=ACTIVE
# to measure with the default policy. (Must be set before torch loads OpenMP.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphsparse as gs  # noqa: E402
from graphsparse._files import atomic_write  # noqa: E402
from graphsparse.ops import MeanSparse, cpu_kernel, fast, triton_kernel  # noqa: E402
from graphsparse.ops.fused import apply_activation  # noqa: E402
from graphsparse.ops.meansparse import _mean_and_threshold, _mean_sparse  # noqa: E402
from graphsparse.planning.fuse import fuse_activations  # noqa: E402

ALPHA = 0.25
GRAPH_ONLY = "fused graph, α = 0"
REWRITE_DEFAULT = "rewrite() default"
ACTIVATIONS_ONLY = "graph, activations only"
COMPILED_KERNEL = "fused, compiled kernel"


class ReferenceMeanSparse(nn.Module):
    """The reference code's formula: ``torch.where(|x − μ| < α·σ, μ, x)``, threshold recomputed per call."""

    def __init__(self, op: MeanSparse, *, inclusive: bool = False) -> None:
        super().__init__()
        self.register_buffer("mean", op.mean.clone())
        self.register_buffer("var", op.var.clone())
        self.register_buffer("alpha", op.alpha.clone())
        self.axis = op.channel_axis
        self.inclusive = inclusive

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.axis] = -1
        mu = self.mean.view(shape)
        thr = (self.alpha * self.var.sqrt()).view(shape)
        diff = (x - mu).abs()
        return torch.where(diff <= thr if self.inclusive else diff < thr, mu, x)


class ActivationOnly(nn.Module):
    """A fused operator without MeanSparse: only the activation it absorbed (out of place, as inductor sees
    it). Under ``torch.compile`` an operator at α = 0 still runs its formula, so this is how the compiled
    table shows what the rewritten graph costs without the operator's arithmetic."""

    def __init__(self, op: MeanSparse) -> None:
        super().__init__()
        self.activation = op.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.activation is None else apply_activation(self.activation, x, inplace=False)


# ------------------------------------------------------------------------------------------- timing


def _sync() -> None:
    """Wait for queued GPU work, so that a timed call includes its kernels (a no-op on the CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _time_rounds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function in every round, calls interleaved: a, b, c, then b, c, a, ...

    Each round starts one function later, so that no variant always runs right after the same one (the
    previous call's memory and cache state then weigh on every variant alike)."""
    return _time_and_count_rounds(fns, repeats)[0]


def _time_and_count_rounds(
    fns: dict[str, Callable[[], object]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """:func:`_time_rounds`, and the mean number of minor page faults per call of each function."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    faults = dict.fromkeys(names, 0)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            _sync()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            fns[name]()
            _sync()
            times[name].append(time.perf_counter() - start)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return times, {name: n / max(repeats, 1) for name, n in faults.items()}


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> str:
    """Tell glibc's malloc to keep the memory a process frees instead of handing it back to the system.

    By default glibc serves large blocks with mmap and trims the heap, so a forward pass whose tensors were
    freed by the previous one takes its pages anew: up to ~40 thousand minor page faults per resnet50 forward
    here, a number that depends on what the process allocated before rather than on the variant (measured:
    the same compiled resnet50 took 0 faults per forward in one process and 15.6 k in another). jemalloc and
    tcmalloc, which PyTorch's CPU tuning guides recommend, keep freed memory too. Returns what was done, for
    the report."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError):
        return "system (not glibc)"
    return "glibc, freed memory kept" if ok else "system (mallopt refused)"


def _time_round_robin(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """(median, min) seconds per call of each function, calls interleaved (see :func:`_time_rounds`)."""
    return {name: (statistics.median(ts), min(ts)) for name, ts in _time_rounds(fns, repeats).items()}


def _paired_ratio(times: list[float], base: list[float]) -> float:
    """Median over rounds of ``times[r] / base[r]``: each round's variant against the original run next to it,
    so that slow drifts of a shared machine cancel out."""
    return statistics.median(t / b for t, b in zip(times, base))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _exact(out: torch.Tensor, ref: torch.Tensor) -> str:
    if out.shape == ref.shape and torch.equal(_bits(out), _bits(ref)):
        return "bit-equal"
    return f"max|d|={(out - ref).abs().max().item():.2e}"


# ------------------------------------------------------------------------------------------ kernels


def kernel_table(repeats: int, device: torch.device) -> list[dict]:
    """Per-call medians of the candidate MeanSparse implementations on one feature map."""
    g = torch.Generator().manual_seed(0)
    op = MeanSparse(256, 1, ALPHA)
    op.mean.copy_(torch.randn(256, generator=g) * 0.5)
    op.var.copy_(torch.rand(256, generator=g) + 0.5)
    op.to(device)
    ref = ReferenceMeanSparse(op)
    x = torch.randn(8, 256, 56, 56, generator=g).to(device)
    relu_op = copy.deepcopy(op)
    relu_op.activation = "relu"
    relu_inplace = copy.deepcopy(relu_op)
    relu_inplace.inplace = True
    scratch = x.clone()
    on_cpu = device.type == "cpu" and cpu_kernel.available()
    on_gpu = device.type == "cuda" and triton_kernel.available()

    flat = x.view(8, 256, -1)
    compiled = fast._compiled(fast._forward, ("bench", torch.float32, device.type, 3, None))
    mu, thr, _ = _mean_and_threshold(op.mean, op.var, op.alpha, torch.float32)
    mu3, thr3 = mu.view(-1, 1), thr.view(-1, 1)

    def kernel(t: torch.Tensor) -> torch.Tensor:
        return compiled(t, mu3, thr3, None)

    @torch.library.custom_op("graphsparse_bench::mean_sparse", mutates_args=())
    def custom(x: torch.Tensor) -> torch.Tensor:
        return kernel(x)

    @custom.register_fake
    def _(x):
        return torch.empty_like(x)

    small = torch.randn(2, 256, 8, 8, generator=g).to(device)
    small_flat = small.view(2, 256, -1)

    def plain(t: torch.Tensor) -> torch.Tensor:
        with fast.enabled(False):
            return _mean_sparse(t, op.mean, op.var, op.alpha, 1, False)

    candidates = {
        "relu (one memory pass)": lambda: torch.relu(x),
        "relu_ (in place)": lambda: torch.relu_(scratch),
        "reference formula (<)": lambda: ref(x),
        "graphsparse plain formula": lambda: plain(x),
        "compiled kernel (torch.compile fn)": lambda: kernel(flat),
        "custom op -> compiled kernel": lambda: custom(flat),
    }
    if on_cpu:
        cpp = torch.ops.graphsparse.mean_sparse_cpu.default
        out = torch.empty_like(flat)
        candidates["C++ kernel (mean_sparse_cpu op)"] = lambda: cpp(flat, mu, thr, out, None, 0, 0.0)
    if on_gpu:
        out = torch.empty_like(flat)
        launch = triton_kernel.launch
        candidates["Triton kernel (direct launch)"] = lambda: launch("forward_out", flat, mu, thr, None, out)
    candidates.update(
        {
            "MeanSparse fast path": lambda: op(x),
            "MeanSparse + relu fused": lambda: relu_op(x),
            "MeanSparse + relu fused, in place": lambda: relu_inplace(scratch),
        }
    )
    if on_cpu or on_gpu:
        candidates["  the same, compiled kernel"] = lambda: _compiled_kernel_only(relu_inplace, scratch)
    overhead = {
        "small map: plain formula": lambda: plain(small),
        "small map: compiled kernel": lambda: kernel(small_flat),
        "small map: custom op": lambda: custom(small_flat),
    }
    with torch.no_grad():
        for fn in list(candidates.values()) + list(overhead.values()):
            fn()  # warm-up (compiles)
        checks = {
            "compiled kernel (torch.compile fn)": kernel(flat).view_as(x),
            "custom op -> compiled kernel": custom(flat).view_as(x),
            "MeanSparse fast path": op(x),
            "MeanSparse + relu fused": relu_op(x),
        }
        if on_cpu:
            checks["C++ kernel (mean_sparse_cpu op)"] = out.view_as(x)
        if on_gpu:
            checks["Triton kernel (direct launch)"] = out.view_as(x)
        expected = plain(x)
        medians = _time_round_robin(candidates, repeats)
        small_medians = _time_round_robin(overhead, repeats * 5)
    rows = []
    base = medians["relu (one memory pass)"][0]
    for name, (sec, best) in medians.items():
        exact = ""
        if name in checks:
            target = torch.relu(expected) if "relu" in name else expected
            exact = _exact(checks[name], target)
        rows.append({"kernel": name, "ms": sec * 1e3, "min_ms": best * 1e3, "x_relu": sec / base, "exact": exact})
    for name, (sec, best) in small_medians.items():
        rows.append({"kernel": name, "ms": sec * 1e3, "min_ms": best * 1e3, "x_relu": None, "exact": ""})
    return rows


def _compiled_kernel_only(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``module(t)`` with the C++ and Triton kernels switched off: the fast path uses its compiled kernel."""
    with cpu_kernel.enabled(False), triton_kernel.enabled(False):
        return module(t)


def site_maps_table(repeats: int, device: torch.device) -> list[dict]:
    """The fused in-place operator on the input maps of a rewritten timm resnet50's 49 sites (batch 8), each
    map timed alone, summed per forward: the operators' share of a forward, against the in-place ReLUs they
    replace. Rows: ``relu_`` (the original model's cost), the C++ (CPU) or Triton (CUDA) kernel, the compiled
    kernel."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = gs.rewrite(timm.create_model("resnet50"), "before_activations", torch.randn(1, 3, 224, 224))
    shapes: dict[tuple[int, ...], int] = {}

    def record(op, args):
        shape = (8, *args[0].shape[1:])
        shapes[shape] = shapes.get(shape, 0) + 1

    hooks = [op.register_forward_pre_hook(record) for op in gs.operators(model).values()]
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(0)
    native = "fused in place, " + ("Triton kernel" if device.type == "cuda" else "C++ kernel")
    has_native = cpu_kernel.available() if device.type == "cpu" else triton_kernel.available()
    totals = {"relu_ (the original's ReLUs)": 0.0, native: 0.0, "fused in place, compiled": 0.0}
    with torch.no_grad():
        for shape, count in shapes.items():
            op = MeanSparse(shape[1], 1, ALPHA)
            op.var.copy_(torch.rand(shape[1], generator=g) + 0.5)
            op.activation, op.inplace = "relu", True
            op.to(device)
            x = torch.randn(shape, generator=g).to(device)
            fns = {
                "relu_ (the original's ReLUs)": lambda x=x: torch.relu_(x),
                native: lambda op=op, x=x: op(x),
                "fused in place, compiled": lambda op=op, x=x: _compiled_kernel_only(op, x),
            }
            if not has_native:
                del fns[native]
            for fn in fns.values():
                fn()  # warm-up
            for name, (sec, _) in _time_round_robin(fns, repeats).items():
                totals[name] += sec * count
    base = totals["relu_ (the original's ReLUs)"]
    sites = sum(shapes.values())
    return [
        {"variant": name, "sites": sites, "ms": sec * 1e3, "x_relu_": sec / base}
        for name, sec in totals.items()
        if sec > 0
    ]


# ------------------------------------------------------------------------------------------- models


@dataclass
class ModelCase:
    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    rule: str = "before_activations"
    channels_last: bool = False


def _wrn28_10() -> nn.Module:
    from graphsparse.sources.robustbench import import_robustbench

    import_robustbench()
    from robustbench.model_zoo.architectures.dm_wide_resnet import DMWideResNet

    return DMWideResNet(depth=28, width=10)


CASES = {
    "resnet50": ModelCase("resnet50", lambda: timm.create_model("resnet50"), (8, 3, 224, 224)),
    "wrn28_10": ModelCase("wrn28_10", _wrn28_10, (32, 3, 32, 32)),
    "convnext_tiny": ModelCase(
        "convnext_tiny", lambda: timm.create_model("convnext_tiny"), (8, 3, 224, 224), channels_last=True
    ),
}
QUICK_BATCH = {"resnet50": 2, "wrn28_10": 8, "convnext_tiny": 2}


@dataclass
class Row:
    model: str
    variant: str
    mode: str
    ms: float
    ratio: float
    min_ms: float
    min_ratio: float
    exact: str = ""
    compile_s: float | None = None
    page_faults: float = 0.0


@dataclass
class ModelResult:
    model: str
    batch_shape: tuple[int, ...]
    sites: int
    fused: int
    replaced_fraction: float
    rows: list[Row] = field(default_factory=list)


def _calibrate_like(model: nn.Module, x: torch.Tensor) -> float:
    """Per-channel mean/var of each operator's input on ``x``; α = ALPHA. Returns the replaced fraction."""
    ops = list(gs.operators(model).values())
    stats: dict[MeanSparse, torch.Tensor] = {}

    def grab(op, args):
        t = args[0].detach().float()
        dims = [d for d in range(t.dim()) if d != op.channel_axis % t.dim()]
        stats[op] = torch.stack([t.mean(dims), t.var(dims, correction=0)])

    hooks = [op.register_forward_pre_hook(grab) for op in ops]
    with torch.no_grad(), fast.enabled(False):
        model(x)
    for h in hooks:
        h.remove()
    for op in ops:
        op.mean.copy_(stats[op][0])
        op.var.copy_(stats[op][1])
    gs.set_alpha(model, ALPHA)

    counts = []

    def count(op, args, out):
        counts.append(((out != args[0]).sum().item(), out.numel()))

    hooks = [op.register_forward_hook(count) for op in ops]
    with torch.no_grad(), fast.enabled(False):
        model(x)
    for h in hooks:
        h.remove()
    return sum(c for c, _ in counts) / max(1, sum(n for _, n in counts))


def _replace_operators(model: nn.Module, make: Callable[[MeanSparse], nn.Module]) -> nn.Module:
    """A copy of ``model`` with every MeanSparse operator replaced by ``make(operator)``."""
    copied = copy.deepcopy(model)
    for name, module in list(copied.named_modules()):
        if isinstance(module, MeanSparse):
            parent_name, _, attr = name.rpartition(".")
            setattr(copied.get_submodule(parent_name), attr, make(module))
    return copied


def _with_reference(model: nn.Module, *, inclusive: bool) -> nn.Module:
    return _replace_operators(model, lambda op: ReferenceMeanSparse(op, inclusive=inclusive))


@dataclass
class Prepared:
    """One case ready to time: the original model, its rewritten copy with statistics, the fused copy of
    that, the input batch, the fraction of values the operators replace and the number of fused pairs."""

    base: nn.Module
    rewritten: nn.Module
    fused: nn.Module
    x: torch.Tensor
    replaced: float
    n_fused: int
    default: nn.Module | None = None


def prepare(case: ModelCase, batch: int, device: torch.device) -> Prepared:
    """The same weights, input and statistics (:func:`_calibrate_like`) for every variant of ``case``."""
    torch.manual_seed(0)
    base = case.build().eval().to(device)
    probe = torch.randn(1, *case.shape[1:]).to(device)
    x = torch.randn(batch, *case.shape[1:]).to(device)
    if case.channels_last:
        base = base.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rewritten = gs.rewrite(base, case.rule, probe, fuse=False)
        default = gs.rewrite(base, case.rule, probe)  # what users get: rewrite()'s default (fused) form
    if case.channels_last:
        rewritten = rewritten.to(memory_format=torch.channels_last)
        default = default.to(memory_format=torch.channels_last)
    replaced = _calibrate_like(rewritten, x[: min(batch, 4)])
    default.load_state_dict(rewritten.state_dict())
    fused = copy.deepcopy(rewritten)
    n_fused = fuse_activations(fused)
    return Prepared(base, rewritten, fused, x, replaced, n_fused, default)


def bench_model(
    case: ModelCase, batch: int, repeats: int, compile_models: bool, device: torch.device, log
) -> ModelResult:
    ready = prepare(case, batch, device)
    base, rewritten, fused, x = ready.base, ready.rewritten, ready.fused, ready.x
    shape, replaced, n_fused = tuple(x.shape), ready.replaced, ready.n_fused
    graph_only = copy.deepcopy(fused)
    gs.set_alpha(graph_only, 0.0)  # operators return their input: the rewritten graph's own cost
    reference = _with_reference(rewritten, inclusive=False)
    reference_le = _with_reference(rewritten, inclusive=True)
    result = ModelResult(case.name, shape, len(gs.operators(rewritten)), n_fused, replaced)
    log(f"{case.name}: batch {tuple(shape)}, {result.sites} sites, {n_fused} fused, {replaced:.1%} replaced")

    def plain_path():
        with fast.enabled(False):
            return rewritten(x)

    eager: dict[str, Callable[[], torch.Tensor]] = {
        "original": lambda: base(x),
        "reference (<)": lambda: reference(x),
        "graphsparse plain": plain_path,
        "graphsparse fast": lambda: rewritten(x),
        "graphsparse fused": lambda: fused(x),
        REWRITE_DEFAULT: lambda: ready.default(x),
        GRAPH_ONLY: lambda: graph_only(x),
    }
    if cpu_kernel.available() if device.type == "cpu" else triton_kernel.available():
        eager[COMPILED_KERNEL] = lambda: _compiled_kernel_only(fused, x)
    compiled_models = {}
    compile_s: dict[str, float] = {}
    if compile_models:
        for name, model in [
            ("original", base),
            ("reference (<)", reference),
            ("graphsparse", rewritten),
            ("graphsparse fused", fused),
            (ACTIVATIONS_ONLY, _replace_operators(fused, ActivationOnly)),
        ]:
            compiled_models[name] = torch.compile(model)
    compiled = {name: (lambda m=m: m(x)) for name, m in compiled_models.items()}

    with torch.no_grad():
        expected = reference_le(x)
        outputs = {}
        for name, fn in eager.items():
            outputs[("eager", name)] = fn()  # warm-up; the fast kernels compile here
        for name, fn in compiled.items():
            start = time.perf_counter()
            outputs[("compiled", name)] = fn()  # warm-up: compiles the model
            compile_s[name] = time.perf_counter() - start
            fn()  # a compiled model's first runs after compilation are slower (lazy initialisation)
            log(f"  compiled {name} in {compile_s[name]:.0f} s")
        rounds_eager, faults_eager = _time_and_count_rounds(eager, repeats)
        rounds_compiled, faults_compiled = _time_and_count_rounds(compiled, repeats) if compiled else ({}, {})
    for mode, rounds, faults in (("eager", rounds_eager, faults_eager), ("compiled", rounds_compiled, faults_compiled)):
        for name, times in rounds.items():
            checked = name not in ("original", GRAPH_ONLY, ACTIVATIONS_ONLY)
            exact = _exact(outputs[(mode, name)], expected) if checked else ""
            base = rounds["original"]
            sec, best = statistics.median(times), min(times)
            ratio = _paired_ratio(times, base)
            row = Row(case.name, name, mode, sec * 1e3, ratio, best * 1e3, best / min(base), exact)
            row.compile_s = compile_s.get(name) if mode == "compiled" else None
            row.page_faults = faults[name]
            result.rows.append(row)
    return result


# ------------------------------------------------------------------------------------------- output


def _print_kernels(rows: list[dict]) -> None:
    print("\nKernels: one feature map 8x256x56x56 float32 (small map: 2x256x8x8), median ms per call")
    print(f"{'implementation':<40} {'ms':>9} {'min ms':>9} {'x relu':>7}  exact vs plain")
    for r in rows:
        ratio = f"{r['x_relu']:.2f}" if r["x_relu"] is not None else ""
        print(f"{r['kernel']:<40} {r['ms']:>9.3f} {r['min_ms']:>9.3f} {ratio:>7}  {r['exact']}")


def _print_sites(rows: list[dict]) -> None:
    sites = rows[0]["sites"] if rows else 0
    print(f"\nSite maps: resnet50's {sites} operator inputs (batch 8), MeanSparse + ReLU in place, ms per forward")
    print(f"{'variant':<40} {'ms':>9} {'x relu_':>8}")
    for r in rows:
        print(f"{r['variant']:<40} {r['ms']:>9.2f} {r['x_relu_']:>8.2f}")


def _print_models(results: list[ModelResult]) -> None:
    print(
        "\nModels: median ms per forward (torch.no_grad, eval); ratio to the original in the same mode: "
        "median of the per-round ratios, and min / min; minor page faults per forward"
    )
    print(
        f"{'model':<15} {'variant':<23} {'mode':<9} {'ms':>10} {'ratio':>7} {'min ms':>10} {'ratio':>7} "
        f"{'faults':>8}  {'exact vs reference(<=)':<24} compile"
    )
    for res in results:
        head = f"{res.model} {tuple(res.batch_shape)}: {res.sites} sites, {res.fused} fused, "
        print(head + f"{res.replaced_fraction:.1%} of values replaced")
        for r in res.rows:
            comp = f"{r.compile_s:.0f} s" if r.compile_s is not None else ""
            print(
                f"{'':<15} {r.variant:<23} {r.mode:<9} {r.ms:>10.1f} {r.ratio:>7.3f} {r.min_ms:>10.1f} "
                f"{r.min_ratio:>7.3f} {r.page_faults:>8.0f}  {r.exact:<24} {comp}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches and 2 repeats (sanity run)")
    parser.add_argument("--models", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--batch", action="append", default=[], metavar="MODEL=N", help="batch size of a model")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 5, quick 2)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel table")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: where models and data live")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    parser.add_argument(
        "--malloc",
        choices=("keep", "system"),
        default="keep",
        help="keep (default): glibc keeps freed memory, no page faults per forward (see keep_freed_memory); "
        "system: the allocator as configured",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    malloc = keep_freed_memory() if args.malloc == "keep" else "system"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    repeats = args.repeats or (2 if args.quick else 5)
    batches = {name: (QUICK_BATCH[name] if args.quick else case.shape[0]) for name, case in CASES.items()}
    for item in args.batch:
        name, _, value = item.partition("=")
        if name not in CASES or not value.isdigit():
            parser.error(f"--batch {item!r}: expected MODEL=N with MODEL one of {', '.join(CASES)}")
        batches[name] = int(value)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    kernels = [] if args.no_kernels else kernel_table(max(repeats * 4, 10), device)
    sites = [] if args.no_kernels else site_maps_table(max(repeats * 4, 20), device)
    if kernels:
        _print_kernels(kernels)
        _print_sites(sites)
    results = []
    for name in names:
        try:
            results.append(bench_model(CASES[name], batches[name], repeats, not args.no_compile, device, log))
        except Exception as e:  # noqa: BLE001 - report and go on with the other models
            log(f"{name}: skipped ({type(e).__name__}: {e})")
    _print_models(results)
    total = time.perf_counter() - start
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"\n{where}; {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
        f"torch {torch.__version__}, {args.threads} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, malloc: {malloc}, {repeats} repeats, "
        f"total {total:.0f} s"
    )
    if args.json:
        payload = {
            "torch": torch.__version__,
            "device": where,
            "threads": args.threads,
            "repeats": repeats,
            "alpha": ALPHA,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "malloc": malloc,
            "load_average": os.getloadavg()[0],
            "total_s": total,
            "kernels": kernels,
            "site_maps": sites,
            "models": [asdict(r) for r in results],
        }
        atomic_write(args.json, json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
