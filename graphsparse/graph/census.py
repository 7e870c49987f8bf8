"""The census: what ran when the original model saw the probe, recorded independently of tracing.

Forward hooks count every module that ran and note every activation module; a ``TorchDispatchMode`` counts the
activation ops dispatched outside activation modules (``F.relu``, ``x.relu_()``), by the innermost running module.
:func:`graphsparse.graph.sites.sites_of_capture` compares it with the sites it found, so that an activation no
site reaches is named (``PartialCaptureWarning``) instead of missed in silence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from graphsparse.graph.activations import activation_kind_of_module, is_gate_kind

__all__ = ["KIND_BUCKETS", "Census", "probe", "probe_with_census"]


# aten ops an activation dispatches -> the bucket they are counted in; a site's kind -> the bucket its call
# dispatches. Gates (sigmoid, tanh, hardsigmoid) are not counted: they also compute gates and attention.
_ATEN_BUCKETS = {
    **{op: op for op in ("relu", "gelu", "silu", "hardswish", "hardtanh", "elu", "celu", "leaky_relu", "mish",
                         "softplus")},
    **{f"{op}_": op for op in ("relu", "gelu", "silu", "hardswish", "hardtanh", "elu", "celu", "leaky_relu",
                               "mish")},
    "rrelu_with_noise": "rrelu",
    "_prelu_kernel": "prelu",
}
KIND_BUCKETS = {
    **{k: k for k in ("relu", "gelu", "silu", "hardswish", "hardtanh", "elu", "celu", "leaky_relu", "mish",
                      "softplus", "rrelu", "prelu")},
    "relu6": "hardtanh",
    "selu": "elu",
}


@dataclass
class Census:
    """What ran when the original model saw the probe, recorded independently of tracing.

    Attributes:
        activation_modules: path -> kind of every non-gate activation module that ran (not one nested in
            another activation module).
        calls: path -> how many times each module's forward ran.
        classes: path -> class name of each module that ran.
        dispatched: (path of the innermost running module, bucket) -> activation ops dispatched there
            outside activation modules (functional calls such as ``F.relu``, ``x.relu_()``).
    """

    activation_modules: dict[str, str] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    classes: dict[str, str] = field(default_factory=dict)
    dispatched: dict[tuple[str, str], int] = field(default_factory=dict)


def probe(model: nn.Module, example_input: Any) -> Any:
    """``model``'s output on ``example_input``, without gradients."""
    with torch.no_grad():
        return model(example_input)


class _CountActivations(TorchDispatchMode):
    """Counts activation ops dispatched outside activation modules, by the innermost running module."""

    def __init__(self, census: Census, stack: list[str], inside: list[int]) -> None:
        super().__init__()
        self.census, self.stack, self.inside = census, stack, inside

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bucket = _ATEN_BUCKETS.get(func.overloadpacket.__name__)
        if bucket is not None and not self.inside[0]:
            key = (self.stack[-1] if self.stack else "", bucket)
            self.census.dispatched[key] = self.census.dispatched.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


def probe_with_census(model: nn.Module, example_input: torch.Tensor) -> tuple[Any, Census]:
    """Run the probe through the original model, recording what ran (forward hooks, a dispatch mode)."""
    census = Census()
    stack: list[str] = []
    inside = [0]  # depth of activation modules being run: their own aten ops are theirs, not functional calls
    handles = []

    def pre(path: str, kind: str | None):
        def hook(module: nn.Module, args: Any) -> None:
            census.calls[path] = census.calls.get(path, 0) + 1
            census.classes[path] = type(module).__name__
            if kind is not None and not is_gate_kind(kind) and not inside[0]:
                census.activation_modules.setdefault(path, kind)
            inside[0] += kind is not None
            stack.append(path)

        return hook

    def post(kind: str | None):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            stack.pop()
            inside[0] -= kind is not None

        return hook

    try:
        for path, module in model.named_modules():
            kind = activation_kind_of_module(module)
            handles.append(module.register_forward_pre_hook(pre(path, kind)))
            handles.append(module.register_forward_hook(post(kind)))
        with _CountActivations(census, stack, inside):
            output = probe(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return output, census
