"""The data side of the CLI (calibrate, tune, eval): options, data sources and what the commands print."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import graphsparse.artifact.io
from graphsparse.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def never_loaded(tmp_path, monkeypatch):
    """A file that stands for an artifact; loading it fails the test (options must be refused first)."""

    def load(*args, **kwargs):
        raise AssertionError("the artifact was loaded before the options were checked")

    monkeypatch.setattr(graphsparse.io, "load", load)
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"not read")
    return str(path)


@pytest.mark.parametrize(
    ("command", "option"),
    [
        ("eval", "--n"),
        ("tune", "--n"),
        ("eval", "--max-samples"),
        ("tune", "--max-samples"),
        ("calibrate", "--max-samples"),
        ("eval", "--batch-size"),
        ("tune", "--batch-size"),
        ("calibrate", "--batch-size"),
        ("eval", "--steps"),
        ("tune", "--steps"),
    ],
)
def test_zero_counts_are_refused_before_anything_is_loaded(never_loaded, command, option):
    res = CliRunner().invoke(main, [command, never_loaded, "--data", "digits", option, "0"])
    assert res.exit_code == 2, res.output  # click's usage error, not 'all samples' nor a late failure
    assert option in res.output and "0 is not in the range x>=1" in res.output


def test_n_and_max_samples_together_take_the_smaller():
    from graphsparse.cli._data import sample_count

    assert sample_count(None, None) is None
    assert sample_count(5, None) == sample_count(None, 5) == sample_count(5, 9) == sample_count(9, 5) == 5


def test_a_model_without_a_classifier_head_is_refused(tmp_path):
    """timm's resnet18 with num_classes=0 gives 512 pooled features: accuracy on 10-class data would be 0 %."""
    import numpy as np
    import timm
    import torch

    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.random((40, 3, 16, 16), dtype=np.float32), y=np.arange(40) % 10)
    torch.save(timm.create_model("resnet18", num_classes=0), tmp_path / "features.pt")
    art = tmp_path / "a.safetensors"
    res = run("rewrite", str(tmp_path / "features.pt"), "--rule", "after_addition", "--input-shape", "1,3,16,16",
              "-o", str(art))
    assert res.exit_code == 0, res.output
    found = "gives 512 outputs per sample (output shape (1, 512)), but the data has 10 classes"
    res = run("calibrate", str(art), "--data", str(data))  # statistics need no labels: a warning
    assert res.exit_code == 0, res.output
    assert found in res.output and "tune and eval will refuse this data" in res.output
    res = run("eval", str(art), "--data", str(data), "--n", "4", "--steps", "1")
    assert res.exit_code == 1, res.output
    assert found in res.output and "no classifier head" in res.output


@pytest.fixture
def demo_artifact(tmp_path):
    """The demo architecture at 8x8, calibrated on digits (random weights: only the plumbing is tested)."""
    art = tmp_path / "demo.safetensors"
    res = run("rewrite", "graphsparse.demo.models:DemoPreActResNet", "--rule", "after_addition", "--input-shape",
              "1,1,8,8", "--data", "digits", "--max-samples", "64", "-o", str(art))
    assert res.exit_code == 0, res.output
    return art


@pytest.mark.slow
def test_calibrating_again_flags_the_tuning_and_evaluation_records_stale(demo_artifact):
    import json

    import graphsparse as gs

    art = str(demo_artifact)
    res = run("tune", art, "--data", "digits", "--alphas", "0,0.5", "--n", "8", "--steps", "1", "--eps", "0.1",
              "--split", "train")
    assert res.exit_code == 0, res.output
    assert "warning: graphsparse: tuned on the 'train' split; the validation split is 'val'" in res.output
    assert f"set with the tuning record in {art}" in res.output
    res = run("calibrate", art, "--data", "digits", "--seed", "1", "--max-samples", "64")
    assert res.exit_code == 0, res.output
    assert "the tuning record (it chose α = " in res.output and "is marked stale" in res.output
    records = json.loads(gs.read_metadata(art)["records"])
    assert records["tuning"]["stale"] is True and "stale" not in records["calibration"]
    res = run("eval", art, "--data", "digits", "--n", "8", "--steps", "1", "--eps", "0.1")
    assert res.exit_code == 0, res.output
    assert "the tuning record (it chose α" in res.output  # the α in use was chosen for other statistics
    assert "wrote the evaluation record (8 samples, 20" in res.output and f") into {art}" in res.output


@pytest.mark.parametrize("command", ["eval", "tune"])
def test_an_eps_in_pixel_levels_is_refused_with_its_unit(never_loaded, command):
    res = run(command, never_loaded, "--data", "digits", "--eps", "8")
    assert res.exit_code == 1, res.output
    assert "ε is in [0, 1] pixel units" in res.output and "8/255 = 0.0314" in res.output


@pytest.fixture
def tiny_artifact(tmp_path):
    """A user's 1-channel, 3-class model captured at 8x8 (it declares no input size of its own)."""
    try:  # tests/ may or may not be a package, depending on how pytest was started
        from tests._user_models import TinyNet
    except ImportError:
        from _user_models import TinyNet

    art = tmp_path / "tiny.safetensors"
    res = run("rewrite", f"{TinyNet.__module__}:TinyNet", "--rule", "full", "--input-shape", "1,1,8,8", "-o", str(art))
    assert res.exit_code == 0, res.output
    return str(art), TinyNet.__module__.split(".")[0]


def test_an_image_folder_follows_the_models_channels_and_capture_size(tmp_path, tiny_artifact):
    import numpy as np
    from PIL import Image

    import graphsparse as gs

    rng = np.random.default_rng(0)
    for label in ("a", "b", "c"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / label / f"{i}.png")
    art, trust = tiny_artifact
    res = run("calibrate", art, "--data", str(tmp_path / "imgs"), "--split", "all", "--allow-module", trust)
    assert res.exit_code == 0, res.output  # colour files, read as grayscale for the 1-channel model, 8x8
    assert "warning" not in res.output, res.output
    assert gs.rewrite_info(gs.load(art, allow_modules=[trust])).records["calibration"]["samples"] == 12
    res = run("calibrate", art, "--data", str(tmp_path / "imgs"), "--channels", "3", "--allow-module", trust)
    assert res.exit_code == 1 and "(image folders: --channels)" in res.output


def test_image_size_resizes_arrays(tmp_path, tiny_artifact):
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.random((30, 1, 16, 16), dtype=np.float32), y=np.arange(30) % 3)
    art, trust = tiny_artifact
    res = run("calibrate", art, "--data", str(tmp_path / "d.npz"), "--allow-module", trust)
    assert res.exit_code == 0, res.output
    assert "gives 16x16 images, but the model was captured on 8x8" in res.output
    assert "--image-size resizes them" in res.output
    res = run("calibrate", art, "--data", str(tmp_path / "d.npz"), "--image-size", "8", "--allow-module", trust)
    assert res.exit_code == 0 and "warning" not in res.output, res.output


def test_a_malformed_image_size_is_refused_before_loading(never_loaded):
    res = CliRunner().invoke(main, ["eval", never_loaded, "--data", "digits", "--image-size", "8,x"])
    assert res.exit_code == 2 and "'8,x' is not a size: give N or H,W" in res.output


def test_an_interrupted_calibration_resumes_from_its_checkpoint(tmp_path, tiny_artifact, monkeypatch):
    """Ctrl-C while the 5th batch loads: 4 batches are saved; --resume ends with the statistics of an
    uninterrupted pass, bit for bit."""
    import shutil

    import numpy as np
    import torch

    import graphsparse as gs
    from graphsparse.data import SplitDataset

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.random((120, 1, 8, 8), dtype=np.float32), y=np.arange(120) % 3)
    art, trust = tiny_artifact
    reference = str(tmp_path / "reference.safetensors")
    shutil.copy(art, reference)
    common = ("--data", str(tmp_path / "d.npz"), "--batch-size", "16", "--allow-module", trust)
    assert run("calibrate", reference, *common).exit_code == 0

    ckpt = tmp_path / "calib.state.safetensors"
    read = SplitDataset.__getitem__

    def ctrl_c_at_sample_70(self, i):
        if i == 70:
            raise KeyboardInterrupt
        return read(self, i)

    monkeypatch.setattr(SplitDataset, "__getitem__", ctrl_c_at_sample_70)
    res = run("calibrate", art, *common, "--checkpoint", str(ckpt))
    assert res.exit_code == 130, res.output
    assert f"interrupted: 4 batches (64 samples) are saved in {ckpt}" in res.output and "--resume" in res.output
    monkeypatch.setattr(SplitDataset, "__getitem__", read)
    res = run("calibrate", art, *common, "--checkpoint", str(ckpt), "--resume")
    assert res.exit_code == 0, res.output
    assert "calibrated 1 sites on 84 samples" in res.output and not ckpt.exists()
    resumed, whole = gs.load(art, allow_modules=[trust]), gs.load(reference, allow_modules=[trust])
    for site, op in gs.operators(resumed).items():
        ref = gs.operators(whole)[site]
        assert torch.equal(op.mean, ref.mean) and torch.equal(op.var, ref.var), site
    assert gs.rewrite_info(resumed).records["calibration"]["resumed_batches"] == 4


def test_resume_needs_a_checkpoint(never_loaded, tmp_path):
    res = CliRunner().invoke(main, ["calibrate", never_loaded, "--data", "digits", "--resume"])
    assert res.exit_code == 2 and "--resume continues the pass saved in --checkpoint PATH" in res.output


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["rewrite", "--rule", "after_addition", "--data", "digits", "--batch-size", "0"], "--batch-size"),
        (["rewrite", "--rule", "after_addition", "--data", "digits", "--max-samples", "0"], "--max-samples"),
        (["plot", "--max-samples", "0"], "--max-samples"),
    ],
)
def test_zero_counts_are_refused_by_rewrite_and_plot_too(never_loaded, args, option):
    res = CliRunner().invoke(main, [args[0], never_loaded, *args[1:]])
    assert res.exit_code == 2, res.output
    assert option in res.output and "0 is not in the range x>=1" in res.output


def test_the_progress_bar_shows_the_label_evaluate_passes(monkeypatch):
    """evaluate calls progress(done, total, 'exact: apgd-ce: 3 of 8 robust'); the bar shows the robust count."""
    from rich.progress import Progress

    from graphsparse.cli._data import progress_bar

    seen = []
    original = Progress.update

    def update(self, task_id, **kwargs):
        seen.append(kwargs.get("description"))
        return original(self, task_id, **kwargs)

    monkeypatch.setattr(Progress, "update", update)
    with progress_bar("evaluating") as step:
        step(3, 24, "exact: apgd-ce: 3 of 8 robust")
        step(4, 24)
    assert seen == ["evaluating (exact: apgd-ce: 3 of 8 robust)", "evaluating"]
