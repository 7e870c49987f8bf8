"""graphsparse: post-training activation surgery (MeanSparse, SPARTA) for robust image classifiers.

The pipeline, one folder per stage (``docs/architecture.md``)::

    graph (capture, sites) -> planning (rules, plan, rewrite) -> stats (calibrate)
        -> robust (tune, evaluate) -> artifact (save/load); ops holds the operators

The public names below are imported on first use (PEP 562 module ``__getattr__``), so ``import graphsparse``
and the CLI's ``--help`` do not load torch or timm; every name of ``__all__`` is there all the same.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

from graphsparse import _moved

__version__ = "0.1.0"

# public name -> submodule that defines it (imported on first access)
_LAZY: dict[str, str] = {
    "CalibrationRecord": "stats.calibrate",
    "calibrate": "stats.calibrate",
    "Capture": "graph.capture",
    "capture": "graph.capture",
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
    "EvalReport": "robust.eval_report",
    "EvaluationError": "errors",
    "evaluate": "robust.evaluate",
    "fuse_activations": "planning.fuse",
    "export": "deploy",
    "load": "artifact.io",
    "read_metadata": "artifact.io",
    "save": "artifact.io",
    "MeanSparse": "ops",
    "Sparta": "ops",
    "backward_mode": "ops",
    "freeze_except_sparta": "ops",
    "operators": "ops",
    "set_alpha": "ops",
    "sparta_parameters": "ops",
    "straight_through": "ops",
    "Plan": "planning.plan",
    "PlanEntry": "planning.plan",
    "make_plan": "planning.plan",
    "plot_site_histogram": "plots",
    "plot_tuning": "plots",
    "apply_plan": "planning.rewrite",
    "rewrite": "planning.rewrite",
    "rewrite_info": "planning.rewrite",
    "RuleSet": "planning.rules",
    "builtin_rules": "planning.rules",
    "load_rules": "planning.rules",
    "parse_rules": "planning.rule_parser",
    "Site": "graph.sites",
    "find_sites": "graph.sites",
    "pgd_attack": "robust.pgd",
    "train": "robust.train",
    "TuneResult": "robust.tune",
    "tune": "robust.tune",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports these on first use
    from .artifact.io import load, read_metadata, save
    from .data import load_dataset, make_loader, split_indices
    from .deploy import export
    from .errors import (
        ArtifactError,
        CalibrationError,
        CaptureError,
        DataError,
        EvaluationError,
        GraphsparseError,
        ModelSourceError,
        PlanError,
        RuleError,
        UnsafePickleError,
    )
    from .graph.capture import Capture, capture
    from .graph.sites import Site, find_sites
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
    from .planning.fuse import fuse_activations
    from .planning.plan import Plan, PlanEntry, make_plan
    from .planning.rewrite import apply_plan, rewrite, rewrite_info
    from .planning.rule_parser import parse_rules
    from .planning.rules import RuleSet, builtin_rules, load_rules
    from .plots import plot_site_histogram, plot_tuning
    from .robust.eval_report import EvalReport
    from .robust.evaluate import evaluate
    from .robust.pgd import pgd_attack
    from .robust.train import train
    from .robust.tune import TuneResult, tune
    from .stats.calibrate import CalibrationRecord, calibrate


def plan(model: Any, rule: Any, example_input: Any, *, alpha: float | None = None) -> Plan:
    """The :class:`Plan` a rule file makes for ``model``: action, α and deciding rule per site.

    Args:
        model: the base model.
        rule: built-in rule name, YAML path or :class:`RuleSet`.
        example_input: a probe batch with the model's input shape.
        alpha: overrides the α of every MeanSparse rule.
    """
    from .graph.sites import find_sites
    from .planning.plan import make_plan

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


# public functions named like a module's old path (graphsparse.calibrate is the function; the module moved to
# graphsparse.stats.calibrate and its old path still imports, with a DeprecationWarning, for one release)
_SHADOWED = frozenset(name for name in [*_LAZY, "plan"] if f"{__name__}.{name}" in _moved.MOVED)


class _Package(types.ModuleType):
    """Keeps ``graphsparse.calibrate`` (and the other names of ``_SHADOWED``) the function: the first import of
    the submodule ``graphsparse.calibrate``, by any stage, sets the package attribute to the module; it is
    dropped here, and ``__getattr__`` gives the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
_moved.install()

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
