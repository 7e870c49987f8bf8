"""Hugging Face ``transformers`` image classifiers as model sources: the ``transformers`` recipe (class + config,
rebuilt at random init, never from the hub), the ``transformers:MODEL_TYPE`` and ``hf:ORG/NAME`` specs, and the
refusal of anything but transformers' image classification classes.

Models are small random configs (graphsparse.testing.architectures.huggingface_classifiers, or written here).
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from graphsparse.artifact.io import load, read_metadata, save  # noqa: E402
from graphsparse.cli import main  # noqa: E402
from graphsparse.errors import ArtifactError, ModelSourceError  # noqa: E402
from graphsparse.planning.rewrite import rewrite  # noqa: E402
from graphsparse.sources.load import build_from_recipe, load_model  # noqa: E402
from graphsparse.sources.recipes import Recipe  # noqa: E402
from graphsparse.sources.shapes import default_input_shape  # noqa: E402
from graphsparse.testing.architectures import huggingface_classifiers  # noqa: E402

FAMILIES = huggingface_classifiers()
pytestmark = pytest.mark.usefixtures("one_thread")

# a ViT of 2 layers, 32 channels, on 32x32 images: the options a user gives as --model-kwargs
VIT = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
       "image_size": 32, "patch_size": 8}


@pytest.mark.parametrize("family", ["vit", "convnext", "swin", "resnet"])
def test_artifact_of_a_transformers_model_loads_without_base(family, tmp_path):
    build, shape = FAMILIES[family]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(*shape)
    rewritten = rewrite(model, "full", x)
    save(rewritten, tmp_path / "m.safetensors")
    recipe = Recipe.from_json(read_metadata(tmp_path / "m.safetensors")["recipe"])
    assert (recipe.kind, recipe.name) == ("transformers", type(model).__name__)
    assert recipe.kwargs["model_type"] == model.config.model_type
    torch.manual_seed(1)  # the rebuilt model's random init differs: the artifact's weights must be loaded
    loaded = load(tmp_path / "m.safetensors")
    with torch.no_grad():
        expected = rewritten(x).logits
        assert torch.equal(loaded(x).logits, expected)
        assert torch.equal(expected, model(x).logits)  # α = 0 before calibration: the base model's output


def test_transformers_spec_builds_the_config_it_is_given():
    model, recipe = load_model("transformers:vit", num_classes=5, **VIT)
    assert type(model) is transformers.ViTForImageClassification
    assert model.config.num_labels == 5 and model.config.num_hidden_layers == 2 and not model.training
    assert recipe.kind == "transformers" and recipe.spec() == "transformers:ViTForImageClassification"
    # the class name is a spec too, and the recipe rebuilds the same layout
    by_class, _ = load_model("transformers:ViTForImageClassification", **VIT)
    rebuilt = build_from_recipe(Recipe.from_json(recipe.to_json()))
    layout = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == layout
    assert by_class.config.num_labels == 2  # transformers' default without num_classes
    assert default_input_shape(model) == (1, 3, 32, 32)  # the config's image size, not 224


@pytest.mark.parametrize(
    ("spec", "options", "says"),
    [
        ("transformers:vitt", {}, "did you mean 'vit'"),
        ("transformers:vit", {"num_hiden_layers": 2}, "did you mean 'num_hidden_layers'"),
        ("transformers:AutoModel", {}, "neither a Hugging Face image classification model type"),
        ("transformers:vit", {"trust_remote_code": True}, "'trust_remote_code' is not accepted"),
    ],
)
def test_transformers_spec_mistakes_are_named(spec, options, says):
    with pytest.raises(ModelSourceError, match=says):
        load_model(spec, **options)


def _vit_recipe() -> Recipe:
    return load_model("transformers:vit", **VIT)[1]


@pytest.mark.parametrize(
    "name", ["AutoTokenizer", "PreTrainedModel", "ViTModel", "pipeline", "TimmWrapperForImageClassification"]
)
def test_recipe_naming_a_transformers_class_that_is_not_an_image_classifier_is_refused(name):
    recipe = Recipe("transformers", name, _vit_recipe().kwargs)
    with pytest.raises(ModelSourceError, match="not a Hugging Face image classification model class"):
        build_from_recipe(recipe)


@pytest.mark.parametrize("name", ["os:system", "torch.nn.Linear", "transformers.ViTForImageClassification"])
def test_recipe_naming_another_package_or_a_path_is_refused_before_any_import(name):
    with pytest.raises(ModelSourceError, match="bare name of a transformers image classification class"):
        Recipe.from_json(json.dumps({"kind": "transformers", "name": name, "kwargs": {"model_type": "vit"}}))


@pytest.mark.parametrize(
    "entry", [{"auto_map": {"AutoModel": "x.Y"}}, {"trust_remote_code": True}, {"use_pretrained_backbone": True}]
)
def test_recipe_config_that_would_run_remote_code_or_download_is_refused(entry):
    with pytest.raises(ModelSourceError, match="a recipe rebuilds the architecture only"):
        Recipe("transformers", "ViTForImageClassification", {**_vit_recipe().kwargs, **entry})


def test_recipe_whose_model_type_is_not_the_class_s_is_refused():
    recipe = Recipe("transformers", "ConvNextForImageClassification", _vit_recipe().kwargs)
    with pytest.raises(ModelSourceError, match="model_type 'vit' is not the class's 'convnext'"):
        build_from_recipe(recipe)


def test_artifact_with_a_refused_transformers_recipe_does_not_load(tmp_path, monkeypatch):
    model, recipe = load_model("transformers:vit", **VIT)
    bad = Recipe("transformers", "ViTModel", recipe.kwargs)  # a real transformers class, not a classifier
    rewritten = rewrite(model, "full", torch.randn(1, 3, 32, 32), recipe=bad.to_json())
    save(rewritten, tmp_path / "m.safetensors")
    with pytest.raises(ArtifactError, match="cannot rebuild the base model.*'ViTModel' is not a Hugging Face image"):
        load(tmp_path / "m.safetensors")


class _FromPretrained:
    """Stands in for the hub: records the names asked for and returns a small ViT."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __call__(self, name, **options):
        self.names.append(name)
        torch.manual_seed(0)
        return transformers.ViTForImageClassification(transformers.ViTConfig(**VIT, num_labels=3, **options))


@pytest.mark.parametrize("spec", ["hf:some-org/tiny-vit", "transformers:some-org/tiny-vit"])
def test_hub_spec_calls_from_pretrained_and_the_artifact_never_does(spec, tmp_path, monkeypatch):
    hub = _FromPretrained()
    monkeypatch.setattr(transformers.AutoModelForImageClassification, "from_pretrained", hub)
    model, recipe = load_model(spec)
    assert hub.names == ["some-org/tiny-vit"]
    assert (recipe.kind, recipe.name) == ("transformers", "ViTForImageClassification")
    assert "_name_or_path" not in recipe.kwargs  # provenance, not architecture
    x = torch.randn(1, 3, 32, 32)
    rewritten = rewrite(model, "full", x, recipe=recipe.to_json())
    save(rewritten, tmp_path / "m.safetensors")

    def offline(*args, **kwargs):
        raise AssertionError("loading an artifact called from_pretrained")

    monkeypatch.setattr(transformers.AutoModelForImageClassification, "from_pretrained", offline)
    monkeypatch.setattr(transformers.ViTForImageClassification, "from_pretrained", offline)
    loaded = load(tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, rewritten(x).logits)


def test_hub_spec_failure_says_what_to_do_offline(monkeypatch):
    def no_network(name, **options):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoModelForImageClassification, "from_pretrained", no_network)
    with pytest.raises(ModelSourceError, match="from_pretrained.*--arch transformers:MODEL_TYPE"):
        load_model("hf:some-org/tiny-vit")


def test_hf_weights_file_loads_with_a_transformers_arch(tmp_path):
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**VIT, num_labels=3)).eval()
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))  # as a hub repository holds it
    loaded, recipe = load_model(tmp_path / "model.safetensors", arch="transformers:vit", num_classes=3, **VIT)
    assert recipe.kind == "transformers"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_cli_inspect_a_transformers_spec():
    kwargs = json.dumps(VIT)
    res = CliRunner().invoke(
        main,
        ["inspect", "transformers:vit", "--model-kwargs", kwargs, "--num-classes", "3", "--input-shape", "1,3,32,32",
         "--json"],
    )
    assert res.exit_code == 0, res.output
    sites = json.loads(res.output)
    assert [s["module"] for s in sites] == ["vit.layers.0.mlp.activation_fn", "vit.layers.1.mlp.activation_fn"]
    # without --input-shape the probe is the config's image size (a 224 probe fails on a 32-pixel ViT)
    res = CliRunner().invoke(main, ["inspect", "transformers:vit", "--model-kwargs", kwargs, "--json"])
    assert res.exit_code == 0, res.output
    assert [s["shape"] for s in json.loads(res.output)] == [[1, 17, 64]] * 2


def test_a_hub_name_as_arch_is_refused_with_the_form_to_use(tmp_path):
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelSourceError, match="as an architecture write the model type, e.g. transformers:vit"):
        load_model(tmp_path / "model.safetensors", arch="hf:some-org/tiny-vit")
