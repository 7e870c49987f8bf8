"""graphsparse: post-training activation surgery (MeanSparse, SPARTA) for robust image classifiers.

The pipeline, one module per stage::

    capture -> sites -> rules/plan -> rewrite -> calibrate -> tune/evaluate -> io (save/load)

The public names below are imported on first use (PEP 562 module ``__getattr__``), so ``import graphsparse``
and the CLI's ``--help`` do not load torch or timm; every name of ``__all__`` is there all the same.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it (imported on first access)
_LAZY: dict[str, str] = {
    "CalibrationRecord": "calibrate",
    "calibrate": "calibrate",
    "Capture": "capture",
    "capture": "capture",
    "load_dataset": "data",
    "make_loader": "data",
    "split_indices": "data",
    "ArtifactError": "errors",
    "CalibrationError": "errors",
    "CaptureError": "errors",
    "DataError": "errors",
    "GraphsparseError": "errors",
    "ModelSourceError": "errors",
    "PlanError": "errors",
    "RuleError": "errors",
    "UnsafePickleError": "errors",
    "EvalReport": "evaluate",
    "EvaluationError": "evaluate",
    "evaluate": "evaluate",
    "fuse_activations": "fuse",
    "export": "deploy",
    "load": "io",
    "read_metadata": "io",
    "save": "io",
    "MeanSparse": "ops",
    "Sparta": "ops",
    "backward_mode": "ops",
    "freeze_except_sparta": "ops",
    "operators": "ops",
    "set_alpha": "ops",
    "sparta_parameters": "ops",
    "straight_through": "ops",
    "Plan": "plan",
    "PlanEntry": "plan",
    "make_plan": "plan",
    "plot_site_histogram": "plots",
    "plot_tuning": "plots",
    "apply_plan": "rewrite",
    "rewrite": "rewrite",
    "rewrite_info": "rewrite",
    "RuleSet": "rules",
    "builtin_rules": "rules",
    "load_rules": "rules",
    "parse_rules": "rules",
    "Site": "sites",
    "find_sites": "sites",
    "pgd_attack": "train",
    "train": "train",
    "TuneResult": "tune",
    "tune": "tune",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports these on first use
    from .calibrate import CalibrationRecord, calibrate
    from .capture import Capture, capture
    from .data import load_dataset, make_loader, split_indices
    from .deploy import export
    from .errors import (
        ArtifactError,
        CalibrationError,
        CaptureError,
        DataError,
        GraphsparseError,
        ModelSourceError,
        PlanError,
        RuleError,
        UnsafePickleError,
    )
    from .evaluate import EvalReport, EvaluationError, evaluate
    from .fuse import fuse_activations
    from .io import load, read_metadata, save
    from .ops import (
        MeanSparse,
        Sparta,
        backward_mode,
        freeze_except_sparta,
        operators,
        set_alpha,
        sparta_parameters,
        straight_through,
    )
    from .plan import Plan, PlanEntry, make_plan
    from .plots import plot_site_histogram, plot_tuning
    from .rewrite import apply_plan, rewrite, rewrite_info
    from .rules import RuleSet, builtin_rules, load_rules, parse_rules
    from .sites import Site, find_sites
    from .train import pgd_attack, train
    from .tune import TuneResult, tune


def plan(model: Any, rule: Any, example_input: Any, *, alpha: float | None = None) -> Plan:
    """The :class:`Plan` a rule file makes for ``model``: action, α and deciding rule per site.

    Args:
        model: the base model.
        rule: built-in rule name, YAML path or :class:`RuleSet`.
        example_input: a probe batch with the model's input shape.
        alpha: overrides the α of every MeanSparse rule.
    """
    from .plan import make_plan
    from .sites import find_sites

    return make_plan(find_sites(model, example_input), rule, alpha=alpha)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        # a submodule (gs.models, gs.io, ...), as when this file imported every stage up front
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# public functions named like the submodule that defines them (graphsparse.calibrate is the function)
_SHADOWED = frozenset({"plan"} | {name for name, module in _LAZY.items() if name == module})


class _Package(types.ModuleType):
    """Keeps ``graphsparse.calibrate`` (and the other names of ``_SHADOWED``) the function: the first import of
    the submodule ``graphsparse.calibrate``, by any stage, sets the package attribute to the module; it is
    dropped here, and ``__getattr__`` gives the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "ArtifactError",
    "CalibrationError",
    "CalibrationRecord",
    "Capture",
    "CaptureError",
    "EvalReport",
    "EvaluationError",
    "TuneResult",
    "evaluate",
    "plot_site_histogram",
    "plot_tuning",
    "tune",
    "DataError",
    "GraphsparseError",
    "MeanSparse",
    "ModelSourceError",
    "Plan",
    "PlanEntry",
    "PlanError",
    "RuleError",
    "RuleSet",
    "Site",
    "Sparta",
    "freeze_except_sparta",
    "fuse_activations",
    "export",
    "pgd_attack",
    "sparta_parameters",
    "train",
    "UnsafePickleError",
    "apply_plan",
    "backward_mode",
    "builtin_rules",
    "calibrate",
    "capture",
    "find_sites",
    "load",
    "read_metadata",
    "save",
    "load_dataset",
    "load_rules",
    "make_loader",
    "make_plan",
    "operators",
    "parse_rules",
    "plan",
    "rewrite",
    "rewrite_info",
    "set_alpha",
    "split_indices",
    "straight_through",
]
