"""Builders: a random-init architecture from a recipe (timm, torchvision, transformers, RobustBench, a class or
builder function), with the trust checks a recipe read from an artifact passes before anything is imported or called.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from graphsparse._moved import new_name
from graphsparse.errors import ModelSourceError, closest
from graphsparse.sources.hf import build_transformers
from graphsparse.sources.recipes import TIMM_FORBIDDEN_KWARGS, Recipe, fetching_kwarg
from graphsparse.sources.robustbench import import_robustbench, robustbench_entry, torchvision_weights
from graphsparse.sources.safe_pickle import TRUSTED_PACKAGES, class_problem, user_allowed

__all__ = ["package_to_trust"]

# Functions of trusted packages that an artifact's recipe may call (besides registered torchvision and timm
# builders): they build a model and do nothing else.
_TRUSTED_BUILDERS = ("graphsparse.demo.models:load_demo_model",)


def build_architecture(recipe: Recipe, *, trusted: bool, allow_modules: Sequence[str]) -> nn.Module:
    """Random-init architecture for a timm / robustbench / class recipe."""
    if recipe.kind == "timm":
        return _build_timm(recipe.name, recipe.kwargs)
    if recipe.kind == "torchvision":
        return build_torchvision(recipe.name, recipe.kwargs)
    if recipe.kind == "transformers":
        return build_transformers(recipe)
    if recipe.kind == "robustbench":
        entry = robustbench_entry(recipe)
        missing = [p for p in torchvision_weights(recipe.name) if not p.is_file()]
        if recipe.kwargs["dataset"] == "imagenet" and missing:
            raise ModelSourceError(
                f"RobustBench's {recipe.name} constructor loads torchvision's pretrained weights, which are "
                f"not in torch's hub cache ({missing[0]}); graphsparse never downloads: copy the file there"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return entry["model"]()
    if recipe.kind == "class":
        return _build_class(recipe, trusted=trusted, allow_modules=allow_modules)
    raise ModelSourceError(f"recipe kind {recipe.kind!r} does not describe an architecture")


def _build_timm(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    import timm

    forbidden = [k for k in kwargs if k in TIMM_FORBIDDEN_KWARGS]
    if forbidden:
        raise ModelSourceError(
            f"timm:{name}: option {forbidden[0]!r} is not accepted: graphsparse never lets timm download or "
            f"read weights itself; pass the weights file as the model and --arch timm:{name}"
        )
    if not timm.is_model(name):
        raise ModelSourceError(
            f"timm has no architecture {name!r}{closest(name, timm.list_models())}; "
            "list them with timm.list_models('*pattern*')"
        )
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise ModelSourceError(f"timm:{name} does not accept the options {dict(kwargs)}: {e}") from e


def build_torchvision(name: str, kwargs: Mapping[str, Any], *, fetch: Mapping[str, Any] | None = None) -> nn.Module:
    """``torchvision.models.get_model(name)`` with random init, or with the weights options of ``fetch`` (they
    download, and are used once: a recipe never records them)."""
    try:
        from torchvision import models
    except ImportError as e:
        raise ModelSourceError(f"torchvision:{name} needs torchvision; pip install torchvision") from e
    names = models.list_models()
    if name not in names:
        raise ModelSourceError(
            f"torchvision has no model builder {name!r}{closest(name, names)}; "
            "list them with torchvision.models.list_models()"
        )
    fetch = dict(fetch or {})
    try:
        return models.get_model(name, **{"weights": None, **fetch, **kwargs})
    except TypeError as e:
        raise ModelSourceError(f"torchvision:{name} does not accept the options {dict(kwargs)}: {e}") from e
    except Exception as e:
        if not any(v is not None for v in fetch.values()):
            raise ModelSourceError(
                f"torchvision:{name} with options {dict(kwargs)} could not be built: {type(e).__name__}: {e}"
            ) from e
        raise ModelSourceError(
            f"torchvision:{name} could not get the weights {fetch} ({type(e).__name__}: {e}); without "
            f"internet, load a weights file with --arch torchvision:{name} instead"
        ) from e


def _is_registered_builder(obj: Any) -> bool:
    """Whether ``obj`` is a model builder torchvision or timm registers (it builds a model, nothing else)."""
    if not callable(obj) or isinstance(obj, type):
        return False
    name = getattr(obj, "__name__", "")
    top = (getattr(obj, "__module__", None) or "").split(".")[0]
    if top == "torchvision":
        from torchvision import models

        return name in models.list_models() and models.get_model_builder(name) is obj
    if top == "timm":
        import timm

        return timm.is_model(name) and timm.models.model_entrypoint(name) is obj
    return False


def warn_if_untrained(recipe: Recipe) -> None:
    """Warn when a spec names a class whose trained weights ship under another spec (the demo model)."""
    if recipe.kind != "class":
        return
    module_name, _, qualname = recipe.name.partition(":")
    cls = sys.modules.get(module_name)
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
    trained = getattr(cls, "trained_builder", None) if isinstance(cls, type) else None
    if isinstance(trained, str):
        warnings.warn(
            f"{recipe.name} builds the architecture with random weights; the shipped trained model is "
            f"{trained}",
            UserWarning,
            stacklevel=3,
        )


def package_to_trust(recipe: Recipe, allow_modules: Sequence[str] = ()) -> str | None:
    """The package a ``class`` recipe read from an artifact needs in ``allow_modules`` to be rebuilt
    (classes of trusted packages need none), or None."""
    if recipe.kind != "class":
        return None
    module_name, _, qualname = recipe.name.partition(":")
    top = module_name.split(".")[0]
    if top in TRUSTED_PACKAGES or user_allowed(f"{module_name}.{qualname}", allow_modules):
        return None
    return top


def _build_class(recipe: Recipe, *, trusted: bool, allow_modules: Sequence[str]) -> nn.Module:
    module_name, _, qualname = recipe.name.partition(":")
    if not trusted:
        top = package_to_trust(recipe, allow_modules)
        if top is not None:
            raise ModelSourceError(
                f"the recipe wants to import {recipe.name!r}, which is not in a trusted package "
                f"({', '.join(TRUSTED_PACKAGES)}); nothing was imported. If you trust it, pass "
                f"--allow-module {top} (Python: allow_modules=[{top!r}])"
            )
    if module_name.split(".")[0] == "robustbench":
        import_robustbench()  # its modules import 'autoattack', which must be aliased first
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelSourceError(
            f"cannot import module {module_name!r} for {recipe.name!r}: {e}; "
            "is it installed or on PYTHONPATH?"
        ) from e
    obj: Any = module
    for part in qualname.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ModelSourceError(
                f"{module_name!r} has no attribute {part!r} (in {recipe.name!r}){closest(part, names)}"
            )
        obj = getattr(obj, part)
    is_class = isinstance(obj, type) and issubclass(obj, nn.Module)
    is_function = isinstance(obj, (types.FunctionType, types.BuiltinFunctionType))
    if not (is_class or is_function):
        raise ModelSourceError(
            f"{recipe.name!r} is {obj!r}, not an nn.Module subclass or a function that builds one"
        )
    if not trusted and not user_allowed(f"{module_name}.{qualname}", allow_modules):
        if is_class:
            problem = class_problem(obj)
        elif new_name(recipe.name) in _TRUSTED_BUILDERS or _is_registered_builder(obj):
            fetching = fetching_kwarg(recipe.kwargs)
            problem = (
                f"its option {fetching!r} would make the builder download or read weights, which a recipe never "
                "does (the artifact holds the weights)"
                if fetching
                else None
            )
        else:
            problem = (
                "it is a function, not an nn.Module subclass or a registered model builder (torchvision, "
                f"timm, {', '.join(_TRUSTED_BUILDERS)}), and calling it could do anything; only if you trust "
                f"it, pass --allow-module {module_name}.{qualname}"
            )
        if problem is not None:
            raise ModelSourceError(f"the recipe wants to build {recipe.name!r}, which is refused: {problem}")
    try:
        model = obj(**recipe.kwargs)
    except Exception as e:
        raise ModelSourceError(
            f"{'constructing' if is_class else 'calling'} {recipe.name} with {recipe.kwargs} failed: "
            f"{type(e).__name__}: {e}"
        ) from e
    if not isinstance(model, nn.Module):
        raise ModelSourceError(
            f"{recipe.name} returned a {type(model).__name__}, not an nn.Module; name a function that "
            "returns the model"
        )
    return model
