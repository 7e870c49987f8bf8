"""Operators graphsparse inserts into models, and functions acting on every operator of a model."""

from graphsparse.ops.meansparse import (
    MeanSparse,
    backward_mode,
    operators,
    set_alpha,
    straight_through,
)

__all__ = ["MeanSparse", "operators", "straight_through", "backward_mode", "set_alpha"]
