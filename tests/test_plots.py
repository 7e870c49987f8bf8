"""Pictures: the α curve and a site's input histogram are real, non-blank PNGs; histograms are exact."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from torch import nn

import graphsparse as gs
from graphsparse.data import load_dataset
from graphsparse.ops import MeanSparse, operators
from graphsparse.plots import _site_histogram_figure, _tuning_figure, plot_site_histogram, plot_tuning
from graphsparse.robust.tune import TunePoint, TuneResult
from graphsparse.stats.histograms import SiteHistogram, record_histograms

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> np.ndarray:
    """A valid, non-trivial PNG: magic bytes, a real size, and more than one colour."""
    import matplotlib.image

    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    colours = np.unique(image[..., :3].reshape(-1, 3), axis=0)
    assert len(colours) > 10, "the image is (nearly) a single colour"
    return image


def tuning_result(bpda: bool = True) -> TuneResult:
    alphas = [round(0.05 * i, 2) for i in range(11)]
    clean = [95.0 - 8 * a * a for a in alphas]
    robust = [40.0 + 30 * a for a in alphas]
    curve = [TunePoint(a, c, r, (40.0 + 5 * a) if bpda else None) for a, c, r in zip(alphas, clean, robust)]
    return TuneResult(
        curve=curve,
        chosen_alpha=0.25,
        baseline_clean=95.0,
        max_clean_drop=0.5,
        criterion="min(robust, robust_bpda)" if bpda else "robust",
        attack="apgd-ce",
        eps=8 / 255,
        norm="Linf",
        n=200,
        seed=0,
        batch_size=128,
        steps=None,
        split="val",
        source="digits",
        indices=list(range(200)),
    )


def test_tuning_plot_is_a_real_png(tmp_path):
    path = plot_tuning(tuning_result(), tmp_path / "tuning.png")
    assert path == tmp_path / "tuning.png"
    assert_png(path)
    # from the JSON record of an artifact, and without a BPDA curve
    assert_png(plot_tuning(tuning_result(bpda=False).to_dict(), tmp_path / "from_dict.png"))
    assert sorted(os.listdir(tmp_path)) == ["from_dict.png", "tuning.png"]  # no temporary files left


def test_tuning_plot_overwrites_atomically(tmp_path):
    target = tmp_path / "t.png"
    target.write_bytes(b"old")
    plot_tuning(tuning_result(), target)
    assert target.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError):
        plot_tuning({**tuning_result().to_dict(), "curve": []}, target)
    assert target.read_bytes()[:8] == PNG_MAGIC  # a failed plot leaves the old file alone


def _text_boxes(fig) -> list[tuple[str, object]]:
    """(description, window extent) of every piece of text in ``fig``: titles, axis and tick labels,
    annotations and legends (a legend as one box)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [(f"legend {i}", lg.get_window_extent(renderer)) for i, lg in enumerate(fig.legends)]
    for i, ax in enumerate(fig.axes):
        texts = [("title", ax.title), ("xlabel", ax.xaxis.label), ("ylabel", ax.yaxis.label)]
        texts += [(f"text {t.get_text()!r}", t) for t in ax.texts]
        for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            ticks = zip(axis.get_ticklocs(), axis.get_ticklabels())  # labels of ticks outside the view are not drawn
            texts += [(f"tick {t.get_text()!r}", t) for loc, t in ticks if min(lo, hi) <= loc <= max(lo, hi)]
        boxes += [(f"axes {i} {name}", t.get_window_extent(renderer)) for name, t in texts if t.get_text()]
        if ax.get_legend() is not None:
            boxes.append((f"axes {i} legend", ax.get_legend().get_window_extent(renderer)))
    return boxes


def _assert_text_laid_out(fig) -> None:
    """No text runs off the figure, and no two pieces of text overlap (tick labels of one axis may touch)."""
    width, height = fig.canvas.get_width_height()
    boxes = _text_boxes(fig)
    for name, box in boxes:
        assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= width + 1 and box.y1 <= height + 1, (name, box)
    for i, (name_a, a) in enumerate(boxes):
        for name_b, b in boxes[i + 1 :]:
            if "tick" in name_a and "tick" in name_b:
                continue
            overlap = min(a.x1, b.x1) - max(a.x0, b.x0) > 1 and min(a.y1, b.y1) - max(a.y0, b.y0) > 1
            assert not overlap, f"{name_a} overlaps {name_b}"


def _edge_cases() -> list[TuneResult]:
    r = tuning_result()
    flat = [TunePoint(p.alpha, 90.0 - p.alpha, 90.0 - p.alpha, None) for p in r.curve]
    return [
        r,
        dataclasses.replace(r, chosen_alpha=0.5),  # at the right edge: the note ran off the figure
        dataclasses.replace(r, curve=flat, chosen_alpha=0.0),  # at the top left: the note crossed the title
        dataclasses.replace(r, attack="apgd-ce+apgd-t+fab-t+square", eps=0.0313725, n=10_000, split="validation"),
    ]


@pytest.mark.parametrize("case", range(4))
def test_tuning_plot_text_stays_inside_and_apart(case):
    _assert_text_laid_out(_tuning_figure(_edge_cases()[case], None))


def test_tuning_plot_keeps_equal_curves_visible():
    """When robust equals clean the robust line is drawn over the clean one: it must be dashed or dotted and
    thinner, each curve with its own marker, so that the clean line shows beneath."""
    fig = _tuning_figure(_edge_cases()[2], None)
    (ax,) = fig.axes
    curves = (ln for ln in ax.get_lines() if not ln.get_label().startswith(("chosen", "base")))
    lines = sorted(curves, key=lambda ln: ln.zorder)
    assert [ln.get_label() for ln in lines][0] == "clean"
    for below, above in zip(lines, lines[1:]):
        assert above.zorder > below.zorder
        assert above.get_linestyle() != "-" and above.get_linewidth() < below.get_linewidth(), above.get_label()
    markers = [tuple(c.get_paths()[0].vertices.round(3).ravel()) for c in ax.collections if len(c.get_offsets())]
    assert len(set(markers)) >= 2  # clean and robust points have different markers


def test_tuning_plot_draws_the_base_models_robust_level():
    r = tuning_result()
    base = next(p for p in r.curve if p.alpha == 0)
    (ax,) = _tuning_figure(r, None).axes
    (line,) = [ln for ln in ax.get_lines() if ln.get_label().startswith("base (α = 0)")]
    assert set(line.get_ydata()) == {base.robust}


def test_tuning_plot_title_names_the_split_only_when_known():
    r = tuning_result()
    assert "'val' split" in _tuning_figure(r, None).axes[0].get_title()
    for split in ("", None):
        title = _tuning_figure(dataclasses.replace(r, split=split), None).axes[0].get_title()
        assert "unknown" not in title and "split" not in title and "apgd-ce" in title


# ---------------------------------------------------------------------------------------- histograms


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        MeanSparse(6, site_id="stem.act", depth=0),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, stride=2),
        MeanSparse(4, site_id="layer1.act", depth=1),
        nn.ReLU(),
    ).eval()
    train = load_dataset("digits", split="train")
    loader = gs.make_loader(train, 256)
    gs.calibrate(model, loader)
    gs.set_alpha(model, 0.25)
    return model, loader


def test_histograms_count_every_value_and_block_exactly_the_band(calibrated):
    model, loader = calibrated
    hists = record_histograms(model, loader)
    assert list(hists) == ["stem.act", "layer1.act"]
    x = torch.cat([b[0] for b in loader])
    with torch.no_grad():
        stem_in = model[0](x)  # the input of the first operator
    h = hists["stem.act"]
    assert h.counts.shape == (6, len(h.edges) + 1) and h.total == stem_in.numel()
    assert float(operators(model)["stem.act"].alpha) == 0.25  # α restored after the pass
    # the mass `after(α)` moves onto μ is the number of values MeanSparse blocks
    op = operators(model)["stem.act"]
    with torch.no_grad():
        blocked = int((op(stem_in) != stem_in).sum() + ((stem_in == op.mean.reshape(1, -1, 1, 1)).sum()))
    _, moved = h.after(0.25)
    assert abs(moved - blocked) <= 2  # values sitting exactly on a band edge may round either way
    # per channel in input units: edges are μ_c + σ_c·z
    c = 2
    edges = h.edges_for(c)
    assert np.isclose(edges[len(edges) // 2], float(op.mean[c]))
    values = stem_in[:, c].double().numpy().ravel()
    inside = (values >= edges[0]) & (values < edges[-1])
    assert abs(int(h.channel_counts(c)[1:-1].sum()) - int(inside.sum())) <= 2
    assert SiteHistogram.from_dict(h.to_dict()).to_dict() == h.to_dict()


def test_site_histogram_plot_is_a_real_png(calibrated, tmp_path):
    model, loader = calibrated
    hists = record_histograms(model, loader, sites=["layer1.act"], max_batches=2)
    op = operators(model)["layer1.act"]
    assert_png(plot_site_histogram(hists, "layer1.act", op, tmp_path / "pooled.png"))
    assert_png(plot_site_histogram(hists["layer1.act"], "layer1.act", op, tmp_path / "ch1.png", channel=1))
    assert_png(plot_site_histogram(hists, "layer1.act", None, tmp_path / "a0.png", alpha=0.0))
    with pytest.raises(KeyError):
        plot_site_histogram(hists, "stem.act", op, tmp_path / "missing.png")
    assert sorted(os.listdir(tmp_path)) == ["a0.png", "ch1.png", "pooled.png"]


def test_histograms_need_statistics():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), MeanSparse(3, site_id="a"))
    with pytest.raises(gs.CalibrationError, match="calibrate"):
        record_histograms(model, [torch.rand(4, 1, 8, 8)])
    with pytest.raises(gs.PlanError, match="did you mean 'a'"):
        record_histograms(model, [torch.rand(4, 1, 8, 8)], sites=["aa"])


@pytest.mark.parametrize("alpha,channel", [(0.25, None), (0.0, None), (3.0, 1)])
def test_site_histogram_text_stays_inside_and_apart(calibrated, alpha, channel):
    model, loader = calibrated
    hists = record_histograms(model, loader, sites=["layer1.act"], max_batches=2)
    fig = _site_histogram_figure(hists, "layer1.act", None, channel=channel, alpha=alpha, title=None)
    _assert_text_laid_out(fig)
    if alpha == 0:
        assert "both panels are the same" in fig.axes[0].get_title()
