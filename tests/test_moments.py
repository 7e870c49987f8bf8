"""The compiled batch-moment kernel behind calibration: exact float64 moments without a float64 copy.

Each case spies on the kernel launches, so a silent fall back to ``torch.var_mean`` fails the test, and
compares with a brute-force float64 computation (``Tensor.double()`` then two-pass mean / variance).
"""

from __future__ import annotations

import pytest
import torch

from graphsparse.ops import fast
from graphsparse.stats import moments
from graphsparse.stats.moments import RunningMoments, batch_moments

RTOL = 1e-10


def reference(x: torch.Tensor, axis: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    wide = x.double()
    dims = [d for d in range(x.dim()) if d != axis % x.dim()]
    mean = wide.mean(dim=dims)
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    m2 = (wide - mean.reshape(shape)).square().sum(dim=dims)
    return x.numel() // x.shape[axis], mean, m2


def assert_close64(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * float(expected.abs().max()))


def data(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a mean far from zero next to a small spread: a one-pass sum-of-squares formula would lose digits
    channels = shape[1] if len(shape) == 4 else shape[-1]
    offset = torch.linspace(-3e3, 3e3, channels)
    x = torch.randn(shape, generator=g) * 0.01
    x = x + (offset.view(1, -1, 1, 1) if len(shape) == 4 else offset)
    return x.to(dtype)


@pytest.mark.parametrize(
    "layout",
    ["nchw", "channels_last", "tokens", "features"],
)
def test_kernel_moments_equal_brute_force(kernel_calls, layout):
    if layout == "tokens":
        x, axis = data((3, 50, 24)), -1
    elif layout == "features":
        x, axis = data((40, 24)), 1
    else:
        x, axis = data((3, 24, 7, 9)), 1
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    n, mean, m2 = batch_moments(x, axis)
    assert kernel_calls == ["moments"]
    n_ref, mean_ref, m2_ref = reference(x, axis)
    assert n == n_ref
    assert_close64(mean, mean_ref)
    assert_close64(m2, m2_ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_moments_of_half_precision_inputs(kernel_calls, dtype):
    x = (torch.randn(4, 16, 10, 10, generator=torch.Generator().manual_seed(1)) * 3 + 2).to(dtype)
    n, mean, m2 = batch_moments(x, 1)
    assert kernel_calls == ["moments"]
    _, mean_ref, m2_ref = reference(x, 1)
    assert_close64(mean, mean_ref)
    assert_close64(m2, m2_ref)


def test_kernel_and_fallback_accumulate_the_same_moments(kernel_calls):
    batches = [data((b, 8, 5, 6), seed=b) for b in (1, 4, 7)]
    with_kernel, without = RunningMoments(), RunningMoments()
    for x in batches:
        with_kernel.update(x, 1)
    assert kernel_calls == ["moments"] * 3
    with fast.enabled(False):
        for x in batches:
            without.update(x, 1)
    assert kernel_calls == ["moments"] * 3
    assert with_kernel.count == without.count == sum(x.numel() // 8 for x in batches)
    assert_close64(with_kernel.mean, without.mean)
    assert_close64(with_kernel.m2, without.m2)


def test_kernel_propagates_non_finite_values(kernel_calls):
    x = data((2, 4, 6, 6))
    x[1, 2, 3, 3] = float("nan")
    x[0, 3, 0, 0] = float("inf")
    _, mean, _ = batch_moments(x, 1)
    assert kernel_calls == ["moments"]
    assert torch.isfinite(mean[:2]).all() and not torch.isfinite(mean[2:]).any()


def test_fallback_folds_large_batches_in_chunks(monkeypatch):
    monkeypatch.setattr(moments, "CHUNK_ELEMENTS", 100)
    with fast.enabled(False):
        x = data((9, 3, 8, 8))
        n, mean, m2 = batch_moments(x, 1)
    n_ref, mean_ref, m2_ref = reference(x, 1)
    assert n == n_ref
    assert_close64(mean, mean_ref)
    assert_close64(m2, m2_ref)
