"""Sites: every place an operator can go, classified the way the MeanSparse and SPARTA papers talk.

``find_sites(model, example_input)`` captures the model (see :mod:`graphsparse.capture`) and returns one
:class:`Site` per activation and per residual-addition output, in forward order.
"""

from __future__ import annotations

import html
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from graphsparse.graph.activations import activation_kind_of_module, is_gate_kind
from graphsparse.graph.capture import Capture, PartialCaptureWarning, capture
from graphsparse.graph.census import KIND_BUCKETS
from graphsparse.graph.roles import GraphFacts, shape_of

__all__ = ["Site", "SiteList", "ROLES", "LAYOUTS", "find_sites", "sites_of_capture"]

ROLES = ("stem", "main_path", "after_addition", "in_se", "mlp", "head")
LAYOUTS = ("nchw", "nhwc", "tokens", "ncl", "nc")


@dataclass(frozen=True)
class Site:
    """One place where an operator can go.

    Args:
        id: stable, readable id: module path + op + ordinal (``layer2.1.act2``, ``layer1.0.add``).
        op: canonical activation kind (``relu``, ``gelu``, ...) or ``add`` for a residual-addition output
            that does not feed an activation directly.
        role: one of :data:`ROLES`.
        layout: ``nchw``, ``nhwc`` (channels-last features), ``tokens`` (B, L, C) or ``nc`` (B, C).
        channel_axis: axis of the channel dimension in the site's input tensor (1 or -1).
        channels: number of channels.
        depth: index along the forward pass (0 = first site).
        stage: index of the resolution stage (increments when the spatial size / token count drops).
        last_in_stage: the last site of its stage.
        first_in_stage: the first site of its stage.
        module: qualified path of the module the site belongs to ('' for the root).
        module_class: class name of that module (of the activation module for module calls).
        reached: ``graph`` (a node of the fx graph) or ``module_tree`` (an activation inside a leaf module).
        shape: shape of the site's input on the probe input.
        relative_depth: ``depth / (n_sites - 1)`` in [0, 1].
        node: name of the fx node (graph sites) inside ``graph_module``; for internal use by rewrite.
        graph_module: path of the captured graph module holding the node ('' for the root).
    """

    id: str
    op: str
    role: str
    layout: str
    channel_axis: int
    channels: int
    depth: int
    stage: int
    last_in_stage: bool
    first_in_stage: bool
    module: str
    module_class: str
    reached: str
    shape: tuple[int, ...]
    relative_depth: float
    node: str = field(default="", compare=False)
    graph_module: str = field(default="", compare=False)

    @property
    def is_addition(self) -> bool:
        """True when the site is (or sits right after) a residual addition."""
        return self.role == "after_addition"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the public field names."""
        data = asdict(self)
        data["shape"] = list(self.shape)
        data.pop("node")
        data.pop("graph_module")
        return data


_TABLE_COLUMNS = ("id", "op", "role", "layout", "channels", "stage", "depth", "reached", "module_class")


class SiteList(list):
    """The sites of a model, a ``list[Site]`` in forward order that also says what capture missed and shows
    itself as a table (HTML in notebooks, ``to_rows()`` for a DataFrame).

    Attributes:
        missed: activation places that ran on the probe but are not sites (empty when capture saw them all).
    """

    missed: list[str]

    def __init__(self, sites: Any = (), missed: list[str] | None = None) -> None:
        super().__init__(sites)
        self.missed = list(missed or [])

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per site with the public fields (``pandas.DataFrame(sites.to_rows())``)."""
        return [s.to_dict() for s in self]

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{c}</th>" for c in _TABLE_COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(getattr(s, c)))}</td>" for c in _TABLE_COLUMNS) + "</tr>"
            for s in self
        )
        note = "".join(f"<p>missed: {html.escape(m)}</p>" for m in self.missed)
        return f"<p>{len(self)} sites</p><table><tr>{head}</tr>{body}</table>{note}"


@dataclass
class _Candidate:
    key: tuple[int, int, int]
    id_base: str
    op: str
    role: str
    shape: tuple[int, ...]
    channel_axis: int
    module: str
    module_class: str
    reached: str
    node: str = ""
    graph_module: str = ""


def find_sites(
    model: nn.Module, example_input: torch.Tensor, *, capture_result: Capture | None = None
) -> SiteList:
    """Every place an operator can go in ``model``, in forward order.

    Args:
        model: an image classifier (timm, RobustBench, torchvision, your own).
        example_input: a probe batch with the model's input shape, e.g. ``torch.randn(1, 3, 224, 224)``.
        capture_result: a :class:`~graphsparse.graph.capture.Capture` of ``model`` to reuse (skips capturing).

    Returns:
        The sites, ``depth`` 0 first (a :class:`SiteList`: a list that shows as a table). Ids are stable
        across runs.

    Warns:
        PartialCaptureWarning: activations ran on the probe that are not sites (listed in ``.missed``).
    """
    cap = capture_result if capture_result is not None else capture(model, example_input)
    return sites_of_capture(cap)


def sites_of_capture(cap: Capture) -> SiteList:
    """Sites of an existing capture (see :func:`find_sites`)."""
    candidates: list[_Candidate] = []
    facts_by_path = {gpath: GraphFacts(gm) for gpath, gm in cap.graphs.items()}
    # residual forks and adds of every graph, keyed by execution order: roles such as stem/head are
    # global even when the root stayed eager and its children were traced one by one
    forks = [
        (cap.graph_order[p], f, _fork_outside(cap, p, r.fork))
        for p, f in facts_by_path.items()
        for r in f.residual_adds
    ]
    adds = [(cap.graph_order[p], f, r.node) for p, f in facts_by_path.items() for r in f.residual_adds]
    for gpath, facts in facts_by_path.items():
        candidates.extend(_graph_candidates(facts, gpath, cap.graph_order[gpath], cap, forks, adds))
    fork_keys = [(cap.graph_order[p], f.index[r.fork], 0) for p, f in facts_by_path.items() for r in f.residual_adds]
    add_keys = [(g, f.index[n], 0) for g, f, n in adds]
    handed_on = {n[0] for _, _, n in forks if isinstance(n, tuple) and n[1] is None}
    candidates.extend(_eager_candidates(cap, fork_keys, add_keys, handed_on))
    candidates.sort(key=lambda c: c.key)
    sites = SiteList(_finish(candidates))
    cap.missed = sites.missed = _missed(cap, sites)
    if sites.missed:
        shown = "; ".join(sites.missed[:5]) + (f"; and {len(sites.missed) - 5} more" if len(sites.missed) > 5 else "")
        warnings.warn(
            PartialCaptureWarning(
                f"{type(cap.model).__name__}: {len(sites.missed)} activation place(s) that ran on the probe are not "
                f"sites, so no operator can go there: {shown}. They run inside modules graphsparse does not "
                "trace (torch.nn layers, opaque modules listed by `graphsparse inspect`) or in Python that stayed "
                "eager. Hint: make those modules traceable, or call activation modules there (nn.ReLU, ...) "
                "instead of functions."
            ),
            stacklevel=3,
        )
    return sites


def _missed(cap: Capture, sites: list[Site]) -> list[str]:
    """What ran on the probe (the capture's census of the original model) that no site accounts for."""
    census = cap.census
    if census is None:
        return []
    found = {s.module for s in sites if s.op != "add"}
    missed = [
        f"{path} ({census.classes.get(path, '?')}, {kind})"
        for path, kind in census.activation_modules.items()
        if path not in found
    ]
    # functional sites: each accounts for one call per run of the module it sits in
    expected: Counter[tuple[str, str]] = Counter()
    for s in sites:
        bucket = KIND_BUCKETS.get(s.op)
        if bucket is not None and s.module not in census.activation_modules:
            expected[(s.module, bucket)] += census.calls.get(s.module, 1)
    for (path, bucket), n in census.dispatched.items():
        extra = n - expected[(path, bucket)]
        if extra > 0:
            where = f"{path} ({census.classes.get(path, '?')})" if path else f"the root ({type(cap.model).__name__})"
            missed.append(f"{extra} {bucket} call{'s' if extra > 1 else ''} in {where}")
    return missed


_Located = list[tuple[int, GraphFacts, Any]]


def _fork_outside(cap: Capture, gpath: str, fork: fx.Node) -> Any:
    """A fork at a graph's input is the output node of the graph that handed the tensor on, if any."""
    producer = cap.handoffs.get(gpath) if fork.op == "placeholder" else None
    if producer is None:
        return fork
    if producer not in cap.graphs:  # an activation that ran eagerly
        return (producer, None)
    outputs = [n for n in cap.graphs[producer].graph.nodes if n.op == "output"]
    value = outputs[0].args[0] if outputs else None
    return (producer, value) if isinstance(value, fx.Node) else fork


def _graph_candidates(
    facts: GraphFacts, gpath: str, gkey: int, cap: Capture, forks: _Located, adds: _Located
) -> list[_Candidate]:
    out: list[_Candidate] = []
    residual = {r.node: r for r in facts.residual_adds}
    absorbed: set[fx.Node] = set()  # residual adds whose only user is an activation: one site, not two
    branch_nodes = set().union(*(r.branch for r in facts.residual_adds)) if residual else set()

    def position_role(node: fx.Node) -> str:
        if node in facts.se_nodes:
            return "in_se"
        if not adds or node in branch_nodes:
            return "main_path"
        # stem: a strict ancestor of every residual fork; head: a descendant of every residual add
        if all(_strictly_before(facts, gpath, gkey, node, g, f, n) for g, f, n in forks):
            return "stem"
        if all(facts.is_descendant(node, n) if f is facts else g < gkey for g, f, n in adds):
            return "head"
        return "main_path"

    for node in facts.nodes:
        kind = facts.activation_kind(node)
        if kind is None or facts.is_gate(node):
            continue
        inputs = [a for a in node.args if isinstance(a, fx.Node)]
        if not inputs or shape_of(inputs[0]) is None:
            continue
        source = inputs[0]
        if source in residual and len(source.users) == 1:
            role = "after_addition"
            absorbed.add(source)
        elif node in facts.se_nodes:
            role = "in_se"
        elif facts.is_mlp(node):
            role = "mlp"
        else:
            role = position_role(node)
        module_path, module_class = _owner(facts, node, gpath)
        out.append(
            _Candidate(
                key=(gkey, facts.index[node], 0),
                id_base=_id_base(node, gpath, kind),
                op=kind,
                role=role,
                shape=shape_of(source),
                channel_axis=facts.channel_axis(source),
                module=module_path,
                module_class=module_class,
                reached="graph",
                node=node.name,
                graph_module=gpath,
            )
        )
    for add in facts.residual_adds:
        if add.node in absorbed:
            continue
        module_path, module_class = _owner(facts, add.node, gpath)
        out.append(
            _Candidate(
                key=(gkey, facts.index[add.node], 0),
                id_base=_id_base(add.node, gpath, "add"),
                op="add",
                role="after_addition",
                shape=shape_of(add.node),
                channel_axis=facts.channel_axis(add.node),
                module=module_path,
                module_class=module_class,
                reached="graph",
                node=add.node.name,
                graph_module=gpath,
            )
        )
    # activations hidden inside leaf modules called from this graph
    for node in facts.nodes:
        if node.op != "call_module" or _join(gpath, node.target) not in cap.leaves:
            continue
        leaf_path = _join(gpath, node.target)
        role = position_role(node)
        for path, shape in cap.module_tree_inputs.items():
            if not path.startswith(leaf_path + "."):
                continue
            module = cap.model.get_submodule(path)
            kind = activation_kind_of_module(module)
            if kind is None or is_gate_kind(kind):
                continue
            out.append(
                _Candidate(
                    key=(gkey, facts.index[node], cap.module_tree_order[path] + 1),
                    id_base=path,
                    op=kind,
                    role=role,
                    shape=shape,
                    channel_axis=_axis_from_shape(shape),
                    module=path,
                    module_class=type(module).__name__,
                    reached="module_tree",
                )
            )
    return out


def _strictly_before(facts: GraphFacts, gpath: str, gkey: int, node: fx.Node, g: int, f: GraphFacts, fork: Any) -> bool:
    """``node`` (of graph ``gpath``) is a strict ancestor of ``fork`` (of the graph with facts ``f``)."""
    if isinstance(fork, tuple):  # a fork at a graph input: the output of the graph that handed it on
        producer, value = fork
        if producer == gpath:
            return value is not node and facts.is_descendant(value, node)
        return f is not facts and g > gkey
    if f is facts:
        return facts.is_descendant(fork, node)
    return g > gkey


def _eager_candidates(
    cap: Capture, fork_keys: list[tuple[int, int, int]], add_keys: list[tuple[int, int, int]], handed_on: set[str]
) -> list[_Candidate]:
    """Activation modules run outside any graph (in modules that stayed eager)."""
    out = []
    for path, shape in cap.module_tree_inputs.items():
        if any(path.startswith(leaf + ".") for leaf in cap.leaves):
            continue
        module = cap.model.get_submodule(path)
        kind = activation_kind_of_module(module)
        if kind is None or is_gate_kind(kind):
            continue
        key = (cap.module_tree_order[path], -1, 0)
        if fork_keys and all(key < k for k in fork_keys) and path not in handed_on:
            role = "stem"
        elif add_keys and all(key > k for k in add_keys):
            role = "head"
        else:
            role = "main_path"
        out.append(
            _Candidate(
                key=key,
                id_base=path,
                op=kind,
                role=role,
                shape=shape,
                channel_axis=_axis_from_shape(shape),
                module=path,
                module_class=type(module).__name__,
                reached="module_tree",
            )
        )
    return out


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _axis_from_shape(shape: tuple[int, ...]) -> int:
    # module-tree activations have no graph around them: NCHW for 4-D, tokens for 3-D
    return -1 if len(shape) == 3 else 1


def _owner(facts: GraphFacts, node: fx.Node, gpath: str) -> tuple[str, str]:
    """Qualified path and class of the module a node belongs to."""
    if node.op == "call_module":
        return _join(gpath, node.target), type(facts.gm.get_submodule(node.target)).__name__
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        cls_name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1].strip("'>")
        return _join(gpath, path), cls_name
    return gpath, type(facts.gm).__name__


def _id_base(node: fx.Node, gpath: str, op: str) -> str:
    if node.op == "call_module":
        return _join(gpath, node.target)
    stack = node.meta.get("nn_module_stack") or {}
    parent = list(stack.values())[-1][0] if stack else ""
    return _join(_join(gpath, parent), op)


def _layout(shape: tuple[int, ...], axis: int) -> str:
    if len(shape) == 4:
        return "nhwc" if axis in (-1, 3) else "nchw"
    if len(shape) == 3:
        return "tokens" if axis in (-1, 2) else "ncl"
    return "nc"


def _spatial(shape: tuple[int, ...], layout: str) -> int | None:
    if layout == "nchw":
        return shape[2] * shape[3]
    if layout == "nhwc":
        return shape[1] * shape[2]
    if layout == "tokens":
        return shape[1]
    if layout == "ncl":
        return shape[2]
    return None


_STAGE_ROLES = ("main_path", "after_addition", "mlp")


def _finish(candidates: list[_Candidate]) -> list[Site]:
    """Assign ids (ordinals for repeats), depth, stage and first/last-in-stage."""
    seen: dict[str, int] = {}
    ids = []
    for c in candidates:
        n = seen.get(c.id_base, 0)
        seen[c.id_base] = n + 1
        ids.append(c.id_base if n == 0 else f"{c.id_base}_{n}")
    stages, stage, last_spatial = [], 0, None
    for c in candidates:
        layout = _layout(c.shape, c.channel_axis)
        spatial = _spatial(c.shape, layout)
        if c.role != "in_se" and spatial is not None:
            if last_spatial is not None and spatial < last_spatial:
                stage += 1
            last_spatial = spatial
        stages.append(stage)
    firsts: dict[int, int] = {}
    lasts: dict[int, int] = {}
    for i, (c, st) in enumerate(zip(candidates, stages)):
        if c.role in _STAGE_ROLES:
            firsts.setdefault(st, i)
            lasts[st] = i
    n = len(candidates)
    sites = []
    for i, (c, st, sid) in enumerate(zip(candidates, stages, ids)):
        layout = _layout(c.shape, c.channel_axis)
        sites.append(
            Site(
                id=sid,
                op=c.op,
                role=c.role,
                layout=layout,
                channel_axis=c.channel_axis,
                channels=c.shape[c.channel_axis],
                depth=i,
                stage=st,
                last_in_stage=lasts.get(st) == i,
                first_in_stage=firsts.get(st) == i,
                module=c.module,
                module_class=c.module_class,
                reached=c.reached,
                shape=c.shape,
                relative_depth=i / (n - 1) if n > 1 else 0.0,
                node=c.node,
                graph_module=c.graph_module,
            )
        )
    return sites
