"""Artifacts: save → load round trip, byte-identical files, tampering and truncation refused, atomic writes."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import timm
import torch

import graphsparse as gs
from graphsparse.artifact.io import _canonical_safetensors, _metadata_digest, read_metadata
from graphsparse.errors import ArtifactError
from graphsparse.sources.load import load_model


@pytest.fixture(scope="module")
def rewritten():
    model, recipe = load_model("timm:resnet10t")
    x = torch.randn(2, 3, 32, 32)
    r = gs.rewrite(model, "full", x, recipe=recipe.to_json())
    g = torch.Generator().manual_seed(0)
    for op in gs.operators(r).values():
        op.mean.copy_(torch.randn(op.mean.shape, generator=g))
        op.var.copy_(torch.rand(op.var.shape, generator=g) + 0.1)
    gs.set_alpha(r, 0.25)
    gs.rewrite_info(r).records["tuning"] = {"alpha": 0.25}
    return r, x


def test_round_trip_outputs_plan_and_tensors(rewritten, tmp_path):
    model, x = rewritten
    path = gs.save(model, tmp_path / "a.safetensors")
    loaded = gs.load(path)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert gs.rewrite_info(loaded).plan.to_json() == gs.rewrite_info(model).plan.to_json()
    assert gs.rewrite_info(loaded).records == {"tuning": {"alpha": 0.25}}
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert all(float(op.alpha) == 0.25 for op in gs.operators(loaded).values())
    meta = read_metadata(path)
    assert json.loads(meta["recipe"])["name"] == "resnet10t"
    assert "after_addition" in meta["plan"] and meta["rules"].startswith("version: 1")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_artifacts_load_as_they_were_saved(tmp_path, dtype):
    make = lambda: timm.create_model("resnet10t", num_classes=10).to(dtype)  # noqa: E731
    x = torch.rand(2, 3, 32, 32).to(dtype)
    model = gs.rewrite(make(), "full", x)
    for op in gs.operators(model).values():
        op.var.fill_(1.0)
    gs.set_alpha(model, 0.1)
    path = gs.save(model, tmp_path / "h.safetensors")
    base = timm.create_model("resnet10t", num_classes=10)  # float32: the artifact decides
    with torch.no_grad():
        for loaded in (gs.load(path), gs.load(path, base=base)):
            assert next(loaded.parameters()).dtype == dtype and torch.equal(loaded(x), model(x))
    assert next(base.parameters()).dtype == torch.float32  # the base passed in is left alone


def test_same_model_gives_byte_identical_files(rewritten, tmp_path):
    model, _ = rewritten
    p1 = gs.save(model, tmp_path / "1.safetensors")
    p2 = gs.save(gs.load(p1), tmp_path / "2.safetensors")
    assert p1.read_bytes() == p2.read_bytes()


def test_load_returns_the_fused_form_and_fused_or_not_writes_the_same_bytes(rewritten, tmp_path):
    """load fuses as rewrite does (fuse=False opts out); the artifact does not depend on the form."""
    model, x = rewritten
    path = gs.save(model, tmp_path / "a.safetensors")
    fused, plain = gs.load(path), gs.load(path, fuse=False)
    assert any(op.activation is not None for op in gs.operators(fused).values())
    assert all(op.activation is None for op in gs.operators(plain).values())
    with torch.no_grad():
        assert torch.equal(fused(x.clone()), plain(x))
    unfused = gs.save(plain, tmp_path / "plain.safetensors").read_bytes()
    assert gs.save(fused, tmp_path / "fused.safetensors").read_bytes() == unfused == path.read_bytes()


def test_saving_under_another_formats_name_warns_and_says_what_the_file_is(rewritten, tmp_path):
    model, _ = rewritten
    with pytest.warns(UserWarning, match=r"safetensors.*a\.safetensors"):
        path = gs.save(model, tmp_path / "a.pt")
    assert path.read_bytes() == gs.save(model, tmp_path / "b.safetensors").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gs.save(model, tmp_path / "C.SafeTensors")


def test_no_pickle_in_the_artifact(rewritten, tmp_path):
    model, _ = rewritten
    data = gs.save(model, tmp_path / "a.safetensors").read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    json.loads(data[8 : 8 + header_len])  # a plain JSON header, then raw tensor bytes
    assert b"\x80\x02" not in data[: 8 + header_len] and b"PK\x03\x04" not in data[:16]


def test_tampered_tensor_bytes_are_refused(rewritten, tmp_path):
    model, _ = rewritten
    path = gs.save(model, tmp_path / "a.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="tensors_sha256"):
        gs.load(path)


def test_tampered_metadata_is_refused(rewritten, tmp_path):
    from safetensors.torch import load_file

    model, _ = rewritten
    path = gs.save(model, tmp_path / "a.safetensors")
    meta = read_metadata(path)
    tampered = meta["plan"].replace('"action": "meansparse"', '"action": "skip"', 1)
    assert tampered != meta["plan"]
    meta["plan"] = tampered
    path.write_bytes(_canonical_safetensors(load_file(path), meta))
    with pytest.raises(ArtifactError, match="metadata_sha256"):
        gs.load(path)


def _resave_with(path, **fields):
    """Rewrite the artifact's metadata fields with a matching digest, as a crafted file would be."""
    from safetensors.torch import load_file

    meta = dict(read_metadata(path), **fields)
    meta["metadata_sha256"] = _metadata_digest(meta)
    path.write_bytes(_canonical_safetensors(load_file(path), meta))


_BAD_SHAPE = "'input_shape' must be a list of at most 8 positive integers"


@pytest.mark.parametrize(
    "field, value, message",
    [("input_shape", v, _BAD_SHAPE) for v in ('["a"]', "[1e12]", '"1,3,32,32"', "[2, 3, 32.5, 32]", "[2, -3, 32]")]
    + [("input_shape", "[true]", _BAD_SHAPE)]
    + [("records", v, "'records' must be a JSON object") for v in ("[1, 2]", '"x"', "5")],
)
def test_malformed_metadata_fields_are_refused_by_name(rewritten, tmp_path, field, value, message):
    model, _ = rewritten
    path = gs.save(model, tmp_path / "a.safetensors")
    _resave_with(path, **{field: value})
    with pytest.raises(ArtifactError, match=message):
        gs.load(path)


def test_oversized_probe_shape_is_refused_before_allocating(rewritten, tmp_path, monkeypatch):
    model, _ = rewritten
    path = gs.save(model, tmp_path / "a.safetensors")
    _resave_with(path, input_shape="[100000, 3, 4096, 4096]")

    def no_allocation(*args, **kwargs):
        raise AssertionError("a probe was allocated")

    monkeypatch.setattr(torch, "zeros", no_allocation)
    with pytest.raises(ArtifactError, match="'input_shape' .* elements"):
        gs.load(path)


def test_truncated_file_is_refused(rewritten, tmp_path):
    model, _ = rewritten
    path = gs.save(model, tmp_path / "a.safetensors")
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(ArtifactError, match="truncated"):
        gs.load(path)


def test_mismatched_base_model_is_refused(rewritten, tmp_path):
    model, _ = rewritten
    path = gs.save(model, tmp_path / "a.safetensors")
    other = timm.create_model("resnet18")
    with pytest.raises(ArtifactError, match="does not match"):
        gs.load(path, base=other)


def test_not_an_artifact(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(ArtifactError, match="not a graphsparse artifact"):
        gs.load(path)


def test_saving_onto_a_directory_names_it(rewritten, tmp_path):
    with pytest.raises(gs.errors.GraphsparseError, match="is a directory; give a file name"):
        gs.save(rewritten[0], tmp_path)


def test_interrupted_save_leaves_previous_file_intact(rewritten, tmp_path, monkeypatch):
    import graphsparse.artifact.io as gio

    model, _ = rewritten
    path = gs.save(model, tmp_path / "a.safetensors")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gio, "_canonical_safetensors", lambda t, m: b"partial" + boom())
    with pytest.raises(KeyboardInterrupt):
        gs.save(model, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_recipe_is_inferred_for_timm_and_plain_classes(tmp_path):
    from graphsparse.demo.models import DemoPreActResNet

    for base, shape in ((timm.create_model("resnet10t", num_classes=7), (1, 3, 32, 32)),
                        (DemoPreActResNet(), (1, 1, 28, 28))):
        x = torch.randn(*shape)
        rewritten = gs.rewrite(base, "after_addition", x)
        loaded = gs.load(gs.save(rewritten, tmp_path / "r.safetensors"))
        with torch.no_grad():
            assert torch.equal(rewritten(x), loaded(x))
    recipe = json.loads(read_metadata(tmp_path / "r.safetensors")["recipe"])
    assert recipe["kind"] == "class" and recipe["name"] == "graphsparse.demo.models:DemoPreActResNet"


@pytest.mark.parametrize(
    "make",
    [
        lambda: timm.create_model("resnet10t", global_pool="max"),  # same weights as the default, other pooling
        lambda: timm.create_model("resnet10t", output_stride=16),
        lambda: __import__("graphsparse.demo.models", fromlist=["x"]).DemoPreActResNet(act="relu"),  # default: gelu
    ],
)
def test_no_recipe_is_inferred_when_the_rebuilt_model_computes_otherwise(tmp_path, make):
    from graphsparse.sources.infer import infer_recipe
    from graphsparse.sources.shapes import default_input_shape

    base = make()
    assert infer_recipe(base) is None
    x = torch.rand(1, *default_input_shape(base)[1:])
    path = gs.save(gs.rewrite(base, "after_addition", x), tmp_path / "r.safetensors")
    with pytest.raises(ArtifactError, match="no base-model recipe"):
        gs.load(path)
    with torch.no_grad():
        assert torch.equal(gs.load(path, base=make())(x), gs.load(path, base=base)(x))
