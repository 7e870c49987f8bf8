"""Exact per-channel moments in float64: the accumulator behind calibration.

:class:`RunningMoments` keeps, per channel, the count, mean and ``M2`` (sum of squared deviations) of every
value it has seen, in float64, and folds batches and other accumulators in with Chan et al.'s parallel
update, so the result does not depend on batch sizes, their order, or how the data was split.

The moments of one batch come from :func:`batch_moments`: a compiled two-pass reduction (``torch.compile``,
the same machinery as :mod:`graphsparse.ops.fast`) that reads the float32/float16/bfloat16 values where
they lie and accumulates in float64 -- first the per-channel mean, then the sum of squared deviations from
it, the textbook two-pass algorithm, without a float64 copy of the batch. Measured with
``python tools/bench_calibrate.py --quick --no-memory --kernels`` (2 cores, one 8×64×112×112 float32 map):
~2 ms, against ~31 ms for ``torch.var_mean`` of a float64 copy.
Where the kernel does not apply (small inputs, other layouts, tracing, compiler unavailable) the same
moments come from ``torch.var_mean`` in float64, in chunks of at most :data:`CHUNK_ELEMENTS` elements.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from graphsparse.ops import fast

__all__ = ["CHUNK_ELEMENTS", "RunningMoments", "batch_moments", "state_problem"]

CHUNK_ELEMENTS = 1 << 20
"""Largest number of elements the fallback converts to float64 at once (8 MiB); larger batches are folded
in chunks along the batch axis, which Chan's update makes exact."""


def _two_pass(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel float64 mean and M2 of ``flat`` viewed ``(M, C)`` or ``(N, C, L)``."""
    dims = (0,) if flat.dim() == 2 else (0, 2)
    wide = flat.to(torch.float64)
    mean = wide.mean(dims, keepdim=True)
    m2 = (wide - mean).square().sum(dims)
    return mean.reshape(-1), m2


def batch_moments(x: torch.Tensor, axis: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(n, mean, m2)`` of ``x`` per index of ``axis`` (every other axis reduced), in float64.

    ``n`` is the number of values per channel; ``mean`` and ``m2`` are float64 ``[C]`` on ``x``'s device.
    NaN and Inf propagate into ``mean`` (the caller checks).
    """
    axis %= x.dim()
    channels = x.shape[axis]
    n = x.numel() // channels
    if axis != 0 and fast.applies(x):
        flat = fast.channels_view(x, axis)
        if flat is not None:
            mean, m2 = fast.run_kernel(_two_pass, ("moments", flat.dtype, flat.device.type, flat.dim()), flat)
            return n, mean, m2
    dims = [d for d in range(x.dim()) if d != axis]
    if axis == 0 or x.numel() <= CHUNK_ELEMENTS:
        var, mean = torch.var_mean(x.to(torch.float64), dim=dims, correction=0)
        return n, mean, var * n
    chunks = RunningMoments(channels)
    for part in x.split(max(1, CHUNK_ELEMENTS // x[0].numel()), dim=0):
        k = part.numel() // channels
        var, mean = torch.var_mean(part.to(torch.float64), dim=dims, correction=0)
        chunks._fold(k, mean, var * k)
    return n, chunks.mean, chunks.m2


class RunningMoments:
    """Exact per-channel count, mean and M2 (sum of squared deviations), accumulated in float64.

    Batches are folded in with Chan et al.'s parallel formula, so the result is the same (to float64
    rounding) whatever the batch sizes, their order, or how the data was split between accumulators
    that are later :meth:`merge`-d.

    Args:
        channels: number of channels; ``None`` takes it from the first :meth:`update`.

    Attributes:
        count: number of values seen per channel (the same for every channel), a Python int.
        mean: float64 tensor ``[channels]``.
        m2: float64 tensor ``[channels]``; ``m2 / count`` is the population variance.
    """

    def __init__(self, channels: int | None = None) -> None:
        if channels is not None and (
            isinstance(channels, bool) or not isinstance(channels, int) or channels < 1
        ):
            raise ValueError(f"channels must be a positive int or None, got {channels!r}")
        self.channels = channels
        self.count = 0
        self.mean = torch.zeros(channels or 0, dtype=torch.float64)
        self.m2 = torch.zeros(channels or 0, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"RunningMoments(channels={self.channels}, count={self.count})"

    @property
    def variance(self) -> torch.Tensor:
        """Population variance ``m2 / count`` (float64); raises ``ValueError`` before any data."""
        if self.count == 0:
            raise ValueError("RunningMoments has seen no data; its variance is undefined")
        return self.m2 / self.count

    def _check_channels(self, channels: int) -> None:
        if self.channels is None:
            self.channels = channels
            self.mean = torch.zeros(channels, dtype=torch.float64, device=self.mean.device)
            self.m2 = torch.zeros(channels, dtype=torch.float64, device=self.m2.device)
        elif channels != self.channels:
            raise ValueError(f"RunningMoments has {self.channels} channels, got {channels}")

    def _fold(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        """Chan's update with a batch of ``n_b`` values per channel, batch mean and batch M2."""
        if n_b == 0:
            return
        n_a = self.count
        if n_a == 0:
            self.mean = mean_b.to(torch.float64).clone()
            self.m2 = m2_b.to(torch.float64).clone()
        else:
            mean_a = self.mean.to(mean_b.device)
            n = n_a + n_b
            delta = mean_b - mean_a
            self.mean = mean_a + delta * (n_b / n)
            self.m2 = self.m2.to(mean_b.device) + m2_b + delta.square() * (n_a * n_b / n)
        self.count = n_a + n_b

    def update(self, x: torch.Tensor, channel_axis: int = 1) -> RunningMoments:
        """Fold in every value of ``x``: one channel per index of ``channel_axis``, all other axes reduced.

        The batch moments are computed in float64 by :func:`batch_moments`, on the device of ``x``; the
        accumulators move there too.

        Returns:
            ``self``.
        """
        x = x.detach()
        if x.dim() == 0:
            raise ValueError("RunningMoments.update needs a tensor with a channel axis, got a scalar")
        if not -x.dim() <= channel_axis < x.dim():
            raise ValueError(f"channel_axis {channel_axis} is out of range for shape {tuple(x.shape)}")
        axis = channel_axis % x.dim()
        channels = x.shape[axis]
        self._check_channels(channels)
        if x.numel() == 0:
            return self
        if x.dim() == 1:  # one value per channel
            self._fold(1, x.to(torch.float64), torch.zeros_like(x, dtype=torch.float64))
            return self
        self._fold(*batch_moments(x, axis))
        return self

    def merge(self, other: RunningMoments) -> RunningMoments:
        """Fold in the accumulators of ``other`` (which is not changed); exact. Returns ``self``."""
        if other.channels is None or other.count == 0:
            return self
        self._check_channels(other.channels)
        device = self.mean.device if self.count else other.mean.device
        self._fold(other.count, other.mean.to(device), other.m2.to(device))
        return self

    def copy(self) -> RunningMoments:
        """An independent copy."""
        new = RunningMoments(self.channels)
        new.count, new.mean, new.m2 = self.count, self.mean.clone(), self.m2.clone()
        return new

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"count": int64 [1], "mean": float64 [C], "m2": float64 [C]}``, on the CPU."""
        return {
            "count": torch.tensor([self.count], dtype=torch.int64),
            "mean": self.mean.detach().to("cpu", torch.float64).clone(),
            "m2": self.m2.detach().to("cpu", torch.float64).clone(),
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the accumulators by those of :meth:`state_dict`; raises ``ValueError`` if malformed."""
        problem = state_problem(state)
        if problem:
            raise ValueError(f"invalid RunningMoments state: {problem}")
        self.channels = int(state["mean"].numel())
        self.count = int(state["count"].reshape(-1)[0])
        self.mean = state["mean"].to(torch.float64).clone()
        self.m2 = state["m2"].to(torch.float64).clone()


def state_problem(state: Mapping[str, torch.Tensor], prefix: str = "") -> str:
    """What is wrong with a RunningMoments state dict ('' when nothing is)."""
    for key in ("count", "mean", "m2"):
        if key not in state:
            return f"key {prefix + key!r} is missing"
    count, mean, m2 = state["count"], state["mean"], state["m2"]
    if count.dtype != torch.int64 or count.numel() != 1 or int(count.reshape(-1)[0]) < 0:
        return f"key {prefix + 'count'!r} must be one int64 >= 0, got {count.dtype} {tuple(count.shape)}"
    for key, t in (("mean", mean), ("m2", m2)):
        if t.dtype != torch.float64 or t.dim() != 1 or t.numel() < 1:
            return f"key {prefix + key!r} must be a non-empty float64 vector, got {t.dtype} {tuple(t.shape)}"
        if not bool(torch.isfinite(t).all()):
            return f"key {prefix + key!r} contains NaN or Inf"
    if mean.shape != m2.shape:
        return f"keys {prefix + 'mean'!r} and {prefix + 'm2'!r} differ in shape"
    if bool((m2 < 0).any()):
        return f"key {prefix + 'm2'!r} has negative values"
    return ""
