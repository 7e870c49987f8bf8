"""Histograms of every MeanSparse input, per channel, for pictures of what the operator blocks.

``record_histograms(model, data)`` runs ``data`` through a calibrated model (eval mode, no_grad, every α
temporarily 0 so the inputs are those of the base model, as in calibration) and counts, per site and per
channel, the operator's input in *standardised units* ``z = (x - μ_c) / σ_c``, using the operator's own
statistics. All channels share the bin edges in ``z``, so

- a channel's histogram in input units has edges ``μ_c + σ_c · edges``;
- the site's pooled histogram is the sum over channels;
- MeanSparse with threshold α blocks exactly ``|z| ≤ α``: with the default bin width of 0.05 σ, every α on
  the 0.05 grid of :func:`graphsparse.tune` falls on a bin edge, and :meth:`SiteHistogram.after` (the
  histogram after the operator: the blocked mass moved onto μ) is exact.

Two extra bins hold the values below and above the range (``±span`` standard deviations).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from graphsparse.errors import CalibrationError, PlanError, closest
from graphsparse.ops import MeanSparse, operators

__all__ = ["SiteHistogram", "record_histograms"]


@dataclass
class SiteHistogram:
    """Per-channel counts of one site's input in standardised units.

    Attributes:
        site_id: the site.
        edges: shared bin edges in units of σ around μ, shape ``[bins + 1]``.
        counts: int64 ``[channels, bins + 2]``: below range, the bins, above range.
        mean: per-channel μ used (float64 ``[channels]``).
        std: per-channel σ used (float64 ``[channels]``).
        nan: number of NaN inputs (not counted in a bin).
    """

    site_id: str
    edges: np.ndarray
    counts: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    nan: int = 0

    @property
    def channels(self) -> int:
        return int(self.counts.shape[0])

    @property
    def total(self) -> int:
        """Number of values counted (all channels, out-of-range bins included)."""
        return int(self.counts.sum())

    def channel_counts(self, channel: int | None = None) -> np.ndarray:
        """Counts ``[bins + 2]`` of one channel, or pooled over channels when ``channel`` is None."""
        if channel is None:
            return self.counts.sum(0)
        if not -self.channels <= channel < self.channels:
            raise IndexError(f"site {self.site_id!r} has {self.channels} channels, got channel {channel}")
        return self.counts[channel]

    def edges_for(self, channel: int | None = None) -> np.ndarray:
        """Bin edges in input units for ``channel`` (``μ + σ·edges``), or in σ units when None."""
        if channel is None:
            return self.edges.copy()
        return self.mean[channel] + self.std[channel] * self.edges

    def after(self, alpha: float, channel: int | None = None) -> tuple[np.ndarray, int]:
        """The histogram after MeanSparse with threshold ``alpha``.

        Returns:
            ``(counts, blocked)``: the in-range counts ``[bins]`` with every bin whose centre lies in
            ``|z| ≤ alpha`` emptied, and the number of values moved onto μ (the spike at μ).
        """
        counts = self.channel_counts(channel)[1:-1].copy()
        centres = (self.edges[:-1] + self.edges[1:]) / 2
        inside = np.abs(centres) <= alpha + 1e-9
        blocked = int(counts[inside].sum())
        counts[inside] = 0
        return counts, blocked

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (lists); :meth:`from_dict` reads it back."""
        return {
            "site_id": self.site_id,
            "edges": self.edges.tolist(),
            "counts": self.counts.tolist(),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "nan": self.nan,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SiteHistogram:
        return cls(
            site_id=str(d["site_id"]),
            edges=np.asarray(d["edges"], dtype=np.float64),
            counts=np.asarray(d["counts"], dtype=np.int64),
            mean=np.asarray(d["mean"], dtype=np.float64),
            std=np.asarray(d["std"], dtype=np.float64),
            nan=int(d.get("nan", 0)),
        )


class _Counter:
    def __init__(self, op: MeanSparse, edges: np.ndarray, width: float, span: float) -> None:
        self.op = op
        self.width = width
        self.span = span
        self.bins = len(edges) - 1
        self.counts = torch.zeros(op.channels * (self.bins + 2), dtype=torch.int64)
        self.nan = 0

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        axis = self.op.channel_axis % x.dim()
        c = x.shape[axis]
        v = x.movedim(axis, 0).reshape(c, -1).double()
        mu = self.op.mean.detach().double().to(v.device).reshape(c, 1)
        sd = self.op.var.detach().double().clamp_min(0).sqrt().to(v.device).reshape(c, 1)
        diff = v - mu
        z = torch.where(sd > 0, diff / sd.clamp_min(1e-300), torch.where(diff == 0, 0.0, diff * math.inf))
        nan = torch.isnan(z)
        self.nan += int(nan.sum())
        idx = torch.floor((z + self.span) / self.width).clamp(-1, self.bins) + 1
        idx = torch.where(nan, torch.zeros_like(idx), idx).long()
        flat = (idx + torch.arange(c, device=v.device).reshape(c, 1) * (self.bins + 2)).reshape(-1)
        weights = (~nan).reshape(-1).long()
        self.counts += torch.bincount(flat, weights=weights, minlength=self.counts.numel()).long().cpu()


def record_histograms(
    model: nn.Module,
    data: Iterable[Any],
    *,
    sites: Iterable[str] | None = None,
    bins_per_sigma: int = 20,
    span: float = 5.0,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> OrderedDict[str, SiteHistogram]:
    """Per-channel histograms of the input of every (or the named) MeanSparse of a calibrated model.

    Args:
        model: a calibrated model with MeanSparse operators.
        data: an iterable of input tensors or ``(x, y)`` batches (e.g. a DataLoader over calibration data).
        sites: site ids to record; default every MeanSparse.
        bins_per_sigma: bins per standard deviation (20: width 0.05 σ, aligned with the α grid).
        span: the binned range is ``±span`` standard deviations; values beyond go to two outer bins.
        max_batches: stop after this many batches.
        device: where inputs are moved; default the model's device.
        progress: called as ``progress(batches_done, total_or_None)``.

    Returns:
        Site id -> :class:`SiteHistogram`, in forward order. α, modes and hooks are restored on exit.

    Raises:
        PlanError: unknown site id, or no MeanSparse in the model.
        CalibrationError: a recorded operator has no statistics (calibrate first); no data.
    """
    from graphsparse.ops.state import alphas_kept, eval_mode, model_device

    if isinstance(bins_per_sigma, bool) or not isinstance(bins_per_sigma, int) or bins_per_sigma < 1:
        raise ValueError(f"bins_per_sigma must be an int >= 1, got {bins_per_sigma!r}")
    if not (math.isfinite(span) and span > 0):
        raise ValueError(f"span must be a finite number > 0, got {span!r}")
    ops = operators(model, types=(MeanSparse,))
    if not ops:
        raise PlanError("the model has no MeanSparse operators. Hint: rewrite and calibrate it first")
    chosen = list(ops) if sites is None else list(sites)
    for site in chosen:
        if site not in ops:
            raise PlanError(f"unknown site id {site!r}{closest(site, ops)}. Hint: list them with operators(model)")
        if float(ops[site].var.abs().max()) == 0.0:
            raise CalibrationError(
                f"site {site!r} has no statistics (its variance is 0 everywhere). Hint: calibrate the model first"
            )
    width = 1.0 / bins_per_sigma
    n_half = int(round(span * bins_per_sigma))
    edges = np.arange(-n_half, n_half + 1, dtype=np.float64) * width
    span = n_half * width
    counters = {site: _Counter(ops[site], edges, width, span) for site in chosen}
    device = torch.device(device) if device is not None else model_device(model)
    handles = []
    batches = 0
    try:
        for site, counter in counters.items():
            handles.append(ops[site].register_forward_pre_hook(counter))
        with eval_mode(model), alphas_kept(model) as all_ops, torch.no_grad():
            for op in all_ops.values():
                op.alpha.zero_()
            total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
            for batch in data:
                if max_batches is not None and batches >= max_batches:
                    break
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                model(x.to(device))
                batches += 1
                if progress is not None:
                    progress(batches, total)
    finally:
        for h in handles:
            h.remove()
    if batches == 0:
        raise CalibrationError("no data reached the model. Hint: check that the data iterable is not empty")
    out: OrderedDict[str, SiteHistogram] = OrderedDict()
    for site, counter in counters.items():
        op = ops[site]
        out[site] = SiteHistogram(
            site_id=site,
            edges=edges,
            counts=counter.counts.reshape(op.channels, len(edges) + 1).numpy(),
            mean=op.mean.detach().double().cpu().numpy(),
            std=op.var.detach().double().clamp_min(0).sqrt().cpu().numpy(),
            nan=counter.nan,
        )
    return out
