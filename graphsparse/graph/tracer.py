"""The capture tracer: which modules torch.fx traces through and which stay leaves, and the tracing of a model
that falls back, module by module, to its largest traceable submodules.

Activation modules, torch.nn built-ins and graphsparse's own operators are leaves (ordinary graph nodes); timm's
no-trace modules and modules that call a ``torch.autograd.Function`` are leaves too, with a reason
(:func:`leaf_reason`), and are listed as :class:`OpaqueModule`\\ s. A module that does not trace stays eager and
its children are traced instead (:func:`trace_children`), each swapped for its ``GraphModule`` in place.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from graphsparse.graph.activations import activation_kind_of_module

__all__ = ["OpaqueModule", "first_line", "join_path", "leaf_reason", "operator_types", "trace", "trace_children"]


@dataclass(frozen=True)
class OpaqueModule:
    """A module whose code graphsparse cannot see as a graph, and why."""

    path: str
    module_class: str
    reason: str


def _autograd_function_called(module: nn.Module) -> str | None:
    """Name of a ``torch.autograd.Function`` the module's own ``forward`` calls, if any."""
    forward = type(module).forward
    code = getattr(forward, "__code__", None)
    if code is None:
        return None
    scope = getattr(forward, "__globals__", {})
    for name in code.co_names:
        obj = scope.get(name)
        if inspect.isclass(obj) and issubclass(obj, torch.autograd.Function):
            return obj.__name__
    return None


def _timm_notrace() -> tuple[tuple[type, ...], list[Any]]:
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:
        return (), []
    return tuple(timm_fx.get_notrace_modules()), list(timm_fx.get_notrace_functions())


def leaf_reason(module: nn.Module) -> str | None:
    """Why ``module`` is kept as a leaf (its code is not traced), or None when it is traced through.

    Activation modules and torch.nn built-ins are leaves too but need no reason: they are ordinary
    graph nodes.
    """
    notrace_modules, _ = _timm_notrace()
    if notrace_modules and isinstance(module, notrace_modules):
        return "timm no-trace module"
    fn = _autograd_function_called(module)
    if fn is not None:
        return f"calls autograd.Function {fn}"
    return None


def operator_types() -> tuple[type, ...]:
    """The operator classes graphsparse inserts; they stay leaves when a rewritten model is captured again."""
    from graphsparse.ops.meansparse import OPERATOR_TYPES
    from graphsparse.ops.sparta import SPARTA_TYPES

    return tuple(OPERATOR_TYPES) + tuple(SPARTA_TYPES)


class _CaptureTracer(fx.Tracer):
    """fx tracer with timm's no-trace registries, activation modules as leaves, autograd.Function leaves."""

    def __init__(self) -> None:
        notrace_modules, notrace_functions = _timm_notrace()
        super().__init__(autowrap_functions=tuple(notrace_functions))
        self.notrace_modules = notrace_modules
        self.leaf_paths: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if activation_kind_of_module(m) is not None or isinstance(m, operator_types()):
            return True
        if leaf_reason(m) is not None:
            if module_qualified_name not in self.leaf_paths:
                self.leaf_paths.append(module_qualified_name)
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _optional_args(module: nn.Module) -> dict[str, Any]:
    """Keyword arguments of ``forward`` past the input that default to None/bool/number: the root is
    called with the input alone, so they are traced as their defaults (e.g. ``mask=None``)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return {}
    return {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty and (p.default is None or isinstance(p.default, (bool, int, float)))
    }


def trace(module: nn.Module, *, root: bool = False) -> tuple[fx.GraphModule, list[str]]:
    """``module`` traced by the capture tracer: its ``GraphModule`` and the paths of the leaves that hide code (a
    ``root`` is traced with its optional ``forward`` arguments at their defaults)."""
    tracer = _CaptureTracer()
    graph = tracer.trace(module, concrete_args=_optional_args(module) or None if root else None)
    gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
    return gm, tracer.leaf_paths


def join_path(prefix: str, name: str) -> str:
    """The path of child ``name`` of the module at ``prefix`` ('' is the root)."""
    return f"{prefix}.{name}" if prefix else name


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of ``exc``, for an error or a reason that quotes it."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def _is_torch_builtin(module: nn.Module) -> bool:
    """A torch.nn layer (fx's default leaves); containers are traced (Sequential) or looked into."""
    return type(module).__module__.startswith("torch.nn") and not isinstance(module, (nn.Sequential, *_CONTAINERS))


def _only_called(parent: nn.Module, name: str) -> bool:
    """True when ``parent.forward`` uses ``self.<name>`` only by calling it (``self.blocks(x)``): then the
    child may be swapped for a GraphModule. Iterated, indexed, measured or passed on (``for b in
    self.blocks``, ``self.blocks[0]``, ``len(self.blocks)``), or when the source cannot be read: False."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(parent).forward)))
    except (OSError, TypeError, SyntaxError):
        return False
    called = set()
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            called.add(id(node.func))
        if (
            isinstance(node, ast.Attribute)
            and node.attr == name
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
        ):
            uses.append(node)
    return all(id(u) in called for u in uses)


def trace_children(
    module: nn.Module,
    path: str,
    graphs: dict[str, fx.GraphModule],
    leaves: list[str],
    opaque: list[OpaqueModule],
) -> None:
    """Trace the children of an eager ``module``, swapping each for its GraphModule inside ``module`` (a
    container keeps its class, length and order, so the eager parent still iterates or indexes it)."""
    for name, child in list(module.named_children()):
        eager_use = isinstance(module, _CONTAINERS) or not _only_called(module, name)
        if isinstance(child, nn.Sequential) and eager_use:
            # a GraphModule neither iterates nor indexes like the Sequential: trace its children instead
            opaque.append(OpaqueModule(join_path(path, name), type(child).__name__, "container used eagerly"))
            trace_children(child, join_path(path, name), graphs, leaves, opaque)
            continue
        child_gm = _trace_tree(child, join_path(path, name), graphs, leaves, opaque)
        if child_gm is not None:
            setattr(module, name, child_gm)


def _trace_tree(
    module: nn.Module,
    path: str,
    graphs: dict[str, fx.GraphModule],
    leaves: list[str],
    opaque: list[OpaqueModule],
) -> fx.GraphModule | None:
    """Trace ``module``; when it fails, keep it eager and trace its children instead (in place)."""
    if activation_kind_of_module(module) is not None or _is_torch_builtin(module):
        return None
    if isinstance(module, _CONTAINERS):  # no forward of its own: its owner iterates or indexes it
        trace_children(module, path, graphs, leaves, opaque)
        return None
    reason = leaf_reason(module)
    if reason is not None:
        opaque.append(OpaqueModule(path, type(module).__name__, reason))
        leaves.append(path)
        return None
    try:
        gm, leaf_paths = trace(module)
    except Exception as exc:  # any tracer failure means: fall back to the children
        opaque.append(OpaqueModule(path, type(module).__name__, f"stayed eager: {first_line(exc)}"))
        trace_children(module, path, graphs, leaves, opaque)
        return None
    graphs[path] = gm
    for leaf in leaf_paths:
        leaves.append(join_path(path, leaf))
        leaf_module = gm.get_submodule(leaf)
        opaque.append(OpaqueModule(join_path(path, leaf), type(leaf_module).__name__, leaf_reason(leaf_module) or ""))
    return gm
