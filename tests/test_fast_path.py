"""The fast MeanSparse path (the C++ CPU kernel, the compiled kernel, the Triton fallback) and the fused form.

Both must be invisible except for speed: bit-equal outputs and gradients against the plain formula,
a fallback with a single notice when the compiler fails, and models that still export and compile.
Inputs are kept small and ``fast.MIN_NUMEL`` is lowered so that the kernel runs on them; the number of
distinct kernels (each one a compilation) is kept small. Tests taking the ``backend`` fixture run twice on
float32 CPU inputs: through the C++ kernel (``cpp``) and through the compiled one it falls back to
(``compiled``).
"""

from __future__ import annotations

import copy
import gc
import shutil
import types
import warnings

import hypothesis.strategies as st
import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from torch import nn

import graphsparse as gs
from graphsparse.ops import MeanSparse, cpu_kernel, fast, triton_kernel
from graphsparse.planning.fuse import fuse_activations, residual_add
from graphsparse.planning.rewrite import OperatorSlot

BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

pytestmark = pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++") or torch.cuda.is_available()),
    reason="no C++ compiler: the compiled kernel cannot be built here (the fallback test covers this case)",
)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(BITS[a.dtype]), b.contiguous().view(BITS[b.dtype]))
    )


@pytest.fixture(autouse=True)
def kernel_on_small_inputs(monkeypatch):
    monkeypatch.setattr(fast, "MIN_NUMEL", 1)
    with fast.enabled(True):
        yield


@pytest.fixture(params=["cpp", "compiled"])
def backend(request):
    """The kernel float32 CPU inputs go through: the C++ one (which must build here) or the compiled one."""
    use_cpp = request.param == "cpp"
    if use_cpp and not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no C++ compiler: the C++ kernel cannot be built here")
    if use_cpp:
        assert cpu_kernel.available(), f"the C++ kernel did not build: {cpu_kernel.unavailable_reason()}"
    with cpu_kernel.enabled(use_cpp):
        yield request.param


def random_op(channels: int, axis: int, alpha: float, seed: int = 0) -> MeanSparse:
    g = torch.Generator().manual_seed(seed)
    op = MeanSparse(channels, axis, alpha)
    op.mean.copy_(torch.randn(channels, generator=g))
    op.var.copy_(torch.rand(channels, generator=g) * 2 + 0.1)
    op.var[0] = 0.0  # an empty band
    return op


def tricky_input(shape, axis: int, op: MeanSparse, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    """Random values around the means, with -0.0, NaN, ±inf, exact means and exact band edges."""
    g = torch.Generator().manual_seed(seed)
    channels = op.channels
    x = torch.randn(shape, generator=g)
    flat = x.movedim(axis, -1).reshape(-1, channels)  # a copy; rows run over positions
    flat += op.mean
    special = torch.tensor([-0.0, 0.0, float("nan"), float("inf"), -float("inf")])
    flat[: len(special), :] = special[:, None]
    flat[5, :] = op.mean  # exactly on the mean
    band = op.alpha * op.var.sqrt()
    flat[6, :] = op.mean + band  # on the edge (in float32)
    flat[7, :] = op.mean - band
    x = flat.reshape(x.movedim(axis, -1).shape).movedim(-1, axis).contiguous()
    return x.to(dtype)


def plain(op: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with fast.enabled(False):
        return op(x)


LAYOUTS = [((2, 6, 5, 7), 1, False), ((2, 6, 5, 7), 1, True), ((3, 11, 6), -1, False)]
LAYOUT_IDS = ["nchw", "channels_last", "tokens"]


# ------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("alpha", [0.7, 0.0])
@pytest.mark.parametrize("shape, axis, channels_last", LAYOUTS, ids=LAYOUT_IDS)
def test_fast_path_is_bit_equal_to_the_plain_formula(shape, axis, channels_last, alpha, backend, kernel_calls):
    op = random_op(shape[axis], axis, alpha)
    x = tricky_input(shape, axis, op)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = plain(op, x)
    assert not kernel_calls
    y = op(x)
    assert bit_equal(y, expected) and y.stride() == expected.stride()
    if alpha == 0.0:
        assert bit_equal(y, x)  # an exact identity, -0.0 and NaN included
        assert y is x and not kernel_calls  # every band empty: no work at all
    else:
        assert kernel_calls == ["forward"] and kernel_calls.backends == [backend]
        assert (y != x).any()


def test_band_edges_land_on_the_side_the_plain_formula_puts_them(backend, kernel_calls):
    """Values exactly on α·σ as eager PyTorch computes it: its sqrt and a compiled one can differ in the
    last bit (they do for ~15 % of these variances on x86), so the kernel must not recompute it."""
    channels = 4096
    op = MeanSparse(channels, -1, 1.0)
    op.var.copy_(torch.rand(channels, generator=torch.Generator().manual_seed(7)) * 2 + 0.1)
    edge = op.alpha * op.var.sqrt()
    x = torch.stack([edge, -edge, torch.nextafter(edge, torch.tensor(float("inf")))])
    y = op(x)
    assert kernel_calls == ["forward"] and kernel_calls.backends == [backend]
    assert bit_equal(y, plain(op, x))
    assert (y[:2] == 0).all() and bit_equal(y[2], x[2])


def test_a_compiled_operator_matches_the_eager_one_on_band_edges_and_exports_without_custom_ops():
    """Under torch.compile the thresholds come from one opaque per-channel operation (computed once per call,
    not per element, with eager's sqrt); torch.export keeps the plain formula, so exported programs need no
    graphsparse operator to load."""
    channels = 4096
    op = MeanSparse(channels, -1, 1.0)
    op.var.copy_(torch.rand(channels, generator=torch.Generator().manual_seed(7)) * 2 + 0.1)
    edge = op.alpha * op.var.sqrt()
    x = torch.stack([edge, -edge, torch.nextafter(edge, torch.tensor(float("inf"))), edge * 0.5 + 1.0])
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(op, dynamic=False)(x)
    assert bit_equal(compiled, plain(op, x))
    assert (compiled[:2] == 0).all() and bit_equal(compiled[2], x[2])
    code = torch.export.export(op, (x,)).graph_module.print_readable(print_output=False)  # with submodules
    assert "torch.ops.graphsparse" not in code and "torch.ops.aten.sqrt" in code


def test_is_exporting_is_true_under_export_only():
    """torch 2.11's dynamo folds torch.compiler.is_exporting() to True under torch.compile as well; the fast
    path's own test must tell the two apart (compiled CPU models call the threshold operator, exported ones
    trace the formula)."""
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(fast.is_exporting())
            return x + 1

    torch._dynamo.reset()
    torch.compile(Probe(), fullgraph=True)(torch.zeros(2))
    torch.export.export(Probe(), (torch.zeros(2),))
    assert seen[0] is False and seen[-1] is True and not fast.is_exporting()


def test_the_threshold_cache_lets_go_of_dropped_operators():
    """The cache is keyed by the buffer's id: an entry must go with its buffer (no leak, and a new buffer that
    gets the same id must never see the old thresholds)."""
    from graphsparse.ops import meansparse

    op = random_op(6, 1, 0.7)
    op(tricky_input((2, 6, 5, 7), 1, op))
    key = id(op.var)
    assert key in meansparse._pairs
    del op
    gc.collect()
    assert key not in meansparse._pairs


def test_the_threshold_operation_returns_tensors_it_does_not_keep():
    """Inductor may recycle the memory of an operation's outputs for its own buffers: writing into them must
    not reach the cached pair the next call (or the eager operator) reads."""
    op = random_op(6, 1, 0.7)
    args = (op.mean, op.var, op.alpha, torch.float32)
    mu, thr = torch.ops.graphsparse.mean_and_threshold(*args)
    expected = (mu.clone(), thr.clone())
    mu.fill_(123.0)
    thr.fill_(-1.0)
    again = torch.ops.graphsparse.mean_and_threshold(*args)
    assert bit_equal(again[0], expected[0]) and bit_equal(again[1], expected[1])
    assert again[0].data_ptr() != mu.data_ptr() and again[1].data_ptr() != thr.data_ptr()


@pytest.mark.parametrize("path", ["fast", "plain", "compiled"])
def test_cached_thresholds_follow_buffer_changes(path):
    """Eager and compiled calls share one threshold cache: every call must see α, σ² and μ changed in place or
    loaded after the first call (for a compiled model: after it was compiled), never the thresholds it saw
    first."""
    op = random_op(6, 1, 0.7)
    x = tricky_input((2, 6, 5, 7), 1, op)
    run = op
    if path == "compiled":
        torch._dynamo.reset()
        run = torch.compile(op, dynamic=False)
    with fast.enabled(path != "plain"), torch.no_grad():
        before = run(x)
        assert bit_equal(before, plain(op, x))
        op.alpha.fill_(0.0)
        assert bit_equal(run(x), x)
        gs.set_alpha(op, 0.7)
        assert bit_equal(run(x), before)
        op.var.mul_(4.0)
        assert bit_equal(run(x), plain(op, x)) and not bit_equal(run(x), before)
        op.mean.add_(0.5)
        assert bit_equal(run(x), plain(op, x))
        op.load_state_dict(random_op(6, 1, 0.7).state_dict())
        assert bit_equal(run(x), before)
        assert bit_equal(run(x.half()), plain(op, x.half()))  # another dtype, another threshold


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rounds_like_eager(dtype, kernel_calls):
    op = random_op(6, 1, 0.9)
    x = tricky_input((4, 6, 9, 9), 1, op, dtype=dtype)
    y = op(x)
    assert kernel_calls == ["forward"] and kernel_calls.backends == ["compiled"]  # the C++ kernel is float32
    assert y.dtype == dtype
    assert bit_equal(y, plain(op, x))  # emulate_precision_casts: x - mu is rounded to dtype, as in eager


def test_other_layouts_and_small_inputs_use_the_plain_path(kernel_calls, monkeypatch):
    op = random_op(6, 1, 0.5)
    x = torch.randn(4, 6, 5, 5).transpose(2, 3)  # neither contiguous nor channels-last
    assert bit_equal(op(x), plain(op, x))
    monkeypatch.setattr(fast, "MIN_NUMEL", 10_000)
    small = torch.randn(2, 6, 3)
    assert bit_equal(op(small), plain(op, small))
    assert not kernel_calls


def test_inplace_operator_overwrites_its_input_only_without_autograd(backend, kernel_calls):
    op = random_op(6, 1, 0.7)
    op.activation, op.inplace = "relu", True
    x = tricky_input((2, 6, 5, 7), 1, op)
    expected = F.relu(plain(op, x))
    buf = x.clone()
    version = buf._version
    with torch.no_grad():
        y = op(buf)
    assert y is buf and bit_equal(y, expected)
    assert kernel_calls == ["forward_inplace"] and kernel_calls.backends == [backend]
    assert buf._version > version  # autograd's version counter sees the write

    xg = x.clone().requires_grad_()
    y = op(xg)
    assert y.data_ptr() != xg.data_ptr() and bit_equal(y.detach(), expected)
    assert bit_equal(xg.detach(), x)


KERNEL_ACTIVATIONS = [("relu", ()), ("leaky_relu", (("negative_slope", 0.1),)), ("silu", ())]


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("activation", KERNEL_ACTIVATIONS, ids=["relu", "leaky_relu", "silu"])
@pytest.mark.parametrize("shape, axis, channels_last", LAYOUTS, ids=LAYOUT_IDS)
def test_fused_activation_is_bit_equal_in_one_launch(
    shape, axis, channels_last, activation, inplace, backend, kernel_calls
):
    """relu and leaky_relu inside the kernel (-0.0 and NaN as eager PyTorch gives them), silu after it."""
    op = random_op(shape[axis], axis, 0.7)
    op.activation, op.inplace = activation, inplace
    x = tricky_input(shape, axis, op)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    name, args = activation
    expected = getattr(F, name)(plain(random_op(shape[axis], axis, 0.7), x), **dict(args))
    buf = x.clone(memory_format=torch.preserve_format)
    with torch.no_grad():
        y = op(buf)
    assert bit_equal(y, expected) and y.stride() == x.stride()
    assert (y is buf) == inplace
    assert kernel_calls == ["forward_inplace" if inplace else "forward"] and kernel_calls.backends == [backend]


def test_cpp_kernel_splits_work_across_threads_exactly(kernel_calls):
    """Rows split between two threads (the input is several times the parallel grain), in both layouts."""
    op = random_op(40, 1, 0.8)
    op.activation = "relu"
    x = tricky_input((3, 40, 37, 29), 1, op)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for t in (x, x.contiguous(memory_format=torch.channels_last)):
            assert bit_equal(op(t), F.relu(plain(random_op(40, 1, 0.8), t)))
    finally:
        torch.set_num_threads(threads)
    assert kernel_calls.backends == ["cpp", "cpp"]


def values_near_the_bands(shape, axis: int, op: MeanSparse, seed: int) -> torch.Tensor:
    """Values around each channel's band, a quarter of them replaced by band edges, means, -0.0, NaN, ±inf."""
    g = torch.Generator().manual_seed(seed)
    view = [1] * len(shape)
    view[axis] = -1
    mean, band = op.mean.view(view), (op.alpha * op.var.sqrt()).view(view)
    x = mean + 2 * band * torch.randn(shape, generator=g)
    specials = [mean + band, mean - band, mean, -0.0, float("nan"), float("inf"), -float("inf")]
    pick = torch.randint(0, 4 * len(specials), shape, generator=g)
    for i, value in enumerate(specials):
        x = torch.where(pick == i, value, x)
    return x


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 24),
    spatial=st.lists(st.integers(1, 19), max_size=2),
    layout=st.sampled_from(["contiguous", "channels_last", "channels_innermost"]),
    activation=st.sampled_from([None, *KERNEL_ACTIVATIONS[:2]]),
    inplace=st.booleans(),
    alpha=st.sampled_from([0.05, 0.7, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_cpp_kernel_equals_the_plain_formula_on_any_shape(
    batch, channels, spatial, layout, activation, inplace, alpha, seed
):
    """Odd lengths exercise the vector loops' tails; every layout the kernel accepts."""
    if layout == "channels_last" and len(spatial) != 2:
        layout = "contiguous"
    axis = -1 if layout == "channels_innermost" else 1
    shape = (batch, *spatial, channels) if axis == -1 else (batch, channels, *spatial)
    op = random_op(channels, axis, alpha, seed=seed)
    op.activation, op.inplace = activation, inplace
    x = values_near_the_bands(shape, axis, op, seed)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    expected = plain(random_op(channels, axis, alpha, seed=seed), x)
    if activation is not None:
        expected = getattr(F, activation[0])(expected, **dict(activation[1]))
    launches = []
    launch = cpu_kernel.launch
    cpu_kernel.launch = lambda kind, *args: launches.append(kind) or launch(kind, *args)
    try:
        with torch.no_grad():
            y = op(x.clone(memory_format=torch.preserve_format))
    finally:
        cpu_kernel.launch = launch
    assert bit_equal(y, expected) and y.stride() == x.stride()
    kind = "forward_inplace" if inplace else "forward"
    assert launches == ([] if channels == 1 else [kind])  # random_op empties channel 0's band


# ------------------------------------------------------------------------------------------ backward


@pytest.mark.parametrize("mode", ["exact", "straight_through"])
def test_gradients_equal_the_plain_ops(mode, backend, kernel_calls):
    op = random_op(6, 1, 0.9)
    op.backward_mode = mode
    x = tricky_input((2, 6, 5, 7), 1, op).nan_to_num(0.0, 0.0, 0.0)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    grads = []
    for enabled in (False, True):
        xg = x.clone().requires_grad_()
        with fast.enabled(enabled):
            y = op(xg)
        (g,) = torch.autograd.grad((y * w).sum(), xg)
        grads.append((y.detach(), g))
    assert kernel_calls == ["forward_mask" if mode == "exact" else "forward_out"]
    assert kernel_calls.backends == [backend]
    assert bit_equal(grads[0][0], grads[1][0])
    assert bit_equal(grads[0][1], grads[1][1])
    assert (grads[1][1] == w).all() == (mode == "straight_through")


SPECIAL = [-0.0, 0.0, float("nan"), float("inf"), -float("inf")]


def _special_weights(shape, seed: int = 3) -> torch.Tensor:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    w.view(-1)[: 4 * len(SPECIAL)] = torch.tensor(SPECIAL * 4)
    return w


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh_grad", "held_grad"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_the_cpp_exact_gradient_is_where_bit_for_bit(channels_last, fresh, kernel_calls):
    """The C++ backward writes what torch.where(inside, 0.0, grad) writes: +0.0 inside the band, the gradient's
    own bits (-0.0, NaN, inf) outside; into a fresh gradient (nothing else holds it) or into a new tensor
    (the caller's grad_outputs, which must stay as they were)."""
    op = random_op(6, 1, 0.9)
    x = tricky_input((3, 6, 5, 7), 1, op).nan_to_num(0.0, 0.0, 0.0)
    w = _special_weights(x.shape)
    if channels_last:
        x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    kept = w.clone()
    grads = []
    for enabled in (False, True):
        xg = x.clone().requires_grad_()
        with fast.enabled(enabled):
            y = op(xg)
        # fresh: MulBackward's product (w's bits) reaches the operator alone; held: the caller's tensor
        (g,) = torch.autograd.grad((y * w).sum(), xg) if fresh else torch.autograd.grad(y, xg, w)
        grads.append(g)
    assert kernel_calls == ["forward_mask"] and kernel_calls.backends == ["cpp"]
    assert bit_equal(grads[0], grads[1]) and grads[1].stride() == x.stride()
    assert bit_equal(w, kept)
    assert (grads[1] == 0).any() and grads[1].isnan().any()


def test_a_gradient_shared_by_two_operators_is_not_overwritten(kernel_calls):
    """``a + b`` hands one gradient tensor to both operands: the first operator's backward must not write its
    band into it, or the second would read zeros."""
    op1, op2 = random_op(6, 1, 0.9, seed=0), random_op(6, 1, 0.9, seed=5)
    x = tricky_input((2, 6, 5, 7), 1, op1).nan_to_num(0.0, 0.0, 0.0)
    w = _special_weights(x.shape)
    grads = []
    for enabled in (False, True):
        x1, x2 = x.clone().requires_grad_(), x.flip(0).clone().requires_grad_()
        with fast.enabled(enabled):
            z = op1(x1) + op2(x2)
        grads.append(torch.autograd.grad((z * w).sum(), [x1, x2]))
    assert kernel_calls == ["forward_mask"] * 2
    assert all(bit_equal(a, b) for a, b in zip(grads[0], grads[1]))


def test_a_double_backward_through_the_cpp_gradient_is_differentiable(kernel_calls):
    op = random_op(6, 1, 0.9)
    x = tricky_input((2, 6, 5, 7), 1, op).nan_to_num(0.0, 0.0, 0.0)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    seconds = []
    for enabled in (False, True):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        with fast.enabled(enabled):
            (g,) = torch.autograd.grad((op(xg) * wg).sum(), xg, create_graph=True)
        seconds.append((g.detach(), *torch.autograd.grad((g * v).sum(), wg)))  # d/dw where(inside, 0, w)
    assert kernel_calls == ["forward_mask"]
    assert bit_equal(seconds[0][0], seconds[1][0]) and bit_equal(seconds[0][1], seconds[1][1])
    assert (seconds[1][1] == 0).any() and (seconds[1][1] == v).any()


@pytest.mark.parametrize("mode", ["exact", "straight_through"])
def test_an_inplace_operator_overwrites_a_computed_input_under_autograd(mode, kernel_calls):
    """Under autograd the C++ path writes into x when the operator may (its input is read by nothing else):
    same output and gradient, no new tensor; never into a leaf or a view; and autograd's version check
    refuses a backward that still needs the overwritten values."""
    op = random_op(6, 1, 0.7)
    op.backward_mode, op.inplace = mode, True
    x = tricky_input((2, 6, 5, 7), 1, op).nan_to_num(0.0, 0.0, 0.0)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    leaf = x.clone().requires_grad_()
    computed = leaf * 1.0
    y = op(computed)
    assert y.data_ptr() == computed.data_ptr() and bit_equal(y.detach(), plain(op, x))
    (g,) = torch.autograd.grad((y * w).sum(), leaf)
    reference = x.clone().requires_grad_()
    (g_plain,) = torch.autograd.grad((plain(op, reference) * w).sum(), reference)
    assert bit_equal(g, g_plain)
    assert bit_equal(op(leaf).detach(), plain(op, x)) and bit_equal(leaf.detach(), x)  # a leaf: left alone
    base = torch.cat([x, x]).requires_grad_() * 1.0
    view = base[2:]
    assert op(view).data_ptr() != view.data_ptr() and bit_equal(base[2:].detach(), x)  # a view: left alone
    saved = leaf.exp()  # exp's backward needs its output
    out = op(saved)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    assert kernel_calls == ["forward_mask" if mode == "exact" else "forward_out"] * 4


@pytest.mark.parametrize("mode", ["exact", "straight_through"])
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_fused_gradient_is_the_composition(act, mode):
    """straight_through: the activation's gradient at the operator's output, MeanSparse as identity."""
    op = random_op(6, 1, 0.9)
    op.backward_mode = mode
    fused = copy.deepcopy(op)
    fused.activation = act
    module = {"relu": nn.ReLU(), "silu": nn.SiLU()}[act]
    x = tricky_input((2, 6, 5, 7), 1, op).nan_to_num(0.0, 0.0, 0.0).requires_grad_()
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    (g_ref,) = torch.autograd.grad((module(plain(op, x)) * w).sum(), x)
    y = fused(x)
    (g,) = torch.autograd.grad((y * w).sum(), x)
    assert bit_equal(y.detach(), module(plain(op, x)).detach())
    assert bit_equal(g, g_ref)
    if mode == "straight_through":
        ms = plain(op, x).detach().requires_grad_()
        (g_act,) = torch.autograd.grad((module(ms) * w).sum(), ms)
        assert bit_equal(g, g_act)


# ------------------------------------------------------------------------------------------ fallback


def test_compiler_failure_falls_back_with_one_notice(monkeypatch):
    monkeypatch.setattr(cpu_kernel._switch, "on", False)  # float32 on CPU would not reach torch.compile
    def broken_compile(fn, **kwargs):
        def call(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore details")

        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(fast, "_kernels", {})
    monkeypatch.setattr(fast, "_broken", {})
    op = random_op(6, 1, 0.7)
    x = tricky_input((2, 6, 5, 7), 1, op)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = op(x)
        y2 = op(x.to(torch.float16))
        op.activation = "relu"
        y3 = op(x)
    notices = [w for w in caught if "compiled MeanSparse kernel is unavailable" in str(w.message)]
    assert len(notices) == 1 and "\n" not in str(notices[0].message)
    assert "No working C++ compiler" in fast.unavailable_reason("cpu")
    assert not fast.applies(x)
    op.activation = None
    assert bit_equal(y1, plain(op, x)) and bit_equal(y2, plain(op, x.to(torch.float16)))
    assert bit_equal(y3, F.relu(plain(op, x)))


def test_cpp_build_failure_falls_back_to_the_compiled_kernel_with_one_notice(monkeypatch, kernel_calls):
    from torch.utils import cpp_extension

    def broken_load(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\nmore details")

    monkeypatch.setattr(cpp_extension, "load", broken_load)
    monkeypatch.setattr(cpu_kernel, "_op", None)
    monkeypatch.setattr(cpu_kernel, "_failure", None)
    op = random_op(6, 1, 0.7)
    x = tricky_input((2, 6, 5, 7), 1, op)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1, y2 = op(x), op(x)
    notices = [w for w in caught if "MeanSparse CPU kernel could not be built" in str(w.message)]
    assert len(notices) == 1 and "\n" not in str(notices[0].message)
    assert "Ninja is required" in cpu_kernel.unavailable_reason()
    assert kernel_calls.backends == ["compiled", "compiled"]
    assert bit_equal(y1, plain(op, x)) and bit_equal(y2, y1)


@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
def test_triton_compile_failure_falls_back_to_the_compiled_kernel_with_one_notice(
    monkeypatch, kernel_calls, inplace
):
    """Checked on CPU tensors: the Triton kernel stands in as a kernel whose compilation fails, so each
    launch kind's fallback receives the arguments it takes."""

    class FailingKernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("PTXAS error: sm_xx is not supported\nmore details")

            return launch

    monkeypatch.setattr(triton_kernel, "_kernel", FailingKernel())
    monkeypatch.setattr(triton_kernel, "_failure", None)
    monkeypatch.setattr(triton_kernel, "handles", lambda flat, act: triton_kernel.available())
    monkeypatch.setattr(triton_kernel, "_current_device", lambda: None)  # CPU tensors have no device index
    op = random_op(6, 1, 0.7)
    op.activation, op.inplace = "relu", inplace
    x = tricky_input((2, 6, 5, 7), 1, op)
    expected = plain(op, x.clone())
    with warnings.catch_warnings(record=True) as caught, cpu_kernel.enabled(False):
        warnings.simplefilter("always")
        y1 = op(x.clone())
        leaf = x.clone().requires_grad_()
        op.activation = None
        op(leaf).sum().backward()  # the band-mask launch
        y2 = op(x.clone())
    notices = [w for w in caught if "MeanSparse Triton kernel is unavailable" in str(w.message)]
    assert len(notices) == 1 and "\n" not in str(notices[0].message)
    assert "PTXAS error" in triton_kernel.unavailable_reason()
    first = "forward_inplace" if inplace else "forward"
    assert kernel_calls == [first, first, "forward_mask", first]
    assert kernel_calls.backends == ["triton", "compiled", "compiled", "compiled"]
    assert bit_equal(y1, expected) and bit_equal(y2, plain(op, x))
    reference = x.clone().requires_grad_()
    plain(op, reference).sum().backward()
    assert bit_equal(leaf.grad, reference.grad)


def _stand_in_kernel_run(flat, out, mask_out, mu, thr, numel, channels, inner, slope, code, masked, *constexprs):
    """What the Triton kernel computes, on CPU tensors (the stand-ins below run it)."""
    shape = (-1,) if flat.dim() == 2 else (-1, 1)
    mu, thr = mu.view(shape), thr.view(shape)
    band = (flat - mu).abs() <= thr
    y = torch.where(band, mu, flat)
    y = torch.relu(y) if code == 1 else F.leaky_relu(y, slope) if code == 2 else y
    out.copy_(y)
    if masked:
        mask_out.copy_(band)


class StandInTriton:
    """Triton's ``kernel[grid](...)`` on CPU tensors: returns a compiled-kernel stand-in whose launcher takes
    every argument of the signature after the grid, stream, function and metadata (Triton 3.6's layout)."""

    def __init__(self):
        self.jit_launches, self.direct_launches = 0, 0
        self.refuse = False  # the direct launcher raises TypeError (another Triton's argument layout)

    def __getitem__(self, grid):
        def launch(*args, num_warps):
            self.jit_launches += 1
            _stand_in_kernel_run(*args)
            compiled = types.SimpleNamespace(function=object(), packed_metadata=(4, 1, 0))
            compiled.src = types.SimpleNamespace(signature=dict.fromkeys(range(len(args))))
            compiled.run = self.launcher
            return compiled

        return launch

    def launcher(self, grid_x, grid_y, grid_z, stream, function, metadata, launch_metadata, enter, exit_, *args):
        if self.refuse:
            raise TypeError("function takes exactly 22 arguments (25 given)")
        self.direct_launches += 1
        _stand_in_kernel_run(*args)


@pytest.fixture
def stand_in_triton(monkeypatch):
    """The Triton kernel path on CPU tensors, through :class:`StandInTriton`; the C++ kernel off."""
    triton = StandInTriton()
    monkeypatch.setattr(triton_kernel, "_kernel", triton)
    monkeypatch.setattr(triton_kernel, "_failure", None)
    monkeypatch.setattr(triton_kernel, "_direct", {})
    monkeypatch.setattr(triton_kernel, "_stream", lambda device: 0)
    monkeypatch.setattr(triton_kernel, "_knobs", None)
    monkeypatch.setattr(triton_kernel, "handles", lambda flat, act: True)
    monkeypatch.setattr(triton_kernel, "_current_device", lambda: None)  # CPU tensors have no device index
    with cpu_kernel.enabled(False):
        yield triton


def _off_by_4_bytes(x: torch.Tensor) -> torch.Tensor:
    view = torch.empty(x.numel() + 1)[1:].view(x.shape).copy_(x)
    assert view.data_ptr() % 16 != 0
    return view


def test_triton_variants_compile_once_then_launch_directly(stand_in_triton, kernel_calls):
    """Checked on CPU tensors with a stand-in: a variant's first launch goes through ``kernel[grid]``, later
    ones through its launcher; whatever Triton specializes on (an unaligned pointer, a size's multiples, the
    band-mask output, the activation) makes a variant of its own."""
    op = random_op(6, 1, 0.7)
    op.activation = "relu"
    x = tricky_input((2, 6, 5, 7), 1, op)
    inputs = [x, x, _off_by_4_bytes(x), x[:, :, :4].contiguous(), x.contiguous(memory_format=torch.channels_last), x]
    outputs = [op(t) for t in inputs]
    for t, y in zip(inputs, outputs):
        assert bit_equal(y, plain(op, t))
    assert (stand_in_triton.jit_launches, stand_in_triton.direct_launches) == (4, 2)
    op.activation = None
    leaf = x.clone().requires_grad_()
    op(leaf).sum().backward()  # the band-mask launch: a variant of its own
    op(x)  # out of place without activation: another one
    assert (stand_in_triton.jit_launches, stand_in_triton.direct_launches) == (6, 2)
    reference = x.clone().requires_grad_()
    plain(op, reference).sum().backward()
    assert bit_equal(leaf.grad, reference.grad)
    assert kernel_calls.backends == ["triton"] * 8


def test_a_refused_direct_launch_falls_back_to_triton_for_good(stand_in_triton, kernel_calls):
    op = random_op(6, 1, 0.7)
    x = tricky_input((2, 6, 5, 7), 1, op)
    op(x)
    stand_in_triton.refuse = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no notice: Triton's own path still runs the kernel
        ys = [op(x) for _ in range(3)]
    assert all(bit_equal(y, plain(op, x)) for y in ys)
    assert (stand_in_triton.jit_launches, stand_in_triton.direct_launches) == (4, 0)
    assert triton_kernel.unavailable_reason() is None and kernel_calls.backends == ["triton"] * 4


def test_triton_launch_hooks_keep_launches_on_tritons_own_path(stand_in_triton, monkeypatch):
    op = random_op(6, 1, 0.7)
    x = tricky_input((2, 6, 5, 7), 1, op)
    runtime = types.SimpleNamespace(launch_enter_hook=types.SimpleNamespace(calls=[print]), launch_exit_hook=None)
    monkeypatch.setattr(triton_kernel, "_knobs", types.SimpleNamespace(runtime=runtime))
    op(x), op(x)
    runtime.launch_enter_hook.calls = []  # a chain emptied again
    op(x)
    assert (stand_in_triton.jit_launches, stand_in_triton.direct_launches) == (2, 1)


def test_cpp_kernel_rejects_bad_arguments_by_name():
    assert cpu_kernel.available(), cpu_kernel.unavailable_reason()
    kernel = torch.ops.graphsparse.mean_sparse_cpu
    x, mu = torch.randn(2, 3, 4), torch.zeros(3)
    with pytest.raises(RuntimeError, match="thr must be a contiguous CPU tensor of Float"):
        kernel(x, mu, mu.double(), x, None, 0, 0.0)
    with pytest.raises(RuntimeError, match="mu has 4 elements, expected 3"):
        kernel(x, torch.zeros(4), mu, x, None, 0, 0.0)
    with pytest.raises(RuntimeError, match="band mask is only computed without an activation"):
        kernel(x, mu, mu, torch.empty_like(x), torch.empty_like(x, dtype=torch.bool), 1, 0.0)


def test_switch_and_environment(monkeypatch):
    x = torch.randn(2, 6, 5, 7)
    with fast.enabled(False):
        assert not fast.is_enabled() and not fast.applies(x)
    assert fast.is_enabled() and fast.applies(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fast.applies(x)


# ----------------------------------------------------------------------------- fusion, export, compile


def _randomise(model: nn.Module, alpha: float = 0.5) -> None:
    g = torch.Generator().manual_seed(4)
    for op in gs.operators(model).values():
        op.mean.copy_(torch.randn(op.mean.shape, generator=g) * 0.5)
        op.var.copy_(torch.rand(op.var.shape, generator=g) + 0.5)
    gs.set_alpha(model, alpha)


class _Mixed(nn.Module):
    """Functional, method and module activations, in place or not; one that must not be fused."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.prelu = nn.PReLU()
        self.silu = nn.SiLU(inplace=True)

    def forward(self, x):
        x = self.conv(x)
        a = F.relu(x, inplace=True)
        b = F.leaky_relu(a * 1.5, 0.1)
        c = (b - 0.25).relu()
        d = self.prelu(c + 1.0)  # has a parameter: not fused
        e = self.silu(d)
        return F.gelu(e * 2.0, approximate="tanh") + e


def test_fuse_activations_keeps_state_and_outputs():
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    model = gs.rewrite(_Mixed(), "full", x, fuse=False)  # the unfused form, fused below
    _randomise(model)
    fused = copy.deepcopy(model)
    n = fuse_activations(fused)
    ops = list(gs.operators(fused).values())
    assert n == len(ops) - 1 == 5
    specs = [op.activation for op in ops]
    assert specs[:3] == [("relu", ()), ("leaky_relu", (("negative_slope", 0.1),)), ("relu", ())]
    assert specs[3] is None and specs[4] == ("silu", ()) and specs[5] == ("gelu", (("approximate", "tanh"),))
    assert [op.inplace for op in ops] == [True, False, False, False, True, False]
    assert list(fused.state_dict()) == list(model.state_dict())
    assert fuse_activations(fused) == 0
    with torch.no_grad():
        assert bit_equal(fused(x), model(x))
        with fast.enabled(False):
            assert bit_equal(fused(x), model(x))


def test_fuse_leaves_shared_outputs_and_fuses_operator_slots():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.conv(x) + x
            return torch.relu(y) + y  # the operator on y also feeds the last addition

    x = torch.randn(2, 4, 8, 8)
    model = gs.rewrite(Shared(), "after_addition", x)
    assert len(gs.operators(model)) == 1
    assert fuse_activations(model) == 0

    slot = nn.Sequential(nn.Conv2d(3, 4, 1), OperatorSlot(random_op(4, 1, 0.5), nn.ReLU(inplace=True)))
    reference = copy.deepcopy(slot)
    assert fuse_activations(slot) == 1
    assert isinstance(slot[1].act, nn.Identity) and slot[1].op.activation == ("relu", ())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert bit_equal(slot(x), reference(x))


def test_rewritten_resnet18_exports_and_fuses():
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    model = gs.rewrite(timm.create_model("resnet18"), "after_addition", x, fuse=False)
    _randomise(model)
    fused = copy.deepcopy(model)
    assert fuse_activations(fused) == len(gs.operators(model)) == 8
    assert list(fused.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        expected = model(x)
        assert bit_equal(fused(x), expected)
    for m in (model, fused):
        exported = torch.export.export(m, (x,))
        with torch.no_grad():
            assert bit_equal(exported.module()(x), expected)


@pytest.mark.parametrize("mode", ["exact", "straight_through"])
def test_an_in_place_activation_may_follow_the_kernel_under_autograd(mode, backend, kernel_calls):
    """The ReLU(inplace=True) after an operator in every rewritten timm ResNet: the kernel's output must
    not be a view, or autograd refuses the in-place update."""
    op = random_op(6, 1, 0.7)
    op.backward_mode = mode
    x = torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(3))
    grads = []
    for use_kernel in (True, False):
        leaf = x.clone().requires_grad_()
        with fast.enabled(use_kernel):
            torch.relu_(op(leaf)).square().sum().backward()
        grads.append(leaf.grad)
    assert kernel_calls == ["forward_mask" if mode == "exact" else "forward_out"]
    assert kernel_calls.backends == [backend]
    assert bit_equal(grads[0], grads[1])


def _residual_adds(model: nn.Module) -> list[torch.fx.Node]:
    return [
        n
        for gm in model.modules()
        if isinstance(gm, torch.fx.GraphModule)
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target is residual_add
    ]


def test_operators_overwrite_only_inputs_that_nothing_else_reads(kernel_calls):
    class Mlps(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(6, 12), nn.Linear(12, 12), nn.Linear(12, 3)

        def forward(self, x):
            a = F.gelu(self.fc1(x))  # fc1's output is read by the operator alone: in place
            b = self.fc2(a)
            return self.fc3(F.gelu(b) + b)  # b is read twice: a new tensor

    x = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(9))
    model = gs.rewrite(Mlps().eval(), "before_activations", x, fuse=False)
    _randomise(model, alpha=0.6)
    fused = copy.deepcopy(model)
    assert fuse_activations(fused) == 2
    ops = list(gs.operators(fused).values())
    assert [op.inplace for op in ops] == [True, False]
    with torch.no_grad():
        out = fused(x)
        assert kernel_calls == ["forward_inplace", "forward"]
        assert bit_equal(out, model(x))
    hooked = copy.deepcopy(model)
    hooked.fc1.register_forward_hook(lambda m, i, o: None)  # a hook may keep the output: left alone
    fuse_activations(hooked)
    assert not any(op.inplace for op in gs.operators(hooked).values())


def test_fusion_makes_residual_adds_in_place_only_where_nothing_else_reads_the_operand():
    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv2, self.conv3 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 1, 1)
            self.act, self.act2, self.act3 = nn.ReLU(inplace=True), nn.ReLU(), nn.ReLU()

        def forward(self, x):
            a = self.act(x + self.bn(self.conv(x)))  # fresh BN output, second operand: in place
            c = self.conv2(a)
            b = self.act2(c + a) + c  # c is read twice: not in place
            return self.act3(torch.relu(b) + self.conv3(b))  # conv3's output broadcasts: a new tensor

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    model = gs.rewrite(Blocks().eval(), "after_addition", x, fuse=False)
    _randomise(model, alpha=0.3)
    fused = copy.deepcopy(model)
    fuse_activations(fused)
    adds = _residual_adds(fused)
    assert [str(n.args[n.args[2]].target) for n in adds] == ["bn", "conv3"]
    with torch.no_grad():
        assert bit_equal(fused(x), model(x))
    leaf, ref_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused(leaf).square().sum().backward()
    model(ref_leaf).square().sum().backward()
    assert bit_equal(leaf.grad, ref_leaf.grad)
    hooked = copy.deepcopy(model)
    hooked.bn.register_forward_hook(lambda m, i, o: None)  # a hook may keep the output: left alone
    fuse_activations(hooked)
    assert [str(n.args[n.args[2]].target) for n in _residual_adds(hooked)] == ["conv3"]


def test_operators_after_a_sum_that_nothing_else_reads_overwrite_it(kernel_calls):
    """The demo model's after_addition operators write into their sums, under autograd too (the C++ path):
    outputs and input gradients bit-equal to the unfused model's, which makes new tensors."""
    from graphsparse.demo.models import load_demo_model

    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    unfused = gs.rewrite(load_demo_model().eval(), "after_addition", x, fuse=False)
    _randomise(unfused, alpha=0.4)
    fused = copy.deepcopy(unfused)
    fuse_activations(fused)
    assert [op.inplace for op in gs.operators(fused).values()] == [True] * 6
    assert not any(op.inplace for op in gs.operators(unfused).values())
    overwrote = []
    for op in gs.operators(fused).values():
        op.register_forward_hook(lambda m, args, out: overwrote.append(out.data_ptr() == args[0].data_ptr()))
    results = []
    for model in (unfused, fused):
        leaf = x.clone().requires_grad_()
        out = model(leaf)
        results.append((out.detach(), *torch.autograd.grad(out.square().sum(), leaf)))
    assert overwrote == [True] * 6 and kernel_calls.backends == ["cpp"] * 12
    assert bit_equal(results[0][0], results[1][0]) and bit_equal(results[0][1], results[1][1])


def test_an_operator_keeps_a_sum_that_something_else_reads():
    root = nn.Module()
    root.first, root.second = MeanSparse(4, 1, 0.5), MeanSparse(4, 1, 0.5)
    graph = torch.fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    read_once, read_twice = graph.call_function(torch.add, (a, b)), graph.call_function(torch.add, (a, b))
    first, second = graph.call_module("first", (read_once,)), graph.call_module("second", (read_twice,))
    graph.output((first, graph.call_function(torch.mul, (second, read_twice))))
    gm = torch.fx.GraphModule(root, graph)
    fuse_activations(gm)
    assert gm.first.inplace and not gm.second.inplace


def test_residual_add_writes_into_its_operand_only_without_autograd():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    expected = a + b
    fresh = a.clone()
    with torch.no_grad():
        assert residual_add(fresh, b, 0) is fresh and bit_equal(fresh, expected)
        fresh = b.clone()
        assert residual_add(a, fresh, 1) is fresh and bit_equal(fresh, expected)
        assert bit_equal(residual_add(a, b[:1], 0), expected[:1] * 0 + a + b[:1])  # broadcast: a new tensor
    leaf = a.clone().requires_grad_()
    y = residual_add(leaf, b, 0)
    assert y is not leaf and bit_equal(y.detach(), expected)
    assert residual_add(a.double(), b, 0).dtype == torch.float64


def test_residual_add_keeps_the_layout_of_a_plus_b():
    """Operands laid out differently: ``a + b`` decides the result's strides (reductions after it sum in that
    order), so nothing is written in place and the operands keep their order."""
    fresh = torch.randn(2, 5, 3)  # contiguous, like a Linear's output
    view = torch.randn(2, 3, 5).transpose(1, 2)  # a transposed view, like tokens from a feature map
    expected = view + fresh
    with torch.no_grad():
        y = residual_add(view, fresh.clone(), 1)
    assert y.stride() == expected.stride() != fresh.stride() and bit_equal(y, expected)


def test_whole_model_compile_has_no_graph_break():
    x = torch.randn(2, 3, 32, 32)
    model = gs.rewrite(timm.create_model("resnet18"), "full", x)
    _randomise(model)
    fuse_activations(model)
    first = next(iter(gs.operators(model).values()))
    first.activation = None  # one unfused operator too
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
