"""Hugging Face ``transformers`` image classifiers: the ``transformers:MODEL_TYPE`` spec (random init from a
config), ``hf:ORG/NAME`` (``from_pretrained``, the one path that downloads), the ``transformers`` recipe (class and
config) and its rebuild, which never downloads.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Mapping
from typing import Any

from torch import nn

from graphsparse.errors import ModelSourceError, closest
from graphsparse.sources.recipes import TRANSFORMERS_REFUSED_KEYS, Recipe, json_kwargs

# Spec prefixes of Hugging Face models ('hf:ORG/NAME', 'transformers:vit').
TRANSFORMERS_SPECS = ("transformers:", "hf:")
# Config entries that are provenance, not architecture: left out of a transformers recipe.
_TRANSFORMERS_META_KEYS = ("transformers_version", "_name_or_path", "architectures", "_commit_hash")
# Image classifiers of the auto mapping that wrap another library's model (and its own download logic).
_TRANSFORMERS_EXCLUDED = ("timm_wrapper",)


def _import_transformers(where: str) -> types.ModuleType:
    try:
        import transformers
    except ImportError as e:
        raise ModelSourceError(
            f"{where} needs Hugging Face transformers; pip install 'graphsparse[transformers]'"
        ) from e
    return transformers


def _transformers_classes() -> dict[str, str]:
    """``{class name: model_type}`` of the Hugging Face image classifiers a recipe may build (the classes of
    transformers' image classification auto mapping, less the wrappers of other libraries)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    out: dict[str, str] = {}
    for model_type, names in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.items():
        if model_type in _TRANSFORMERS_EXCLUDED:
            continue
        for name in (names,) if isinstance(names, str) else names:
            out[name] = model_type
    return out


def _transformers_class(name: str, where: str) -> Any:
    """The transformers image classification class ``name``; nothing else of the package is looked up."""
    transformers = _import_transformers(where)
    classes = _transformers_classes()
    if name not in classes:
        raise ModelSourceError(
            f"{where}: {name!r} is not a Hugging Face image classification model class{closest(name, classes)}; "
            "only transformers' *ForImageClassification classes (AutoModelForImageClassification's mapping, "
            "e.g. ViTForImageClassification) are built, and never with from_pretrained"
        )
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ModelSourceError(f"{where}: transformers.{name} is not a PreTrainedModel class in this transformers")
    return cls


def _transformers_config_kwargs(config: Any) -> dict[str, Any]:
    """A config's entries as recipe options: ``config.to_dict()`` less provenance (version, hub name)."""
    data = {k: v for k, v in config.to_dict().items() if k not in _TRANSFORMERS_META_KEYS}
    return json_kwargs(data, f"transformers config {type(config).__name__}")


def transformers_spec_recipe(spec: str, kwargs: Mapping[str, Any], role: str) -> Recipe:
    """The recipe of ``transformers:MODEL_TYPE`` or ``transformers:XxxForImageClassification`` with config
    options (``num_classes`` is ``num_labels``); builds the config only."""
    body = spec.partition(":")[2].strip()
    if not body:
        raise ModelSourceError(f"{role} spec {spec!r} has no model type; write e.g. transformers:vit")
    if "/" in body:
        raise ModelSourceError(
            f"{role} {spec!r} names a Hugging Face hub model, which only MODEL may be (it downloads); as an "
            "architecture write the model type, e.g. transformers:vit with --model-kwargs JSON of its config"
        )
    _import_transformers(f"{role} {spec!r}")
    classes = _transformers_classes()
    options = dict(kwargs)
    if "num_classes" in options:
        if "num_labels" in options and options["num_labels"] != options["num_classes"]:
            raise ModelSourceError(f"{role} {spec!r}: num_classes and num_labels disagree; give one of them")
        options["num_labels"] = options.pop("num_classes")
    for key in ("model_type", *TRANSFORMERS_REFUSED_KEYS):
        if key in options:
            raise ModelSourceError(f"{role} {spec!r}: the option {key!r} is not accepted (the spec names the model)")
    if body in classes:
        name = body
    else:
        by_type = {t: n for n, t in reversed(list(classes.items()))}  # a model type's first class
        if body not in by_type:
            raise ModelSourceError(
                f"{role} {spec!r}: {body!r} is neither a Hugging Face image classification model type nor one of "
                f"its classes{closest(body, [*by_type, *classes])}; e.g. transformers:vit, transformers:convnext"
            )
        name = by_type[body]
    config_class = _transformers_class(name, f"{role} {spec!r}").config_class
    import inspect

    known = set(config_class().to_dict()) | set(inspect.signature(config_class.__init__).parameters)
    known |= {"num_labels", "attn_implementation"}  # PretrainedConfig's own, read from **kwargs
    unknown = [k for k in options if k not in known]
    if unknown:
        raise ModelSourceError(
            f"{role} {spec!r}: {config_class.__name__} has no option {unknown[0]!r}{closest(unknown[0], known)}"
        )
    try:
        config = config_class(**options)
    except Exception as e:
        raise ModelSourceError(f"{role} {spec!r}: {config_class.__name__}({options}) failed: {e}") from e
    return Recipe("transformers", name, _transformers_config_kwargs(config))


def build_transformers(recipe: Recipe) -> nn.Module:
    """Random-init ``transformers.<name>(config)``: the class is checked first, nothing is downloaded."""
    cls = _transformers_class(recipe.name, f"transformers recipe {recipe.name!r}")
    options = dict(recipe.kwargs)
    model_type = options.pop("model_type")
    if model_type != cls.config_class.model_type:
        raise ModelSourceError(
            f"transformers recipe {recipe.name!r}: config model_type {model_type!r} is not the class's "
            f"{cls.config_class.model_type!r}"
        )
    try:
        config = cls.config_class(**options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(config).eval()
    except Exception as e:
        raise ModelSourceError(
            f"building transformers.{recipe.name} from its config failed: {type(e).__name__}: {e}"
        ) from e


def transformers_model_recipe(model: nn.Module) -> Recipe | None:
    """Class and config of a transformers image classifier (attention implementation included), or None."""
    if not type(model).__module__.startswith("transformers.") or getattr(model, "config", None) is None:
        return None
    name = type(model).__name__
    if name not in _transformers_classes():
        return None
    try:
        options = _transformers_config_kwargs(model.config)
        attention = getattr(model.config, "_attn_implementation", None)
        if isinstance(attention, str):
            options["attn_implementation"] = attention
        return Recipe("transformers", name, options)
    except ModelSourceError:
        return None


def load_pretrained(spec: str, kwargs: Mapping[str, Any]) -> tuple[nn.Module, Recipe]:
    """``hf:ORG/NAME``: ``AutoModelForImageClassification.from_pretrained`` (the one path that downloads);
    the recipe records the class and config, so an artifact rebuilds without the hub."""
    name = spec.partition(":")[2].strip()
    transformers = _import_transformers(f"model {spec!r}")
    options = dict(kwargs)
    if "num_classes" in options:
        options["num_labels"] = options.pop("num_classes")
    if "trust_remote_code" in options or "model_dir" in options:
        bad = "trust_remote_code" if "trust_remote_code" in options else "model_dir"
        raise ModelSourceError(f"model {spec!r}: the option {bad!r} is not accepted")
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(name, **options)
    except Exception as e:
        raise ModelSourceError(
            f"model {spec!r}: from_pretrained({name!r}) failed ({type(e).__name__}: {e}); without internet, "
            "load its weights file with --arch transformers:MODEL_TYPE and its config as --model-kwargs"
        ) from e
    recipe = transformers_model_recipe(model)
    if recipe is None:
        raise ModelSourceError(
            f"model {spec!r} is a {type(model).__name__}, not a Hugging Face image classification class "
            "graphsparse can rebuild"
        )
    return model.eval(), recipe


def transformers_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """``(1, num_channels, H, W)`` from a transformers model's config (``image_size``), or None."""
    if not type(model).__module__.startswith("transformers."):
        return None
    config = getattr(model, "config", None)
    size = getattr(config, "image_size", None)
    channels = getattr(config, "num_channels", None)
    if isinstance(size, int):
        size = (size, size)
    if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        return None
    return (1, channels if isinstance(channels, int) and channels > 0 else 3, int(size[0]), int(size[1]))
