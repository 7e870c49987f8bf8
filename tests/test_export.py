"""graphsparse export: files that run without graphsparse (checked here in a process that cannot import it),
their outputs against the eager model, metadata, torch.jit.script, and one-line refusals."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile

import pytest
import timm
import torch
from click.testing import CliRunner

import graphsparse as gs
from graphsparse.cli import main
from graphsparse.data import load_dataset, make_loader
from graphsparse.demo.models import DemoPreActResNet, load_demo_model
from graphsparse.deploy import ExportError
from graphsparse.deploy.verify import band_edges
from graphsparse.sources.load import load_model
from graphsparse.sources.recipes import Recipe

pytest.importorskip("onnxruntime")

# Runs an exported file where importing graphsparse fails, independently of graphsparse's own verifier.
_RUNNER = r"""
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "graphsparse":
            raise ImportError("blocked")
sys.meta_path.insert(0, Blocked())
import torch
try:
    import graphsparse
    raise SystemExit("graphsparse was importable")
except ImportError:
    pass
fmt, path, inputs, outputs = sys.argv[1:5]
xs = torch.load(inputs)
if fmt == "onnx":
    import onnxruntime as ort
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ys = [torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]) for x in xs]
else:
    m = torch.export.load(path).module() if fmt == "pt2" else torch.jit.load(path)
    with torch.no_grad():
        ys = [m(x) for x in xs]
torch.save(ys, outputs)
"""


def run_without_graphsparse(fmt, path, batches, tmp_path):
    inputs, outputs = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(batches, inputs)
    done = subprocess.run([sys.executable, "-c", _RUNNER, fmt, str(path), str(inputs), str(outputs)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(outputs)


def _random_stats(model, alpha=0.3):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for op in gs.operators(model).values():
            if isinstance(op, gs.MeanSparse):
                op.mean.copy_(torch.randn(op.mean.shape, generator=g) * 0.1)
                op.var.copy_(torch.rand(op.var.shape, generator=g) + 0.1)
    gs.set_alpha(model, alpha)
    return model


@pytest.fixture(scope="module")
def demo_artifact(tmp_path_factory):
    """The shipped demo model, MeanSparse after every residual addition, calibrated on 500 MNIST-5k images."""
    recipe = Recipe("class", "graphsparse.demo.models:DemoPreActResNet").to_json()
    model = gs.rewrite(load_demo_model(), "full", torch.zeros(1, 1, 28, 28), recipe=recipe)
    train = load_dataset("mnist5k", split="train")
    gs.calibrate(model, make_loader(torch.utils.data.Subset(train, range(500)), 250))
    gs.set_alpha(model, 0.3)
    return gs.save(model, tmp_path_factory.mktemp("demo") / "demo.full.safetensors")


@pytest.fixture(scope="module")
def mnist_test():
    test = load_dataset("mnist5k", split="test")
    return torch.stack([test[i][0] for i in range(64)])


def _check_metadata(meta: dict, artifact, model):
    assert meta["graphsparse.version"] == gs.__version__
    assert meta["graphsparse.artifact_sha256"] == hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert meta["graphsparse.tensors_sha256"] == gs.read_metadata(artifact)["tensors_sha256"]
    assert json.loads(meta["graphsparse.plan"]) == json.loads(gs.read_metadata(artifact)["plan"])
    alphas = {site: float(op.alpha) for site, op in gs.operators(model).items()}
    assert json.loads(meta["graphsparse.alpha"]) == alphas and len(alphas) > 0


def _file_metadata(fmt, path) -> dict:
    """Read the metadata with the format's own tools (not graphsparse's reader)."""
    if fmt == "onnx":
        import onnx

        return {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("extra/graphsparse.json"))
        return json.loads(z.read(name))


@pytest.mark.parametrize("fmt", ["onnx", pytest.param("pt2", marks=pytest.mark.slow),
                                 pytest.param("torchscript", marks=pytest.mark.slow)])
def test_demo_artifact_exports_and_runs_without_graphsparse(fmt, demo_artifact, mnist_test, tmp_path):
    out = tmp_path / f"demo.{fmt}"
    report = gs.export(demo_artifact, out, fmt, input_shape=(16, 1, 28, 28), data="mnist5k", n=32)
    assert out.is_file() and report.verification.passed and report.verification.data_samples == 32
    model = gs.load(demo_artifact)
    batches = list(mnist_test.split(16))
    got = torch.cat(run_without_graphsparse(fmt, out, batches, tmp_path))
    with torch.no_grad():
        want = torch.cat([model(b) for b in batches])
    assert torch.equal(got.argmax(1), want.argmax(1))  # every one of the 64 MNIST-5k test predictions
    if fmt == "onnx":  # another backend: within the stated tolerance (band-edge values aside)
        within = (got - want).abs().amax(1) <= 1e-4 * max(1.0, float(want.abs().max()))
        assert within.float().mean() >= 0.9
    else:  # the same kernels as eager mode: bit for bit
        assert torch.equal(got, want)
    _check_metadata(_file_metadata(fmt, out), demo_artifact, model)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "pt2", "torchscript"])
def test_timm_convnext_artifact_exports_with_a_dynamic_batch(fmt, tmp_path):
    """convnext_atto: channels-last MeanSparse sites in its MLPs, LayerNorm, GELU; any batch size."""
    model, recipe = load_model("timm:convnext_atto")
    rewritten = _random_stats(gs.rewrite(model, "full", torch.randn(1, 3, 32, 32), recipe=recipe.to_json()))
    artifact = gs.save(rewritten, tmp_path / "atto.safetensors")
    out = tmp_path / f"atto.{fmt}"
    report = gs.export(artifact, out, fmt, dynamic_batch=True, data=torch.rand(5, 3, 32, 32))
    assert report.verification.passed and report.input_shape == (None, 3, 32, 32)
    x = [torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))]
    got = run_without_graphsparse(fmt, out, x, tmp_path)[0]
    with torch.no_grad():
        want = rewritten(x[0])
    assert got.shape == (3, 1000) and torch.equal(got.argmax(1), want.argmax(1))
    assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
    _check_metadata(_file_metadata(fmt, out), artifact, rewritten)


@pytest.mark.slow
@pytest.mark.parametrize("name, dtype, fmt", [("resnet18", torch.float16, "onnx"), ("demo", torch.bfloat16, "pt2")])
def test_half_precision_exports(name, dtype, fmt, tmp_path):
    if name == "demo":
        model, x = load_demo_model().to(dtype), torch.rand(2, 1, 28, 28)
    else:
        model, x = timm.create_model(name, num_classes=10).to(dtype), torch.rand(2, 3, 32, 32)
    rewritten = _random_stats(gs.rewrite(model, "full", x.to(dtype)))
    report = gs.export(rewritten, tmp_path / f"m.{fmt}", fmt, data=x)
    assert report.dtype == str(dtype).removeprefix("torch.") and report.verification.passed
    got = run_without_graphsparse(fmt, tmp_path / f"m.{fmt}", [x.to(dtype)], tmp_path)[0]
    assert got.dtype == dtype
    with torch.no_grad():
        assert torch.equal(got.argmax(1), rewritten(x.to(dtype)).argmax(1))


def test_sparta_model_exports_to_pt2_with_a_dynamic_batch_and_refuses_it_elsewhere(tmp_path):
    model = DemoPreActResNet(act="relu", blocks=1).eval()
    rewritten = gs.rewrite(model, "sparta_stage_last", torch.zeros(2, 1, 28, 28))
    report = gs.export(rewritten, tmp_path / "s.pt2", "pt2", dynamic_batch=True, data=torch.rand(3, 1, 28, 28))
    assert report.verification.passed and report.verification.samples == 5
    x = torch.rand(5, 1, 28, 28)
    got = run_without_graphsparse("pt2", tmp_path / "s.pt2", [x], tmp_path)[0]
    with torch.no_grad():
        assert torch.equal(got, rewritten(x))
    with pytest.raises(ExportError, match="dynamic batch is refused for onnx with SPARTA.*--format pt2"):
        gs.export(rewritten, tmp_path / "s.onnx", "onnx", dynamic_batch=True)


def test_a_file_that_computes_something_else_fails_verification_and_is_not_written(tmp_path, monkeypatch):
    rewritten = _random_stats(gs.rewrite(load_demo_model(), "full", torch.zeros(1, 1, 28, 28)), alpha=0.0)
    from graphsparse.deploy import formats

    real = formats.write

    def write_with_another_alpha(fmt, model, *args, **kwargs):
        import copy

        other = copy.deepcopy(model)
        gs.set_alpha(other, 1.0)  # the file gets α = 1, the model has α = 0
        real(fmt, other, *args, **kwargs)

    monkeypatch.setattr(formats, "write", write_with_another_alpha)
    out = tmp_path / "d.torchscript.pt"
    with pytest.raises(ExportError, match="does not compute what the model computes.*Nothing was written"):
        gs.export(rewritten, out, "torchscript", input_shape=(4, 1, 28, 28))
    assert list(tmp_path.iterdir()) == []  # no file, no temp file


def test_band_edge_values_are_counted_per_sample():
    op = gs.MeanSparse(2)
    op.var.fill_(1.0)
    op.alpha.fill_(0.5)  # band |x - 0| <= 0.5
    x = torch.tensor([[0.5, 0.5000001], [0.4, 0.6]]).reshape(2, 2, 1, 1)  # sample 0: two values on the edge
    x = torch.cat([x, -x])  # mirrored: the lower edge
    _, counts, seen = band_edges(op, x, 1e-5)
    assert counts.tolist() == [2, 0, 2, 0] and seen == 8


def test_custom_operators_are_refused():
    class UsesTheLibraryOp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("var", torch.ones(3))

        def forward(self, x):
            mu, thr = torch.ops.graphsparse.mean_and_threshold(self.var, self.var, self.var[0], x.dtype)
            return x + thr.reshape(1, -1, 1, 1)

    with pytest.raises(ExportError, match="outside the standard set: graphsparse.mean_and_threshold"):
        gs.export(UsesTheLibraryOp(), "unused.pt2", "pt2", input_shape=(1, 3, 4, 4), verify=False)


def test_torch_jit_script_compiles_rewritten_models_bit_equal():
    x = torch.randn(2, 3, 32, 32)
    model = _random_stats(gs.rewrite(timm.create_model("resnet18", num_classes=10).eval(), "full", x))
    scripted = torch.jit.script(model)
    assert not [n.kind() for n in scripted.inlined_graph.nodes() if n.kind() == "prim::PythonOp"]
    with torch.no_grad():
        assert torch.equal(scripted(x), model(x))
    for spec in ("gelu", ("gelu", (("approximate", "tanh"),)), ("leaky_relu", (("negative_slope", 0.2),)), None):
        op = gs.MeanSparse(4)
        op.var.fill_(1.0)
        op.alpha.fill_(0.4)
        op.activation = spec
        y = torch.randn(3, 4, 5, 5)
        assert torch.equal(torch.jit.script(op)(y), op(y))


def _one_line_error(res):
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), res.output
    return lines[0]


def test_cli_refusals_are_one_line(tmp_path):
    runner = CliRunner()
    not_artifact = tmp_path / "notes.safetensors"
    not_artifact.write_text("not a model")
    res = runner.invoke(main, ["export", str(not_artifact)], catch_exceptions=False)
    assert "notes.safetensors" in _one_line_error(res)

    model = _random_stats(gs.rewrite(load_demo_model(), "full", torch.zeros(1, 1, 28, 28)))
    artifact = gs.save(model, tmp_path / "d.safetensors")
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    res = runner.invoke(main, ["export", str(artifact), "-o", str(blocked / "d.onnx")], catch_exceptions=False)
    assert "not a writable directory" in _one_line_error(res)
    res = runner.invoke(main, ["export", str(artifact), "--format", "pt2", "--opset", "17"], catch_exceptions=False)
    assert "opset is an ONNX setting" in _one_line_error(res)
    res = runner.invoke(main, ["export", str(artifact), "--format", "tflite"], catch_exceptions=False)
    assert res.exit_code == 2 and "tflite" in res.output
    bf16 = gs.rewrite(load_demo_model().to(torch.bfloat16), "full", torch.zeros(1, 1, 28, 28, dtype=torch.bfloat16))
    with pytest.raises(ExportError, match="bfloat16 model is refused.*--format pt2"):
        gs.export(bf16, tmp_path / "b.onnx", "onnx")
    with pytest.raises(ExportError, match="unknown export format 'onx' \\(did you mean 'onnx'\\?\\)"):
        gs.export(model, tmp_path / "b.onnx", "onx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "d.safetensors", "notes.safetensors"]


def test_cli_export_prints_the_verification(demo_artifact, tmp_path):
    out = tmp_path / "d.torchscript.pt"
    res = CliRunner().invoke(main, ["export", str(demo_artifact), "--format", "torchscript", "-o", str(out),
                                    "--input-shape", "8,1,28,28", "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["path"] == str(out) and report["input_shape"] == [8, 1, 28, 28] and out.is_file()
    assert report["verification"]["passed"] and report["verification"]["samples"] == 8
    assert report["verification"]["max_abs_diff"] == 0.0  # TorchScript: the eager kernels, bit for bit


def test_an_old_opset_goes_through_the_legacy_exporter(tmp_path):
    import onnx

    rewritten = _random_stats(gs.rewrite(load_demo_model(), "full", torch.zeros(1, 1, 28, 28)))
    report = gs.export(rewritten, tmp_path / "d.onnx", "onnx", opset=13, dynamic_batch=True,
                       data=torch.rand(3, 1, 28, 28))
    assert report.verification.passed and report.opset == 13
    proto = onnx.load(str(tmp_path / "d.onnx"))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [13]
    assert json.loads({p.key: p.value for p in proto.metadata_props}["graphsparse.input_shape"]) == [None, 1, 28, 28]
