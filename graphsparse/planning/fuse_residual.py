"""Fuse for attacks: each after_addition operator and the residual addition it reads as one call, one pass.

An ``after_addition`` site puts a MeanSparse right after a residual addition: the addition writes a sum,
the operator reads it back and writes it again. :func:`fuse_residual_operators` gives a view of a rewritten
model in which each such pair is one call of :func:`residual_mean_sparse`: the C++ kernel adds the two
operands and applies MeanSparse in the same pass, writing into the addition's fresh operand (the output of a
convolution, normalisation or linear module that nothing else reads, as
:func:`~graphsparse.planning.fuse.residual_add` names it), under autograd too. The view shares every
parameter, buffer and operator with the model, so ``set_alpha`` and :func:`~graphsparse.ops.straight_through`
act on both; outputs and gradients are the model's, bit for bit (the sum is eager PyTorch's float32
``a + b``; its gradient, the operator's, goes to both operands as an addition's does).

It is a view for running attacks (``evaluate`` and ``tune`` attack it), not a model to keep: the operators
are called as functions, so a pair whose operator has hooks when it runs, or a fused activation, is computed
unfused (its hooks then run), as are inputs the kernel does not take (not float32, not on the CPU, under
tracing, functorch, a dispatch mode or autocast). Pre-activation networks (RobustBench's WideResNets, the
demo model) have such pairs; where a ReLU follows the addition (torchvision's and timm's ResNets) the operator
has absorbed it and the view leaves the pair alone. What it saves: docs/performance.md.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules import module as _module

from graphsparse.ops import cpu_kernel, fast
from graphsparse.ops.meansparse import MeanSparse
from graphsparse.planning.fuse import residual_add

__all__ = ["fuse_residual_operators", "residual_mean_sparse"]


def _hooked(op: nn.Module) -> bool:
    return bool(
        op._forward_hooks
        or op._forward_pre_hooks
        or op._backward_hooks
        or op._backward_pre_hooks
        or _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    )


def residual_mean_sparse(a: torch.Tensor, b: torch.Tensor, into: int, op: MeanSparse) -> torch.Tensor:
    """``op(residual_add(a, b, into))``, by one pass of the C++ kernel where it applies (float32 CPU tensors of
    one shape and contiguous layout, eager mode, ``op`` without hooks or fused activation).

    The result is written into operand ``into`` when no gradient is recorded, and under autograd when that
    operand is neither a leaf nor a view and its producer did not save it (autograd's version counter guards
    the rest, as for any in-place op)."""
    fresh = b if into else a
    if (
        not fast.applies(a)  # eager mode, a plain tensor, no functorch, dispatch mode or autocast; large enough
        or type(b) is not torch.Tensor
        or a.dtype is not torch.float32
        or b.dtype is not torch.float32
        or not (a.is_cpu and b.is_cpu)
        or cpu_kernel._add_op is None
        or not cpu_kernel._switch.on
        or op._activation is not None
        or _hooked(op)
        or a.shape != b.shape
        or a.stride() != b.stride()
        or not a.is_contiguous()
        or a.dim() < 2
    ):
        return op(residual_add(a, b, into))
    buffers = op._buffers
    mean, var, alpha = buffers["mean"], buffers["var"], buffers["alpha"]
    axis = op.channel_axis % a.dim()
    if (
        type(mean) is not torch.Tensor
        or type(var) is not torch.Tensor
        or type(alpha) is not torch.Tensor
        or not (mean.is_cpu and var.is_cpu and alpha.is_cpu)
        or a.shape[axis] != mean.shape[0]
    ):
        return op(residual_add(a, b, into))
    mu, thr, empty = op.eager_band(torch.float32)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        kind = "forward_out" if op._backward_mode == "straight_through" else "forward_mask"
        # not into a leaf or a view, nor a tensor its producer's backward reads (a sigmoid saves its result)
        inplace = not fresh.is_leaf and fresh._base is None and getattr(fresh.grad_fn, "_saved_result", None) is None
    else:
        kind, inplace = "forward_inplace", True
    if empty:  # the operator is the identity (α = 0: the base model): the addition alone
        return fresh.add_(a if into else b) if inplace else a + b
    return cpu_kernel.launch_add(kind, a, b, mu, thr, axis, into, inplace)


torch.fx.wrap("residual_mean_sparse")


def _fusable_pairs(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """``(addition, operator)`` nodes: a :func:`residual_add` read only by a MeanSparse without activation."""
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        add = node.args[0]
        if not isinstance(add, fx.Node) or add.op != "call_function" or add.target is not residual_add:
            continue
        op = gm.get_submodule(str(node.target))
        if type(op) is MeanSparse and op.activation is None and len(add.users) == 1:
            pairs.append((add, node))
    return pairs


def _fused_graph_module(gm: fx.GraphModule) -> fx.GraphModule | None:
    pairs = _fusable_pairs(gm)
    if not pairs:
        return None
    graph = copy.deepcopy(gm.graph)
    nodes = {n.name: n for n in graph.nodes}
    for add, node in pairs:
        add, node = nodes[add.name], nodes[node.name]
        with graph.inserting_before(node):
            op = graph.get_attr(node.target)
            a, b, into = add.args
            fused = graph.call_function(residual_mean_sparse, (a, b, into, op))
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        graph.erase_node(add)
    graph.lint()
    view = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    view.training = gm.training
    return view


def _with_children(module: nn.Module, replaced: dict[str, nn.Module], prefix: str = "") -> nn.Module:
    """``module`` with the submodules at the paths in ``replaced`` (each ending in ".") swapped, by shallow
    copies of the modules along the way."""
    if prefix in replaced:
        return replaced[prefix]
    children = {
        name: child
        for name, child in module._modules.items()
        if child is not None and any(p.startswith(f"{prefix}{name}.") for p in replaced)
    }
    if not children:
        return module
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    for name, child in children.items():
        clone._modules[name] = _with_children(child, replaced, f"{prefix}{name}.")
    return clone


def fuse_residual_operators(model: nn.Module) -> nn.Module:
    """A view of ``model`` computing each after_addition operator and its residual addition in one call.

    Args:
        model: a model made by :func:`graphsparse.rewrite` (fused, as it is by default).

    Returns:
        ``model`` itself when no graph of it has such a pair; otherwise shallow copies of the modules from the
        root down to each graph that has one, that graph replaced by a copy calling :func:`residual_mean_sparse`
        (a graph inside another replaced one is left as it is). Every parameter, buffer and operator is shared
        with ``model``.
    """
    replaced: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        key = f"{path}." if path else ""
        if isinstance(module, fx.GraphModule) and not any(key.startswith(outer) for outer in replaced):
            view = _fused_graph_module(module)
            if view is not None:
                replaced[key] = view
    return _with_children(model, replaced) if replaced else model
