"""The :class:`Recipe`: how to rebuild a base model's architecture without pickle, as JSON text a graphsparse
artifact (safetensors) stores, and the checks every recipe passes before anything is imported (a recipe may come
from an untrusted artifact).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from graphsparse.errors import ModelSourceError, closest
from graphsparse.sources.robustbench import check_robustbench_kwargs

__all__ = ["RECIPE_KINDS", "Recipe"]

# The kinds of source a recipe rebuilds from.
RECIPE_KINDS = ("timm", "torchvision", "transformers", "robustbench", "class", "file")
# Options that would make timm download or read weights on its own (hidden network / pickle access).
TIMM_FORBIDDEN_KWARGS = (
    "pretrained",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "checkpoint_path",
    "cache_dir",
)
# A class recipe's name (and a spec naming a class or builder): 'pkg.module:Class'.
CLASS_SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TRANSFORMERS_CLASS = re.compile(r"^[A-Za-z_]\w*$")
# Config entries a transformers recipe never carries: remote code, quantisation back ends, pretrained backbones.
TRANSFORMERS_REFUSED_KEYS = ("auto_map", "trust_remote_code", "quantization_config")
_TRANSFORMERS_FETCHING_FLAGS = ("use_pretrained_backbone", "use_timm_backbone")


@dataclass(frozen=True)
class Recipe:
    """How to rebuild a base model's architecture without pickle.

    Args:
        kind: ``timm``, ``torchvision``, ``transformers``, ``robustbench``, ``class`` or ``file``.
        name: timm or torchvision architecture name, a ``transformers`` image classification class name
            (``ViTForImageClassification``), RobustBench model id, ``pkg.module:Class`` (or
            ``pkg.module:function``, a builder returning the module), or the file's path.
        kwargs: JSON-able constructor options (timm ``num_classes``/``in_chans``; RobustBench
            ``dataset``/``threat_model``; the class's or builder's keyword arguments; for ``transformers``
            the model's ``config.to_dict()``, ``model_type`` included). Normalised through JSON.
        sha256: for kind ``file``: the hex SHA-256 of the file, checked when it is re-loaded.
    """

    kind: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""

    def __post_init__(self) -> None:
        if self.kind not in RECIPE_KINDS:
            raise ModelSourceError(
                f"recipe kind {self.kind!r} is not one of {', '.join(RECIPE_KINDS)}"
                f"{closest(self.kind, RECIPE_KINDS)}"
            )
        if not isinstance(self.name, str) or not self.name.strip():
            raise ModelSourceError(
                f"recipe of kind {self.kind!r} needs a non-empty string name, got {self.name!r}"
            )
        if not isinstance(self.kwargs, Mapping):
            raise ModelSourceError(
                f"recipe {self.kind}:{self.name} kwargs must be a dict, got {type(self.kwargs).__name__}"
            )
        object.__setattr__(self, "kwargs", json_kwargs(self.kwargs, f"recipe {self.kind}:{self.name}"))
        if not isinstance(self.sha256, str):
            raise ModelSourceError(f"recipe {self.name!r}: sha256 must be a string")
        if self.kind == "file":
            if not _SHA256.match(self.sha256):
                raise ModelSourceError(
                    f"file recipe {self.name!r} needs the file's sha256 (64 lowercase hex digits), "
                    f"got {self.sha256!r}"
                )
        elif self.sha256:
            raise ModelSourceError(
                f"recipe {self.kind}:{self.name} has a sha256, which only kind 'file' uses"
            )
        if self.kind == "class" and not CLASS_SPEC.match(self.name):
            raise ModelSourceError(f"class recipe name {self.name!r} must look like 'pkg.module:Class'")
        fetching = fetching_kwarg(self.kwargs)
        if self.kind == "torchvision" and fetching:
            raise ModelSourceError(
                f"torchvision recipe {self.name!r} has a {fetching!r} option; a recipe rebuilds the architecture "
                "only (the artifact holds the weights) and never downloads"
            )
        if self.kind == "robustbench":
            check_robustbench_kwargs(self.name, self.kwargs)
        if self.kind == "transformers":
            _check_transformers_recipe(self.name, self.kwargs)

    def spec(self) -> str:
        """The spec string :func:`load_model` accepts for this recipe (kwargs are separate)."""
        if self.kind in ("timm", "torchvision", "transformers"):
            return f"{self.kind}:{self.name}"
        if self.kind == "robustbench":
            return f"robustbench:{self.name}@{self.kwargs['dataset']}/{self.kwargs['threat_model']}"
        return self.name

    def __str__(self) -> str:
        if self.kind == "transformers":  # the whole config would fill a screen
            return f"{self.spec()} (model_type={self.kwargs['model_type']!r}, {len(self.kwargs) - 1} config entries)"
        options = ", ".join(f"{k}={v!r}" for k, v in sorted(self.kwargs.items()))
        return f"{self.spec()} ({options})" if options else self.spec()

    def to_json(self) -> str:
        """Canonical JSON text (sorted keys), suitable for safetensors string metadata."""
        data = {"kind": self.kind, "name": self.name, "kwargs": self.kwargs, "sha256": self.sha256}
        return json.dumps(data, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        """Parse and validate :meth:`to_json` output; raises ModelSourceError on anything else."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as e:
            raise ModelSourceError(
                f"model recipe is not valid JSON ({e}); text starts {str(text)[:80]!r}"
            ) from e
        if not isinstance(data, dict):
            raise ModelSourceError(f"model recipe must be a JSON object, got {type(data).__name__}")
        fields = ("kind", "name", "kwargs", "sha256")
        for key in data:
            if key not in fields:
                raise ModelSourceError(
                    f"model recipe has unknown key {key!r}{closest(key, fields)}; "
                    f"expected {', '.join(fields)}"
                )
        for key in ("kind", "name"):
            if not isinstance(data.get(key), str):
                raise ModelSourceError(f"model recipe needs a string {key!r}, got {data.get(key)!r}")
        return cls(data["kind"], data["name"], data.get("kwargs", {}), data.get("sha256", ""))


def fetching_kwarg(kwargs: Mapping[str, Any]) -> str | None:
    """The first option that makes a builder download or read weights (torchvision ``weights``,
    ``weights_backbone``; timm ``pretrained``, ``checkpoint_path``...), or None."""
    for key in kwargs:
        if key in TIMM_FORBIDDEN_KWARGS or "weights" in key or "pretrained" in key:
            return key
    return None


def json_kwargs(kwargs: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Options as plain JSON values (a copy through JSON), or ModelSourceError naming ``where``."""
    bad = [k for k in kwargs if not isinstance(k, str)]
    if bad:
        raise ModelSourceError(f"{where}: option names must be strings, got {bad[0]!r}")
    try:
        return json.loads(json.dumps(dict(kwargs), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ModelSourceError(
            f"{where}: options must be JSON values (str, int, float, bool, None, lists, dicts) so the "
            f"recipe can be saved as text; {e}"
        ) from e


def _check_transformers_recipe(name: str, kwargs: Mapping[str, Any]) -> None:
    """Shape checks a transformers recipe passes before anything is imported (it may come from an artifact)."""
    if not _TRANSFORMERS_CLASS.match(name):
        raise ModelSourceError(
            f"transformers recipe name {name!r} must be the bare name of a transformers image classification "
            "class such as 'ViTForImageClassification' (no module path: only the transformers package is used)"
        )
    if not isinstance(kwargs.get("model_type"), str):
        raise ModelSourceError(
            f"transformers recipe {name!r} needs the config's 'model_type' (a string) among its options"
        )
    refused = [k for k in TRANSFORMERS_REFUSED_KEYS if k in kwargs]
    refused += [k for k in _TRANSFORMERS_FETCHING_FLAGS if kwargs.get(k)]
    if refused:
        raise ModelSourceError(
            f"transformers recipe {name!r} has the config entry {refused[0]!r}, which would run remote code, a "
            "quantisation back end or download a backbone; a recipe rebuilds the architecture only (the artifact "
            "holds the weights)"
        )
