"""The measuring parts of tools/bench_ops.py: the interleaved round order and the stand-in models it times."""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import graphsparse as gs
from graphsparse.planning.fuse import fuse_activations

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench_ops.py"


@pytest.fixture(scope="module")
def bench():
    saved = dict(os.environ)  # the script sets OMP_WAIT_POLICY for its own process
    spec = importlib.util.spec_from_file_location("bench_ops", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_ops"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        sys.modules.pop("bench_ops", None)
    return module


def test_rounds_run_every_variant_once_and_rotate_the_order(bench):
    calls: list[str] = []
    names = ["original", "a", "b"]
    times, faults = bench._time_and_count_rounds({n: (lambda n=n: calls.append(n)) for n in names}, 6)
    rounds = [calls[i : i + 3] for i in range(0, len(calls), 3)]
    assert all(sorted(r) == sorted(names) for r in rounds)
    firsts = [r[0] for r in rounds]
    assert all(firsts.count(n) == 2 for n in names)  # each variant leads as often as the others
    assert [r.index("a") for r in rounds] != [rounds[0].index("a")] * 6  # positions move
    assert all(len(t) == 6 for t in times.values()) and set(faults) == set(names)


def test_activations_only_keeps_the_graph_and_drops_the_operators(bench):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.GELU()).eval()
    x = torch.randn(2, 3, 12, 12)
    rewritten = gs.rewrite(model, "before_activations", x[:1], fuse=False)
    bench._calibrate_like(rewritten, x)
    fused = copy.deepcopy(rewritten)
    assert fuse_activations(fused) == 2
    stripped = bench._replace_operators(fused, bench.ActivationOnly)
    assert not gs.operators(stripped) and len(gs.operators(fused)) == 2
    gs.set_alpha(fused, 0.0)
    with torch.no_grad():
        assert torch.equal(stripped(x), fused(x))
        assert torch.equal(stripped(x), model(x))


def _load_profile_compiled():
    """tools/profile_compiled.py as a module (it imports bench_ops from tools/: environment and path restored)."""
    saved_env, saved_path = dict(os.environ), list(sys.path)
    spec = importlib.util.spec_from_file_location("profile_compiled", BENCH.with_name("profile_compiled.py"))
    profiler = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(profiler)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.path[:] = saved_path
        sys.modules.pop("bench_ops", None)
    return profiler


def test_profile_compiled_stand_ins_compute_the_fused_model(bench):
    """tools/profile_compiled.py's constant-threshold operators and its op-threshold switch change where the
    thresholds come from, not what the model computes."""
    profiler = _load_profile_compiled()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.GELU()).eval()
    x = torch.randn(2, 3, 12, 12)
    rewritten = gs.rewrite(model, "before_activations", x[:1])
    bench._calibrate_like(rewritten, x)
    fuse_activations(rewritten)
    constant = bench._replace_operators(rewritten, profiler.ConstantThresholds)
    assert not gs.operators(constant)
    with torch.no_grad():
        expected = rewritten(x)
        assert not torch.equal(expected, model(x))
        assert torch.equal(constant(x), expected)
        with profiler.thresholds_from_the_op():
            assert torch.equal(rewritten(x), expected)


def test_profile_compiled_kernel_breakdown_sums_per_name_and_forward(bench):
    profiler = _load_profile_compiled()
    event = types.SimpleNamespace
    events = [
        event(name="triton_poi_fused_relu_1", device_time=30.0),
        event(name="sm90_xmma_fprop_implicit_gemm", device_time=100.0),
        event(name="triton_poi_fused_relu_1", device_time=50.0),
        event(name="cudnn::conv2d_grouped", device_time=60.0),
        event(name="triton_poi_fused_add_2", device_time=10.0),
    ]
    rows = profiler.kernel_breakdown(events, repeats=2)
    assert rows == [
        ("convolutions and products (cuDNN / cuBLAS)", 80.0, 1.0),
        ("triton_poi_fused_relu_1", 40.0, 1.0),
        ("triton_poi_fused_add_2", 5.0, 0.5),
    ]
