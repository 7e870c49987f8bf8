"""Operators graphsparse inserts into models, and functions acting on every operator of a model."""

from graphsparse.ops.meansparse import (
    MeanSparse,
    backward_mode,
    operators,
    set_alpha,
    straight_through,
)
from graphsparse.ops.sparta import SPARTA_TYPES, Sparta, freeze_except_sparta, sparta_parameters

__all__ = [
    "MeanSparse",
    "SPARTA_TYPES",
    "Sparta",
    "backward_mode",
    "freeze_except_sparta",
    "operators",
    "set_alpha",
    "sparta_parameters",
    "straight_through",
]
