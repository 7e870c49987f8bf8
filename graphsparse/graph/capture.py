"""Capture: turn a model into torch.fx graph modules, falling back to submodules when the root won't trace.

``capture(model, example_input)`` returns a :class:`Capture`: the captured model (a ``GraphModule`` when the
root traces, otherwise a copy of the model whose largest traceable submodules are ``GraphModule``\\ s), the
graph modules by path, the modules that stayed opaque with the tracer's reason, and the leaf modules that
hide activations. Shapes are recorded on every node (``node.meta['tensor_meta']``, as ``ShapeProp``
writes them) and the captured model is checked against the original on the probe input.
"""

from __future__ import annotations

import copy as copy_module
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from graphsparse.errors import CaptureError
from graphsparse.graph.activations import activation_kind_of_module
from graphsparse.graph.census import Census, probe, probe_with_census
from graphsparse.graph.tracer import OpaqueModule, first_line, join_path, leaf_reason, trace, trace_children

__all__ = [
    "Capture",
    "PartialCaptureWarning",
    "capture",
    "iter_module_tree_activations",
    "unwrap_compiled",
]


@dataclass
class Capture:
    """The result of :func:`capture`.

    Attributes:
        model: the captured model; runs like the original.
        graphs: graph modules by their path in ``model`` ('' is the root), in execution order.
        opaque: modules that stayed eager (root fallback) or are leaves by policy, with reasons.
        leaves: paths (in ``model``) of leaf modules called from a graph; activations inside them are
            reached through the module tree.
        max_abs_diff: largest |captured − original| output difference on the probe (0.0 when bit-equal).
        module_tree_inputs: input shape of every activation module no graph calls (inside leaves, or in
            modules that stayed eager) that ran on the probe, by path.
        module_tree_order: the probe's execution counter when each of those activations first ran.
        graph_order: the probe's execution counter when each graph module first ran.
        handoffs: graph path → path of the graph or eager activation whose output tensor was the graph's
            first input (the children of an eager root handing a tensor on to each other).
    """

    model: nn.Module
    graphs: dict[str, fx.GraphModule]
    opaque: list[OpaqueModule]
    leaves: list[str]
    max_abs_diff: float
    module_tree_inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    module_tree_order: dict[str, int] = field(default_factory=dict)
    graph_order: dict[str, int] = field(default_factory=dict)
    handoffs: dict[str, str] = field(default_factory=dict)
    census: Census | None = None
    missed: list[str] = field(default_factory=list)


class PartialCaptureWarning(UserWarning):
    """Activations ran on the probe that no site reaches: an operator cannot go there (see ``Capture.missed``)."""


def iter_module_tree_activations(model: nn.Module, capture: Capture) -> Iterator[tuple[str, nn.Module]]:
    """Activation modules that no graph calls: inside leaves, or in modules that stayed eager."""
    called: set[str] = set()
    for gpath, gm in capture.graphs.items():
        for node in gm.graph.nodes:
            if node.op == "call_module":
                called.add(join_path(gpath, node.target))
    graph_paths = set(capture.graphs)
    for path, module in model.named_modules():
        if path in called or activation_kind_of_module(module) is None:
            continue
        # activations owned by a graph module but not called by it (dead code) are not places
        owner = max((g for g in graph_paths if g == "" or path.startswith(g + ".")), key=len, default=None)
        inside_leaf = any(path.startswith(leaf + ".") for leaf in capture.leaves)
        if owner is not None and not inside_leaf:
            continue
        yield path, module


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _outputs(o)]
    return []


def _max_abs_diff(a: Any, b: Any) -> float:
    ta, tb = _outputs(a), _outputs(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return float("inf")
    diff = 0.0
    for x, y in zip(ta, tb):
        if torch.equal(x, y):
            continue
        both_nan = torch.isnan(x) & torch.isnan(y)
        d = (x.double() - y.double()).abs().masked_fill(both_nan, 0.0)
        diff = max(diff, float(d.max()))
    return diff


def capture(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    copy: bool = False,
    check: bool = True,
    atol: float = 1e-5,
) -> Capture:
    """Capture ``model`` as fx graph modules and record shapes on the probe ``example_input``.

    Args:
        model: the model (put in eval mode for the probe; its mode is restored afterwards).
        example_input: a probe input batch, e.g. ``torch.randn(1, 3, 224, 224)``.
        copy: deep-copy the model first so the capture shares nothing with it (needed before rewriting).
            When the root does not trace the model is always copied, since submodules are replaced.
        check: compare the captured model's output with the original's on the probe.
        atol: largest absolute output difference accepted by the check.

    Raises:
        CaptureError: when nothing traces, or the captured model's output differs from the original's.
    """
    if not isinstance(example_input, torch.Tensor):
        raise CaptureError(
            f"the probe input must be one tensor batch, e.g. torch.randn(1, 3, 224, 224), not "
            f"{type(example_input).__name__}"
        )
    model = unwrap_compiled(model)
    saved = _ModuleState(model)  # fx leaves `_tensor_constantN` on a traced root; the probe sets eval mode
    model.eval()
    try:
        reference, census = _run_original(model, example_input) if check else (None, None)
        source = copy_module.deepcopy(model) if copy else model
        try:
            result = _capture_root(source, example_input, reference, atol)
        except Exception as exc:  # the root does not trace, does not run as a graph, or differs
            if isinstance(exc, CaptureError) and reference is None:
                raise
            source = copy_module.deepcopy(model)
            result = _capture_children(source, example_input, reference, atol, exc)
        result.census = census
        return result
    finally:
        saved.restore()


class _ModuleState:
    """Every module's attributes, parameters, buffers, children, hooks and train/eval flag, restored by
    :meth:`restore` exactly as they were (same objects, same dicts): capturing leaves the user's model as it was.

    The graph modules a capture builds are made before the restore and keep what they copied (tensor
    constants, submodules), so they are unaffected.
    """

    _DICTS = ("_parameters", "_buffers", "_modules")

    def __init__(self, model: nn.Module) -> None:
        self.saved = []
        for module in model.modules():
            attrs = dict(module.__dict__)
            contents = {
                name: dict(value)
                for name, value in attrs.items()
                if isinstance(value, dict) and (name in self._DICTS or "hook" in name)
            }
            self.saved.append((module, attrs, contents))

    def restore(self) -> None:
        for module, attrs, contents in self.saved:
            current = module.__dict__
            for name in [k for k in current if k not in attrs]:
                del current[name]
            for name, value in attrs.items():
                if current.get(name, _MISSING) is not value:
                    current[name] = value
            for name, items in contents.items():
                live = current[name]
                if live.keys() != items.keys() or any(live[k] is not v for k, v in items.items()):
                    live.clear()
                    live.update(items)


_MISSING = object()


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (``OptimizedModule._orig_mod``), or ``model`` itself: the
    wrapper's forward runs the compiled original, so tracing it would find nothing."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule" else model


def _run_original(model: nn.Module, example_input: torch.Tensor) -> tuple[Any, Census | None]:
    try:
        return probe_with_census(model, example_input)
    except Exception:  # the census is a check: a model it disturbs is still captured, without it
        pass
    try:
        return probe(model, example_input), None
    except Exception as exc:
        raise CaptureError(
            f"{type(model).__name__} does not run on a probe input of shape {tuple(example_input.shape)} "
            f"({first_line(exc)}). Hint: pass the input shape the model was built for "
            "(--input-shape B,C,H,W, e.g. 1,3,224,224)."
        ) from exc


def _untraceable_hint(model: nn.Module) -> str:
    """What to do about a module torch.fx cannot trace: timm's no-trace registry only helps timm models."""
    classes = {type(m).__module__.split(".")[0] for m in model.modules()}
    if "timm" in classes:
        return "register the module with timm.layers.register_notrace_module (it then stays a leaf)."
    return (
        "make the module's forward free of Python control flow on tensors, or give it an "
        "autograd.Function (it then stays a leaf); an activation class of your own can be registered with "
        "graphsparse.graph.activations.register_activation_module."
    )


def _check_output(result: Capture, model_name: str, reference: Any, output: Any, atol: float) -> Capture:
    if reference is not None:
        result.max_abs_diff = _max_abs_diff(reference, output)
        if result.max_abs_diff > atol:
            raise CaptureError(
                f"{model_name}: the captured graph does not reproduce the model on the probe "
                f"input (max |difference| = {result.max_abs_diff:.3g}). Hint: a module with "
                f"data-dependent Python control flow was traced on one branch; {_untraceable_hint(result.model)}"
            )
    return result


# What describes the model rather than computes with it: timm's preprocessing config and the input size
# some models declare. Kept on the traced root, and in its ``meta`` (which survives deep copies), so data
# is prepared for a rewritten model as for the original (see ``data.data_config_transform``).
MODEL_CARD = ("pretrained_cfg", "default_cfg", "default_input_size")


def _keep_model_card(source: nn.Module, gm: fx.GraphModule) -> None:
    for attr in MODEL_CARD:
        value = getattr(source, attr, None)
        if value is not None:
            setattr(gm, attr, value)
            gm.meta[attr] = value


def _capture_root(source: nn.Module, example_input: torch.Tensor, reference: Any, atol: float) -> Capture:
    root_gm, leaf_paths = trace(source, root=True)
    _keep_model_card(source, root_gm)
    opaque = []
    for leaf in leaf_paths:
        leaf_module = root_gm.get_submodule(leaf)
        opaque.append(OpaqueModule(leaf, type(leaf_module).__name__, leaf_reason(leaf_module) or ""))
    root_gm.eval()
    result = Capture(root_gm, {"": root_gm}, opaque, list(leaf_paths), 0.0)
    output = _record_shapes(result, example_input)
    return _check_output(result, type(source).__name__, reference, output, atol)


def _capture_children(
    source: nn.Module, example_input: torch.Tensor, reference: Any, atol: float, root_error: Exception
) -> Capture:
    """Keep the root eager and trace the largest traceable submodules instead."""
    graphs: dict[str, fx.GraphModule] = {}
    leaves: list[str] = []
    opaque = [OpaqueModule("", type(source).__name__, f"stayed eager: {first_line(root_error)}")]
    trace_children(source, "", graphs, leaves, opaque)
    result = Capture(source, graphs, opaque, leaves, 0.0)
    # with no graph at all, activation modules that run eagerly are still sites (reached through the tree)
    if not graphs and next(iter_module_tree_activations(source, result), None) is None:
        raise CaptureError(
            f"{type(source).__name__}: neither the model nor any of its submodules could be captured by torch.fx "
            f"({first_line(root_error)}), and it holds no activation module. Hint: {_untraceable_hint(source)}"
        ) from root_error
    source.eval()
    output = _record_shapes(result, example_input)
    return _check_output(result, type(source).__name__, reference, output, atol)


def _record_shapes(result: Capture, example_input: torch.Tensor) -> Any:
    """Run the captured model once: ShapeProp every graph, time-order graphs and module-tree activations."""
    counter = iter(range(1 << 30))
    graph_inputs: dict[str, tuple[Any, ...]] = {}
    handles = []

    def graph_hook(path: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if path not in graph_inputs:
                graph_inputs[path] = args
                result.graph_order[path] = next(counter)

        return hook

    graph_outputs: dict[str, Any] = {}

    def output_hook(path: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            graph_outputs.setdefault(path, output)

        return hook

    def activation_hook(path: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if path not in result.module_tree_order and args and isinstance(args[0], torch.Tensor):
                result.module_tree_order[path] = next(counter)
                result.module_tree_inputs[path] = tuple(args[0].shape)

        return hook

    def activation_output_hook(path: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            graph_outputs.setdefault(path, output)

        return hook

    model = result.model
    try:
        if "" in result.graphs:
            result.graph_order[""] = next(counter)
            for path, module in iter_module_tree_activations(model, result):
                handles.append(module.register_forward_pre_hook(activation_hook(path)))
            with torch.no_grad():
                output = ShapeProp(result.graphs[""]).propagate(example_input)
        else:
            for path, gm in result.graphs.items():
                handles.append(gm.register_forward_pre_hook(graph_hook(path)))
                handles.append(gm.register_forward_hook(output_hook(path)))
            for path, module in iter_module_tree_activations(model, result):
                handles.append(module.register_forward_pre_hook(activation_hook(path)))
                handles.append(module.register_forward_hook(activation_output_hook(path)))
            output = probe(model, example_input)
            for consumer, args in graph_inputs.items():
                for producer, out in graph_outputs.items():
                    if args and args[0] is out:
                        result.handoffs[consumer] = producer
            for path, gm in result.graphs.items():
                if path in graph_inputs:
                    with torch.no_grad():
                        ShapeProp(gm).propagate(*graph_inputs[path])
    except Exception as exc:
        raise CaptureError(
            f"{type(model).__name__}: the probe input of shape {tuple(example_input.shape)} could not be run "
            f"through the model ({first_line(exc)}). Hint: pass the input shape the model was built for "
            "(--input-shape B,C,H,W, e.g. 1,3,224,224)."
        ) from exc
    finally:
        for h in handles:
            h.remove()
    # graphs never called on the probe carry no shapes and no sites
    result.graphs = {
        p: g
        for p, g in sorted(result.graphs.items(), key=lambda kv: result.graph_order.get(kv[0], 1 << 31))
        if p in result.graph_order
    }
    return output
