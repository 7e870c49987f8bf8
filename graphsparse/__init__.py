"""graphsparse: post-training activation surgery (MeanSparse, SPARTA) for robust image classifiers.

The pipeline, one module per stage::

    capture -> sites -> rules/plan -> rewrite -> calibrate -> tune/evaluate -> io (save/load)
"""

from .calibrate import CalibrationRecord, calibrate
from .capture import Capture, capture
from .data import load_dataset, make_loader, split_indices
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

__version__ = "0.1.0"


def plan(model, rule, example_input, *, alpha: float | None = None) -> Plan:
    """The :class:`Plan` a rule file makes for ``model``: action, α and deciding rule per site.

    Args:
        model: the base model.
        rule: built-in rule name, YAML path or :class:`RuleSet`.
        example_input: a probe batch with the model's input shape.
        alpha: overrides the α of every MeanSparse rule.
    """
    return make_plan(find_sites(model, example_input), rule, alpha=alpha)


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
