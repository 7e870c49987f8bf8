"""Model sources: specs, recipes and safe loading of pickled files (DESIGN §3, §5)."""

from __future__ import annotations

import builtins
import functools
import hashlib
import importlib.util
import io
import json
import os
import pickle
import pickletools
import socket
import subprocess
import sys
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from graphsparse.errors import ModelSourceError, UnsafePickleError
from graphsparse.sources.load import build_from_recipe, load_model
from graphsparse.sources.recipes import Recipe
from graphsparse.sources.robustbench import import_robustbench
from graphsparse.sources.shapes import default_input_shape, parse_input_shape

try:  # tests/ may or may not be a package, depending on how pytest was started
    from tests import _user_models
except ImportError:
    import _user_models

TinyNet = _user_models.TinyNet
USER_MODULE = TinyNet.__module__


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing in this module may reach the network (RobustBench and timm would try to download)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"test tried to open a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def timm_model(name: str = "test_resnet", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def same_output(a: nn.Module, b: nn.Module, shape=(2, 3, 64, 64)) -> bool:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def layout(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


class Payload:
    """Unpickling this runs ``func(*args)``: the classic malicious pickle."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


# ------------------------------------------------------------------------------------------ specs


def test_timm_spec_builds_the_architecture_with_options_and_recipe():
    model, recipe = load_model("timm:test_resnet", num_classes=7)
    assert isinstance(model, timm.models.resnet.ResNet)
    assert not model.training
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert recipe == Recipe("timm", "test_resnet", {"num_classes": 7})
    assert recipe.spec() == "timm:test_resnet"


def test_unknown_timm_name_suggests_the_closest():
    with pytest.raises(ModelSourceError, match="did you mean 'resnet18'"):
        load_model("timm:resnet18x")


def test_timm_options_that_would_download_are_refused():
    with pytest.raises(ModelSourceError, match="never lets timm download"):
        load_model("timm:test_resnet", pretrained=True)


def test_class_spec_instantiates_with_kwargs():
    model, recipe = load_model(f"{USER_MODULE}:TinyNet", width=6, num_classes=2)
    assert isinstance(model, TinyNet) and not model.training
    assert model.fc.out_features == 2 and model.conv.out_channels == 6
    assert recipe == Recipe("class", f"{USER_MODULE}:TinyNet", {"width": 6, "num_classes": 2})


def test_class_spec_errors_name_the_problem():
    with pytest.raises(ModelSourceError, match="did you mean 'TinyNet'"):
        load_model(f"{USER_MODULE}:TinyNett")
    with pytest.raises(ModelSourceError, match="not an nn.Module subclass or a function that builds one"):
        load_model(f"{USER_MODULE}:NOT_A_MODEL")
    with pytest.raises(ModelSourceError, match="returned a str, not an nn.Module"):
        load_model(f"{USER_MODULE}:make_nothing")
    with pytest.raises(ModelSourceError, match="cannot import module 'no_such_pkg.models'"):
        load_model("no_such_pkg.models:Net")
    with pytest.raises(ModelSourceError, match="constructing .*TinyNet.* failed"):
        load_model(f"{USER_MODULE}:TinyNet", depth=3)


def test_torchvision_spec_builds_the_architecture_and_a_recipe_that_rebuilds_it():
    torchvision = pytest.importorskip("torchvision")
    model, recipe = load_model("torchvision:resnet18", num_classes=7)
    assert isinstance(model, torchvision.models.ResNet) and not model.training
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert recipe == Recipe("torchvision", "resnet18", {"num_classes": 7})
    assert recipe.spec() == "torchvision:resnet18"
    rebuilt = build_from_recipe(Recipe.from_json(recipe.to_json()))
    assert type(rebuilt) is type(model) and layout(rebuilt) == layout(model)
    with pytest.raises(ModelSourceError, match="did you mean 'resnet18'"):
        load_model("torchvision:resnet18x")
    with pytest.raises(ModelSourceError, match="does not accept the options"):
        load_model("torchvision:resnet18", depth=3)
    for options in ({"weights": "DEFAULT"}, {"weights_backbone": "DEFAULT"}):  # a recipe read from an artifact
        with pytest.raises(ModelSourceError, match="never downloads"):
            Recipe("torchvision", "resnet18", options)


def test_torchvision_weights_stay_possible_but_are_not_recorded(monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    seen = {}

    def builder(name, **config):  # stands in for the download, which needs internet
        seen.update(config)
        return torchvision.models.resnet18()

    monkeypatch.setattr(torchvision.models, "get_model", builder)
    _, recipe = load_model("torchvision:resnet18", weights="DEFAULT", num_classes=1000)
    assert seen == {"weights": "DEFAULT", "num_classes": 1000}
    assert recipe == Recipe("torchvision", "resnet18", {"num_classes": 1000})
    # a builder function named as pkg.module:function: the same, and its artifact's recipe reloads
    calls = []
    monkeypatch.setattr(_user_models, "make_tiny", lambda **kw: calls.append(kw) or TinyNet())
    _, recipe = load_model(f"{USER_MODULE}:make_tiny", weights="DEFAULT", width=4)
    assert calls == [{"width": 4, "weights": "DEFAULT"}]
    assert recipe == Recipe("class", f"{USER_MODULE}:make_tiny", {"width": 4})


@pytest.mark.slow
def test_a_torchvision_model_gets_a_torchvision_recipe(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from graphsparse.artifact.io import load, save
    from graphsparse.planning.rewrite import rewrite
    from graphsparse.sources.infer import infer_recipe

    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(num_classes=5).eval()
    assert infer_recipe(model) == Recipe("torchvision", "squeezenet1_1", {"num_classes": 5})
    torch.save(model, tmp_path / "squeeze.pt")
    assert load_model(tmp_path / "squeeze.pt")[1] == Recipe("torchvision", "squeezenet1_1", {"num_classes": 5})
    # a notebook's torchvision model: the artifact reloads without base= (its recipe was inferred)
    x = torch.zeros(1, 3, 64, 64)
    save(rewrite(model, "before_activations", x), tmp_path / "squeeze.safetensors")
    assert same_output(load(tmp_path / "squeeze.safetensors"), model)


def test_builder_functions_are_a_model_source():
    torchvision = pytest.importorskip("torchvision")
    model, recipe = load_model("torchvision.models:resnet18", num_classes=3)
    assert isinstance(model, torchvision.models.ResNet) and model.fc.out_features == 3
    assert recipe == Recipe("class", "torchvision.models:resnet18", {"num_classes": 3})
    assert layout(build_from_recipe(recipe)) == layout(model)  # a registered builder: trusted from an artifact
    for options in ({"weights": "DEFAULT"}, {"weights_backbone": "DEFAULT"}):  # but never to download
        with pytest.raises(ModelSourceError, match="download or read weights"):
            build_from_recipe(Recipe("class", "torchvision.models:resnet18", options))
    with pytest.raises(ModelSourceError, match="download or read weights"):
        build_from_recipe(Recipe("class", "timm.models.resnet:resnet18", {"pretrained": True}))
    model, recipe = load_model(f"{USER_MODULE}:make_tiny", width=5)
    assert isinstance(model, TinyNet) and model.conv.out_channels == 5
    with pytest.raises(ModelSourceError, match="not in a trusted package.*--allow-module"):
        build_from_recipe(recipe)  # a user's function needs trust, like a user's class
    assert layout(build_from_recipe(recipe, allow_modules=[USER_MODULE])) == layout(model)
    from graphsparse.demo.models import load_demo_model

    model, recipe = load_model("graphsparse.demo.models:load_demo_model")
    assert same_output(model, load_demo_model(), shape=(2, 1, 28, 28))  # the shipped trained weights
    assert same_output(build_from_recipe(recipe), model, shape=(2, 1, 28, 28))


def test_the_demo_class_warns_that_it_has_random_weights():
    with pytest.warns(UserWarning, match="random weights.*graphsparse.demo.models:load_demo_model"):
        load_model("graphsparse.demo.models:DemoPreActResNet")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model("graphsparse.demo.models:load_demo_model")
        build_from_recipe(Recipe("class", "graphsparse.demo.models:DemoPreActResNet"))  # an artifact has weights


@pytest.mark.slow
def test_artifacts_of_torchvision_and_builder_sources_reload(tmp_path):
    pytest.importorskip("torchvision")
    from click.testing import CliRunner

    from graphsparse.artifact.io import load, save
    from graphsparse.cli import main
    from graphsparse.planning.rewrite import rewrite, rewrite_info

    out = tmp_path / "r18.safetensors"
    result = CliRunner().invoke(
        main,
        ["rewrite", "torchvision:resnet18", "--rule", "after_addition", "--input-shape", "1,3,32,32", "-o", str(out)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert Recipe.from_json(rewrite_info(load(out)).recipe) == Recipe("torchvision", "resnet18", {})
    base, recipe = load_model("torchvision:resnet18")
    rewritten = rewrite(base, "after_addition", torch.zeros(1, 3, 32, 32), recipe=recipe.to_json())
    save(rewritten, tmp_path / "api.safetensors")
    assert same_output(load(tmp_path / "api.safetensors"), base, shape=(2, 3, 32, 32))  # α = 0: identical
    demo, recipe = load_model("graphsparse.demo.models:load_demo_model")
    rewritten = rewrite(demo, "full", torch.zeros(1, 1, 28, 28), recipe=recipe.to_json())
    save(rewritten, tmp_path / "demo.safetensors")
    assert same_output(load(tmp_path / "demo.safetensors"), demo, shape=(2, 1, 28, 28))


def test_cli_constructor_options_reach_the_model_and_its_recipe(tmp_path):
    from click.testing import CliRunner

    from graphsparse.artifact.io import load
    from graphsparse.cli import main
    from graphsparse.planning.rewrite import rewrite_info

    out = tmp_path / "r.safetensors"
    args = ["rewrite", "timm:test_resnet", "--rule", "after_addition", "--input-shape", "1,3,32,32", "-o", str(out)]
    options = ["--num-classes", "10", "--model-kwargs", '{"drop_rate": 0.1}']
    result = CliRunner().invoke(main, args + options, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    model = load(out)
    recipe = Recipe.from_json(rewrite_info(model).recipe)
    assert recipe == Recipe("timm", "test_resnet", {"num_classes": 10, "drop_rate": 0.1})
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    bad = CliRunner().invoke(main, args + ["--model-kwargs", "{drop_rate: 0.1}"])
    assert bad.exit_code == 2 and "--model-kwargs" in bad.output and "not JSON" in bad.output
    both = CliRunner().invoke(main, args + ["--num-classes", "10", "--model-kwargs", '{"num_classes": 3}'])
    assert both.exit_code == 1 and "disagree" in both.output
    prefix = CliRunner().invoke(main, args + ["--strip-prefix", "model."])
    assert prefix.exit_code == 1 and "only applies to weights files" in prefix.output


def test_cli_reaches_the_shipped_demo_model_and_warns_about_the_bare_class():
    from click.testing import CliRunner

    from graphsparse.cli import main

    bare = CliRunner().invoke(main, ["inspect", "graphsparse.demo.models:DemoPreActResNet", "--json"])
    assert bare.exit_code == 0 and "warning: graphsparse.demo.models:DemoPreActResNet builds" in bare.output
    trained = CliRunner().invoke(main, ["inspect", "graphsparse.demo.models:load_demo_model", "--json"])
    assert trained.exit_code == 0 and "warning" not in trained.output


def test_the_readme_demo_command_names_the_trained_model():
    import pathlib
    import re

    from graphsparse.demo.models import load_demo_model

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    specs = re.findall(r"graphsparse rewrite (graphsparse\.demo\.models:\w+)", readme)
    assert specs, "the README shows no rewrite of the demo model"
    for spec in specs:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the bare class warns: random weights
            model, _ = load_model(spec)
        assert same_output(model, load_demo_model(), shape=(2, 1, 28, 28)), spec


def test_unrecognised_spec_lists_the_accepted_forms():
    with pytest.raises(ModelSourceError, match="accepted forms: 'timm:NAME'.*pkg.module:Class.*safetensors"):
        load_model("resnet_of_mine")
    with pytest.raises(ModelSourceError, match="name the library, e.g. timm:resnet18 or torchvision:resnet18"):
        load_model("resnet18")
    with pytest.raises(ModelSourceError, match="no such file"):
        load_model("runs/best.pth.tar")
    with pytest.raises(ModelSourceError, match="does not exist"):
        load_model("missing_model.pt")
    with pytest.raises(ModelSourceError, match="only applies to weights files"):
        load_model("timm:test_resnet", arch="timm:test_resnet")


# ------------------------------------------------------------------------------------------ files


def test_whole_pickled_timm_model_loads_with_equal_outputs_and_a_timm_recipe(tmp_path):
    original = timm_model(num_classes=5)
    torch.save(original, tmp_path / "model.pt")
    model, recipe = load_model(tmp_path / "model.pt")
    assert type(model) is type(original) and not model.training
    assert same_output(model, original)
    assert recipe == Recipe("timm", "test_resnet", {"num_classes": 5, "in_chans": 3})


def test_whole_timm_model_whose_recipe_would_not_rebuild_gets_a_file_recipe(tmp_path):
    original = timm_model(stem_width=24)  # an option the recipe cannot discover: layout differs
    path = tmp_path / "model.pth"
    torch.save(original, path)
    model, recipe = load_model(path)
    assert recipe.kind == "file" and recipe.name == str(path.resolve())
    assert recipe.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert same_output(build_from_recipe(recipe), original)


def test_state_dict_needs_arch_and_then_loads(tmp_path):
    original = timm_model(num_classes=4)
    torch.save(original.state_dict(), tmp_path / "weights.pth")
    with pytest.raises(ModelSourceError, match="state dict .*--arch timm:NAME"):
        load_model(tmp_path / "weights.pth")
    model, recipe = load_model(tmp_path / "weights.pth", arch="timm:test_resnet", num_classes=4)
    assert same_output(model, original)
    assert recipe == Recipe("timm", "test_resnet", {"num_classes": 4})
    # the legacy (pre-zip) format is read too: its pickles are vetted by pickletools instead
    torch.save(original.state_dict(), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    model, _ = load_model(tmp_path / "legacy.pth", arch="timm:test_resnet", num_classes=4)
    assert same_output(model, original)


def test_checkpoint_dict_with_ddp_prefix(tmp_path):
    original = timm_model()
    state = {f"module.{k}": v for k, v in original.state_dict().items()}
    torch.save({"epoch": 12, "best_acc": 0.5, "state_dict": state, "optimizer": {}}, tmp_path / "ckpt.ckpt")
    model, _ = load_model(tmp_path / "ckpt.ckpt", arch="timm:test_resnet")
    assert same_output(model, original)


def test_wrong_arch_lists_missing_and_unexpected_keys(tmp_path):
    torch.save(timm_model().state_dict(), tmp_path / "weights.bin")
    with pytest.raises(ModelSourceError) as info:
        load_model(tmp_path / "weights.bin", arch=f"{USER_MODULE}:TinyNet")
    message = str(info.value)
    assert "missing: conv.weight" in message and "90 unexpected: conv1.0.weight" in message
    assert "weights.bin" in message and "--arch" in message
    with pytest.raises(ModelSourceError, match=r"another shape .*fc.weight \(1000, 96\) vs \(10, 96\)"):
        load_model(tmp_path / "weights.bin", arch="timm:test_resnet", num_classes=10)


def test_safetensors_state_dict_with_arch(tmp_path):
    original = timm_model(num_classes=3)
    save_file(original.state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelSourceError, match="--arch"):
        load_model(tmp_path / "w.safetensors")
    model, recipe = load_model(tmp_path / "w.safetensors", arch="timm:test_resnet", num_classes=3)
    assert same_output(model, original)
    assert recipe.kind == "timm"


def test_truncated_and_garbage_files_raise_model_source_errors(tmp_path):
    torch.save(timm_model().state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint at all")
    save_file({"w": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:-5])
    for name in ("cut.pt", "junk.pth", "cut.safetensors"):
        with pytest.raises(ModelSourceError, match=name) as info:
            load_model(tmp_path / name, arch="timm:test_resnet")
        assert not isinstance(info.value, UnsafePickleError)


# ------------------------------------------------------------------------------------------ safety


def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = Payload(os.system, f"touch {marker}")
    # the payload is real: plain pickle runs it
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(Payload(os.system, f"touch {proof}")))
    assert proof.exists()

    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": payload}, tmp_path / "evil.pt")
    torch.save(payload, tmp_path / "evil_p4.pt", pickle_protocol=4)  # zip, but STACK_GLOBAL inside
    with open(tmp_path / "evil_plain.pth", "wb") as f:  # plain pickle, protocol 5 (STACK_GLOBAL)
        pickle.dump(Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"), f, protocol=5)

    with pytest.raises(UnsafePickleError) as info:
        load_model(tmp_path / "evil.pt", arch="timm:test_resnet")
    message = str(info.value)
    assert f"{os.system.__module__}.system" in message and "Nothing in the file was executed" in message
    assert "--allow-module" in message and "evil.pt" in message

    with pytest.raises(UnsafePickleError, match=f"{os.system.__module__}.system: package"):
        load_model(tmp_path / "evil_p4.pt")
    with pytest.raises(UnsafePickleError, match="builtins.exec: package 'builtins' is not trusted"):
        load_model(tmp_path / "evil_plain.pth")
    # allowing the package does not allow a function
    with pytest.raises(UnsafePickleError, match="a function, not a class"):
        load_model(tmp_path / "evil_plain.pth", allow_modules=["builtins"])
    assert not marker.exists()


def test_trusted_package_functions_are_refused_except_tensor_ops(tmp_path):
    torch.save(Payload(torch.hub.load, "someone/repo", "model"), tmp_path / "hub.pt")
    with pytest.raises(UnsafePickleError, match="torch.hub.load"):
        load_model(tmp_path / "hub.pt")
    torch.save(Payload(torch.load, "other.pt"), tmp_path / "load.pt")
    with pytest.raises(UnsafePickleError, match="torch.serialization.load: a function, not a class"):
        load_model(tmp_path / "load.pt")
    # a path that walks through a module attribute does not reach torch.hub.load either
    raw = b"\x80\x02ctorch.nn.functional\ntorch.hub.load\nX\x01\x00\x00\x00a\x85R."
    (tmp_path / "walk.pt").write_bytes(raw)
    walked = r"torch\.nn\.functional\.torch\.hub\.load: cannot be imported"
    with pytest.raises(UnsafePickleError, match=walked):
        load_model(tmp_path / "walk.pt")


def test_trusted_package_classes_that_are_not_modules_are_refused(tmp_path):
    # torch.serialization._open_file(path, "wb") truncates the file: a class defined in torch, built with
    # the pickle's own arguments
    victim, proof = tmp_path / "victim.txt", tmp_path / "proof.txt"
    victim.write_text("precious")
    proof.write_text("precious")
    opener = torch.serialization._open_file
    pickle.loads(pickle.dumps(Payload(opener, str(proof), "wb")))  # the payload is real
    assert proof.read_text() == ""
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Payload(opener, str(victim), "wb")}, tmp_path / "t.pt")
    with pytest.raises(UnsafePickleError, match="torch.serialization._open_file: neither a module nor an enum"):
        load_model(tmp_path / "t.pt", arch="timm:test_resnet")
    assert victim.read_text() == "precious"


def test_modules_derived_from_code_generating_packages_are_refused(tmp_path):
    from torchvision.models.feature_extraction import DualGraphModule  # an fx GraphModule subclass

    (tmp_path / "g.pt").write_bytes(pickle.dumps(DualGraphModule, protocol=2))
    derives = r"DualGraphModule: it derives from torch\.fx\.graph_module\.GraphModule"
    with pytest.raises(UnsafePickleError, match=derives):
        load_model(tmp_path / "g.pt")
    recipe = Recipe("class", "torchvision.models.feature_extraction:DualGraphModule", {})
    with pytest.raises(ModelSourceError, match="refused: it derives from torch.fx"):
        build_from_recipe(recipe)
    # timm's distillation teacher downloads or reads the pretrained model it is told to
    teacher = Recipe("class", "timm.task.distillation:DistillationTeacher", {"model_name_or_module": "resnet18"})
    with pytest.raises(ModelSourceError, match="refused: it is timm.task.distillation.DistillationTeacher"):
        build_from_recipe(teacher)


# A pickle may build a module only as torch.save does, without running its constructor: a constructor runs
# with the file's own arguments, and some download or read files.
_RUNS_A_CONSTRUCTOR = "torch.nn.modules.linear.Linear: the file has its constructor run"


def test_a_module_class_called_directly_is_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "m": Payload(nn.Linear, 2, 2)}, tmp_path / "direct.pt")
    with pytest.raises(UnsafePickleError, match=_RUNS_A_CONSTRUCTOR):
        load_model(tmp_path / "direct.pt", arch="timm:test_resnet")


def test_a_module_class_handed_to_a_call_is_refused(tmp_path):
    # torch's own allowed rebuild function _rebuild_from_type_v2(func, new_type, args, state) calls func(*args)
    rebuild = torch._tensor._rebuild_from_type_v2
    torch.save(Payload(rebuild, nn.Linear, torch.Tensor, (2, 2), {}), tmp_path / "rebuild.pt")
    with pytest.raises(UnsafePickleError, match=_RUNS_A_CONSTRUCTOR):
        load_model(tmp_path / "rebuild.pt")
    # a list memoized while empty, filled with the class, then handed to a function through the memo
    raw = (
        b"\x80\x02]q\x00(ctorch.nn.modules.linear\nLinear\ne0"  # EMPTY_LIST BINPUT 0 MARK GLOBAL APPENDS POP
        b"ctimm.layers\ncreate_norm_layer\nh\x00K\x02\x86R."  # GLOBAL BINGET 0 BININT1 2 TUPLE2 REDUCE STOP
    )
    pickletools.dis(raw, out=io.StringIO())  # a well-formed pickle (dis checks the stack and memo)
    (tmp_path / "memo.pt").write_bytes(raw)
    with pytest.raises(UnsafePickleError, match=_RUNS_A_CONSTRUCTOR):
        load_model(tmp_path / "memo.pt")


def test_a_callee_of_an_untrusted_module_is_not_imported_to_be_vetted(tmp_path, monkeypatch):
    # the file calls a function of a module that is never imported here, with a trusted class as argument:
    # deciding whether that callee calls its argument must not import the module
    raw = b"\x80\x02cgs_never_imported_mod\nf\nctorch.nn.modules.linear\nLinear\n\x85R."
    (tmp_path / "callee.pt").write_bytes(raw)
    imported = []
    real_import = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real_import(name, *a))
    with pytest.raises(UnsafePickleError, match="gs_never_imported_mod.f: package 'gs_never_imported_mod'"):
        load_model(tmp_path / "callee.pt")
    assert not any(name.startswith("gs_never_imported_mod") for name in imported)


def test_classes_enums_and_partials_held_as_values_load(tmp_path):
    from timm.layers import Format

    model = nn.Sequential(nn.Linear(2, 2))
    model.act_layer, model.fmt = nn.GELU, Format.NHWC  # a class as a value; an enum member (called)
    model.norm = functools.partial(nn.LayerNorm, eps=1e-6)  # a partial holds, and does not call, its class
    torch.save(model, tmp_path / "values.pt")
    loaded, _ = load_model(tmp_path / "values.pt", allow_modules=["functools.partial"])
    assert loaded.act_layer is nn.GELU and loaded.fmt is Format.NHWC
    assert loaded.norm.func is nn.LayerNorm and loaded.norm.keywords == {"eps": 1e-6}


def test_model_holding_a_functional_activation_loads(tmp_path):
    class_free = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    class_free.gate = torch.nn.functional.silu  # a function stored on a module
    torch.save(class_free, tmp_path / "seq.pt")
    model, recipe = load_model(tmp_path / "seq.pt")
    assert model.gate is torch.nn.functional.silu and recipe.kind == "file"


def test_allow_modules_admits_a_user_class(tmp_path):
    torch.manual_seed(0)
    original = TinyNet().eval()
    torch.save(original, tmp_path / "tiny.pt")
    with pytest.raises(UnsafePickleError) as info:
        load_model(tmp_path / "tiny.pt")
    assert f"{USER_MODULE}.TinyNet" in str(info.value)
    assert f"--allow-module {USER_MODULE.split('.')[0]}" in str(info.value)
    model, recipe = load_model(tmp_path / "tiny.pt", allow_modules=[USER_MODULE])
    assert isinstance(model, TinyNet) and same_output(model, original, shape=(2, 1, 8, 8))
    assert recipe.kind == "file"
    assert same_output(build_from_recipe(recipe, allow_modules=[USER_MODULE]), original, shape=(2, 1, 8, 8))


# ------------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize(
    "recipe",
    [
        Recipe("timm", "resnet18", {"num_classes": 10, "in_chans": 1}),
        Recipe("robustbench", "Carmon2019Unlabeled", {"dataset": "cifar10", "threat_model": "Linf"}),
        Recipe("class", "mypkg.models:Net", {"widths": [16, 32], "act": "relu", "p": 0.5, "bn": None}),
        Recipe("file", "/models/a.pt", {}, sha256="ab" * 32),
    ],
)
def test_recipe_json_round_trip(recipe):
    text = recipe.to_json()
    assert Recipe.from_json(text) == recipe
    assert json.loads(text)["kind"] == recipe.kind


def test_recipe_validation():
    assert Recipe("class", "m:C", {"shape": (1, 2)}).kwargs == {"shape": [1, 2]}  # normalised via JSON
    with pytest.raises(ModelSourceError, match="did you mean 'kwargs'"):
        Recipe.from_json('{"kind": "timm", "name": "resnet18", "kwarg": {}}')
    with pytest.raises(ModelSourceError, match="did you mean 'timm'"):
        Recipe.from_json('{"kind": "tim", "name": "resnet18"}')
    with pytest.raises(ModelSourceError, match="not valid JSON"):
        Recipe.from_json("{kind: timm")
    with pytest.raises(ModelSourceError, match="JSON values"):
        Recipe("timm", "resnet18", {"act_layer": nn.ReLU})
    with pytest.raises(ModelSourceError, match="sha256"):
        Recipe("file", "a.pt", {})
    with pytest.raises(ModelSourceError, match="dataset 'mnist'"):
        Recipe("robustbench", "X", {"dataset": "mnist", "threat_model": "Linf"})
    assert Recipe("robustbench", "X", {"dataset": "cifar100", "threat_model": "L2"}).spec() == (
        "robustbench:X@cifar100/L2"
    )


def test_build_from_recipe_reproduces_the_architecture():
    model, recipe = load_model("timm:test_resnet", num_classes=5, in_chans=1)
    rebuilt = build_from_recipe(Recipe.from_json(recipe.to_json()))
    assert layout(rebuilt) == layout(model) and type(rebuilt) is type(model)
    user, user_recipe = load_model(f"{USER_MODULE}:TinyNet", width=5)
    assert layout(build_from_recipe(user_recipe, allow_modules=[USER_MODULE])) == layout(user)


def test_class_recipe_from_an_artifact_needs_a_trusted_module():
    recipe = Recipe("class", f"{USER_MODULE}:TinyNet", {})
    with pytest.raises(ModelSourceError, match="not in a trusted package.*nothing was imported"):
        build_from_recipe(recipe)
    with pytest.raises(ModelSourceError, match="not in a trusted package"):
        build_from_recipe(Recipe("class", "subprocess:Popen", {"args": ["true"]}))
    with pytest.raises(ModelSourceError, match="not an nn.Module subclass or a registered model builder"):
        build_from_recipe(Recipe("class", "torch.hub:load", {}))  # a trusted package's function that is no builder


def test_file_recipe_detects_a_changed_file(tmp_path):
    path = tmp_path / "seq.pt"
    torch.save(nn.Sequential(nn.Linear(2, 2)), path)
    _, recipe = load_model(path)
    assert isinstance(build_from_recipe(recipe), nn.Sequential)
    torch.save(nn.Sequential(nn.Linear(2, 3)), path)
    with pytest.raises(ModelSourceError, match="changed since the recipe was written"):
        build_from_recipe(recipe)


# ------------------------------------------------------------------------------------------ shapes


def test_parse_input_shape():
    assert parse_input_shape("1,3,224,224") == (1, 3, 224, 224)
    assert parse_input_shape(" 2, 1, 28, 28 ") == (2, 1, 28, 28)
    assert parse_input_shape("1x3x32x32") == (1, 3, 32, 32)
    for bad in ("", "1,3,a,4", "1,-3,4,4", "224", "1,,3"):
        with pytest.raises(ModelSourceError, match="1,3,224,224"):
            parse_input_shape(bad)


def test_default_input_shape():
    assert default_input_shape(timm_model()) == (1, 3, 160, 160)
    assert default_input_shape(timm_model(in_chans=1)) == (1, 1, 160, 160)
    assert default_input_shape(TinyNet()) == (1, 1, 224, 224)
    from graphsparse.demo.models import DemoPreActResNet  # declares default_input_size = (1, 28, 28)

    assert default_input_shape(DemoPreActResNet()) == (1, 1, 28, 28)
    assert default_input_shape(DemoPreActResNet(in_chans=3)) == (1, 3, 28, 28)
    cifar = Recipe("robustbench", "Standard", {"dataset": "cifar10", "threat_model": "Linf"})
    assert default_input_shape(nn.Conv2d(3, 4, 3), recipe=cifar) == (1, 3, 32, 32)


# ------------------------------------------------------------------------------------------ robustbench


@pytest.fixture
def robustbench():
    try:
        return import_robustbench()
    except ModelSourceError as e:  # pragma: no cover - CI installs it
        pytest.skip(str(e))


def test_import_robustbench_aliases_autoattack(monkeypatch):
    if importlib.util.find_spec("robustbench") is None:  # pragma: no cover - CI installs it
        pytest.skip("robustbench not installed")
    pyautoattack = pytest.importorskip("pyautoattack")
    monkeypatch.delitem(sys.modules, "autoattack", raising=False)
    module = import_robustbench()
    assert module.__name__ == "robustbench" and "robustbench.utils" in sys.modules
    if sys.modules["autoattack"] is not pyautoattack:  # the GitHub AutoAttack is installed
        assert hasattr(sys.modules["autoattack"], "AutoAttack")


@pytest.mark.slow
def test_robustbench_classes_load_in_a_fresh_process(tmp_path, robustbench):
    # a fresh interpreter has no 'autoattack' alias yet: importing a robustbench module by name needs it
    script = f"""
import torch
from graphsparse.sources.load import build_from_recipe, load_model
spec = "robustbench.model_zoo.architectures.dm_wide_resnet:DMWideResNet"
model, recipe = load_model(spec, depth=10, width=1)
torch.save(model.state_dict(), {str(tmp_path / "dm.pt")!r})
print(type(model).__name__, recipe)
"""
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "DMWideResNet robustbench.model_zoo.architectures.dm_wide_resnet:DMWideResNet" in first.stdout
    script = f"""
from graphsparse.sources.load import build_from_recipe, load_model
from graphsparse.sources.recipes import Recipe
spec = "robustbench.model_zoo.architectures.dm_wide_resnet:DMWideResNet"
model, recipe = load_model({str(tmp_path / "dm.pt")!r}, arch=spec, depth=10, width=1)
print(type(model).__name__, type(build_from_recipe(Recipe("class", spec, {{"depth": 10, "width": 1}}))).__name__)
"""
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.split() == ["DMWideResNet", "DMWideResNet"]


def test_missing_robustbench_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "robustbench", None)
    with pytest.raises(ModelSourceError, match=r"pip install --no-deps robustbench==1\.1\.1"):
        import_robustbench()
    with pytest.raises(ModelSourceError, match="not installed"):
        load_model("robustbench:Carmon2019Unlabeled")


def test_robustbench_unknown_id_and_missing_weights(tmp_path, robustbench):
    with pytest.raises(ModelSourceError, match="did you mean 'Carmon2019Unlabeled'"):
        load_model("robustbench:Carmon2019Unlabelled", model_dir=tmp_path)
    with pytest.raises(ModelSourceError, match="threat model 'Linfinity'"):
        load_model("robustbench:Carmon2019Unlabeled@cifar10/Linfinity")
    expected = tmp_path / "cifar100" / "Linf" / "Addepalli2022Efficient_RN18.pt"
    with pytest.raises(ModelSourceError, match="not on disk") as info:
        load_model("robustbench:Addepalli2022Efficient_RN18@cifar100/Linf", model_dir=tmp_path)
    assert str(expected) in str(info.value) and "never downloads" in str(info.value)
    with pytest.raises(ModelSourceError, match="Hugging Face hub as timm model"):
        load_model("robustbench:Debenedetti2022Light_XCiT-S12", model_dir=tmp_path)


def test_robustbench_weights_on_disk_load(tmp_path, robustbench):
    where = {"dataset": "cifar100", "threat_model": "Linf"}
    recipe = Recipe("robustbench", "Addepalli2022Efficient_RN18", where)
    torch.manual_seed(0)
    reference = build_from_recipe(recipe)
    target = tmp_path / "cifar100" / "Linf" / "Addepalli2022Efficient_RN18.pt"
    target.parent.mkdir(parents=True)
    torch.save({"state_dict": reference.state_dict()}, target)
    model, got = load_model(recipe.spec(), model_dir=tmp_path)
    assert got == recipe and not model.training
    assert same_output(model, reference, shape=(2, 3, 32, 32))
    assert default_input_shape(model, recipe=got) == (1, 3, 32, 32)
    # the CLI's --model-dir, which the missing-weights message names
    from click.testing import CliRunner

    from graphsparse.cli import main

    spec = "robustbench:Addepalli2022Efficient_RN18@cifar100/Linf"
    missing = CliRunner().invoke(main, ["inspect", spec, "--model-dir", str(tmp_path / "elsewhere")])
    assert missing.exit_code == 1 and "(--model-dir)" in missing.output
    found = CliRunner().invoke(main, ["inspect", spec, "--model-dir", str(tmp_path), "--json"])
    assert found.exit_code == 0, found.output
