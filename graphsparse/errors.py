"""Error types. The library raises these; the CLI prints them as one line without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "GraphsparseError",
    "ModelSourceError",
    "UnsafePickleError",
    "CaptureError",
    "RuleError",
    "PlanError",
    "CalibrationError",
    "ArtifactError",
    "DataError",
    "EvaluationError",
    "closest",
]


class GraphsparseError(Exception):
    """Base class of every error graphsparse raises on purpose."""


class ModelSourceError(GraphsparseError):
    """A model spec or model file could not be turned into a module."""


class UnsafePickleError(ModelSourceError):
    """A pickle asked to import something that is not on the allow list; it was not executed."""


class CaptureError(GraphsparseError):
    """The model could not be captured (traced) or the capture does not reproduce the model."""


class RuleError(GraphsparseError):
    """A rule file is invalid, or a rule matches nothing."""


class PlanError(GraphsparseError):
    """A plan does not fit the model it is applied to."""


class CalibrationError(GraphsparseError):
    """Calibration could not produce statistics (no data, NaN/Inf at a site, ...)."""


class ArtifactError(GraphsparseError):
    """A safetensors artifact is malformed, tampered with, or does not match its model."""


class DataError(GraphsparseError):
    """A data source could not be read or split."""


class EvaluationError(GraphsparseError):
    """An evaluation or tuning request is invalid (unknown attack or norm, bad ε or sample count)."""


def closest(name: str, candidates: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix naming the closest candidate, or '' when nothing is close."""
    match = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""
