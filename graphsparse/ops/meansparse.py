"""The MeanSparse operator and the functions that act on every operator of a model.

Per channel ``c`` with mean ``μ_c``, population variance ``σ_c²`` and a threshold factor ``α ≥ 0``::

    y = μ_c   where |x − μ_c| ≤ α·σ_c
    y = x     elsewhere

``α = 0`` is a bit-exact identity whatever the statistics (``-0.0``, NaN and inf pass through unchanged),
and so is every channel whose band is empty (``α·σ_c == 0``, e.g. ``σ_c == 0``). In eager mode an operator
whose every band is empty returns its input tensor itself, without any work (what calibration and the
base-model rows of an evaluation run, at α = 0).
The statistics are buffers (``mean``, ``var``, ``alpha``) and take effect as soon as they are set; there is
no hidden "calibrated" flag, so a fresh operator (zeros everywhere) passes its input through.

The forward pass has no Python branching on tensor values, so the module traces with ``torch.fx`` (as a
``call_module`` under a tracer that keeps it as a leaf), and runs under ``torch.compile`` and
``torch.export``. With the default ``torch.fx.symbolic_trace`` the module is traced through into one
``call_function`` node; the backward mode is then fixed at trace time.

In eager mode large inputs go through a compiled one-pass kernel (:mod:`graphsparse.ops.fast`, bit-equal
output and gradients); an operator may also apply the activation that follows it (``activation``, set by
:func:`graphsparse.planning.fuse.fuse_activations`), which the kernel computes in the same pass.
"""


import functools
import math
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from graphsparse.errors import PlanError, closest
from graphsparse.ops import fast
from graphsparse.ops.fused import ActivationSpec, apply_activation, check_activation

__all__ = [
    "BACKWARD_MODES",
    "OPERATOR_TYPES",
    "MeanSparse",
    "operators",
    "backward_mode",
    "straight_through",
    "set_alpha",
]

BACKWARD_MODES = ("exact", "straight_through")
"""Valid values of :attr:`MeanSparse.backward_mode`."""


def _check_mode(mode: str) -> str:
    if mode not in BACKWARD_MODES:
        raise ValueError(f"unknown backward mode {mode!r}; valid modes: {', '.join(BACKWARD_MODES)}")
    return mode


def _check_alpha(value: float, where: str = "") -> float:
    try:
        alpha = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"alpha{where} must be a number, got {value!r}") from e
    if not (math.isfinite(alpha) and alpha >= 0.0):
        raise ValueError(f"alpha{where} must be a finite number >= 0, got {value!r}")
    return alpha


class _StraightThroughWhere(torch.autograd.Function):
    """``where(|x - mu| <= thr, mu, x)`` with an identity gradient for ``x`` (BPDA)."""

    @staticmethod
    def forward(x: torch.Tensor, mu: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
        return torch.where((x - mu).abs() <= thr, mu, x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


def _compute_mean_and_threshold(
    mean: torch.Tensor, var: torch.Tensor, alpha: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    band = (alpha * var.clamp_min(0.0).sqrt()).to(dtype)
    return mean.to(dtype, copy=True), torch.where(band > 0, band, -1.0)


# id(var buffer) -> (weak reference to it, key, mu, thr, every band empty). Keyed by id and checked through the
# weak reference rather than a WeakTensorKeyDictionary: a lookup runs once per operator and forward, and
# inside a compiled model it runs with caches cold from the kernels around it, where each Python object it
# touches counts (measured on convnext_tiny compiled: 58 µs a lookup before; the operators' cost beyond the
# same formula with constant thresholds went from 1.0–1.1 % of the forward to 0.2–0.7 %).
_pairs: dict[int, tuple] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    if _pairs.get(key, (None,))[0] is ref:
        del _pairs[key]


def _cached_mean_and_threshold(
    mean: torch.Tensor, var: torch.Tensor, alpha: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """:func:`_mean_and_threshold` on plain eager tensors, cached until a buffer changes (version counters
    and storage), which spares every call six tiny operations and a host sync."""
    key = (dtype, mean._version, var._version, alpha._version, mean.data_ptr(), var.data_ptr(), alpha.data_ptr())
    hit = _pairs.get(id(var))
    if hit is not None and hit[1] == key and hit[0]() is var:
        return hit[2], hit[3], hit[4]
    with torch.no_grad():
        mu, thr = _compute_mean_and_threshold(mean, var, alpha, dtype)
    empty = bool((thr < 0).all())
    _pairs[id(var)] = (weakref.ref(var, functools.partial(_forget, id(var))), key, mu, thr, empty)
    return mu, thr, empty


# The per-channel pair as one opaque operation for torch.compile on CPU: inductor would otherwise inline
# ``α·sqrt(σ²)`` into the elementwise kernel and compute a square root per element instead of per channel
# (measured: +0.7 % on resnet50, +1.4 % on convnext_tiny). Being eager code, it rounds exactly as the eager
# operator does, so compiled and eager outputs agree on band edges, and it shares the eager cache. A plain
# library operator rather than ``torch.library.custom_op``, whose Python wrapper cost 25 µs a call against
# 7 µs here. It returns copies: inductor owns the buffers an operator returns and may reuse their memory for
# its own, which must never be the cached tensors.
_library = torch.library.Library("graphsparse", "FRAGMENT")
_library.define("mean_and_threshold(Tensor mean, Tensor var, Tensor alpha, ScalarType dtype) -> (Tensor, Tensor)")


def _mean_and_threshold_op(
    mean: torch.Tensor, var: torch.Tensor, alpha: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    if var.device.type != "cpu":
        # Reached only when called directly (compiled models trace the formula on GPUs). No cache: a miss's
        # host sync would break a CUDA graph capture.
        return _compute_mean_and_threshold(mean, var, alpha, dtype)
    mu, thr, _ = _cached_mean_and_threshold(mean, var, alpha, dtype)
    return mu.clone(), thr.clone()


_library.impl("mean_and_threshold", _mean_and_threshold_op, "CompositeExplicitAutograd")


@torch.library.register_fake("graphsparse::mean_and_threshold")
def _(mean, var, alpha, dtype):
    return torch.empty_like(mean, dtype=dtype), torch.empty_like(var, dtype=dtype)


def _mean_and_threshold(
    mean: torch.Tensor, var: torch.Tensor, alpha: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Per channel, in ``dtype``: the mean and the threshold ``α·σ``, -1 wherever the band is empty; and
    whether every band is known to be empty.

    -1 (α = 0, σ = 0, a NaN, or α·σ underflowing in ``dtype``) makes the comparison ``|x − μ| <= thr`` never
    true, so the output is ``x`` itself, bit for bit (-0.0 and NaN included). In eager mode the triple is
    cached until a buffer changes; the compiled kernel takes it as input too, since eager ``sqrt`` and a
    compiled one may differ in the last bit, and a value exactly on the band edge must land on the same side
    in both. The last item is only computed (one host sync per change of the buffers) in eager mode; it is
    False while tracing.
    """
    if torch.compiler.is_compiling() and var.is_cpu and not fast.is_exporting():
        # not under export: keeps programs portable. On a GPU the formula is traced instead: inductor fuses
        # it into the kernel that uses it, where the op would add seven small kernels per operator (measured on
        # an H100 with tools/profile_compiled.py, CUDA time per forward of compiled resnet50 at batch 8 over
        # the compiled original: 1.50 with the op, 1.08 traced; in an earlier run 1.47 and 1.04)
        mu, thr = torch.ops.graphsparse.mean_and_threshold(mean, var, alpha, dtype)
        return mu, thr, False
    plain = (  # spelled out, not all(...): this runs once per operator and forward (~1 µs less)
        not fast.tracing()
        and type(mean) is torch.Tensor
        and type(var) is torch.Tensor
        and type(alpha) is torch.Tensor
        and not (mean.is_meta or var.is_meta or alpha.is_meta)
        and torch._C._len_torch_dispatch_stack() == 0
    )
    if plain:
        return _cached_mean_and_threshold(mean, var, alpha, dtype)
    with torch.no_grad():
        mu, thr = _compute_mean_and_threshold(mean, var, alpha, dtype)
    return mu, thr, False


def _mean_sparse(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    alpha: torch.Tensor,
    channel_axis: int,
    straight_through: bool,
    activation: ActivationSpec | None = None,
    inplace: bool = False,
    activation_inplace: bool = False,
) -> torch.Tensor:
    """The MeanSparse formula, then ``activation`` (in place under autograd too when ``activation_inplace``);
    wrapped for ``torch.fx`` so a traced-through module stays one node."""
    if x.dim() < 2:
        raise ValueError(f"MeanSparse expects an input of rank >= 2, got shape {tuple(x.shape)}")
    axis = channel_axis % x.dim()
    # not under torch.jit.trace, where sizes are traced values and the check would warn and be baked in
    if not torch.jit.is_tracing() and x.shape[axis] != mean.shape[0]:
        raise ValueError(
            f"MeanSparse has {mean.shape[0]} channels but the input has {x.shape[axis]} along axis "
            f"{channel_axis} (shape {tuple(x.shape)})"
        )
    mu, thr, empty = _mean_and_threshold(mean, var, alpha, x.dtype)
    if empty:  # every band is empty (α = 0 in particular): MeanSparse is the identity, x itself
        if activation is None:
            return x
        in_place = activation_inplace or (inplace and not (torch.is_grad_enabled() and x.requires_grad))
        return apply_activation(activation, x, inplace=in_place)
    y = fast.mean_sparse(
        x,
        mu,
        thr,
        axis,
        straight_through=straight_through,
        activation=activation,
        inplace=inplace,
        activation_inplace=activation_inplace,
    )
    if y is not None:
        return y
    shape = [1] * x.dim()
    shape[axis] = -1
    thr, mu = thr.reshape(shape), mu.reshape(shape)
    if straight_through:
        y = _StraightThroughWhere.apply(x, mu, thr)
    else:
        y = torch.where((x - mu).abs() <= thr, mu, x)
    if activation is None:
        return y
    in_place = activation_inplace or not (torch.is_grad_enabled() and y.requires_grad)
    return apply_activation(activation, y, inplace=in_place)


torch.fx.wrap("_mean_sparse")


# Keyword arguments of the fusable activations, in the order _script_activation passes them.
_SCRIPT_FLOATS = {
    "leaky_relu": (("negative_slope", 0.01),),
    "hardtanh": (("min_val", -1.0), ("max_val", 1.0)),
    "elu": (("alpha", 1.0),),
    "celu": (("alpha", 1.0),),
    "softplus": (("beta", 1.0), ("threshold", 20.0)),
}


def _script_spec(spec: ActivationSpec | None) -> tuple[str, list[float], str]:
    """An activation spec as (name, float arguments, text argument): types TorchScript can hold."""
    if spec is None:
        return "", [], ""
    name, args = spec
    kwargs = dict(args)
    floats = [float(kwargs.get(key, default)) for key, default in _SCRIPT_FLOATS.get(name, ())]
    return name, floats, str(kwargs.get("approximate", "none"))


def _script_activation(y: torch.Tensor, name: str, floats: list[float], text: str) -> torch.Tensor:
    """``apply_activation`` for TorchScript: the same functions, chosen by name."""
    if name == "":
        return y
    if name == "relu":
        return F.relu(y)
    if name == "relu6":
        return F.relu6(y)
    if name == "leaky_relu":
        return F.leaky_relu(y, floats[0])
    if name == "hardtanh":
        return F.hardtanh(y, floats[0], floats[1])
    if name == "elu":
        return F.elu(y, floats[0])
    if name == "celu":
        return F.celu(y, floats[0])
    if name == "selu":
        return F.selu(y)
    if name == "gelu":
        return F.gelu(y, approximate=text)
    if name == "silu":
        return F.silu(y)
    if name == "mish":
        return F.mish(y)
    if name == "hardswish":
        return F.hardswish(y)
    if name == "hardsigmoid":
        return F.hardsigmoid(y)
    if name == "sigmoid":
        return torch.sigmoid(y)
    if name == "tanh":
        return torch.tanh(y)
    if name == "softplus":
        return F.softplus(y, floats[0], floats[1])
    raise RuntimeError("MeanSparse: unknown fused activation " + name)


class MeanSparse(nn.Module):
    """Replace values within ``alpha`` standard deviations of their channel mean by that mean.

    Args:
        channels: number of channels (size of ``mean`` and ``var``).
        channel_axis: axis of the channel dimension in the input: ``1`` for NCHW features, ``-1`` for
            channels-last (NHWC) and token (B, L, C) features. Any input rank >= 2 is accepted.
        alpha: threshold factor, a finite number >= 0. ``0`` makes the operator an exact identity.
        site_id: id of the site the operator was inserted at (key of :func:`operators`).
        depth: index of the site along the forward pass (orders :func:`operators`).

    Buffers (all float32, all in the ``state_dict``):
        mean: per-channel mean, shape ``[channels]``.
        var: per-channel population variance, shape ``[channels]``.
        alpha: the threshold factor, a 0-dim tensor. Change it with :func:`set_alpha` or ``op.alpha.fill_``.

    Attributes:
        backward_mode: ``"exact"`` (true gradient: zero inside the band, identity outside) or
            ``"straight_through"`` (identity gradient everywhere, BPDA). The forward output is bit-equal
            in both modes.
        activation: None, or the :data:`~graphsparse.ops.fused.ActivationSpec` of an activation the
            operator applies to its own output (the fused form, see :func:`graphsparse.planning.fuse.fuse_activations`).
            Its gradient is the activation's at the operator's output times MeanSparse's (identity under
            ``straight_through``), i.e. the gradient of the unfused pair.
        inplace: the operator may overwrite its input (as ``nn.ReLU(inplace=True)`` does): when no gradient
            is recorded, and under autograd on float32 CPU tensors that are neither leaves nor views (the
            C++ kernel's path). Set by the fusion pass where the activation it absorbs was in place, or where
            its input is the fresh output of a module, or a sum, that nothing else reads.
        activation_inplace: the absorbed activation was in place, so it is applied in place under autograd
            too, where the unfused graph applied it to the operator's output: ELU, CELU and SELU compute an
            in-place call's gradient from their output, an out-of-place call's from their input, which
            differ in the last bits. Set by the fusion pass.
    """

    mean: torch.Tensor
    var: torch.Tensor
    alpha: torch.Tensor
    _act_floats: list[float]  # typed for TorchScript (an empty list would be taken for a list of tensors)
    __jit_unused_properties__ = ["backward_mode", "activation"]  # torch.jit.script compiles _scripted instead

    def __init__(
        self,
        channels: int,
        channel_axis: int = 1,
        alpha: float = 0.0,
        *,
        site_id: str = "",
        depth: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if isinstance(channel_axis, bool) or not isinstance(channel_axis, int):
            raise ValueError(f"channel_axis must be an int, got {channel_axis!r}")
        self.channels = channels
        self.channel_axis = channel_axis
        self.site_id = str(site_id)
        self.depth = int(depth)
        self.backward_mode = "exact"
        self.activation = None  # no annotation: TorchScript warns about instance-level ones
        self.inplace = False
        self.activation_inplace = False
        self.register_buffer("mean", torch.zeros(channels, dtype=torch.float32))
        self.register_buffer("var", torch.zeros(channels, dtype=torch.float32))
        self.register_buffer("alpha", torch.tensor(_check_alpha(alpha), dtype=torch.float32))

    @property
    def backward_mode(self) -> str:
        """``"exact"`` or ``"straight_through"``; setting anything else raises ``ValueError``."""
        return self._backward_mode

    @backward_mode.setter
    def backward_mode(self, mode: str) -> None:
        self._backward_mode = _check_mode(mode)

    @property
    def activation(self) -> ActivationSpec | None:
        """The fused activation's spec, or None; set a name (``"relu"``) or ``(name, args)``."""
        return self._activation

    @activation.setter
    def activation(self, spec: ActivationSpec | str | None) -> None:
        self._activation = check_activation(spec)
        # the same spec in attributes TorchScript can type (see _scripted)
        self._act_name, self._act_floats, self._act_text = _script_spec(self._activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # torch.jit.script compiles only this branch
            return self._scripted(x)
        buffers = self._buffers  # not three nn.Module.__getattr__ lookups (~0.6 µs a call)
        return _mean_sparse(
            x,
            buffers["mean"],
            buffers["var"],
            buffers["alpha"],
            self.channel_axis,
            self._backward_mode == "straight_through",
            self._activation,
            self.inplace,
            self.activation_inplace,
        )

    @torch.jit.unused
    def thresholds(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel, in ``dtype``: the mean and the threshold ``α·σ`` the forward pass compares with (computed
        as it computes them), -1 where the band is empty."""
        return _compute_mean_and_threshold(self.mean, self.var, self.alpha, dtype)

    @torch.jit.unused
    def eager_band(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """What the eager forward pass compares with, for callers running the kernels themselves (the attack view,
        :mod:`graphsparse.planning.fuse_residual`): the mean and the threshold per channel in ``dtype`` (-1 where
        the band is empty), and whether every band is empty. Cached until a buffer changes; for plain tensors
        outside any tracing (the caller checks)."""
        buffers = self._buffers
        return _cached_mean_and_threshold(buffers["mean"], buffers["var"], buffers["alpha"], dtype)

    def _scripted(self, x: torch.Tensor) -> torch.Tensor:
        """The forward pass as TorchScript compiles it: the plain formula on the same per-channel mean and
        threshold (bit-equal to eager mode), then the fused activation; the gradient is the exact one."""
        mu = self.mean.to(x.dtype)
        band = (self.alpha * self.var.clamp_min(0.0).sqrt()).to(x.dtype)
        thr = torch.where(band > 0, band, -torch.ones_like(band))
        shape = [1] * x.dim()
        shape[self.channel_axis % x.dim()] = -1
        mu, thr = mu.reshape(shape), thr.reshape(shape)
        y = torch.where((x - mu).abs() <= thr, mu, x)
        return _script_activation(y, self._act_name, self._act_floats, self._act_text)

    def extra_repr(self) -> str:
        alpha = "?" if self.alpha.is_meta else f"{float(self.alpha):g}"
        fused = ""
        if self._activation is not None:
            name, args = self._activation
            fused = f", activation={name}" + "".join(f", {k}={v!r}" for k, v in args)
            fused += ", inplace=True" if self.inplace else ""
        return (
            f"{self.channels}, channel_axis={self.channel_axis}, alpha={alpha}, "
            f"backward_mode={self._backward_mode!r}, site_id={self.site_id!r}{fused}"
        )


OPERATOR_TYPES: tuple[type[nn.Module], ...] = (MeanSparse,)
"""Operator classes :func:`operators` collects by default; new operator types (SPARTA) join here."""


def operators(
    model: nn.Module, *, types: tuple[type[nn.Module], ...] | None = None
) -> OrderedDict[str, MeanSparse]:
    """Every operator in ``model``, keyed by site id, in forward order.

    Operators are sorted by their ``depth`` attribute; ties keep the module order of
    ``model.named_modules()``. An operator with an empty ``site_id`` is keyed by its qualified module name.
    A module reachable under several names is listed once.

    Args:
        model: any module tree (the model itself may be an operator).
        types: operator classes to collect; defaults to :data:`OPERATOR_TYPES`.

    Returns:
        An ordered mapping site id -> operator module.

    Raises:
        PlanError: two operators share a site id.
    """
    types = OPERATOR_TYPES if types is None else tuple(types)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, types)]
    found.sort(key=lambda item: getattr(item[1], "depth", 0))  # stable: module order breaks ties
    result: OrderedDict[str, MeanSparse] = OrderedDict()
    names: dict[str, str] = {}
    for name, op in found:
        key = getattr(op, "site_id", "") or name
        if key in result:
            raise PlanError(
                f"site id {key!r} is used by two operators ({names[key]!r} and {name!r}). "
                "Hint: give every operator a unique site_id"
            )
        result[key] = op
        names[key] = name
    return result


def _meansparse_ops(model: nn.Module) -> list[MeanSparse]:
    return list(operators(model, types=(MeanSparse,)).values())


@contextmanager
def backward_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Switch the backward mode of every MeanSparse in ``model`` for the duration of a ``with`` block.

    Each operator's previous mode is restored on exit, also when the block raises.

    Args:
        model: any module tree.
        mode: ``"exact"`` or ``"straight_through"``.

    Raises:
        ValueError: ``mode`` is not a valid backward mode (nothing is changed).
    """
    _check_mode(mode)
    ops = _meansparse_ops(model)
    previous = [op.backward_mode for op in ops]
    try:
        for op in ops:
            op.backward_mode = mode
        yield
    finally:
        for op, old in zip(ops, previous):
            op.backward_mode = old


@contextmanager
def straight_through(model: nn.Module) -> Iterator[None]:
    """Give every MeanSparse in ``model`` an identity gradient (BPDA) inside a ``with`` block.

    Shorthand for ``backward_mode(model, "straight_through")``; previous modes are restored on exit.

    Args:
        model: any module tree.
    """
    with backward_mode(model, "straight_through"):
        yield


def set_alpha(model: nn.Module, value: float | Mapping[str, float]) -> None:
    """Set the threshold factor of MeanSparse operators in ``model`` (in place).

    Everything is validated before any operator is changed.

    Args:
        model: any module tree.
        value: one number for every operator, or a mapping site id -> number for some of them.

    Raises:
        PlanError: ``model`` has no MeanSparse, or a site id of the mapping names none in ``model``.
        ValueError: a value is negative, not finite or not a number.
    """
    ops = operators(model, types=(MeanSparse,))
    if not ops:
        raise PlanError(
            f"{type(model).__name__} has no MeanSparse operator, so there is no alpha to set. "
            "Hint: set it on the model graphsparse.rewrite returned"
        )
    if isinstance(value, Mapping):
        updates: list[tuple[MeanSparse, float]] = []
        for site_id, alpha in value.items():
            if site_id not in ops:
                raise PlanError(
                    f"unknown site id {site_id!r}{closest(site_id, ops)}. "
                    "Hint: list the ids with graphsparse.ops.operators(model)"
                )
            updates.append((ops[site_id], _check_alpha(alpha, f" for site {site_id!r}")))
    else:
        alpha = _check_alpha(value)
        updates = [(op, alpha) for op in ops.values()]
    with torch.no_grad():
        for op, alpha in updates:
            op.alpha.fill_(alpha)
