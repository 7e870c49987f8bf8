"""RobustBench models: the ``robustbench:ID[@dataset/threat]`` spec, importing robustbench (``autoattack``
aliased first), its model zoo entries, and loading a model whose weights are already on disk (never downloads).
"""

from __future__ import annotations

import sys
import types
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from graphsparse._compat import ensure_autoattack_alias
from graphsparse.errors import ModelSourceError, closest

if TYPE_CHECKING:
    from graphsparse.sources.recipes import Recipe

__all__ = ["import_robustbench"]

_ROBUSTBENCH_DATASETS = ("cifar10", "cifar100", "imagenet")
_ROBUSTBENCH_THREATS = ("Linf", "L2", "corruptions", "corruptions_3d")
_ROBUSTBENCH_INSTALL = (
    "pip install --no-deps robustbench==1.1.1 (its metadata pins an old timm), then "
    "pip install 'graphsparse[robustbench]' for the packages its model zoo imports"
)


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


def parse_robustbench(spec: str) -> tuple[str, str, str]:
    """``(model id, dataset, threat model)`` of ``robustbench:ID[@dataset/threat]`` (default cifar10/Linf)."""
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


def check_robustbench_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    """Checks a robustbench recipe's options: exactly a known dataset and threat model."""
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


def robustbench_entry(recipe: Recipe) -> dict[str, Any]:
    """The RobustBench model zoo entry of a robustbench recipe (its constructor and weights ids)."""
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


def torchvision_weights(model_id: str) -> list[Path]:
    """Cached torchvision files that RobustBench's ImageNet ``Standard_*`` constructors load."""
    if model_id != "Standard_R50":
        return []
    from torchvision.models import ResNet50_Weights

    url = ResNet50_Weights.IMAGENET1K_V1.url
    return [Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]]


def load_robustbench(recipe: Recipe, model_dir: Path) -> nn.Module:
    """The RobustBench model of ``recipe`` with its weights, read from ``model_dir`` (never downloads)."""
    import timm

    entry = robustbench_entry(recipe)
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
        needed = torchvision_weights(model_id)  # its constructor loads torchvision's pretrained weights
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
