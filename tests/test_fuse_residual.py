"""The attack view (:mod:`graphsparse.planning.fuse_residual`): each after_addition operator and the residual
addition it reads as one pass of the C++ kernel, bit for bit the rewritten model in outputs and gradients."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import graphsparse as gs
from graphsparse.ops import MeanSparse, cpu_kernel
from graphsparse.planning.fuse import residual_add
from graphsparse.planning.fuse_residual import fuse_residual_operators, residual_mean_sparse

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not cpu_kernel.available(), reason="the C++ kernel could not be built here"),
]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def _randomise(model: nn.Module, alpha: float = 0.4) -> None:
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for op in gs.operators(model).values():
            op.mean.copy_(torch.randn(op.mean.shape, generator=g) * 0.5)
            op.var.copy_(torch.rand(op.var.shape, generator=g) + 0.5)
    gs.set_alpha(model, alpha)


def _run(net: nn.Module, x: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
    """The output, the input gradient and every parameter gradient of ``(net(x) * w).sum()``."""
    leaf = x.clone().requires_grad_()
    out = net(leaf)
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * w).sum(), [leaf, *params])
    return [out.detach(), *grads]


def _assert_same(model: nn.Module, view: nn.Module, x: torch.Tensor) -> None:
    w = torch.randn(model(x).shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(_bits(view(x.clone())), _bits(model(x.clone())))
    for mode in ("exact", "bpda"):
        with gs.straight_through(model) if mode == "bpda" else contextlib.nullcontext():
            expected, got = _run(model, x, w), _run(view, x, w)
        assert len(got) == len(expected)
        for e, g in zip(expected, got):
            assert torch.equal(_bits(g), _bits(e)), mode


def _fused_calls(view: nn.Module) -> list[torch.fx.Node]:
    return [n for n in view.graph.nodes if n.op == "call_function" and n.target is residual_mean_sparse]


@pytest.fixture
def demo():
    from graphsparse.demo.models import load_demo_model

    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    model = gs.rewrite(load_demo_model().eval(), "after_addition", x)
    _randomise(model)
    return model, x


def test_the_demo_models_pairs_run_in_one_pass_into_the_convolution_output(demo, kernel_calls):
    """All six after_addition operators of the demo model (pre-activation blocks) fuse with their addition; the
    kernel writes each sum into the convolution's output under autograd too; outputs, input and parameter
    gradients equal the rewritten model's in both backward modes."""
    model, x = demo
    view = fuse_residual_operators(model)
    assert len(_fused_calls(view)) == len(gs.operators(model)) == 6
    assert not any(n.target is residual_add for n in view.graph.nodes)
    _assert_same(model, view, x)

    kernel_calls.clear(), kernel_calls.backends.clear()
    written, read = [], []  # shared modules: hooks on the model's convolutions and norms see the view's tensors
    convs = [model.get_submodule(f"layers.{i}.conv2") for i in range(6)]
    hooks = [c.register_forward_hook(lambda m, a, out: written.append(out.data_ptr())) for c in convs]
    # what reads each operator's output
    followers = [*(model.get_submodule(f"layers.{i}.bn1") for i in range(1, 6)), model.bn]
    hooks += [f.register_forward_pre_hook(lambda m, a: read.append(a[0].data_ptr())) for f in followers]
    try:
        _run(view, x, torch.ones(8, 10))
    finally:
        for h in hooks:
            h.remove()
    assert kernel_calls == ["forward_mask"] * 6 and kernel_calls.backends == ["cpp_add"] * 6
    assert written == read and len(read) == 6


def test_the_view_shares_parameters_buffers_and_operators(demo):
    model, x = demo
    view = fuse_residual_operators(model)
    assert {id(p) for p in view.parameters()} == {id(p) for p in model.parameters()}
    assert {id(op) for op in gs.operators(view).values()} == {id(op) for op in gs.operators(model).values()}
    gs.set_alpha(model, 1.5)  # set on the model, seen by the view
    with torch.no_grad():
        assert torch.equal(_bits(view(x)), _bits(model(x)))
        gs.set_alpha(model, 0.0)
        assert torch.equal(_bits(view(x)), _bits(model(x)))


def test_a_model_without_pairs_is_returned_as_it_is():
    model = gs.rewrite(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), "full", torch.zeros(1, 3, 8, 8))
    assert fuse_residual_operators(model) is model


def test_robustbench_dm_wide_resnet(robustbench_archs):
    """A third-party pre-activation network: RobustBench's DM WideResNet, random weights."""
    dm, _ = robustbench_archs
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model = gs.rewrite(dm.DMWideResNet(depth=10, width=1).eval(), "after_addition", x)
    _randomise(model, alpha=0.3)
    view = fuse_residual_operators(model)
    assert len(_fused_calls(view)) >= 3
    _assert_same(model, view, x)


@pytest.mark.parametrize("case", ["hooked", "activation", "float64", "alpha_zero"])
def test_where_the_kernel_does_not_apply_the_pair_runs_unfused(demo, monkeypatch, case):
    """An operator with a hook (the hook runs), a fused activation set after the view was made, a float64 model,
    an empty band: the same outputs and gradients, and the fused kernel left out where it does not apply."""
    from graphsparse.ops import fast

    model, x = demo
    view = fuse_residual_operators(model)
    first = next(iter(gs.operators(model).values()))
    launches, calls = [], []
    monkeypatch.setattr(fast, "MIN_NUMEL", 1)  # the 7x7 maps too
    launch = cpu_kernel.launch_add
    monkeypatch.setattr(cpu_kernel, "launch_add", lambda *a: launches.append(a[0]) or launch(*a))
    if case == "hooked":
        first.register_forward_pre_hook(lambda m, a: calls.append(1))
    elif case == "activation":
        first.activation = "relu"
    elif case == "float64":
        monkeypatch.setattr(fast, "applies", lambda x: False)  # the plain formula: no kernel to compile
        model.double()
        x = x.double()
    else:
        gs.set_alpha(model, 0.0)
    _assert_same(model, view, x)
    per_run = {"hooked": 5, "activation": 5, "float64": 0, "alpha_zero": 0}[case]  # pairs run by the kernel
    assert len(launches) == 3 * per_run  # a no-grad pass, exact, BPDA
    if case == "hooked":
        assert len(calls) == 1 + 2 * 3  # _assert_same's first call; model and view in three passes


def test_a_fresh_operand_whose_producer_saved_it_is_not_overwritten():
    """A sigmoid's backward reads its output: a sum into it would corrupt the gradient (autograd would refuse).
    The view adds into a new tensor there, and the gradient is the unfused one."""
    root = nn.Module()
    root.op = MeanSparse(4, 1, 0.5)
    graph = torch.fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    s = graph.call_function(torch.sigmoid, (a,))
    graph.output(graph.call_module("op", (graph.call_function(residual_add, (s, b, 0)),)))
    model = torch.fx.GraphModule(root, graph)
    _randomise(model, alpha=0.8)
    view = fuse_residual_operators(model)
    assert len(_fused_calls(view)) == 1
    g = torch.Generator().manual_seed(5)
    xa, xb = torch.randn(16, 4, 32, 32, generator=g), torch.randn(16, 4, 32, 32, generator=g)
    grads = []
    for net in (model, view):
        la, lb = xa.clone().requires_grad_(), xb.clone().requires_grad_()
        out = net(la, lb)
        grads.append(torch.autograd.grad(out.square().sum(), [la, lb]))
    for e, got in zip(*grads):
        assert torch.equal(_bits(got), _bits(e))


def test_evaluate_reports_what_it_reports_without_the_view(demo, monkeypatch):
    """evaluate attacks the view (base, exact and BPDA): the same report, per-sample records included, as
    attacking the rewritten model itself."""
    from graphsparse.data import load_dataset
    from graphsparse.robust import attack_cache

    model, _ = demo
    data = load_dataset("mnist5k", split="test")
    settings = {"eps": 0.2, "n": 16, "steps": 3, "batch_size": 8, "attacks": ["apgd-ce"]}
    used = []
    real = attack_cache.fuse_residual_operators
    monkeypatch.setattr(attack_cache, "fuse_residual_operators", lambda m: used.append(1) or real(m))
    fused = gs.evaluate(model, data, **settings).to_dict()
    assert used
    monkeypatch.setattr(attack_cache, "fuse_residual_operators", lambda m: m)
    plain = gs.evaluate(model, data, **settings).to_dict()
    fused.pop("date"), plain.pop("date")
    assert fused == plain
