"""One registry of activation kinds: torch, timm and functional spellings -> one canonical name.

Like timm's ``create_act`` registry, lookups accept a module, a class, a function or a method name and
return the canonical kind (``'relu'``, ``'gelu'``, ...) or ``None``. Gate kinds (sigmoid, tanh,
hardsigmoid) are listed separately: they are gates when they feed a multiplication, activations otherwise.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ACTIVATION_KINDS",
    "GATE_KINDS",
    "register_activation_module",
    "activation_kind_of_module",
    "activation_kind_of_function",
    "activation_kind_of_method",
    "is_gate_kind",
]

GATE_KINDS = frozenset({"sigmoid", "tanh", "hardsigmoid"})

# module class -> kind; matched with isinstance, most specific class first.
_MODULE_KINDS: dict[type, str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.PReLU: "prelu",
    nn.RReLU: "rrelu",
    nn.ELU: "elu",
    nn.SELU: "selu",
    nn.CELU: "celu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Mish: "mish",
    nn.Hardswish: "hardswish",
    nn.Softplus: "softplus",
    nn.Hardtanh: "hardtanh",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.Hardsigmoid: "hardsigmoid",
}

_FUNCTION_KINDS: dict[Callable[..., Any], str] = {
    F.relu: "relu",
    torch.relu: "relu",
    F.relu_: "relu",
    torch.relu_: "relu",
    F.relu6: "relu6",
    F.leaky_relu: "leaky_relu",
    F.leaky_relu_: "leaky_relu",
    F.prelu: "prelu",
    torch.prelu: "prelu",
    F.rrelu: "rrelu",
    F.elu: "elu",
    F.elu_: "elu",
    F.selu: "selu",
    torch.selu: "selu",
    F.celu: "celu",
    F.gelu: "gelu",
    F.silu: "silu",
    F.mish: "mish",
    F.hardswish: "hardswish",
    F.softplus: "softplus",
    F.hardtanh: "hardtanh",
    F.hardtanh_: "hardtanh",
    F.sigmoid: "sigmoid",
    torch.sigmoid: "sigmoid",
    F.tanh: "tanh",
    torch.tanh: "tanh",
    F.hardsigmoid: "hardsigmoid",
}

_METHOD_KINDS: dict[str, str] = {
    "relu": "relu",
    "relu_": "relu",
    "sigmoid": "sigmoid",
    "sigmoid_": "sigmoid",
    "tanh": "tanh",
    "tanh_": "tanh",
}


# Classes of other libraries, by ``module.QualName``: matched along the MRO without importing the library.
_QUALNAME_KINDS: dict[str, str] = {
    f"transformers.activations.{name}": kind
    for name, kind in [
        ("GELUActivation", "gelu"),
        ("GELUTanh", "gelu"),
        ("PytorchGELUTanh", "gelu"),
        ("NewGELUActivation", "gelu"),
        ("FastGELUActivation", "gelu"),
        ("AccurateGELUActivation", "gelu"),
        ("ClippedGELUActivation", "gelu"),
        ("QuickGELUActivation", "quick_gelu"),
        ("SiLUActivation", "silu"),
        ("MishActivation", "mish"),
        ("ReLUSquaredActivation", "relu_squared"),
        ("SqrtSoftplusActivation", "softplus"),
    ]
}


def _register_timm() -> None:
    try:
        from timm.layers import activations as ta
        from timm.layers import activations_me as tme
    except ImportError:  # timm is a dependency, but keep the registry usable without it
        return
    for cls, kind in [
        (ta.Swish, "silu"),
        (ta.Mish, "mish"),
        (ta.Sigmoid, "sigmoid"),
        (ta.Tanh, "tanh"),
        (ta.HardSwish, "hardswish"),
        (ta.HardSigmoid, "hardsigmoid"),
        (ta.HardMish, "hardmish"),
        (ta.GELU, "gelu"),
        (ta.GELUTanh, "gelu"),
        (ta.QuickGELU, "quick_gelu"),
        (ta.PReLU, "prelu"),
        (tme.SwishMe, "silu"),
        (tme.MishMe, "mish"),
        (tme.HardSwishMe, "hardswish"),
        (tme.HardSigmoidMe, "hardsigmoid"),
        (tme.HardMishMe, "hardmish"),
    ]:
        _MODULE_KINDS[cls] = kind
    for name, kind in [
        ("swish", "silu"),
        ("mish", "mish"),
        ("hard_swish", "hardswish"),
        ("hard_sigmoid", "hardsigmoid"),
        ("hard_mish", "hardmish"),
        ("gelu", "gelu"),
        ("gelu_tanh", "gelu"),
        ("quick_gelu", "quick_gelu"),
        ("sigmoid", "sigmoid"),
        ("tanh", "tanh"),
    ]:
        fn = getattr(ta, name, None)
        if callable(fn):
            _FUNCTION_KINDS[fn] = kind


_register_timm()

ACTIVATION_KINDS = (
    frozenset(_MODULE_KINDS.values()) | frozenset(_FUNCTION_KINDS.values()) | frozenset(_QUALNAME_KINDS.values())
)


def register_activation_module(cls: type, kind: str) -> type:
    """Teach graphsparse that modules of class ``cls`` are activations of ``kind``.

    Usable as ``register_activation_module(MyAct, "silu")``; returns ``cls``.
    """
    _MODULE_KINDS[cls] = kind
    global ACTIVATION_KINDS
    ACTIVATION_KINDS = ACTIVATION_KINDS | {kind}
    return cls


# Parameter-free modules of unregistered classes with these names are activations (RobustBench's
# ``Swish`` wraps an autograd.Function; many papers ship their own ``Swish``/``Mish``/``GELU``).
_CLASS_NAME_KINDS = {
    "swish": "silu",
    "silu": "silu",
    "mish": "mish",
    "gelu": "gelu",
    "relu": "relu",
    "relu6": "relu6",
    "hardswish": "hardswish",
    "hswish": "hardswish",
    "leakyrelu": "leaky_relu",
    "elu": "elu",
    "selu": "selu",
    "softplus": "softplus",
    "quickgelu": "quick_gelu",
}


def activation_kind_of_module(module: nn.Module) -> str | None:
    """The kind of an activation module (isinstance match, most derived class wins), else None.

    Also activations: ``transformers.activations`` classes (matched by name, transformers is not imported),
    unregistered parameter-free classes whose name is an activation's name (``Swish``, ``Mish``), and any
    parameter-free module whose ``forward`` is one activation call (``return F.gelu(x)``, ``self.act(x)``
    with ``self.act = F.silu``). Register other classes with :func:`register_activation_module`.
    """
    for cls in type(module).__mro__:
        kind = _MODULE_KINDS.get(cls)
        if kind is None:
            kind = _QUALNAME_KINDS.get(f"{cls.__module__}.{cls.__qualname__}")
        if kind is not None:
            return kind
    if type(module).__module__.startswith("torch.") or module._parameters or module._modules:
        return None
    if any(True for _ in module.parameters()):
        return None
    name = type(module).__name__.lower().lstrip("_")
    if name in _CLASS_NAME_KINDS:
        return _CLASS_NAME_KINDS[name]
    return _one_call_kind(module)


_ONE_CALL: weakref.WeakKeyDictionary[nn.Module, str | None] = weakref.WeakKeyDictionary()


def _one_call_kind(module: nn.Module) -> str | None:
    """The kind of the single activation call ``module.forward`` makes on its input, else None (cached per
    module: tracing decides it, and the instance's attributes may choose the function)."""
    try:
        return _ONE_CALL[module]
    except KeyError:
        pass
    kind = None
    try:
        graph = torch.fx.Tracer().trace(module)
    except Exception:  # forward is not one traceable function of its input: not an activation
        graph = None
    if graph is not None:
        nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
        inputs = [n for n in graph.nodes if n.op == "placeholder"]
        if len(nodes) == 1 and inputs and nodes[0].args and nodes[0].args[0] is inputs[0]:
            node = nodes[0]
            if node.op == "call_function":
                kind = activation_kind_of_function(node.target)
            elif node.op == "call_method":
                kind = activation_kind_of_method(node.target)
            outputs = [n for n in graph.nodes if n.op == "output"]
            if not outputs or outputs[0].args[0] is not node:
                kind = None
    _ONE_CALL[module] = kind
    return kind


def activation_kind_of_function(fn: Any) -> str | None:
    """The kind of a functional activation (``F.relu``, ``torch.relu``, ...), else None."""
    try:
        return _FUNCTION_KINDS.get(fn)
    except TypeError:  # unhashable target
        return None


def activation_kind_of_method(name: str) -> str | None:
    """The kind of a tensor method call (``x.relu()``, ``x.relu_()``), else None."""
    return _METHOD_KINDS.get(name)


def is_gate_kind(kind: str | None) -> bool:
    """True for kinds that act as gates when they feed a multiplication."""
    return kind in GATE_KINDS


# Binary ops that make residual additions and gating multiplications, in the three spellings fx records.
ADD_FUNCTIONS = frozenset({operator.add, operator.iadd, torch.add})
ADD_METHODS = frozenset({"add", "add_"})
MUL_FUNCTIONS = frozenset({operator.mul, operator.imul, torch.mul})
MUL_METHODS = frozenset({"mul", "mul_"})
