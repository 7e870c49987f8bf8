"""Recipe inference: the :class:`~graphsparse.sources.recipes.Recipe` that rebuilds a model in hand (timm,
torchvision, transformers, or an importable class), kept only when the rebuilt model computes the same function.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from graphsparse.errors import ModelSourceError
from graphsparse.model_output import logits_of
from graphsparse.sources.hf import build_transformers, transformers_model_recipe
from graphsparse.sources.recipes import Recipe
from graphsparse.sources.shapes import default_input_shape, input_channels, timm_cfg

__all__ = ["infer_recipe"]

def timm_recipe(model: nn.Module) -> Recipe | None:
    """A timm recipe for a whole timm model, if rebuilding it gives the same parameter names and shapes."""
    cfg = timm_cfg(model)
    arch = cfg.get("architecture") if cfg is not None else None
    if not isinstance(arch, str) or not type(model).__module__.startswith("timm."):
        return None
    import timm

    if not timm.is_model(arch):
        return None
    kwargs: dict[str, Any] = {}
    if isinstance(getattr(model, "num_classes", None), int):
        kwargs["num_classes"] = model.num_classes
    in_chans = input_channels(model)
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    recipe = Recipe("timm", arch, kwargs)
    try:
        rebuilt = timm.create_model(arch, pretrained=False, **kwargs)
    except Exception:
        return None
    return recipe if _computes_the_same(model, rebuilt) else None


def torchvision_recipe(model: nn.Module) -> Recipe | None:
    """A torchvision recipe for a whole torchvision classifier: the builder of its module whose model (with the
    same class count) has its parameter names and shapes and computes the same function."""
    module = type(model).__module__
    if not module.startswith("torchvision.models."):
        return None
    from torchvision import models

    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    classes = getattr(last[-1], "out_features", getattr(last[-1], "out_channels", None)) if last else None
    options: list[dict[str, Any]] = [{}] if classes in (None, 1000) else [{"num_classes": classes}, {}]
    for name in models.list_models():
        if models.get_model_builder(name).__module__ != module:
            continue
        for kwargs in options:
            try:  # on the meta device first: no memory, no initialisation, to compare the layout
                with warnings.catch_warnings(), torch.device("meta"):
                    warnings.simplefilter("ignore")
                    candidate = models.get_model(name, **kwargs)
            except Exception:
                continue
            layout = {k: tuple(v.shape) for k, v in candidate.state_dict().items()}
            if type(candidate) is not type(model) or layout != shapes:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rebuilt = models.get_model(name, **kwargs)
            if _computes_the_same(model, rebuilt):
                return Recipe("torchvision", name, kwargs)
    return None


def _transformers_recipe(model: nn.Module) -> Recipe | None:
    """A transformers recipe for a Hugging Face image classifier, if its class rebuilt from its config computes
    the same function."""
    recipe = transformers_model_recipe(model)
    if recipe is None:
        return None
    try:
        rebuilt = build_transformers(recipe)
    except ModelSourceError:
        return None
    return recipe if _computes_the_same(model, rebuilt) else None


def _computes_the_same(model: nn.Module, rebuilt: nn.Module) -> bool:
    """Whether ``rebuilt``, given ``model``'s weights, has its parameter names and shapes and gives its output
    on a probe. Shapes alone miss options that own no weights (timm's ``global_pool='max'``,
    ``output_stride``, an activation), and a recipe that drops them rebuilds another function."""
    state = model.state_dict()
    if {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} != {k: tuple(v.shape) for k, v in state.items()}:
        return False
    first = next((t for t in state.values() if t.is_floating_point()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    modes = [(m, m.training) for m in model.modules()]
    try:
        rebuilt.load_state_dict(state)
        rebuilt.to(device=device, dtype=dtype).eval()
        model.eval()
        probe = torch.randn(default_input_shape(model), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a, b = model(probe.to(device, dtype)), rebuilt(probe.to(device, dtype))
    except Exception:  # no recipe rather than a wrong one
        return False
    finally:
        for module, training in modes:
            module.training = training
    a, b = logits_of(a), logits_of(b)  # transformers' ImageClassifierOutput
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return False
    return bool(torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6))


def infer_recipe(model: nn.Module) -> Recipe | None:
    """A recipe that rebuilds ``model``'s architecture, when one can be found without guessing.

    timm models give a ``timm`` recipe, torchvision classifiers a ``torchvision`` one (the builder whose model
    has the same layout), Hugging Face image classifiers a ``transformers`` one (class and config); other
    classes of an importable module give a ``class`` recipe when their no-argument constructor rebuilds the
    same parameter names and shapes. Each is kept only if the rebuilt model, given ``model``'s weights, gives
    ``model``'s output on a probe. None otherwise
    (then :func:`graphsparse.load` needs ``base=``).
    """
    recipe = timm_recipe(model) or torchvision_recipe(model) or _transformers_recipe(model)
    if recipe is not None:
        return recipe
    cls = type(model)
    if cls.__module__ in ("__main__", "builtins") or "<locals>" in cls.__qualname__:
        return None
    try:
        candidate = Recipe("class", f"{cls.__module__}:{cls.__qualname__}", {})
        rebuilt = cls()
    except Exception:  # needs arguments, or not a valid spec: no recipe rather than a wrong one
        return None
    return candidate if _computes_the_same(model, rebuilt) else None
