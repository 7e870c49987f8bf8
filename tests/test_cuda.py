"""The CUDA paths: the fast MeanSparse kernels (Triton, and its torch.compile fallback), the batch-moment kernel,
calibration on the GPU and the NCCL merge. Skipped where there is no GPU; on a GPU machine run

    python -m pytest tests/test_cuda.py

Each fast-path test spies on the kernel launches, so a silent fall back to the plain formula fails it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from graphsparse.ops import MeanSparse, fast, straight_through, triton_kernel
from graphsparse.stats.calibrate import calibrate
from graphsparse.stats.moments import batch_moments

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CUDA = torch.device("cuda")
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(BITS[a.dtype]), b.contiguous().view(BITS[b.dtype]))
    )


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor, x: torch.Tensor) -> None:
    """Bit-equal, or an error listing the first mismatches: input, actual and expected values and bits."""
    if bit_equal(actual, expected):
        return
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    bits = BITS[actual.dtype]
    a, e, i = (t.detach().contiguous().view(bits).flatten() for t in (actual, expected, x))
    where = (a != e).nonzero().flatten()[:6].tolist()
    af, ef, xf = (t.detach().contiguous().flatten().float() for t in (actual, expected, x))
    lines = [
        f"flat {k}: x={xf[k].item()!r} ({i[k].item():#x}) got {af[k].item()!r} ({a[k].item():#x}) "
        f"expected {ef[k].item()!r} ({e[k].item():#x})"
        for k in where
    ]
    raise AssertionError(f"{int((a != e).sum())} elements differ:\n" + "\n".join(lines))


def cuda_op(channels: int, axis: int, alpha: float = 0.7, seed: int = 0) -> MeanSparse:
    g = torch.Generator().manual_seed(seed)
    op = MeanSparse(channels, axis, alpha)
    op.mean.copy_(torch.randn(channels, generator=g))
    op.var.copy_(torch.rand(channels, generator=g) * 2 + 0.1)
    op.var[0] = 0.0  # an empty band
    return op.to(CUDA)


def cuda_input(shape, axis: int, op: MeanSparse, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    """Values around the means with -0.0, NaN, ±inf, exact means and exact band edges."""
    g = torch.Generator().manual_seed(seed)
    mean, band = op.mean.cpu(), (op.alpha * op.var.sqrt()).cpu()
    x = torch.randn(shape, generator=g)
    flat = x.movedim(axis, -1).reshape(-1, op.channels) + mean
    flat[:5, :] = torch.tensor([-0.0, 0.0, float("nan"), float("inf"), -float("inf")])[:, None]
    flat[5, :], flat[6, :], flat[7, :] = mean, mean + band, mean - band
    return flat.reshape(x.movedim(axis, -1).shape).movedim(-1, axis).contiguous().to(CUDA, dtype)


LAYOUTS = [((4, 6, 9, 7), 1, False), ((4, 6, 9, 7), 1, True), ((5, 33, 6), -1, False)]


def kernel_backend(backend: str):
    """``triton``: the fast path's CUDA kernel; ``compiled``: its torch.compile fallback (Triton off)."""
    return triton_kernel.enabled(backend == "triton")


@pytest.mark.parametrize("backend", ["triton", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, axis, channels_last", LAYOUTS, ids=["nchw", "channels_last", "tokens"])
def test_cuda_kernel_is_bit_equal_to_the_plain_formula(kernel_calls, shape, axis, channels_last, dtype, backend):
    op = cuda_op(shape[axis], axis)
    x = cuda_input(shape, axis, op, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with fast.enabled(False):
        expected = op(x)
    with kernel_backend(backend):
        y = op(x)
    assert kernel_calls == ["forward"] and kernel_calls.backends == [backend]
    assert y.is_cuda and (y != x).any()
    assert_bit_equal(y, expected, x)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_a_compiled_operator_on_the_gpu_follows_buffer_changes(mode):
    """On CUDA the compiled thresholds are computed from the buffers in every call (no cache): CUDA graphs
    (``reduce-overhead``) replay those kernels, so α and σ² changed in place must show in a replay."""
    op = cuda_op(6, 1)
    x = cuda_input((4, 6, 9, 7), 1, op, torch.float32)

    def plain() -> torch.Tensor:
        with fast.enabled(False):
            return op(x)

    torch._dynamo.reset()
    compiled = torch.compile(op, mode=mode, dynamic=False)
    with torch.no_grad():
        for _ in range(3):  # CUDA graph trees record on a later call than the first
            before = compiled(x).clone()
        assert bit_equal(before, plain()) and not bit_equal(before, x)
        op.alpha.fill_(0.0)
        assert bit_equal(compiled(x).clone(), x)
        op.alpha.fill_(0.7)
        op.var.mul_(4.0)
        after = compiled(x).clone()
        assert bit_equal(after, plain()) and not bit_equal(after, before)


@pytest.mark.parametrize("mode", ["exact", "straight_through"])
def test_cuda_kernel_gradients_match_the_plain_formula(kernel_calls, mode):
    op = cuda_op(6, 1)
    x = cuda_input((4, 6, 9, 7), 1, op, torch.float32).nan_to_num(0.0, 1.0, -1.0)
    grads = []
    for use_kernel in (True, False):
        leaf = x.clone().requires_grad_()
        with fast.enabled(use_kernel):
            if mode == "straight_through":
                with straight_through(op):
                    op(leaf).square().sum().backward()
            else:
                op(leaf).square().sum().backward()
        grads.append(leaf.grad)
    assert kernel_calls == ["forward_out" if mode == "straight_through" else "forward_mask"]
    assert kernel_calls.backends == ["triton"]
    assert bit_equal(grads[0], grads[1])


ACTIVATIONS = [("relu", ()), ("leaky_relu", (("negative_slope", 0.1),))]


@pytest.mark.parametrize("backend", ["triton", "compiled"])
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "out_of_place"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=["relu", "leaky_relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_fused_activation_is_bit_equal(kernel_calls, dtype, activation, inplace, backend):
    """Eager CUDA relu turns -0.0 into +0.0 (the CPU keeps it): the kernels must follow the device."""
    op = cuda_op(6, 1)
    op.activation, op.inplace = activation, inplace
    x = cuda_input((4, 6, 9, 7), 1, op, dtype)
    with fast.enabled(False):
        expected = op(x.clone())
    z = x.clone()
    with torch.no_grad(), kernel_backend(backend):
        y = op(z)
    assert kernel_calls == ["forward_inplace" if inplace else "forward"] and kernel_calls.backends == [backend]
    assert (y is z) == inplace
    assert_bit_equal(y, expected, x)


class CountingKernel:
    """The Triton kernel, counting the launches that go through Triton's own ``kernel[grid]`` path."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __getitem__(self, grid):
        self.calls += 1
        return self.kernel[grid]


def _misaligned(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` whose data starts 4 bytes past a 16-byte boundary."""
    buffer = torch.empty(x.numel() + 2, dtype=x.dtype, device=x.device)
    view = buffer[2:].view(x.shape).copy_(x)
    assert view.data_ptr() % 16 != 0
    return view


def test_direct_launches_follow_every_specialization(monkeypatch, kernel_calls):
    """Each variant's first launch compiles it through ``kernel[grid]``; later launches of the same variant
    call its launcher directly. A pointer off 16 bytes, a size not a multiple of 16, a single channel or a
    channels-last map is a variant of its own: reusing another's binary would be wrong (or fault)."""
    counting = CountingKernel(triton_kernel._kernel)
    monkeypatch.setattr(triton_kernel, "_kernel", counting)
    monkeypatch.setattr(triton_kernel, "_direct", {})
    cases = []
    for shape, axis in [((8, 16, 8, 8), 1), ((3, 5, 7, 7), 1), ((4, 1, 16, 16), 1), ((6, 40, 33), -1)]:
        op = cuda_op(shape[axis], axis)
        op.var.clamp_(min=0.5)  # no empty band: a single channel's operator would return x untouched
        x = cuda_input(shape, axis, op, torch.float32)
        cases += [(op, x), (op, _misaligned(x))]
    op = cuda_op(16, 1)
    cases.append((op, cuda_input((8, 16, 8, 8), 1, op, torch.float32).contiguous(memory_format=torch.channels_last)))
    for _ in range(2):
        for op, x in cases:
            with fast.enabled(False):
                expected = op(x)
            assert_bit_equal(op(x), expected, x)
        assert counting.calls == len(triton_kernel._direct) == len(cases)  # the second round: direct only
    assert kernel_calls.backends == ["triton"] * (2 * len(cases))


def test_a_triton_launch_hook_sees_every_launch(monkeypatch, kernel_calls):
    """A profiler's hook (``triton.knobs.runtime.launch_enter_hook``) is called for direct launches' variants
    too: they then go through Triton's own path."""
    knobs = pytest.importorskip("triton").knobs
    seen = []
    hook = seen.append
    op = cuda_op(6, 1)
    x = cuda_input((4, 6, 9, 7), 1, op, torch.float32)
    op(x)  # compiled and remembered
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        op(x), op(x)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    op(x)
    assert len(seen) == 2 and kernel_calls.backends == ["triton"] * 4


def test_operators_left_on_the_cpu_fail_clearly_and_leave_the_kernel_on(kernel_calls):
    """A GPU input through an operator still on the CPU: PyTorch's own device error, not a kernel reading
    host memory, and the Triton kernel stays available for the next call."""
    op = cuda_op(6, 1).cpu()
    x = cuda_input((4, 6, 9, 7), 1, op, torch.float32)
    with pytest.raises(RuntimeError, match="device"):
        op(x)
    assert kernel_calls == [] and triton_kernel.unavailable_reason() is None
    op.to(CUDA)
    assert op(x).is_cuda and kernel_calls.backends == ["triton"]


def test_a_model_rewritten_on_the_gpu_calibrates_and_runs_there(kernel_calls):
    """Operators are made where the model lives; calibration and the fast path then stay on the GPU."""
    import timm

    import graphsparse as gs

    torch.manual_seed(0)
    base = timm.create_model("resnet18", num_classes=10).eval().to(CUDA)
    x = torch.randn(4, 3, 64, 64, device=CUDA)
    rewritten = gs.rewrite(base, "after_addition", x[:1], alpha=0.25)
    ops = gs.operators(rewritten)
    assert ops and all(op.mean.is_cuda for op in ops.values())
    with torch.no_grad():
        assert torch.equal(rewritten(x), base(x))  # before calibration: the identity
    calibrate(rewritten, [x, x.flip(0)])
    before = len(kernel_calls)
    with torch.no_grad():
        y = rewritten(x)
        with fast.enabled(False):
            expected = rewritten(x)
    assert kernel_calls.backends[before:] == ["triton"] * len(ops)
    assert bit_equal(y, expected) and not torch.equal(y, base(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_batch_moments_equal_brute_force(kernel_calls, dtype):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(8, 24, 15, 15, generator=g) * 0.01 + torch.linspace(-3e3, 3e3, 24).view(1, -1, 1, 1))
    x = x.to(dtype)
    n, mean, m2 = batch_moments(x.to(CUDA), 1)
    assert kernel_calls == ["moments"]
    wide = x.double()
    mean_ref = wide.mean(dim=(0, 2, 3))
    m2_ref = (wide - mean_ref.view(1, -1, 1, 1)).square().sum(dim=(0, 2, 3))
    assert n == 8 * 15 * 15 and mean.is_cuda
    for actual, ref in ((mean, mean_ref), (m2, m2_ref)):
        torch.testing.assert_close(actual.cpu(), ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))


def test_calibrate_on_the_gpu_equals_the_cpu(kernel_calls):
    def model() -> nn.Module:  # the operators see the data itself: no float32 arithmetic before them
        return nn.Sequential(MeanSparse(3, site_id="a"), nn.ReLU(), MeanSparse(3, site_id="b", depth=1))

    g = torch.Generator().manual_seed(3)
    batches = [torch.rand(n, 3, 20, 20, generator=g) * 5 + 2 for n in (7, 16, 3)]
    on_cpu, on_gpu = model(), model().to(CUDA)
    with fast.enabled(False):
        expected = calibrate(on_cpu, batches).state
    record = calibrate(on_gpu, batches)
    assert "moments" in kernel_calls
    for site, m in expected.moments.items():
        got = record.state.moments[site]
        assert got.count == m.count
        torch.testing.assert_close(got.mean.cpu(), m.mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got.m2.cpu(), m.m2, rtol=1e-10, atol=1e-10 * float(m.m2.abs().max()))
    assert on_gpu[0].mean.is_cuda and torch.equal(on_gpu[0].mean.cpu(), on_cpu[0].mean)


def test_nccl_calibration_runs_and_merges(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from test_calibrate import _run_workers
    finally:
        sys.path.pop(0)
    codes, output = _run_workers(tmp_path, world_size=1, GS_BACKEND="nccl")
    assert codes == [0], output
    record = json.loads((tmp_path / "record0.json").read_text())
    assert record["world_size"] == 1 and record["samples"] == record["local_samples"] > 0
