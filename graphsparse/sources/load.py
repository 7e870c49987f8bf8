"""The two ways a base model is made: :func:`load_model` turns a spec (``timm:NAME``, ``torchvision:NAME``,
``transformers:MODEL_TYPE``, ``hf:ORG/NAME``, ``robustbench:ID``, ``pkg.module:Class`` or ``pkg.module:function``,
a weights file) into a module with its :class:`~graphsparse.sources.recipes.Recipe`, and :func:`build_from_recipe`
rebuilds a recipe's architecture when an artifact is loaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from graphsparse.errors import ModelSourceError
from graphsparse.sources.builders import build_architecture, build_torchvision, warn_if_untrained
from graphsparse.sources.checkpoints import file_sha256, load_model_file
from graphsparse.sources.hf import TRANSFORMERS_SPECS, load_pretrained
from graphsparse.sources.recipes import Recipe, fetching_kwarg
from graphsparse.sources.robustbench import load_robustbench
from graphsparse.sources.specs import FILE_SUFFIXES, looks_like_file, recipe_for_spec

__all__ = ["build_from_recipe", "load_model"]

def load_model(
    spec: str | os.PathLike[str],
    *,
    arch: str | None = None,
    allow_modules: Sequence[str] = (),
    strip_prefix: str | Sequence[str] | None = None,
    checkpoint_key: str | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, Recipe]:
    """Load a model from a spec and return it in eval mode with its rebuild :class:`Recipe`.

    A file may hold a whole pickled module, a state dict, or a checkpoint dict; from a checkpoint dict the
    first of ``state_dict``, ``model_state_dict``, ``model``, ``net``, ``ema``, ``model_ema``,
    ``state_dict_ema`` is taken (the trained model before its EMA copy; ``checkpoint_key`` chooses). A key
    prefix that every key of a state dict shares (Lightning's ``model.``, DDP's ``module.``, torch.compile's
    ``_orig_mod.``, or several) is removed when that makes the keys those of the architecture.

    Args:
        spec: ``timm:NAME`` or ``torchvision:NAME`` (random init), ``transformers:MODEL_TYPE`` or
            ``transformers:XxxForImageClassification`` (a Hugging Face image classifier, random init; the
            options are its config's: ``num_hidden_layers``..., ``num_classes`` meaning ``num_labels``),
            ``hf:ORG/NAME`` or ``transformers:ORG/NAME`` (``from_pretrained``: downloads, or reads the
            Hugging Face cache; the recipe records the config, so loading an artifact never downloads),
            ``robustbench:MODEL_ID[@dataset/threat]``
            (weights must be on disk under ``model_dir``, default ``./models``), ``pkg.module:Class`` or
            ``pkg.module:function`` (a builder such as ``torchvision.models:resnet18`` or
            ``graphsparse.demo.models:load_demo_model``), or a weights file (``.pt .pth .bin .ckpt`` pickles,
            ``.safetensors``; the format is read from the content, not the suffix).
        arch: for files holding a state dict: the architecture, as a ``timm:NAME``,
            ``robustbench:ID`` or ``pkg.module:Class`` spec.
        allow_modules: extra packages/modules whose *classes* a pickle may use (``mypkg`` or
            ``mypkg.models``), or exact global names (``numpy._core.multiarray.scalar``) to allow that
            one global whatever it is. Only name code you trust.
        strip_prefix: for state dicts: keep only the keys that start with this prefix (``"model."``), without
            it; a sequence strips several in turn.
        checkpoint_key: for checkpoint dicts: the entry that holds the weights (e.g. ``"model_ema"``).
        **kwargs: constructor options (timm ``num_classes``..., the class's arguments, the ``arch``'s);
            for RobustBench, ``model_dir``; for torchvision, ``weights`` too (downloads; not recorded in the
            recipe, since an artifact holds the weights).
    """
    spec_str = os.fspath(spec)
    allow = _check_allow_modules(allow_modules)
    prefixes = _check_prefixes(strip_prefix)
    if checkpoint_key is not None and (not isinstance(checkpoint_key, str) or not checkpoint_key):
        raise ModelSourceError(f"checkpoint_key (--checkpoint-key) must be a non-empty string, got {checkpoint_key!r}")
    if os.path.isdir(spec_str):
        raise ModelSourceError(_directory_message(Path(spec_str)))
    if not looks_like_file(spec_str):
        for name, value in (("arch", arch), ("strip_prefix", strip_prefix), ("checkpoint_key", checkpoint_key)):
            if value is not None and value != ():
                option = "--" + name.replace("_", "-")
                raise ModelSourceError(
                    f"{name}={value!r} ({option}) only applies to weights files, not to {spec_str!r}"
                )
    if looks_like_file(spec_str):
        return load_model_file(
            Path(spec_str),
            arch=arch,
            allow_modules=allow,
            kwargs=kwargs,
            strip_prefix=prefixes,
            checkpoint_key=checkpoint_key,
        )
    if spec_str.startswith(TRANSFORMERS_SPECS) and "/" in spec_str:
        return load_pretrained(spec_str, kwargs)
    model_dir = kwargs.pop("model_dir", None)
    fetch: dict[str, Any] = {}  # options that fetch weights: used once here, never recorded in the recipe
    # timm refuses them; robustbench takes no options; a transformers config's entries are its own
    if not spec_str.startswith(("timm:", "robustbench:", *TRANSFORMERS_SPECS)):
        fetch = {k: kwargs.pop(k) for k in list(kwargs) if fetching_kwarg({k: None})}
    recipe = recipe_for_spec(spec_str, kwargs)
    if model_dir is not None and recipe.kind != "robustbench":
        raise ModelSourceError(f"model_dir only applies to robustbench: specs, not {spec_str!r}")
    if recipe.kind == "robustbench":
        model = load_robustbench(recipe, Path(model_dir if model_dir is not None else "./models"))
    elif recipe.kind == "torchvision":
        model = build_torchvision(recipe.name, recipe.kwargs, fetch=fetch)
    else:
        model = build_architecture(
            Recipe(recipe.kind, recipe.name, {**recipe.kwargs, **fetch}), trusted=True, allow_modules=allow
        )
        warn_if_untrained(recipe)
    return model.eval(), recipe


def build_from_recipe(recipe: Recipe, *, allow_modules: Sequence[str] = ()) -> nn.Module:
    """Rebuild a recipe's architecture (random init; kind ``file`` re-loads the file) in eval mode.

    A recipe may come from an untrusted artifact, so a ``class`` recipe must name a class of a trusted
    package or of one listed in ``allow_modules`` (nothing else is imported), and a ``file`` recipe's
    file must still have the recorded sha256.
    """
    if not isinstance(recipe, Recipe):
        raise ModelSourceError(f"build_from_recipe needs a Recipe, got {type(recipe).__name__}")
    allow = _check_allow_modules(allow_modules)
    if recipe.kind == "file":
        path = Path(recipe.name)
        if not path.is_file():
            raise ModelSourceError(
                f"the model file {path} named by the recipe does not exist; restore it or rebuild from a "
                "different base model"
            )
        digest = file_sha256(path)
        if digest != recipe.sha256:
            raise ModelSourceError(
                f"the model file {path} changed since the recipe was written (sha256 {digest[:12]}... != "
                f"recorded {recipe.sha256[:12]}...); restore the original file"
            )
        model, _ = load_model_file(path, arch=None, allow_modules=allow, kwargs={})
        return model
    return build_architecture(recipe, trusted=False, allow_modules=allow).eval()


def _check_prefixes(strip_prefix: str | Sequence[str] | None) -> tuple[str, ...]:
    if strip_prefix is None:
        return ()
    prefixes = (strip_prefix,) if isinstance(strip_prefix, str) else tuple(strip_prefix)
    for prefix in prefixes:
        if not isinstance(prefix, str) or not prefix:
            raise ModelSourceError(
                f"strip_prefix (--strip-prefix) must be a non-empty key prefix such as 'model.', got {prefix!r}"
            )
    return prefixes


def _directory_message(path: Path) -> str:
    try:
        inside = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.lower().endswith(FILE_SUFFIXES))
    except OSError:
        inside = []
    if not inside:
        return (
            f"{path} is a directory and holds no model file ({', '.join(FILE_SUFFIXES)}); give the weights file "
            "itself as MODEL"
        )
    listed = ", ".join(inside[:5]) + (f" (+{len(inside) - 5} more)" if len(inside) > 5 else "")
    return f"{path} is a directory; give one of its model files as MODEL, e.g. {path / inside[0]} (it holds {listed})"


def _check_allow_modules(allow_modules: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(allow_modules, str):
        allow_modules = [allow_modules]
    out = []
    for entry in allow_modules:
        if not isinstance(entry, str) or not re.match(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$", entry):
            raise ModelSourceError(
                f"allow_modules entry {entry!r} (--allow-module) must be a dotted module or global name "
                "such as 'mypkg' or 'mypkg.models.Net'"
            )
        out.append(entry)
    return tuple(out)
