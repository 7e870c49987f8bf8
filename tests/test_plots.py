"""Pictures: the α curve and a site's input histogram are real, non-blank PNGs; histograms are exact."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import graphsparse as gs
from graphsparse.data import load_dataset
from graphsparse.histograms import SiteHistogram, record_histograms
from graphsparse.ops import MeanSparse, operators
from graphsparse.plots import plot_site_histogram, plot_tuning
from graphsparse.tune import TunePoint, TuneResult

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
