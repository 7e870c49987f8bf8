"""Roles: what each place in an fx graph is, decided from graph structure (never from names).

:class:`GraphFacts` reads one ``GraphModule`` whose nodes carry ``tensor_meta`` (see
:mod:`graphsparse.capture`) and answers: which nodes are activations, which adds are residual additions
(and where their fork and branch are), which nodes sit on a squeeze-excitation gating branch, which
sigmoid/tanh nodes are gates, and the channel axis of any node's output.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphsparse.graph.activations import (
    ADD_FUNCTIONS,
    ADD_METHODS,
    MUL_FUNCTIONS,
    MUL_METHODS,
    activation_kind_of_function,
    activation_kind_of_method,
    activation_kind_of_module,
    is_gate_kind,
)

__all__ = ["GraphFacts", "ResidualAdd", "shape_of"]

_SHAPE_METHODS = frozenset(
    {
        "view",
        "reshape",
        "expand",
        "expand_as",
        "unsqueeze",
        "squeeze",
        "flatten",
        "contiguous",
        "repeat",
        "to",
        "type_as",
        "float",
        "half",
    }
)
_SHAPE_FUNCTIONS = frozenset({torch.reshape, torch.flatten, torch.unsqueeze, torch.squeeze, operator.getitem})
_CHANNEL_FIRST_FUNCTIONS = frozenset(
    {
        F.conv1d,
        F.conv2d,
        F.conv3d,
        F.batch_norm,
        F.group_norm,
        F.instance_norm,
        torch.conv2d,
        torch.conv1d,
        torch.batch_norm,
    }
)
_CHANNEL_LAST_FUNCTIONS = frozenset({F.linear, F.layer_norm, torch.layer_norm})


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """Shape of a node's tensor output recorded by ShapeProp, or None for non-tensor outputs."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node)]


@dataclass(frozen=True)
class ResidualAdd:
    """A residual addition: ``node`` joins two paths that fork at ``fork``; ``branch``: the nodes between."""

    node: fx.Node
    fork: fx.Node
    branch: frozenset[fx.Node]


class GraphFacts:
    """Structural facts about one captured graph module (one object, computed once)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self._modules = dict(gm.named_modules())
        # ancestors as int bitsets over node indices: cheap set algebra on graphs of thousands of nodes
        self.ancestors: list[int] = []
        for n in self.nodes:
            bits = 0
            for a in n.all_input_nodes:
                i = self.index[a]
                bits |= self.ancestors[i] | (1 << i)
            self.ancestors.append(bits)
        # Data, not shape: a size read off the input (a ViT's cls-token expand, a position embedding resampled
        # to the token grid) does not make a weight input-dependent, whatever the batch size.
        self.input_dependent_bits = 0
        for i, n in enumerate(self.nodes):
            if n.op == "placeholder":
                self.input_dependent_bits |= 1 << i
            elif not _holds_no_tensor(n) and any(
                self.input_dependent_bits >> self.index[a] & 1 for a in n.all_input_nodes
            ):
                self.input_dependent_bits |= 1 << i
        self.input_dependent = {self.nodes[i] for i in _bits(self.input_dependent_bits)}
        self.residual_adds = self._find_residual_adds()
        self.se_nodes = self._find_se_nodes()

    # -- node kinds ---------------------------------------------------------------------------------

    def module(self, node: fx.Node) -> nn.Module | None:
        return self._modules.get(node.target) if node.op == "call_module" else None

    def activation_kind(self, node: fx.Node) -> str | None:
        """Canonical activation kind of a node (module, function or tensor method), else None."""
        if node.op == "call_module":
            mod = self.module(node)
            return activation_kind_of_module(mod) if mod is not None else None
        if node.op == "call_function":
            return activation_kind_of_function(node.target)
        if node.op == "call_method":
            return activation_kind_of_method(node.target)
        return None

    def is_add(self, node: fx.Node) -> bool:
        return (node.op == "call_function" and node.target in ADD_FUNCTIONS) or (
            node.op == "call_method" and node.target in ADD_METHODS
        )

    def is_mul(self, node: fx.Node) -> bool:
        return (node.op == "call_function" and node.target in MUL_FUNCTIONS) or (
            node.op == "call_method" and node.target in MUL_METHODS
        )

    def is_parametric(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            mod = self.module(node)
            return mod is not None and any(True for _ in mod.parameters())
        if node.op == "call_function":
            return any(a.op == "get_attr" for a in _tensor_args(node)) or any(
                isinstance(v, fx.Node) and v.op == "get_attr" for v in node.kwargs.values()
            )
        return False

    def is_descendant(self, node: fx.Node, of: fx.Node) -> bool:
        return bool(self.ancestors[self.index[node]] >> self.index[of] & 1)

    # -- residual additions -------------------------------------------------------------------------

    def _find_residual_adds(self) -> list[ResidualAdd]:
        found = []
        for node in self.nodes:
            if not self.is_add(node):
                continue
            operands = _tensor_args(node)
            if len(operands) != 2 or not all(o in self.input_dependent for o in operands):
                continue
            out_shape = shape_of(node)
            if out_shape is None or any(shape_of(o) != out_shape for o in operands):
                continue  # bias, position-embedding and broadcast adds are not residual additions
            a, b = (self.index[o] for o in operands)
            anc_a = self.ancestors[a] | (1 << a)
            anc_b = self.ancestors[b] | (1 << b)
            common = anc_a & anc_b & self.input_dependent_bits
            if not common:
                continue
            fork_i = common.bit_length() - 1  # the latest common ancestor in execution order
            fork = self.nodes[fork_i]
            branch_bits = (anc_a | anc_b) & ~common
            branch = frozenset(
                self.nodes[i] for i in _bits(branch_bits) if self.is_descendant(self.nodes[i], fork)
            )
            if any(self.is_parametric(n) for n in branch):
                found.append(ResidualAdd(node, fork, branch))
        return found

    # -- squeeze-excitation and gates ---------------------------------------------------------------

    def _is_global_reduction_of(self, node: fx.Node, source: fx.Node) -> bool:
        """``node`` reduces ``source`` over every spatial/token position, keeping batch and channels."""
        s_in, s_out = shape_of(source), shape_of(node)
        if s_in is None or s_out is None or len(s_in) < 3 or not s_out or s_out[0] != s_in[0]:
            return False
        per_in, per_out = math.prod(s_in[1:]), math.prod(s_out[1:])
        if per_out < per_in and per_out in (s_in[1], s_in[-1]):
            return True
        # on a 1×1 map a global pool keeps the shape: recognise the op itself
        return per_out == per_in and per_out in (s_in[1], s_in[-1]) and self._is_reduction_op(node)

    def _is_reduction_op(self, node: fx.Node) -> bool:
        if node.op == "call_method":
            return node.target in ("mean", "sum", "amax", "max")
        if node.op == "call_function":
            return node.target in (torch.mean, torch.sum, torch.amax, F.adaptive_avg_pool2d, F.adaptive_max_pool2d)
        mod = self.module(node)
        return isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) or type(mod).__name__.startswith(
            "SelectAdaptivePool"
        )

    def _find_se_nodes(self) -> set[fx.Node]:
        """Nodes on gating branches: global reduction of T ... → multiplied back onto T."""
        se: set[fx.Node] = set()
        for mul in self.nodes:
            if not self.is_mul(mul):
                continue
            operands = _tensor_args(mul)
            if len(operands) != 2:
                continue
            for gate, target in (operands, operands[::-1]):
                gate_i = self.index[gate]
                gate_anc = self.ancestors[gate_i] | (1 << gate_i)
                for reduction in target.users:
                    r = self.index[reduction]
                    if not (gate_anc >> r & 1) or not self._is_global_reduction_of(reduction, target):
                        continue
                    for i in _bits(gate_anc):
                        n = self.nodes[i]
                        if i == r or self.is_descendant(n, reduction):
                            se.add(n)
        return se

    def is_gate(self, node: fx.Node) -> bool:
        """A sigmoid/tanh/hardsigmoid whose output (through shape ops) is multiplied onto something."""
        if not is_gate_kind(self.activation_kind(node)):
            return False
        frontier = list(node.users)
        seen: set[fx.Node] = set()
        while frontier:
            user = frontier.pop()
            if user in seen:
                continue
            seen.add(user)
            if self.is_mul(user):
                return True
            if (user.op == "call_method" and user.target in _SHAPE_METHODS) or (
                user.op == "call_function" and user.target in _SHAPE_FUNCTIONS
            ):
                frontier.extend(user.users)
        return False

    # -- layers around a node -----------------------------------------------------------------------

    def _is_passthrough(self, node: fx.Node) -> bool:
        """Shape-preserving, single-input node without parameters, or a normalisation layer."""
        inputs = _tensor_args(node)
        if len(inputs) != 1 or shape_of(node) is None or shape_of(node) != shape_of(inputs[0]):
            return False
        if node.op == "call_module":
            mod = self.module(node)
            return self.is_norm(mod) or not any(True for _ in mod.parameters())
        return node.op in ("call_function", "call_method") and self.activation_kind(node) is None

    @staticmethod
    def is_norm(mod: nn.Module | None) -> bool:
        return isinstance(
            mod,
            (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm),
        )

    def _is_dense(self, node: fx.Node) -> bool:
        """A Linear layer or a 1×1 convolution (the two layers of an MLP block)."""
        if node.op == "call_module":
            mod = self.module(node)
            if isinstance(mod, nn.Linear):
                return True
            return isinstance(mod, nn.Conv2d) and tuple(mod.kernel_size) == (1, 1) and mod.groups == 1
        return node.op == "call_function" and node.target is F.linear

    def is_mlp(self, node: fx.Node) -> bool:
        """An activation between two dense layers (transformer / ConvNeXt MLP)."""
        inputs = _tensor_args(node)
        if not inputs:
            return False
        producer = inputs[0]
        for _ in range(8):
            if not self._is_passthrough(producer):
                break
            producer = _tensor_args(producer)[0]
        if not self._is_dense(producer):
            return False
        consumer = node
        for _ in range(8):
            users = list(consumer.users)
            if len(users) != 1:
                return False
            consumer = users[0]
            if not self._is_passthrough(consumer):
                break
        return self._is_dense(consumer)

    def channel_axis(self, node: fx.Node, _depth: int = 0) -> int:
        """Axis of the channel dimension of ``node``'s output, from the op that produced the layout.

        Walks back through layout-preserving ops (every tensor input, breadth first) to a conv, norm,
        linear or permute; across a reshape it follows the channel size. Falls back to 1 for 4-D and
        -1 for 3-D tensors.
        """
        found = self._find_axis(node, _depth)
        if found is not None:
            return found
        shape = shape_of(node)
        return -1 if shape is not None and len(shape) == 3 else 1

    def _find_axis(self, node: fx.Node, depth: int) -> int | None:
        shape = shape_of(node)
        if shape is None:
            return None
        ndim = len(shape)
        frontier, seen = [node], {node}
        for _ in range(256):
            if not frontier:
                return None
            cur = frontier.pop(0)
            axis = self._layout_of(cur, ndim)
            if axis is not None:
                return axis
            if cur.op in ("placeholder", "get_attr"):
                continue
            for nxt in _tensor_args(cur):
                s = shape_of(nxt)
                if s is None or nxt in seen:
                    continue
                seen.add(nxt)
                if len(s) == ndim:
                    frontier.append(nxt)
                elif depth < 4 and len(s) >= 2:
                    # a reshape between layouts: the channel size survives at one end
                    inner = self._find_axis(nxt, depth + 1)
                    if inner is None:
                        continue
                    channels = s[inner]
                    if shape[-1] == channels and shape[1] != channels:
                        return -1
                    if shape[1] == channels and shape[-1] != channels:
                        return 1
        return None

    def _layout_of(self, node: fx.Node, ndim: int) -> int | None:
        if node.op == "call_module":
            mod = self.module(node)
            if isinstance(mod, nn.LayerNorm) and type(mod).__name__.endswith("2d"):
                return 1  # timm LayerNorm2d normalises the channel axis of NCHW features
            if isinstance(
                mod,
                (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LocalResponseNorm),
            ):
                return 1
            if isinstance(mod, (nn.Linear, nn.LayerNorm)):
                return -1
            return None
        if node.op == "call_function":
            if node.target in _CHANNEL_FIRST_FUNCTIONS:
                return 1
            if node.target in _CHANNEL_LAST_FUNCTIONS:
                return -1
            if node.target is torch.permute:
                return _permute_axis(node.args[1:] if len(node.args) > 1 else node.kwargs.get("dims"), ndim)
        if node.op == "call_method" and node.target == "permute":
            return _permute_axis(node.args[1:], ndim)
        return None


def _permute_axis(dims: Any, ndim: int) -> int | None:
    if dims and len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    dims = tuple(dims or ())
    if ndim == 4 and dims == (0, 2, 3, 1):
        return -1
    if ndim == 4 and dims == (0, 3, 1, 2):
        return 1
    return None


def _bits(x: int):
    while x:
        low = x & -x
        yield low.bit_length() - 1
        x ^= low


def _holds_no_tensor(node: fx.Node) -> bool:
    """ShapeProp ran on ``node`` and its value holds no tensor (a shape, a size, an int)."""
    return "type" in node.meta and "tensor_meta" not in node.meta
