"""Model specs: which source a spec string names (``timm:NAME``, ``torchvision:NAME``, ``transformers:...``,
``robustbench:ID``, ``pkg.module:Class``, a weights file) and the :class:`~graphsparse.sources.recipes.Recipe` of a
spec that is not a file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from graphsparse.errors import ModelSourceError
from graphsparse.sources.hf import TRANSFORMERS_SPECS, transformers_spec_recipe
from graphsparse.sources.recipes import CLASS_SPEC, Recipe, json_kwargs
from graphsparse.sources.robustbench import parse_robustbench

__all__ = ["FILE_SUFFIXES"]

# Suffixes of the weights files a spec may name (the format is read from the content).
FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
# What a spec may be, for the messages that refuse one.
ACCEPTED_FORMS = (
    "accepted forms: 'timm:NAME' (e.g. timm:resnet18), 'torchvision:NAME' (e.g. torchvision:resnet18), "
    "'transformers:MODEL_TYPE' (e.g. transformers:vit, config options as --model-kwargs JSON), "
    "'hf:ORG/NAME' (Hugging Face hub, downloads), "
    "'robustbench:MODEL_ID[@dataset/threat]' (e.g. robustbench:Carmon2019Unlabeled@cifar10/Linf), "
    "'pkg.module:Class' or 'pkg.module:function' (constructor kwargs as options: --num-classes, "
    f"--model-kwargs JSON), or a weights file ending in {', '.join(FILE_SUFFIXES)} (state dicts also need --arch)"
)


def looks_like_file(spec: str) -> bool:
    """Whether ``spec`` names a weights file (a model file suffix, or an existing file) rather than a source."""
    if spec.startswith(("timm:", "torchvision:", "robustbench:", *TRANSFORMERS_SPECS)):
        return False
    return spec.lower().endswith(FILE_SUFFIXES) or os.path.isfile(spec)


def recipe_for_spec(spec: str, kwargs: Mapping[str, Any], *, role: str = "model") -> Recipe:
    """A recipe for a non-file spec (timm, robustbench, class)."""
    if spec.startswith("timm:"):
        name = spec[len("timm:") :].strip()
        if not name:
            raise ModelSourceError(f"{role} spec {spec!r} has no architecture name; write e.g. timm:resnet18")
        return Recipe("timm", name, json_kwargs(kwargs, f"{role} {spec!r}"))
    if spec.startswith("torchvision:"):
        name = spec[len("torchvision:") :].strip()
        if not name:
            raise ModelSourceError(
                f"{role} spec {spec!r} has no architecture name; write e.g. torchvision:resnet18"
            )
        return Recipe("torchvision", name, json_kwargs(kwargs, f"{role} {spec!r}"))
    if spec.startswith(TRANSFORMERS_SPECS):
        return transformers_spec_recipe(spec, kwargs, role)
    if spec.startswith("robustbench:"):
        model_id, dataset, threat = parse_robustbench(spec)
        extra = dict(kwargs)
        if extra:
            raise ModelSourceError(
                f"{role} {spec!r}: RobustBench models take no constructor options (got {', '.join(extra)}); "
                "put dataset and threat model in the spec: robustbench:ID@cifar100/Linf"
            )
        return Recipe("robustbench", model_id, {"dataset": dataset, "threat_model": threat})
    if CLASS_SPEC.match(spec):
        return Recipe("class", spec, json_kwargs(kwargs, f"{role} {spec!r}"))
    if "/" in spec or os.sep in spec or Path(spec).suffix:
        raise ModelSourceError(
            f"cannot tell what {role} {spec!r} is: there is no such file (check the path), and it is none of the "
            f"other forms; {ACCEPTED_FORMS}"
        )
    known = _bare_name_sources(spec)
    if known:
        raise ModelSourceError(
            f"cannot tell what {role} {spec!r} is: name the library, e.g. {' or '.join(known)} (random init)"
        )
    raise ModelSourceError(f"cannot tell what {role} {spec!r} is; {ACCEPTED_FORMS}")


def _bare_name_sources(name: str) -> list[str]:
    """The specs a bare architecture name could mean (``timm:resnet18``, ``torchvision:resnet18``)."""
    if not re.match(r"^\w+$", name):
        return []
    found = []
    try:
        import timm

        if timm.is_model(name):
            found.append(f"timm:{name}")
    except ImportError:
        pass
    try:
        from torchvision import models

        if name in models.list_models():
            found.append(f"torchvision:{name}")
    except ImportError:
        pass
    return found
