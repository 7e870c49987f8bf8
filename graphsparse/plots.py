"""Pictures: the α tuning curve (the paper's Figure 3) and a site's input histogram (its Figure 1).

Figures are drawn with matplotlib's object API on the Agg canvas (no ``pyplot``, no global state, no
display needed) and written atomically as PNG (temporary file + ``os.replace``).
"""

from __future__ import annotations

import io
import os
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from graphsparse._files import atomic_write
from graphsparse.robust.tune import TuneResult
from graphsparse.stats.histograms import SiteHistogram

__all__ = ["plot_tuning", "plot_site_histogram"]


def _figure(width: float, height: float, rows: int = 1) -> tuple[Any, list[Any]]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is in the eval extra
        raise ImportError("plots need matplotlib. Hint: pip install 'graphsparse[eval]'") from e
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, 1, i + 1) for i in range(rows)]
    return fig, axes


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write(path, buf.getvalue())


def plot_tuning(
    result: TuneResult | Mapping[str, Any], path: str | os.PathLike[str], *, title: str | None = None
) -> Path:
    """Clean and robust accuracy versus α, with the chosen α marked, as a PNG.

    Points whose clean drop exceeds the bound are drawn hollow; a BPDA curve is drawn when measured, and the
    base model's robust level (α = 0) as a grey dotted line. Each
    curve has its own line style and marker, so equal curves stay visible (the clean line is the wide solid
    one under the dashed robust line); the legend, with the chosen α's numbers, sits below the axes.

    Args:
        result: a :class:`~graphsparse.robust.tune.TuneResult` or its ``to_dict()`` (the ``tuning`` record).
        path: the PNG to write.
        title: figure title; default names the split (when known), the attack and ε.

    Returns:
        ``path``.
    """
    return _save(_tuning_figure(result, title), path)


# label, line style, line width, marker, marker size (points²), colour: drawn in this order, each over the last
_TUNING_STYLES = (
    ("clean", "-", 3.0, "o", 64, "tab:blue"),
    ("exact", "--", 1.5, "s", 28, "tab:red"),
    ("BPDA", ":", 1.5, "^", 28, "tab:purple"),
)


def _tuning_figure(result: TuneResult | Mapping[str, Any], title: str | None) -> Any:
    if not isinstance(result, TuneResult):
        result = TuneResult.from_dict(result)
    if not result.curve:
        raise ValueError("the tuning result has no curve to plot")
    alphas = np.array([p.alpha for p in result.curve])
    values = {
        "clean": np.array([p.clean for p in result.curve]),
        "exact": np.array([p.robust for p in result.curve]),
    }
    if any(p.robust_bpda is not None for p in result.curve):
        values["BPDA"] = np.array([np.nan if p.robust_bpda is None else p.robust_bpda for p in result.curve])
    feasible = result.baseline_clean - values["clean"] <= result.max_clean_drop + 1e-9
    fig, (ax,) = _figure(6.4, 4.8)
    for z, (key, linestyle, width, marker, size, colour) in enumerate(_TUNING_STYLES):
        if key not in values:
            continue
        label = "clean" if key == "clean" else f"robust ({result.attack}, {key})"
        ys = values[key]
        ax.plot(alphas, ys, color=colour, linestyle=linestyle, linewidth=width, label=label, zorder=2 + 2 * z)
        ax.scatter(alphas[feasible], ys[feasible], s=size, color=colour, marker=marker, zorder=3 + 2 * z)
        ax.scatter(
            alphas[~feasible], ys[~feasible], s=size, facecolors="white", edgecolors=colour, marker=marker,
            zorder=3 + 2 * z,
        )
    base = next((p for p in result.curve if p.alpha == 0), None)
    if base is not None:  # the original model's level: a gain is a robust curve above it
        ax.axhline(
            base.robust, color="grey", linestyle=(0, (1, 3)), linewidth=1, zorder=1,
            label=f"base (α = 0): robust {base.robust:.1f}%",
        )
    chosen = result.chosen
    ax.axvline(
        result.chosen_alpha, color="black", linestyle="-.", linewidth=1, zorder=1,
        label=f"chosen α = {result.chosen_alpha:g}: clean {chosen.clean:.1f}%, robust {chosen.robust:.1f}%"
        + ("" if chosen.robust_bpda is None else f", BPDA {chosen.robust_bpda:.1f}%"),
    )
    if not feasible.all():
        ax.scatter([], [], s=28, facecolors="white", edgecolors="grey", label="hollow: clean drop over the bound")
    ax.set_xlabel("α")
    ax.set_ylabel("accuracy (%)")
    norm = "∞" if result.norm == "Linf" else result.norm[1:]
    split = f" on the '{result.split}' split" if result.split else ""
    ax.set_title(
        _wrap(title or f"α sweep{split}, {result.attack}, ε = {result.eps:.4g} (L{norm}), n = {result.n}"),
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    _legend_below(fig, *ax.get_legend_handles_labels())
    return fig


def _legend_below(fig: Any, handles: list[Any], labels: list[str]) -> None:
    """One legend below the axes, in two columns when they fit the figure's width, else in one."""
    legend = fig.legend(handles, labels, loc="outside lower center", fontsize=8, ncols=2)
    fig.canvas.draw()
    if legend.get_window_extent().width > fig.bbox.width * 0.98:
        legend.remove()
        fig.legend(handles, labels, loc="outside lower center", fontsize=8, ncols=1)


def _wrap(text: str, width: int = 90) -> str:
    """A title on lines of at most ``width`` characters, so that it stays inside the figure."""
    return "\n".join(textwrap.fill(line, width) for line in text.splitlines())


def plot_site_histogram(
    hist: SiteHistogram | Mapping[str, SiteHistogram],
    site_id: str,
    op: Any,
    path: str | os.PathLike[str],
    *,
    channel: int | None = None,
    alpha: float | None = None,
    title: str | None = None,
) -> Path:
    """A site's input histogram before and after MeanSparse, with μ and the blocked band ±α·σ shaded.

    Args:
        hist: the :class:`~graphsparse.stats.histograms.SiteHistogram` of the site, or the mapping site id ->
            histogram that :func:`~graphsparse.stats.histograms.record_histograms` returns.
        site_id: the site to draw.
        op: the site's MeanSparse (its α is used), or None with ``alpha`` given.
        path: the PNG to write.
        channel: one channel in input units; None pools every channel in units of σ around μ.
        alpha: overrides the operator's α.
        title: figure title.

    Returns:
        ``path``.
    """
    return _save(_site_histogram_figure(hist, site_id, op, channel=channel, alpha=alpha, title=title), path)


def _site_histogram_figure(
    hist: SiteHistogram | Mapping[str, SiteHistogram],
    site_id: str,
    op: Any,
    *,
    channel: int | None,
    alpha: float | None,
    title: str | None,
) -> Any:
    h = hist if isinstance(hist, SiteHistogram) else hist.get(site_id) if isinstance(hist, Mapping) else None
    if h is None:
        raise KeyError(f"no histogram for site {site_id!r}")
    if h.site_id != site_id:
        raise ValueError(f"the histogram is of site {h.site_id!r}, not {site_id!r}")
    if alpha is None:
        if op is None:
            raise ValueError("give the site's operator or alpha")
        alpha = float(op.alpha)
    alpha = float(alpha)
    counts = h.channel_counts(channel)
    inner = counts[1:-1]
    after, blocked = h.after(alpha, channel)
    edges = h.edges_for(channel)
    mu = 0.0 if channel is None else float(h.mean[channel])
    sigma = 1.0 if channel is None else float(h.std[channel])
    widths = np.diff(edges)
    fig, (ax_in, ax_out) = _figure(6.4, 6.0, rows=2)
    for ax, values, label in ((ax_in, inner, "before MeanSparse"), (ax_out, after, "after MeanSparse")):
        ax.bar(edges[:-1], values, width=widths, align="edge", color="tab:blue", alpha=0.8, label="values")
        if alpha > 0:
            ax.axvspan(
                mu - alpha * sigma,
                mu + alpha * sigma,
                color="tab:orange",
                alpha=0.25,
                label=f"blocked band ±{alpha:g}σ",
            )
        ax.axvline(mu, color="black", linestyle="--", linewidth=1, label="μ")
        ax.set_ylabel(f"count, {label}")
        ax.grid(True, alpha=0.3)
    top = max(float(inner.max(initial=0)), 1.0) * 1.1
    if blocked:
        ax_out.bar(
            [mu], [min(blocked, top)], width=widths.min() * 2, color="tab:red", label=f"moved onto μ ({blocked} values)"
        )
        if blocked > top:
            ax_out.annotate(
                f"↑ {blocked}", xy=(mu, top), xytext=(4, -12), textcoords="offset points", fontsize=8, color="tab:red"
            )
    nonzero = np.flatnonzero(inner)
    if len(nonzero):
        lo = min(edges[max(nonzero[0] - 2, 0)], mu - alpha * sigma)
        hi = max(edges[min(nonzero[-1] + 3, len(edges) - 1)], mu + alpha * sigma)
        pad = 0.05 * (hi - lo)
        for ax in (ax_in, ax_out):
            ax.set_xlim(lo - pad, hi + pad)
    for ax in (ax_in, ax_out):
        ax.set_ylim(0, top)
    handles: dict[str, Any] = {}
    for ax in (ax_in, ax_out):  # one legend below both panels: it covers neither bars nor labels
        for handle, text in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(text, handle)
    _legend_below(fig, list(handles.values()), list(handles))
    unit = "(x − μ) / σ, all channels" if channel is None else f"input value, channel {channel}"
    ax_out.set_xlabel(unit)
    outside = int(counts[0] + counts[-1])
    ax_in.set_title(
        _wrap(
            title
            or f"{site_id}: α = {alpha:g}, {int(counts.sum())} values"
            + (f" ({outside} outside ±{h.edges[-1]:g}σ)" if outside else "")
            + ("; α = 0 moves nothing, so both panels are the same" if alpha == 0 else "")
        ),
        fontsize=9,
    )
    return fig
