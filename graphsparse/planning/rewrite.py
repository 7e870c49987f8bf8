"""Rewrite: apply a plan to a captured model, inserting MeanSparse (or replacing activations by SPARTA).

``rewrite(model, rule, example_input)`` captures a copy of the model, finds its sites, makes the plan and
applies it. Graph sites get a ``call_module`` node: before the activation, or on the residual-addition
output; activations inside leaf modules (module tree) are wrapped in place. The rewritten model carries
a :class:`RewriteInfo` (plan, recipe, records) that :func:`graphsparse.save` writes into the artifact.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from graphsparse.errors import PlanError, closest
from graphsparse.graph.capture import Capture, capture, unwrap_compiled
from graphsparse.graph.sites import Site, sites_of_capture
from graphsparse.graph.tracer import operator_types
from graphsparse.ops import MeanSparse
from graphsparse.planning.plan import Plan, PlanEntry, make_plan
from graphsparse.planning.rules import RuleSet

__all__ = ["RewriteInfo", "rewrite", "apply_plan", "check_plan", "rewrite_info", "OperatorSlot"]

_INFO_ATTR = "graphsparse_info"
_OPS_CONTAINER = "graphsparse_ops"


@dataclass
class RewriteInfo:
    """What the artifact needs to rebuild a rewritten model: the plan and where the base model came from.

    Attributes:
        plan: the plan that was applied.
        input_shape: shape of the probe input used for capture.
        recipe: JSON of the base model's :class:`~graphsparse.sources.recipes.Recipe` ('' when unknown).
        records: JSON-able records added by later stages (``calibration``, ``tuning``, ``evaluation``).
    """

    plan: Plan
    input_shape: tuple[int, ...]
    recipe: str = ""
    records: dict[str, Any] = field(default_factory=dict)


def rewrite_info(model: nn.Module) -> RewriteInfo:
    """The :class:`RewriteInfo` of a rewritten model; PlanError if ``model`` was not made by rewrite."""
    model = unwrap_compiled(model)
    info = getattr(model, "meta", {}).get(_INFO_ATTR) if isinstance(model, fx.GraphModule) else None
    info = info if info is not None else getattr(model, _INFO_ATTR, None)
    if not isinstance(info, RewriteInfo):
        raise PlanError(
            f"{type(model).__name__} is not a graphsparse-rewritten model. Hint: call "
            "graphsparse.rewrite(model, rule, example_input) first, or graphsparse.load(artifact)."
        )
    return info


class OperatorSlot(nn.Module):
    """Runs ``op`` before ``act``: how an operator precedes an activation hidden inside a leaf module."""

    def __init__(self, op: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.op = op
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.op(x))


def rewrite(
    model: nn.Module,
    rule: str | Path | RuleSet,
    example_input: torch.Tensor,
    *,
    alpha: float | None = None,
    recipe: str = "",
    fuse: bool = True,
) -> nn.Module:
    """Insert operators into a copy of ``model`` where the rule file says.

    Args:
        model: the base model (left untouched).
        rule: a built-in rule name (``after_addition``), a YAML path, or a parsed :class:`RuleSet`.
        example_input: a probe batch with the model's input shape.
        alpha: overrides the α of every MeanSparse rule.
        recipe: JSON of the base model's recipe, stored for :func:`graphsparse.save`; by default inferred
            (timm models, and classes whose no-argument constructor rebuilds the same architecture).
        fuse: return the fused form (:func:`graphsparse.planning.fuse.fuse_activations`): each MeanSparse applies the
            activation after it and works in place where nothing else reads its input. The same outputs,
            gradients (both backward modes) and ``state_dict``, bit for bit, in fewer memory passes (measured
            in docs/performance.md). ``False`` keeps one graph node per activation (e.g. to look at or edit the
            graph). In the fused form a convolution or normalisation output that only an operator or
            a residual addition reads is overwritten in place when no gradient is recorded: a forward hook
            added afterwards that keeps that tensor should keep a copy (or rewrite with ``fuse=False``).

    Returns:
        The rewritten model (an ``fx.GraphModule`` when the root traces) in eval mode. With α = 0 or
        before calibration its output is bit-identical to ``model``'s.
    """
    _refuse_rewritten(model)
    if not recipe:
        from graphsparse.sources.infer import infer_recipe

        inferred = infer_recipe(model)
        recipe = inferred.to_json() if inferred is not None else ""
    cap = capture(model, example_input, copy=True)
    sites = sites_of_capture(cap)
    plan = make_plan(sites, rule, alpha=alpha)
    model = apply_plan(cap, plan, sites=sites, input_shape=tuple(example_input.shape), recipe=recipe)
    if fuse:
        from graphsparse.planning.fuse import fuse_activations  # fuse imports this module

        fuse_activations(model)
    return model


def _refuse_rewritten(model: nn.Module) -> None:
    types = operator_types()
    found = next((name for name, m in unwrap_compiled(model).named_modules() if isinstance(m, types)), None)
    if found is not None:
        raise PlanError(
            f"the model already holds a graphsparse operator (at {found or 'its root'!r}): rewriting it again would "
            "stack operators. Hint: rewrite the original model; change α with graphsparse.set_alpha."
        )


def check_plan(plan: Plan, sites: list[Site]) -> None:
    """Check that every site the plan acts on exists in ``sites`` with the same op and channels."""
    by_id = {s.id: s for s in sites}
    problems = []
    for entry in plan.selected():
        site = by_id.get(entry.site.id)
        if site is None:
            problems.append(f"site {entry.site.id!r} no longer exists{closest(entry.site.id, by_id)}")
        elif (site.channels, site.op, site.channel_axis) != (
            entry.site.channels,
            entry.site.op,
            entry.site.channel_axis,
        ):
            problems.append(
                f"site {entry.site.id!r} is {site.op} with {site.channels} channels on axis "
                f"{site.channel_axis}, the plan expects {entry.site.op} with {entry.site.channels} on axis "
                f"{entry.site.channel_axis}"
            )
    if problems:
        raise PlanError(
            "the plan does not match the model: "
            + "; ".join(problems[:5])
            + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            + ". Hint: was the model built with other arguments, or a different timm/graphsparse version?"
        )


def apply_plan(
    cap: Capture,
    plan: Plan,
    *,
    sites: list[Site] | None = None,
    input_shape: tuple[int, ...] = (),
    recipe: str = "",
    operator_factory: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Apply ``plan`` to a capture made with ``copy=True`` (the capture is modified and returned)."""
    sites = sites if sites is not None else sites_of_capture(cap)
    check_plan(plan, sites)
    by_id = {s.id: s for s in sites}
    factories = {"meansparse": _make_meansparse, **_extra_factories(), **dict(operator_factory or {})}
    touched: set[str] = set()
    for entry in plan.selected():
        site = by_id[entry.site.id]
        factory = factories.get(entry.action)
        if factory is None:
            raise PlanError(
                f"site {site.id!r}: no operator for action {entry.action!r}{closest(entry.action, factories)}"
            )
        op = factory(site, entry).to(_site_device(cap.model, site))
        replace = entry.action != "meansparse"
        if site.reached == "graph":
            _insert_in_graph(cap.graphs[site.graph_module], site, op, replace=replace)
            touched.add(site.graph_module)
        else:
            _insert_in_tree(cap.model, site, op, replace=replace)
    for path in touched:
        gm = cap.graphs[path]
        gm.graph.lint()
        gm.recompile()
    model = cap.model
    model.eval()
    info = RewriteInfo(plan=plan, input_shape=tuple(input_shape), recipe=recipe)
    if isinstance(model, fx.GraphModule):
        model.meta[_INFO_ATTR] = info  # GraphModule's deepcopy keeps `meta`, not other attributes
    else:
        setattr(model, _INFO_ATTR, info)
    return model


def _site_device(model: nn.Module, site: Site) -> torch.device:
    """Where the site's module keeps its weights (the nearest enclosing module that has any; else the
    model's first): a model rewritten on the GPU gets its operators on the GPU."""
    path = site.module
    while True:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        if module is not None:
            tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
            if tensor is not None:
                return tensor.device
        if not path:
            return torch.device("cpu")
        path = path.rpartition(".")[0]


def _extra_factories() -> dict[str, Any]:
    try:
        from graphsparse.ops import sparta
    except ImportError:
        return {}
    return {"sparta": sparta.make_sparta} if hasattr(sparta, "make_sparta") else {}


def _make_meansparse(site: Site, entry: PlanEntry) -> nn.Module:
    return MeanSparse(site.channels, site.channel_axis, entry.alpha, site_id=site.id, depth=site.depth)


def _slot_name(gm: fx.GraphModule, site_id: str) -> str:
    if not hasattr(gm, _OPS_CONTAINER):
        gm.add_module(_OPS_CONTAINER, nn.ModuleDict())
    container: nn.ModuleDict = getattr(gm, _OPS_CONTAINER)
    key = site_id.replace(".", "_") or "root"
    base, n = key, 1
    while key in container:
        key, n = f"{base}_{n}", n + 1
    return key


def _insert_in_graph(gm: fx.GraphModule, site: Site, op: nn.Module, *, replace: bool) -> None:
    node = next((n for n in gm.graph.nodes if n.name == site.node), None)
    if node is None:
        raise PlanError(f"site {site.id!r}: node {site.node!r} not found in the captured graph")
    key = _slot_name(gm, site.id)
    getattr(gm, _OPS_CONTAINER)[key] = op
    target = f"{_OPS_CONTAINER}.{key}"
    if replace:  # the operator takes the activation's place
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(target, (node.args[0],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        return
    if site.op == "add":  # on the residual-addition output, for every user
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(target, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        return
    source = node.args[0]
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(target, (source,))
    node.replace_input_with(source, new)
    if _is_inplace(gm, node):
        # the original activation mutated `source`; users after it saw the activated tensor
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for user in list(source.users):
            if user is not new and order[user] > order[node]:
                user.replace_input_with(source, node)


def _is_inplace(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        return bool(node.kwargs.get("inplace", False)) or getattr(node.target, "__name__", "").endswith("_")
    return False


def _insert_in_tree(model: nn.Module, site: Site, op: nn.Module, *, replace: bool) -> None:
    parent_path, _, name = site.id.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    act = getattr(parent, name)
    setattr(parent, name, op if replace else OperatorSlot(op, act))
