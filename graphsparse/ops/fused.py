"""Activations a MeanSparse can apply to its own output: the fused MeanSparse + activation form.

An activation is named by a *spec*, ``(name, args)`` where ``args`` is a tuple of ``(keyword, value)``
pairs, e.g. ``("relu", ())`` or ``("leaky_relu", (("negative_slope", 0.1),))``. Specs are plain data so
that they survive ``torch.fx`` code generation, ``copy.deepcopy`` and pickling.

Every activation here is parameter-free and deterministic, and computes exactly what its ``torch.nn``
module computes (``nn.GELU(approximate="tanh")`` is ``("gelu", (("approximate", "tanh"),))``).
:func:`graphsparse.planning.fuse.fuse_activations` makes the specs from graph nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "ActivationSpec",
    "FUNCTIONS",
    "INPLACE",
    "KERNEL_EXACT",
    "apply_activation",
    "check_activation",
    "kernel_activation",
]

ActivationSpec = tuple[str, tuple[tuple[str, Any], ...]]

FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "relu": F.relu,
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "hardtanh": F.hardtanh,
    "elu": F.elu,
    "celu": F.celu,
    "selu": F.selu,
    "gelu": F.gelu,
    "silu": F.silu,
    "mish": F.mish,
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "softplus": F.softplus,
}
"""Activation name -> the function computing it (called as ``fn(y, **dict(args))``)."""

INPLACE = frozenset(
    {"relu", "relu6", "leaky_relu", "hardtanh", "elu", "celu", "selu", "silu", "mish", "hardswish", "hardsigmoid"}
)
"""Activations that can overwrite their input (``inplace=True``)."""

KERNEL_EXACT = frozenset({"relu", "leaky_relu"})
"""Activations computed inside the compiled MeanSparse kernel. A compiled kernel is bit-equal to eager
PyTorch for these (compare and select, one multiply), -0.0 and NaN included; others (relu6 and hardtanh
change -0.0, transcendental ones may round differently) are applied by eager PyTorch after the kernel."""


def check_activation(spec: Any) -> ActivationSpec | None:
    """``spec`` as a valid :data:`ActivationSpec` (or None); ValueError naming the problem otherwise."""
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = (spec, ())
    try:
        name, args = spec
        args = tuple((str(key), value) for key, value in args)
    except (TypeError, ValueError) as e:
        raise ValueError(f"an activation spec is (name, ((keyword, value), ...)), got {spec!r}") from e
    if name not in FUNCTIONS:
        raise ValueError(f"unknown activation {name!r}; fusable activations: {', '.join(FUNCTIONS)}")
    if any(key == "inplace" for key, _ in args):
        raise ValueError(f"activation {name!r}: 'inplace' is decided by the operator, not the spec")
    return name, args


def apply_activation(spec: ActivationSpec, y: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """``spec``'s activation of ``y``; in place (returning ``y``) when asked and the activation can."""
    name, args = spec
    kwargs = dict(args)
    if inplace and name in INPLACE:
        kwargs["inplace"] = True
    return FUNCTIONS[name](y, **kwargs)


def kernel_activation(spec: ActivationSpec | None) -> tuple[str | None, float]:
    """``(name, negative slope)`` of a :data:`KERNEL_EXACT` activation (or None) as the kernels take it."""
    if spec is None:
        return None, 0.0
    name, args = spec
    return name, float(dict(args).get("negative_slope", 0.01)) if name == "leaky_relu" else 0.0
