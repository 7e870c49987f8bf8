"""The CLI as typed: real commands through click's runner, checking output and exit codes."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from click.testing import CliRunner

from graphsparse.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_inspect_json_lists_sites_with_the_documented_fields():
    res = run("inspect", "timm:resnet18", "--input-shape", "1,3,32,32", "--json")
    assert res.exit_code == 0, res.output
    sites = json.loads(res.output)
    assert len(sites) == 17
    fields = {"id", "op", "role", "channel_axis", "channels", "depth", "stage", "last_in_stage", "module",
              "module_class", "reached"}
    assert fields <= set(sites[0])
    assert sum(s["role"] == "after_addition" for s in sites) == 8


def test_inspect_table_with_rule_shows_actions():
    res = run("inspect", "timm:resnet18", "--input-shape", "1,3,32,32", "--rule", "after_addition")
    assert res.exit_code == 0, res.output
    assert "17 sites" in res.output and "plan: " in res.output
    assert res.output.count("meansparse") >= 8


def test_bad_inputs_give_one_line_and_no_traceback():
    for args, needle in [
        (("inspect", "timm:resnet_18"), "resnet18"),
        (("inspect", "timm:resnet18", "--input-shape", "1,x,3"), "input"),
        (("inspect", "timm:resnet18", "--input-shape", "1,5,32,32"), "input shape"),
        (("inspect", "timm:resnet18", "--rule", "after_additon"), "after_addition"),
        (("inspect", "nosuchfile.pt"), "nosuchfile.pt"),
    ]:
        res = run(*args)
        assert res.exit_code == 1, (args, res.output)
        assert "Traceback" not in res.output and needle in res.output, (args, res.output)


def test_data_of_another_layout_or_size_than_the_model_is_pointed_out(tmp_path):
    import numpy as np

    art = tmp_path / "demo.safetensors"
    res = run("rewrite", "graphsparse.demo.models:DemoPreActResNet", "--rule", "after_addition", "-o", str(art))
    assert res.exit_code == 0, res.output
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "nhwc.npz", x=rng.random((20, 28, 28, 1), dtype=np.float32), y=rng.integers(0, 10, 20))
    res = run("calibrate", str(art), "--data", str(tmp_path / "nhwc.npz"))
    assert res.exit_code == 1 and "look channels-last: store x as (N, C, H, W)" in res.output
    res = run("calibrate", str(art), "--data", "digits", "--max-samples", "32")  # 8x8 digits, a 28x28 model
    assert res.exit_code == 0, res.output
    assert "gives 8x8 images, but the model was captured on 28x28 inputs" in res.output


def test_a_malformed_alpha_grid_names_the_option(tmp_path):
    art = tmp_path / "a.safetensors"
    assert run("rewrite", "timm:resnet10t", "--rule", "after_addition", "--input-shape", "1,3,16,16",
               "-o", str(art)).exit_code == 0
    res = CliRunner().invoke(main, ["tune", str(art), "--data", "digits", "--alphas", "0,x"])
    assert res.exit_code == 2 and "--alphas" in res.output and "'0,x' is not a comma-separated list" in res.output


def test_graphsparse_debug_shows_the_traceback_of_library_errors(monkeypatch):
    from graphsparse.errors import ModelSourceError

    quiet = CliRunner().invoke(main, ["inspect", "nosuchfile.pt"])
    assert quiet.exit_code == 1 and isinstance(quiet.exception, SystemExit)
    monkeypatch.setenv("GRAPHSPARSE_DEBUG", "1")
    loud = CliRunner().invoke(main, ["inspect", "nosuchfile.pt"])
    assert isinstance(loud.exception, ModelSourceError) and loud.exc_info[2] is not None


def test_rewrite_a_torch_saved_timm_model_as_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(timm.create_model("resnet10t"), "model.pt")
    res = run("rewrite", "model.pt", "--rule", "after_addition", "--input-shape", "1,3,32,32")
    assert res.exit_code == 0, res.output
    out = tmp_path / "model.after_addition.safetensors"
    assert out.is_file() and "graphsparse calibrate" in res.output


def test_calibrate_updates_the_artifact(tmp_path):
    import numpy as np

    import graphsparse as gs

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.random((60, 3, 16, 16), dtype=np.float32), y=rng.integers(0, 10, 60))
    art = tmp_path / "a.safetensors"
    res = run("rewrite", "timm:resnet10t", "--rule", "after_addition", "--input-shape", "1,3,16,16", "-o", str(art))
    assert res.exit_code == 0, res.output
    res = run("calibrate", str(art), "--data", str(tmp_path / "d.npz"), "--batch-size", "16")
    assert res.exit_code == 0, res.output
    model = gs.load(art)
    assert all(float(op.var.max()) > 0 for op in gs.operators(model).values())
    assert gs.rewrite_info(model).records["calibration"]["samples"] == 42  # 70 % train split of 60


@pytest.fixture
def image_folder(tmp_path):
    """Two classes of five 48² RGB images: smaller than any model's input, so they must be resized."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / label / f"{i}.png")
    return tmp_path / "imgs"


def test_calibrate_prepares_an_image_folder_as_rewrite_does(tmp_path, image_folder):
    """The artifact commands resize images with the original model's timm data config, as rewrite --data
    does with the original model in hand: the same statistics either way."""
    import graphsparse as gs

    model, at_once, later = tmp_path / "m.pt", tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    torch.save(timm.create_model("resnet10t"), model)  # one set of weights for both
    res = run("rewrite", str(model), "--rule", "after_addition", "--data", str(image_folder), "-o", str(at_once))
    assert res.exit_code == 0, res.output
    res = run("rewrite", str(model), "--rule", "after_addition", "-o", str(later))
    assert res.exit_code == 0, res.output
    res = run("calibrate", str(later), "--data", str(image_folder))
    assert res.exit_code == 0, res.output
    a, b = gs.operators(gs.load(at_once)), gs.operators(gs.load(later))
    assert list(a) == list(b)
    for site in a:
        assert torch.equal(a[site].mean, b[site].mean) and torch.equal(a[site].var, b[site].var), site


def test_plot_site_preprocesses_an_image_folder_for_a_fixed_size_model(tmp_path, image_folder):
    """plot --site prepares the calibration data as calibration did: this ViT insists on 160² inputs."""
    import graphsparse as gs

    art = tmp_path / "vit.safetensors"
    res = run("rewrite", "timm:test_vit3", "--rule", "full", "--data", str(image_folder), "-o", str(art))
    assert res.exit_code == 0, res.output
    site = next(iter(gs.operators(gs.load(art))))
    out = tmp_path / "site.png"
    res = run("plot", str(art), "--site", site, "--max-samples", "4", "-o", str(out), "--allow-module", "numpy")
    assert res.exit_code == 0, res.output
    assert out.stat().st_size > 1000


def test_a_users_class_model_goes_through_the_chain_with_the_trust_it_needs(tmp_path):
    """Naming a class trusts it for rewrite; the artifact needs --allow-module to be rebuilt, and the next:
    line says so; plot takes the flag too."""
    try:  # tests/ may or may not be a package, depending on how pytest was started
        from tests._user_models import TinyNet
    except ImportError:
        from _user_models import TinyNet

    art = tmp_path / "tiny.safetensors"
    spec = f"{TinyNet.__module__}:TinyNet"
    res = run("rewrite", spec, "--rule", "full", "--input-shape", "1,1,8,8", "--data", "digits", "-o", str(art))
    assert res.exit_code == 0, res.output
    top = TinyNet.__module__.split(".")[0]
    assert f"next: graphsparse tune {art} --data digits --split val --allow-module {top}" in res.output
    res = run("plot", str(art), "--site", "act", "--max-samples", "16", "-o", str(tmp_path / "act.png"))
    assert res.exit_code == 1 and f"--allow-module {top}" in res.output
    res = run("plot", str(art), "--site", "act", "--max-samples", "16", "-o", str(tmp_path / "act.png"),
              "--allow-module", top)
    assert res.exit_code == 0, res.output


@pytest.mark.slow
def test_rewrite_calibrate_tune_eval_plot_chain(tmp_path):
    """The documented chain on a small model and the digits data: every command as typed."""
    import graphsparse as gs

    art = tmp_path / "demo.safetensors"
    res = run("rewrite", "graphsparse.demo.models:DemoPreActResNet", "--rule", "after_addition", "--input-shape",
              "1,1,8,8", "--data", "digits", "-o", str(art))
    assert res.exit_code == 0, res.output
    assert "calibrated on" in res.output
    res = run("tune", str(art), "--data", "digits", "--alphas", "0,0.5", "--n", "32", "--steps", "2",
              "--eps", "0.1", "--out-dir", str(tmp_path))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "demo.tuning.png").stat().st_size > 1000 and (tmp_path / "demo.tuning.csv").is_file()
    res = run("eval", str(art), "--data", "digits", "--n", "32", "--steps", "2", "--eps", "0.1", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)  # stderr says where the record was written
    for variant in ("base", "exact", "bpda"):
        assert 0 <= report[variant]["robust"]["apgd-ce"] <= report[variant]["clean"] <= 100
    assert report["split"] == "test"
    records = gs.rewrite_info(gs.load(art)).records
    assert records["evaluation"]["indices"] == report["indices"] and records["tuning"]["split"] == "val"
    res = run("plot", str(art), "--tuning", "-o", str(tmp_path / "curve.png"))
    assert res.exit_code == 0 and (tmp_path / "curve.png").stat().st_size > 1000, res.output
    res = run("eval", str(art), "--data", "digits", "--split", "val", "--n", "8", "--steps", "1", "--json")
    assert res.exit_code == 0  # evaluating on val is allowed; tuning on test is what is refused
    res = run("tune", str(art), "--data", "digits", "--split", "test", "--alphas", "0,0.1", "--n", "8")
    assert res.exit_code == 1 and "test" in res.output


@pytest.mark.slow
def test_eval_runs_the_fused_model_and_reports_what_the_unfused_one_gives(tmp_path, monkeypatch):
    """eval (and tune) fuse the loaded model: bit-equal outputs and gradients, so the same attacks find the
    same numbers; the artifact it writes back is the unfused model's."""
    import graphsparse as gs
    import graphsparse.planning.fuse

    art = tmp_path / "demo.safetensors"
    res = run("rewrite", "graphsparse.demo.models:DemoPreActResNet", "--rule", "before_activations", "--input-shape",
              "1,1,8,8", "--data", "digits", "-o", str(art))
    assert res.exit_code == 0, res.output
    model = gs.load(art)
    gs.set_alpha(model, 0.5)
    gs.save(model, art)
    fused_counts = []
    fuse = graphsparse.planning.fuse.fuse_activations
    monkeypatch.setattr(graphsparse.planning.fuse, "fuse_activations", lambda m: fused_counts.append(fuse(m)))
    args = ("eval", str(art), "--data", "digits", "--n", "32", "--steps", "3", "--eps", "0.2", "--json", "--no-cache")
    res = run(*args)
    assert res.exit_code == 0, res.output
    fused = json.loads(res.stdout)
    saved_fused = _written(art)
    monkeypatch.setattr(graphsparse.planning.fuse, "fuse_activations", lambda m: 0)
    res = run(*args)
    assert res.exit_code == 0, res.output
    unfused = json.loads(res.stdout)
    assert fused_counts and fused_counts[0] > 0
    for variant in ("base", "exact", "bpda"):
        assert fused[variant] == unfused[variant], variant
    assert _written(art) == saved_fused


def _written(art) -> tuple[str, dict]:
    """The tensors' digest and the records of an artifact, less the evaluation's date (a UTC time)."""
    import graphsparse as gs

    meta = gs.read_metadata(art)
    records = json.loads(meta["records"])
    records["evaluation"].pop("date")
    return meta["tensors_sha256"], records
