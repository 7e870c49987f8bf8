"""Model sources: turn a spec (``timm:NAME``, ``torchvision:NAME``, ``transformers:MODEL_TYPE``, ``hf:ORG/NAME``,
``robustbench:ID``, ``pkg.module:Class`` or ``pkg.module:function``, a file) into a module.

Every model comes back with a :class:`Recipe`: how to rebuild its architecture without pickle, so a
graphsparse artifact (safetensors) can store the recipe as text and rebuild the base model on load.

Pickled files are read by :mod:`graphsparse.safe_pickle` (DESIGN §5), which vets every global a pickle
wants to import before anything is unpickled; ``.safetensors`` files need no such care.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import sys
import types
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphsparse._compat import ensure_autoattack_alias
from graphsparse._moved import new_name
from graphsparse.errors import ModelSourceError, closest
from graphsparse.model_output import logits_of
from graphsparse.sources.safe_pickle import TRUSTED_PACKAGES, class_problem, read_pickle, user_allowed

__all__ = [
    "Recipe",
    "RECIPE_KINDS",
    "FILE_SUFFIXES",
    "TRUSTED_PACKAGES",
    "load_model",
    "build_from_recipe",
    "import_robustbench",
    "parse_input_shape",
    "default_input_shape",
]

RECIPE_KINDS = ("timm", "torchvision", "transformers", "robustbench", "class", "file")
FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")

# Checkpoint dict keys that hold the model or its state dict, in order of preference: the trained model's own
# entry before an EMA copy (choose another entry with checkpoint_key / --checkpoint-key).
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net", "ema", "model_ema", "state_dict_ema")
# How many shared leading key components (Lightning 'model.', DDP 'module.', torch.compile '_orig_mod.',
# nested) are tried when a state dict's keys do not match the architecture.
_MAX_PREFIX_DEPTH = 4

# Options that would make timm download or read weights on its own (hidden network / pickle access).
_TIMM_FORBIDDEN_KWARGS = (
    "pretrained",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "checkpoint_path",
    "cache_dir",
)

_ROBUSTBENCH_DATASETS = ("cifar10", "cifar100", "imagenet")
_ROBUSTBENCH_THREATS = ("Linf", "L2", "corruptions", "corruptions_3d")
_ROBUSTBENCH_INSTALL = (
    "pip install --no-deps robustbench==1.1.1 (its metadata pins an old timm), then "
    "pip install 'graphsparse[robustbench]' for the packages its model zoo imports"
)
_CLASS_SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ACCEPTED_FORMS = (
    "accepted forms: 'timm:NAME' (e.g. timm:resnet18), 'torchvision:NAME' (e.g. torchvision:resnet18), "
    "'transformers:MODEL_TYPE' (e.g. transformers:vit, config options as --model-kwargs JSON), "
    "'hf:ORG/NAME' (Hugging Face hub, downloads), "
    "'robustbench:MODEL_ID[@dataset/threat]' (e.g. robustbench:Carmon2019Unlabeled@cifar10/Linf), "
    "'pkg.module:Class' or 'pkg.module:function' (constructor kwargs as options: --num-classes, "
    f"--model-kwargs JSON), or a weights file ending in {', '.join(FILE_SUFFIXES)} (state dicts also need --arch)"
)
# Functions of trusted packages that an artifact's recipe may call (besides registered torchvision and timm
# builders): they build a model and do nothing else.
_TRUSTED_BUILDERS = ("graphsparse.demo.models:load_demo_model",)

_TRANSFORMERS_SPECS = ("transformers:", "hf:")
_TRANSFORMERS_CLASS = re.compile(r"^[A-Za-z_]\w*$")
# Config entries that are provenance, not architecture: left out of a transformers recipe.
_TRANSFORMERS_META_KEYS = ("transformers_version", "_name_or_path", "architectures", "_commit_hash")
# Config entries a transformers recipe never carries: remote code, quantisation back ends, pretrained backbones.
_TRANSFORMERS_REFUSED_KEYS = ("auto_map", "trust_remote_code", "quantization_config")
_TRANSFORMERS_FETCHING_FLAGS = ("use_pretrained_backbone", "use_timm_backbone")
# Image classifiers of the auto mapping that wrap another library's model (and its own download logic).
_TRANSFORMERS_EXCLUDED = ("timm_wrapper",)


# ---------------------------------------------------------------------------------------------- Recipe


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
        object.__setattr__(self, "kwargs", _json_kwargs(self.kwargs, f"recipe {self.kind}:{self.name}"))
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
        if self.kind == "class" and not _CLASS_SPEC.match(self.name):
            raise ModelSourceError(f"class recipe name {self.name!r} must look like 'pkg.module:Class'")
        fetching = _fetching_kwarg(self.kwargs)
        if self.kind == "torchvision" and fetching:
            raise ModelSourceError(
                f"torchvision recipe {self.name!r} has a {fetching!r} option; a recipe rebuilds the architecture "
                "only (the artifact holds the weights) and never downloads"
            )
        if self.kind == "robustbench":
            _check_robustbench_kwargs(self.name, self.kwargs)
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


def _fetching_kwarg(kwargs: Mapping[str, Any]) -> str | None:
    """The first option that makes a builder download or read weights (torchvision ``weights``,
    ``weights_backbone``; timm ``pretrained``, ``checkpoint_path``...), or None."""
    for key in kwargs:
        if key in _TIMM_FORBIDDEN_KWARGS or "weights" in key or "pretrained" in key:
            return key
    return None


def _json_kwargs(kwargs: Mapping[str, Any], where: str) -> dict[str, Any]:
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


# ------------------------------------------------------------------------------------------ public API


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
    if not _looks_like_file(spec_str):
        for name, value in (("arch", arch), ("strip_prefix", strip_prefix), ("checkpoint_key", checkpoint_key)):
            if value is not None and value != ():
                option = "--" + name.replace("_", "-")
                raise ModelSourceError(
                    f"{name}={value!r} ({option}) only applies to weights files, not to {spec_str!r}"
                )
    if _looks_like_file(spec_str):
        return _load_file(
            Path(spec_str),
            arch=arch,
            allow_modules=allow,
            kwargs=kwargs,
            strip_prefix=prefixes,
            checkpoint_key=checkpoint_key,
        )
    if spec_str.startswith(_TRANSFORMERS_SPECS) and "/" in spec_str:
        return _load_pretrained(spec_str, kwargs)
    model_dir = kwargs.pop("model_dir", None)
    fetch: dict[str, Any] = {}  # options that fetch weights: used once here, never recorded in the recipe
    # timm refuses them; robustbench takes no options; a transformers config's entries are its own
    if not spec_str.startswith(("timm:", "robustbench:", *_TRANSFORMERS_SPECS)):
        fetch = {k: kwargs.pop(k) for k in list(kwargs) if _fetching_kwarg({k: None})}
    recipe = _recipe_for_spec(spec_str, kwargs)
    if model_dir is not None and recipe.kind != "robustbench":
        raise ModelSourceError(f"model_dir only applies to robustbench: specs, not {spec_str!r}")
    if recipe.kind == "robustbench":
        model = _load_robustbench(recipe, Path(model_dir if model_dir is not None else "./models"))
    elif recipe.kind == "torchvision":
        model = _build_torchvision(recipe.name, recipe.kwargs, fetch=fetch)
    else:
        model = _build(Recipe(recipe.kind, recipe.name, {**recipe.kwargs, **fetch}), trusted=True, allow_modules=allow)
        _warn_if_untrained(recipe)
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
        digest = _sha256(path)
        if digest != recipe.sha256:
            raise ModelSourceError(
                f"the model file {path} changed since the recipe was written (sha256 {digest[:12]}... != "
                f"recorded {recipe.sha256[:12]}...); restore the original file"
            )
        model, _ = _load_file(path, arch=None, allow_modules=allow, kwargs={})
        return model
    return _build(recipe, trusted=False, allow_modules=allow).eval()


def import_robustbench() -> types.ModuleType:
    """Import robustbench, aliasing ``autoattack`` to PyPI's ``pyautoattack`` first (DESIGN §6)."""
    ensure_autoattack_alias()  # when neither is installed, robustbench's own import below says what is missing
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # old-timm-path FutureWarnings and pkg_resources warnings
            import robustbench
            import robustbench.model_zoo
            import robustbench.utils  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name == "robustbench":
            raise ModelSourceError(f"robustbench is not installed; {_ROBUSTBENCH_INSTALL}") from e
        raise ModelSourceError(
            f"robustbench could not be imported: module {e.name!r} is missing; {_ROBUSTBENCH_INSTALL} "
            "(and pip install pyautoattack for 'autoattack')"
        ) from e
    except ImportError as e:
        raise ModelSourceError(f"robustbench could not be imported ({e}); {_ROBUSTBENCH_INSTALL}") from e
    return robustbench


def parse_input_shape(text: str) -> tuple[int, ...]:
    """Parse ``"1,3,224,224"`` (also ``1x3x224x224``) into a tuple of positive ints."""
    parts = [p.strip() for p in re.split(r"[,x×]", str(text).strip().strip("()[]"))]
    if not parts or any(not p.isdigit() or int(p) <= 0 for p in parts) or len(parts) < 2:
        raise ModelSourceError(
            f"input shape {text!r} is not a list of positive integers with a batch dimension; "
            "write it like 1,3,224,224"
        )
    return tuple(int(p) for p in parts)


def default_input_shape(model: nn.Module, *, recipe: Recipe | None = None) -> tuple[int, ...]:
    """A probe input shape: timm's ``pretrained_cfg['input_size']`` (or a model's own ``default_input_size``,
    C×H×W) with batch 1, 32×32 for RobustBench CIFAR models, else ``(1, C, 224, 224)`` with C read from the
    first convolution (3 if none)."""
    in_chans = _in_chans(model)
    cfg = _timm_cfg(model)
    size = cfg.get("input_size") if cfg is not None else getattr(model, "default_input_size", None)
    if isinstance(size, (tuple, list)) and len(size) == 3:
        c, h, w = size
        return (1, in_chans or int(c), int(h), int(w))
    hf_shape = _transformers_input_shape(model)
    if hf_shape is not None:
        return hf_shape
    if recipe is not None and recipe.kind == "robustbench":
        size = 224 if recipe.kwargs.get("dataset") == "imagenet" else 32
        return (1, in_chans or 3, size, size)
    if type(model).__module__.startswith("robustbench."):
        inner = next((m for m in model.modules() if _timm_cfg(m) is not None), None)
        if inner is not None:
            return default_input_shape(inner)
        return (1, in_chans or 3, 32, 32)  # RobustBench's own architectures are the CIFAR ones
    return (1, in_chans or 3, 224, 224)


# ------------------------------------------------------------------------------------------ specs


def _looks_like_file(spec: str) -> bool:
    if spec.startswith(("timm:", "torchvision:", "robustbench:", *_TRANSFORMERS_SPECS)):
        return False
    return spec.lower().endswith(FILE_SUFFIXES) or os.path.isfile(spec)


def _recipe_for_spec(spec: str, kwargs: Mapping[str, Any], *, role: str = "model") -> Recipe:
    """A recipe for a non-file spec (timm, robustbench, class)."""
    if spec.startswith("timm:"):
        name = spec[len("timm:") :].strip()
        if not name:
            raise ModelSourceError(f"{role} spec {spec!r} has no architecture name; write e.g. timm:resnet18")
        return Recipe("timm", name, _json_kwargs(kwargs, f"{role} {spec!r}"))
    if spec.startswith("torchvision:"):
        name = spec[len("torchvision:") :].strip()
        if not name:
            raise ModelSourceError(
                f"{role} spec {spec!r} has no architecture name; write e.g. torchvision:resnet18"
            )
        return Recipe("torchvision", name, _json_kwargs(kwargs, f"{role} {spec!r}"))
    if spec.startswith(_TRANSFORMERS_SPECS):
        return _transformers_spec_recipe(spec, kwargs, role)
    if spec.startswith("robustbench:"):
        model_id, dataset, threat = _parse_robustbench(spec)
        extra = dict(kwargs)
        if extra:
            raise ModelSourceError(
                f"{role} {spec!r}: RobustBench models take no constructor options (got {', '.join(extra)}); "
                "put dataset and threat model in the spec: robustbench:ID@cifar100/Linf"
            )
        return Recipe("robustbench", model_id, {"dataset": dataset, "threat_model": threat})
    if _CLASS_SPEC.match(spec):
        return Recipe("class", spec, _json_kwargs(kwargs, f"{role} {spec!r}"))
    if "/" in spec or os.sep in spec or Path(spec).suffix:
        raise ModelSourceError(
            f"cannot tell what {role} {spec!r} is: there is no such file (check the path), and it is none of the "
            f"other forms; {_ACCEPTED_FORMS}"
        )
    known = _bare_name_sources(spec)
    if known:
        raise ModelSourceError(
            f"cannot tell what {role} {spec!r} is: name the library, e.g. {' or '.join(known)} (random init)"
        )
    raise ModelSourceError(f"cannot tell what {role} {spec!r} is; {_ACCEPTED_FORMS}")


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


def _parse_robustbench(spec: str) -> tuple[str, str, str]:
    body = spec[len("robustbench:") :].strip()
    model_id, _, where = body.partition("@")
    model_id = model_id.strip()
    if not model_id:
        raise ModelSourceError(f"spec {spec!r} has no model id; write e.g. robustbench:Carmon2019Unlabeled")
    dataset, _, threat = where.partition("/")
    dataset = _canonical(dataset.strip() or "cifar10", _ROBUSTBENCH_DATASETS, f"spec {spec!r}: dataset")
    threat = _canonical(threat.strip() or "Linf", _ROBUSTBENCH_THREATS, f"spec {spec!r}: threat model")
    return model_id, dataset, threat


def _canonical(value: str, choices: Sequence[str], where: str) -> str:
    for choice in choices:
        if value.lower() == choice.lower():
            return choice
    raise ModelSourceError(f"{where} {value!r} is not one of {', '.join(choices)}{closest(value, choices)}")


def _check_robustbench_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    keys = ("dataset", "threat_model")
    if set(kwargs) != set(keys):
        raise ModelSourceError(
            f"robustbench recipe {name!r} needs exactly the options dataset and threat_model, got "
            f"{sorted(kwargs)}"
        )
    if kwargs["dataset"] not in _ROBUSTBENCH_DATASETS:
        raise ModelSourceError(
            f"robustbench recipe {name!r}: dataset {kwargs['dataset']!r} is not one of "
            f"{', '.join(_ROBUSTBENCH_DATASETS)}"
        )
    if kwargs["threat_model"] not in _ROBUSTBENCH_THREATS:
        raise ModelSourceError(
            f"robustbench recipe {name!r}: threat_model {kwargs['threat_model']!r} is not "
            f"one of {', '.join(_ROBUSTBENCH_THREATS)}"
        )


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


# ------------------------------------------------------------------------------------------ builders


def _build(recipe: Recipe, *, trusted: bool, allow_modules: Sequence[str]) -> nn.Module:
    """Random-init architecture for a timm / robustbench / class recipe."""
    if recipe.kind == "timm":
        return _build_timm(recipe.name, recipe.kwargs)
    if recipe.kind == "torchvision":
        return _build_torchvision(recipe.name, recipe.kwargs)
    if recipe.kind == "transformers":
        return _build_transformers(recipe)
    if recipe.kind == "robustbench":
        entry = _robustbench_entry(recipe)
        missing = [p for p in _torchvision_weights(recipe.name) if not p.is_file()]
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

    forbidden = [k for k in kwargs if k in _TIMM_FORBIDDEN_KWARGS]
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


def _build_torchvision(name: str, kwargs: Mapping[str, Any], *, fetch: Mapping[str, Any] | None = None) -> nn.Module:
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


def _warn_if_untrained(recipe: Recipe) -> None:
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
            fetching = _fetching_kwarg(recipe.kwargs)
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


# ------------------------------------------------------------------------------------------ robustbench


def _robustbench_entry(recipe: Recipe) -> dict[str, Any]:
    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    dataset, threat = recipe.kwargs["dataset"], recipe.kwargs["threat_model"]
    zoo = model_dicts[BenchmarkDataset(dataset)].get(ThreatModel(threat.replace("_3d", "")), {})
    if recipe.name not in zoo:
        raise ModelSourceError(
            f"RobustBench has no model {recipe.name!r} for {dataset}/{threat}{closest(recipe.name, zoo)}; "
            "the dataset and threat model go after '@': robustbench:ID@cifar100/Linf"
        )
    return zoo[recipe.name]


def _torchvision_weights(model_id: str) -> list[Path]:
    """Cached torchvision files that RobustBench's ImageNet ``Standard_*`` constructors load."""
    if model_id != "Standard_R50":
        return []
    from torchvision.models import ResNet50_Weights

    url = ResNet50_Weights.IMAGENET1K_V1.url
    return [Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]]


def _load_robustbench(recipe: Recipe, model_dir: Path) -> nn.Module:
    import timm

    entry = _robustbench_entry(recipe)
    rb_utils = sys.modules["robustbench.utils"]
    model_id, dataset = recipe.name, recipe.kwargs["dataset"]
    threat = recipe.kwargs["threat_model"].replace("_3d", "")
    timm_name = f"{model_id.lower().replace('-', '_')}_{dataset}_{threat.lower()}"
    if timm.is_model(timm_name):
        raise ModelSourceError(
            f"RobustBench distributes {model_id} through the Hugging Face hub as timm model {timm_name!r}, "
            f"and graphsparse never downloads: load its weights file with --arch timm:{timm_name}"
        )
    base = model_dir / dataset / threat / f"{model_id}.pt"
    gdrive = entry.get("gdrive_id")
    if isinstance(gdrive, list):
        needed = [Path(f"{base}_m{i}.pt") for i in range(len(gdrive))]
    elif dataset == "imagenet" and "Standard" in model_id:
        needed = _torchvision_weights(model_id)  # its constructor loads torchvision's pretrained weights
    else:
        needed = [base]
    missing = [p for p in needed if not p.is_file()]
    if missing:
        raise ModelSourceError(
            f"RobustBench weights for {model_id} ({dataset}/{threat}) are not on disk: "
            f"expected {missing[0]}. "
            "graphsparse never downloads; fetch them with robustbench.utils.load_model on a machine with "
            "internet and copy the models folder here, or pass model_dir=... (--model-dir)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return rb_utils.load_model(
                model_name=model_id, dataset=dataset, threat_model=threat, model_dir=str(model_dir)
            )
    except Exception as e:
        raise ModelSourceError(
            f"RobustBench could not load {model_id} from {model_dir}: {type(e).__name__}: {e}"
        ) from e


# ------------------------------------------------------------------------------------------ files


def _load_file(
    path: Path,
    *,
    arch: str | None,
    allow_modules: Sequence[str],
    kwargs: Mapping[str, Any],
    strip_prefix: Sequence[str] = (),
    checkpoint_key: str | None = None,
) -> tuple[nn.Module, Recipe]:
    if not path.is_file():
        raise ModelSourceError(f"model file {path} does not exist{closest(path.name, _siblings(path))}")
    arch_recipe = None
    if arch is not None:
        if _looks_like_file(arch):
            raise ModelSourceError(
                f"--arch {arch!r} must be an architecture spec, not a file; {_ACCEPTED_FORMS}"
            )
        arch_recipe = _recipe_for_spec(arch, kwargs, role="--arch")
    elif kwargs:
        raise ModelSourceError(
            f"options {', '.join(kwargs)} only apply with an architecture (--arch) "
            f"when loading the file {path}"
        )

    kind = _file_format(path)
    if kind == "safetensors" or (kind == "unknown" and path.suffix.lower() == ".safetensors"):
        obj: Any = _read_safetensors(path)  # whatever the suffix: a renamed .safetensors file is still one
    elif path.suffix.lower() == ".safetensors":  # torch.load reads any *.safetensors path as safetensors
        raise ModelSourceError(
            f"{path} is named .safetensors but holds a torch.save checkpoint (it starts with {_head(path, 8)!r}), "
            f"not safetensors: rename it to {path.with_suffix('.pt').name}"
        )
    elif kind == "unknown" and path.suffix.lower() not in FILE_SUFFIXES:
        raise ModelSourceError(
            f"model file {path} is neither a torch.save checkpoint nor a safetensors file (it starts with "
            f"{_head(path)!r}); give a file written by torch.save or safetensors"
        )
    else:
        obj = read_pickle(path, allow_modules)
    obj = _unwrap(obj, path, checkpoint_key)

    if isinstance(obj, nn.Module) and arch_recipe is None:
        if strip_prefix:
            raise ModelSourceError(
                f"{path} holds a whole model ({type(obj).__name__}); --strip-prefix applies to state dicts "
                "loaded with --arch"
            )
        recipe = _timm_recipe(obj) or _torchvision_recipe(obj)
        return obj.eval(), recipe or Recipe("file", str(path.resolve()), {}, sha256=_sha256(path))
    if arch_recipe is None:
        example = ", ".join(repr(k) for k in list(obj)[:3])
        raise ModelSourceError(
            f"{path} holds a state dict ({len(obj)} tensors, e.g. {example}), not a whole model: say which "
            "architecture it belongs to with --arch timm:NAME, --arch torchvision:NAME or --arch "
            "pkg.module:Class (Python: arch=...)"
        )
    state = obj.state_dict() if isinstance(obj, nn.Module) else obj
    model = _build(arch_recipe, trusted=True, allow_modules=allow_modules)
    state, note = _fit_keys(dict(state), list(model.state_dict()), strip_prefix, path)
    _load_state(model, state, path, arch_recipe, note)
    return model.eval(), arch_recipe


def _file_format(path: Path) -> str:
    """``safetensors``, ``zip`` (torch.save), ``pickle`` (legacy torch.save) or ``unknown``, from the bytes."""
    head = _head(path, 16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 little-endian header length, then JSON
        size = int.from_bytes(head[:8], "little")
        if 0 < size <= path.stat().st_size - 8:
            return "safetensors"
    if head[:1] == b"\x80":  # a pickle's PROTO opcode (legacy torch.save starts with its magic number)
        return "pickle"
    return "unknown"


def _head(path: Path, n: int = 16) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise ModelSourceError(f"cannot read model file {path}: {e}") from e


def _siblings(path: Path) -> list[str]:
    try:
        return [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
    except OSError:
        return []


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise ModelSourceError(
            f"{path} is not a readable safetensors file ({e}); is it truncated or corrupt?"
        ) from e


def _unwrap(obj: Any, path: Path, checkpoint_key: str | None = None) -> nn.Module | dict[str, torch.Tensor]:
    """A whole module or a state dict, from whatever the file held (``checkpoint_key`` picks the entry)."""
    trail = []
    if checkpoint_key is not None:
        if not isinstance(obj, Mapping) or checkpoint_key not in obj:
            keys = [str(k) for k in obj] if isinstance(obj, Mapping) else []
            what = f"a dict with keys {', '.join(repr(k) for k in keys[:8])}" if keys else f"a {type(obj).__name__}"
            raise ModelSourceError(
                f"{path} has no entry {checkpoint_key!r} (--checkpoint-key){closest(checkpoint_key, keys)}; "
                f"it holds {what}"
            )
        trail.append(f"[{checkpoint_key!r}]")
        obj = obj[checkpoint_key]
    for _ in range(4):
        if isinstance(obj, nn.Module):
            return obj
        if _is_state_dict(obj):
            return {str(k): v for k, v in obj.items()}
        if isinstance(obj, Mapping):
            key = next((k for k in CHECKPOINT_KEYS if isinstance(obj.get(k), (Mapping, nn.Module))), None)
            if key is None:
                keys = ", ".join(repr(k) for k in list(obj)[:8])
                holders = [str(k) for k, v in obj.items() if isinstance(v, nn.Module) or _is_state_dict(v)]
                hint = (
                    f"; the weights look to be under {holders[0]!r}: pass --checkpoint-key {holders[0]} "
                    f"(Python: checkpoint_key={holders[0]!r})"
                    if holders and not trail
                    else ""
                )
                raise ModelSourceError(
                    f"{path}{''.join(trail)} is a dict with keys {keys or '(none)'}: "
                    "neither a state dict (all "
                    f"values tensors) nor a checkpoint holding one under {', '.join(CHECKPOINT_KEYS)}{hint}"
                )
            trail.append(f"[{key!r}]")
            obj = obj[key]
            continue
        raise ModelSourceError(
            f"{path}{''.join(trail)} holds a {type(obj).__name__}, not a model, state dict or checkpoint dict; "
            "give a file written by torch.save(model), torch.save(model.state_dict()) or safetensors"
        )
    raise ModelSourceError(f"{path}{''.join(trail)}: checkpoint dicts nested too deep to find the weights")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _fit_keys(
    state: dict[str, torch.Tensor], expected: list[str], strip_prefix: Sequence[str], path: Path
) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict with its keys fitted to the architecture's, and a note on what was done for messages.

    Explicit prefixes keep only the keys under them. Otherwise a leading component every key shares is
    removed (repeatedly: ``module._orig_mod.``) when that makes the key set exactly the architecture's.
    """
    for prefix in strip_prefix:
        kept = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not kept:
            raise ModelSourceError(
                f"no key of the state dict in {path} starts with {prefix!r} (--strip-prefix); "
                f"its keys start with {_leading(state)}"
            )
        state = kept
    if strip_prefix:
        return state, f"taken from under {''.join(strip_prefix)!r} (--strip-prefix)"
    want = set(expected)
    candidates = [("", state)]
    for _ in range(_MAX_PREFIX_DEPTH):
        current = candidates[-1][1]
        heads = {k.split(".", 1)[0] for k in current}
        if len(heads) != 1 or any("." not in k for k in current):
            break
        head = heads.pop() + "."
        candidates.append((candidates[-1][0] + head, {k[len(head) :]: v for k, v in current.items()}))
    for prefix, candidate in candidates:
        if set(candidate) == want:
            return candidate, f"without the prefix {prefix!r} every key shared" if prefix else ""
    # no exact fit: compare with the closest candidate, and name a prefix that selects the architecture's keys
    prefix, best = max(candidates, key=lambda c: len(want & set(c[1])))
    note = f"compared without the prefix {prefix!r} every key shares" if prefix else ""
    fits = [p for p in _leading_components(state) if {k[len(p) :] for k in state if k.startswith(p)} == want]
    if fits:
        others = f" (or {', '.join(fits[1:])})" if len(fits) > 1 else ""
        note += ("; " if note else "") + (
            f"the keys under {fits[0]!r} are exactly the architecture's: pass --strip-prefix {fits[0]}{others} "
            f"(Python: strip_prefix={fits[0]!r})"
        )
    return best, note


def _leading_components(state: Mapping[str, Any]) -> list[str]:
    """Leading key components ('model.'), most keys first."""
    counts: dict[str, int] = {}
    for k in state:
        if "." in k:
            head = k.split(".", 1)[0] + "."
            counts[head] = counts.get(head, 0) + 1
    return sorted(counts, key=lambda h: -counts[h])


def _leading(state: Mapping[str, Any]) -> str:
    heads = _leading_components(state)
    if heads:
        return ", ".join(repr(h) for h in heads[:6])
    return f"no shared prefix (e.g. {next(iter(state), '')!r})"


def _load_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, recipe: Recipe, note: str = ""
) -> None:
    try:
        model.load_state_dict(state, strict=True)
        return
    except RuntimeError as e:
        cause = e
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]

    def few(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

    parts = [f"{len(missing)} missing: {few(missing)}"] if missing else []
    parts += [f"{len(unexpected)} unexpected: {few(unexpected)}"] if unexpected else []
    parts += [f"{len(shapes)} with another shape (file vs model): {few(shapes)}"] if shapes else []
    detail = "; ".join(parts) or str(cause)
    if note and "--strip-prefix" in note:
        hint = note.split("; ")[-1]
        note = "; ".join(note.split("; ")[:-1])
    else:
        hint = "check --arch and its options (--num-classes, --model-kwargs JSON; Python: keyword arguments)"
        classes = _num_classes_hint(expected, state)
        if classes is not None and not missing and not unexpected:
            hint = (
                f"the file's classifier has {classes} classes: pass --num-classes {classes} "
                f"(Python: num_classes={classes})"
            )
    keys = f"; keys {note}" if note else ""
    raise ModelSourceError(f"the weights in {path} do not fit {recipe} ({detail}{keys}); {hint}") from cause


def _num_classes_hint(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> int | None:
    """The class count, when the only tensors of another shape are the classifier's (dim 0 differs, once)."""
    differ = [(state[k], v) for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if not differ or len(differ) > 2:
        return None
    if not all(a.dim() == b.dim() >= 1 and a.shape[1:] == b.shape[1:] for a, b in differ):
        return None
    counts = {int(a.shape[0]) for a, _ in differ}
    return counts.pop() if len(counts) == 1 else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ timm helpers


def _timm_cfg(model: nn.Module) -> Mapping[str, Any] | None:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    return cfg if isinstance(cfg, Mapping) else None


def _in_chans(model: nn.Module) -> int | None:
    if isinstance(getattr(model, "in_chans", None), int):  # timm models record it (TResNet's stem sees 16x)
        return model.in_chans
    cfg = _timm_cfg(model)
    first = cfg.get("first_conv") if cfg is not None else None
    if isinstance(first, str) and first:
        try:
            channels = getattr(model.get_submodule(first), "in_channels", None)
            if isinstance(channels, int):
                return channels
        except AttributeError:
            pass
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    return conv.in_channels if conv is not None else None


def _timm_recipe(model: nn.Module) -> Recipe | None:
    """A timm recipe for a whole timm model, if rebuilding it gives the same parameter names and shapes."""
    cfg = _timm_cfg(model)
    arch = cfg.get("architecture") if cfg is not None else None
    if not isinstance(arch, str) or not type(model).__module__.startswith("timm."):
        return None
    import timm

    if not timm.is_model(arch):
        return None
    kwargs: dict[str, Any] = {}
    if isinstance(getattr(model, "num_classes", None), int):
        kwargs["num_classes"] = model.num_classes
    in_chans = _in_chans(model)
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    recipe = Recipe("timm", arch, kwargs)
    try:
        rebuilt = timm.create_model(arch, pretrained=False, **kwargs)
    except Exception:
        return None
    return recipe if _computes_the_same(model, rebuilt) else None


def _torchvision_recipe(model: nn.Module) -> Recipe | None:
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
    recipe = _timm_recipe(model) or _torchvision_recipe(model) or _transformers_recipe(model)
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


# ------------------------------------------------------------------------------------------ transformers


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
    refused = [k for k in _TRANSFORMERS_REFUSED_KEYS if k in kwargs]
    refused += [k for k in _TRANSFORMERS_FETCHING_FLAGS if kwargs.get(k)]
    if refused:
        raise ModelSourceError(
            f"transformers recipe {name!r} has the config entry {refused[0]!r}, which would run remote code, a "
            "quantisation back end or download a backbone; a recipe rebuilds the architecture only (the artifact "
            "holds the weights)"
        )


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
    return _json_kwargs(data, f"transformers config {type(config).__name__}")


def _transformers_spec_recipe(spec: str, kwargs: Mapping[str, Any], role: str) -> Recipe:
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
    for key in ("model_type", *_TRANSFORMERS_REFUSED_KEYS):
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


def _build_transformers(recipe: Recipe) -> nn.Module:
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


def _transformers_model_recipe(model: nn.Module) -> Recipe | None:
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


def _transformers_recipe(model: nn.Module) -> Recipe | None:
    """A transformers recipe for a Hugging Face image classifier, if its class rebuilt from its config computes
    the same function."""
    recipe = _transformers_model_recipe(model)
    if recipe is None:
        return None
    try:
        rebuilt = _build_transformers(recipe)
    except ModelSourceError:
        return None
    return recipe if _computes_the_same(model, rebuilt) else None


def _load_pretrained(spec: str, kwargs: Mapping[str, Any]) -> tuple[nn.Module, Recipe]:
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
    recipe = _transformers_model_recipe(model)
    if recipe is None:
        raise ModelSourceError(
            f"model {spec!r} is a {type(model).__name__}, not a Hugging Face image classification class "
            "graphsparse can rebuild"
        )
    return model.eval(), recipe


def _transformers_input_shape(model: nn.Module) -> tuple[int, ...] | None:
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
