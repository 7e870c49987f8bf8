"""Random image classifiers whose sites are known by construction, for property-based tests.

:func:`random_architectures` is a hypothesis strategy. Each example is an :class:`Architecture`: a small,
frozen description of a classifier (stem, a sequence of blocks, head) that

- builds the model (:meth:`Architecture.build`, deterministic weights),
- knows its input shape (:attr:`Architecture.input_shape`),
- knows the sites graphsparse must find, in forward order, with their ids, ops, roles, layouts, channel
  axes, channel counts and stages, and the gates that must *not* be sites (:attr:`Architecture.truth`),
- prints as Python code that rebuilds it (:meth:`Architecture.source`), with one comment per block saying
  what its forward does. ``note(arch.source())`` in a property makes failures readable.

The grammar: a conv/BN/activation stem (inline at the root like timm's ResNet, or a ``stem`` module,
optionally followed by max pooling), then blocks:

- :class:`Chain`: conv-BN-activation units (3×3 or 1×1 convs, stride 1 or 2),
- :class:`Residual`: post-activation (``add -> act`` or a bare add) and pre-activation (``BN-act -> conv
  ... -> add``) blocks, identity or projection shortcuts, optional squeeze-excitation in the branch,
- :class:`SqueezeExcite`: sigmoid / hardsigmoid gates after mean, adaptive pooling or a pooling module,
  4-D (1×1 convs) or flat (Linear layers, gate reshaped back),
- :class:`Dense`: ``torch.cat`` of the input and conv-BN-act branches,
- :class:`Hidden`: a conv followed by :class:`HiddenActLeaf`, a timm no-trace leaf holding BN + activation
  (reached through the module tree),
- :class:`ConvNeXt`: depthwise conv, ``permute(0, 2, 3, 1)``, LayerNorm, Linear-act-Linear, permute back,
  residual add,
- :class:`ToTokens` + :class:`TokenMLP`: ``(B, L, C)`` features, LayerNorm, Linear-act-Linear, residual add,

and a head (optional norm + activation, global pooling, Linear or a Linear-act-Linear MLP). Activations
of every kind are spelled as modules (plain, in-place, timm, autograd.Function-based), functionals
(``F.relu``, ``F.relu(x, inplace=True)``, ``F.relu_``, ``torch.relu``) and tensor methods (``x.relu()``,
``x.relu_()``). The root is traceable, or untraceable (a data-dependent branch) either as a wrapper
around the traceable network or with its own children traced one by one.

Roles follow graphsparse's definitions (see :mod:`graphsparse.roles`), applied to the construction:
an activation fed only by a residual add and the bare add otherwise are ``after_addition``; anything on a
squeeze-excitation branch is ``in_se``; an activation between two dense layers (Linear or 1×1 conv, with
norms between) is ``mlp``; otherwise ``stem`` (strict ancestor of every residual fork), ``head``
(descendant of every residual add) or ``main_path``; without residual adds everything is ``main_path``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st
from timm.layers import activations as timm_act
from timm.layers import register_notrace_module

__all__ = [
    "Act",
    "Architecture",
    "Chain",
    "ConvNeXt",
    "Dense",
    "ExpectedGate",
    "ExpectedSite",
    "Head",
    "Hidden",
    "HiddenActLeaf",
    "Residual",
    "SE",
    "SqueezeExcite",
    "Stem",
    "Swish",
    "ToTokens",
    "TokenMLP",
    "Truth",
    "Unit",
    "random_architectures",
    "plain_acts",
    "mlp_acts",
    "GeneratedNet",
    "UntraceableWrapper",
    "ACTIVATION_SPELLINGS",
]

# ------------------------------------------------------------------------------------------ activations


class _SwishFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * (s * (1 + x * (1 - s)))


class Swish(nn.Module):
    """SiLU through a ``torch.autograd.Function`` (like RobustBench's ``Swish``): a leaf for torch.fx."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SwishFunction.apply(x)


MODULE_SPELLINGS = frozenset({"module", "module_inplace", "timm_module", "autograd_module"})


def _spellings() -> dict[str, dict[str, tuple[str, Callable[..., Any]]]]:
    """kind -> spelling -> (code, factory). Module spellings: factory() -> module; others: factory(x)."""
    table: dict[str, dict[str, tuple[str, Callable[..., Any]]]] = {}

    def module(kind, cls, inplace=False, args="", **kwargs):
        entry = table.setdefault(kind, {})
        sep = ", " if args else ""
        entry["module"] = (f"nn.{cls.__name__}({args})", lambda: cls(**kwargs))
        if inplace:
            entry["module_inplace"] = (
                f"nn.{cls.__name__}({args}{sep}inplace=True)",
                lambda: cls(inplace=True, **kwargs),
            )

    def call(kind, spelling, code, fn):
        table.setdefault(kind, {})[spelling] = (code, fn)

    module("relu", nn.ReLU, inplace=True)
    call("relu", "functional", "F.relu(x)", lambda x: F.relu(x))
    call("relu", "functional_inplace", "F.relu(x, inplace=True)", lambda x: F.relu(x, inplace=True))
    call("relu", "functional_underscore", "F.relu_(x)", lambda x: F.relu_(x))
    call("relu", "torch", "torch.relu(x)", lambda x: torch.relu(x))
    call("relu", "method", "x.relu()", lambda x: x.relu())
    call("relu", "method_inplace", "x.relu_()", lambda x: x.relu_())

    module("relu6", nn.ReLU6, inplace=True)
    call("relu6", "functional", "F.relu6(x)", lambda x: F.relu6(x))
    call("relu6", "functional_inplace", "F.relu6(x, inplace=True)", lambda x: F.relu6(x, inplace=True))

    module("leaky_relu", nn.LeakyReLU, inplace=True, args="0.1", negative_slope=0.1)
    call("leaky_relu", "functional", "F.leaky_relu(x, 0.1)", lambda x: F.leaky_relu(x, 0.1))
    call("leaky_relu", "functional_inplace", "F.leaky_relu(x, 0.1, inplace=True)",
         lambda x: F.leaky_relu(x, 0.1, inplace=True))
    call("leaky_relu", "functional_underscore", "F.leaky_relu_(x, 0.1)", lambda x: F.leaky_relu_(x, 0.1))

    module("elu", nn.ELU, inplace=True)
    call("elu", "functional", "F.elu(x)", lambda x: F.elu(x))
    call("elu", "functional_inplace", "F.elu(x, inplace=True)", lambda x: F.elu(x, inplace=True))
    call("elu", "functional_underscore", "F.elu_(x)", lambda x: F.elu_(x))

    module("selu", nn.SELU, inplace=True)
    call("selu", "functional", "F.selu(x)", lambda x: F.selu(x))
    call("selu", "torch", "torch.selu(x)", lambda x: torch.selu(x))

    module("celu", nn.CELU, inplace=True)
    call("celu", "functional", "F.celu(x)", lambda x: F.celu(x))

    module("gelu", nn.GELU)
    table["gelu"]["module_tanh"] = ("nn.GELU(approximate='tanh')", lambda: nn.GELU(approximate="tanh"))
    call("gelu", "functional", "F.gelu(x)", lambda x: F.gelu(x))
    call("gelu", "timm_module", "timm.layers.activations.GELU()", lambda: timm_act.GELU())

    module("silu", nn.SiLU, inplace=True)
    call("silu", "functional", "F.silu(x)", lambda x: F.silu(x))
    call("silu", "functional_inplace", "F.silu(x, inplace=True)", lambda x: F.silu(x, inplace=True))
    call("silu", "timm_module", "timm.layers.activations.Swish()", lambda: timm_act.Swish())
    call("silu", "autograd_module", "Swish()  # calls an autograd.Function", lambda: Swish())

    module("hardswish", nn.Hardswish, inplace=True)
    call("hardswish", "functional", "F.hardswish(x)", lambda x: F.hardswish(x))
    call("hardswish", "functional_inplace", "F.hardswish(x, inplace=True)",
         lambda x: F.hardswish(x, inplace=True))
    call("hardswish", "timm_module", "timm.layers.activations.HardSwish()", lambda: timm_act.HardSwish())

    module("mish", nn.Mish, inplace=True)
    call("mish", "functional", "F.mish(x)", lambda x: F.mish(x))
    call("mish", "timm_module", "timm.layers.activations.Mish()", lambda: timm_act.Mish())

    module("softplus", nn.Softplus)
    call("softplus", "functional", "F.softplus(x)", lambda x: F.softplus(x))

    module("hardtanh", nn.Hardtanh, inplace=True)
    call("hardtanh", "functional", "F.hardtanh(x)", lambda x: F.hardtanh(x))
    call("hardtanh", "functional_underscore", "F.hardtanh_(x)", lambda x: F.hardtanh_(x))

    module("prelu", nn.PReLU)

    # gate kinds: gates when they feed a multiplication, activations otherwise
    module("sigmoid", nn.Sigmoid)
    call("sigmoid", "torch", "torch.sigmoid(x)", lambda x: torch.sigmoid(x))
    call("sigmoid", "method", "x.sigmoid()", lambda x: x.sigmoid())
    call("sigmoid", "method_inplace", "x.sigmoid_()", lambda x: x.sigmoid_())

    module("hardsigmoid", nn.Hardsigmoid, inplace=True)
    call("hardsigmoid", "functional", "F.hardsigmoid(x)", lambda x: F.hardsigmoid(x))
    call("hardsigmoid", "functional_inplace", "F.hardsigmoid(x, inplace=True)",
         lambda x: F.hardsigmoid(x, inplace=True))

    module("tanh", nn.Tanh)
    call("tanh", "torch", "torch.tanh(x)", lambda x: torch.tanh(x))
    call("tanh", "method", "x.tanh()", lambda x: x.tanh())
    call("tanh", "method_inplace", "x.tanh_()", lambda x: x.tanh_())
    return table


ACTIVATION_SPELLINGS = _spellings()
"""kind -> spelling -> (code, factory): every way the generator writes each activation kind."""

PLAIN_KINDS = (
    "relu", "gelu", "silu", "hardswish", "relu6", "leaky_relu", "elu", "selu", "celu", "mish", "softplus",
    "hardtanh", "prelu",
)
"""Kinds used where the output may feed anything (never gates)."""
GATE_KINDS = ("sigmoid", "hardsigmoid", "tanh")
MLP_KINDS = PLAIN_KINDS + GATE_KINDS
"""Kinds used where the output feeds a dense layer (MLPs, the inside of SE): gate kinds are sites there."""
SE_GATES = ("sigmoid", "hardsigmoid")


def _is_module_spelling(spelling: str) -> bool:
    return spelling in MODULE_SPELLINGS or spelling.startswith("module")


@dataclass(frozen=True)
class Act:
    """One activation: its canonical kind (graphsparse's name) and how the code spells it."""

    kind: str
    spelling: str = "module"

    def __post_init__(self) -> None:
        if self.spelling not in ACTIVATION_SPELLINGS.get(self.kind, {}):
            raise ValueError(f"no spelling {self.spelling!r} for activation {self.kind!r}")

    def __repr__(self) -> str:
        return f"Act({self.kind!r}, {self.spelling!r})"

    @property
    def is_module(self) -> bool:
        return _is_module_spelling(self.spelling)

    @property
    def code(self) -> str:
        return ACTIVATION_SPELLINGS[self.kind][self.spelling][0]

    def module(self) -> nn.Module:
        return ACTIVATION_SPELLINGS[self.kind][self.spelling][1]()

    def site_id(self, owner: str, attr: str) -> str:
        """The id graphsparse gives this activation: module path, or owner path + kind."""
        return _join(owner, attr) if self.is_module else _join(owner, self.kind)

    def site_module(self, owner: str, attr: str) -> str:
        return _join(owner, attr) if self.is_module else owner


def _act(owner: nn.Module, attr: str, act: Act, x: torch.Tensor) -> torch.Tensor:
    """Apply ``act`` as spelled: the module ``owner.<attr>``, or the functional/method call."""
    if act.is_module:
        return getattr(owner, attr)(x)
    return ACTIVATION_SPELLINGS[act.kind][act.spelling][1](x)


def _maybe_act_module(owner: nn.Module, attr: str, act: Act | None) -> None:
    if act is not None and act.is_module:
        owner.add_module(attr, act.module())


ADD_SPELLINGS = {
    "+": "out + shortcut",
    "radd": "shortcut + out",
    "+=": "out += shortcut",
    "torch.add": "torch.add(out, shortcut)",
    "method": "out.add(shortcut)",
}


def _add(out: torch.Tensor, shortcut: torch.Tensor, spelling: str) -> torch.Tensor:
    if spelling == "+":
        return out + shortcut
    if spelling == "radd":
        return shortcut + out
    if spelling == "+=":
        out += shortcut
        return out
    if spelling == "torch.add":
        return torch.add(out, shortcut)
    return out.add(shortcut)


MUL_SPELLINGS = {"*": "x * gate", "r*": "gate * x", "torch.mul": "torch.mul(x, gate)", "method": "x.mul(gate)"}


def _mul(x: torch.Tensor, gate: torch.Tensor, spelling: str) -> torch.Tensor:
    if spelling == "*":
        return x * gate
    if spelling == "r*":
        return gate * x
    if spelling == "torch.mul":
        return torch.mul(x, gate)
    return x.mul(gate)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)


def _down(size: int, stride: int) -> int:
    return (size + stride - 1) // stride


# ------------------------------------------------------------------------------------------ ground truth


@dataclass(frozen=True)
class ExpectedSite:
    """A site graphsparse must find. ``channel_axis`` is non-negative (``axis % ndim`` of the input)."""

    id: str
    op: str
    role: str
    layout: str
    channel_axis: int
    channels: int
    reached: str
    module: str
    stage: int
    first_in_stage: bool
    last_in_stage: bool

    def row(self) -> str:
        flags = ("F" if self.first_in_stage else "-") + ("L" if self.last_in_stage else "-")
        return (
            f"{self.id:<32} {self.op:<11} {self.role:<15} {self.layout:<6} axis={self.channel_axis} "
            f"C={self.channels:<3} {self.reached:<11} stage={self.stage} {flags}"
        )


@dataclass(frozen=True)
class ExpectedGate:
    """A sigmoid/hardsigmoid feeding a multiplication: never a site.

    ``module`` is the gate module's path, or for functional/method gates the path of the module whose
    forward calls it (a functional activation of the same kind there may still be a site).
    """

    module: str
    op: str


@dataclass(frozen=True)
class Truth:
    sites: tuple[ExpectedSite, ...]
    gates: tuple[ExpectedGate, ...]

    def table(self) -> str:
        lines = [s.row() for s in self.sites] or ["(no sites)"]
        lines += [f"gate (not a site): {g.op} in {g.module}" for g in self.gates]
        return "\n".join(lines)


_POSITION = "<position>"  # role decided from the site's place relative to the residual blocks


@dataclass
class _Pending:
    id_base: str
    op: str
    role: str
    layout: str
    axis: int
    channels: int
    spatial: int | None
    reached: str
    module: str
    block: int
    is_output: bool  # the site's node is its block's output node


@dataclass
class _State:
    """What flows between blocks."""

    channels: int
    height: int
    width: int
    layout: str = "nchw"  # or "tokens"

    @property
    def spatial(self) -> int:
        return self.height * self.width

    def can_downsample(self) -> bool:
        return self.layout == "nchw" and min(self.height, self.width) >= 3


class _Emitter:
    def __init__(self) -> None:
        self.sites: list[_Pending] = []
        self.gates: list[tuple[str, str]] = []
        self.block = -1

    def site(self, *, id_base, op, role, layout, channels, spatial, module, reached="graph", is_output=False):
        axis = {"nchw": 1, "nhwc": 3, "tokens": 2, "nc": 1}[layout]
        self.sites.append(
            _Pending(id_base, op, role, layout, axis, channels, spatial, reached, module, self.block, is_output)
        )

    def act(self, act: Act, owner: str, attr: str, *, role, layout, channels, spatial, is_output=False):
        self.site(
            id_base=act.site_id(owner, attr), op=act.kind, role=role, layout=layout, channels=channels,
            spatial=spatial, module=act.site_module(owner, attr), is_output=is_output,
        )


# ------------------------------------------------------------------------------------------ block specs


@dataclass(frozen=True)
class Stem:
    """conv3×3(3→out, stride) → BN → act [→ maxpool]; ``inline``: attributes of the root (timm ResNet)."""

    out: int = 4
    act: Act = Act("relu")
    stride: int = 1
    pool: bool = False
    inline: bool = False

    def comment(self) -> str:
        pool = " -> maxpool" if self.pool else ""
        where = "root attributes conv1/bn1/act1" if self.inline else "module 'stem'"
        return f"# stem ({where}): conv3x3(3->{self.out}, stride {self.stride}) -> BN -> {self.act.code}{pool}"


@dataclass(frozen=True)
class Unit:
    """conv k×k (stride) → BN → act."""

    out: int = 4
    k: int = 3
    stride: int = 1
    act: Act = Act("relu")


@dataclass(frozen=True)
class Chain:
    """Plain conv-BN-act units in an ``nn.Sequential``."""

    units: tuple[Unit, ...] = (Unit(),)

    residual = False

    def comment(self) -> str:
        parts = [f"conv{u.k}x{u.k}(->{u.out}, s{u.stride}) -> BN -> {u.act.code}" for u in self.units]
        return "# chain: " + " ; ".join(parts)


@dataclass(frozen=True)
class SE:
    """Squeeze-excitation: reduce (global mean) → dense → act → dense → gate → multiply back."""

    act: Act = Act("relu")
    gate: Act = Act("sigmoid")
    reduce: str = "mean"  # mean | adaptive_avg_pool | pool_module | flat_view | flat_index
    mul: str = "*"

    def comment(self) -> str:
        reduce = {
            "mean": "x.mean((2, 3), keepdim=True) -> conv1x1",
            "adaptive_avg_pool": "F.adaptive_avg_pool2d(x, 1) -> conv1x1",
            "pool_module": "nn.AdaptiveAvgPool2d(1) -> conv1x1",
            "flat_view": "x.mean((2, 3)) -> Linear",
            "flat_index": "x.mean((2, 3)) -> Linear",
        }[self.reduce]
        back = {"flat_view": " -> .view(-1, C, 1, 1)", "flat_index": " -> [:, :, None, None]"}.get(self.reduce, "")
        return f"SE[{reduce} -> {self.act.code} -> dense -> gate {self.gate.code}{back} -> {MUL_SPELLINGS[self.mul]}]"

    @property
    def flat(self) -> bool:
        return self.reduce.startswith("flat")


@dataclass(frozen=True)
class SqueezeExcite:
    """A standalone squeeze-excitation block."""

    se: SE = SE()

    residual = False

    def comment(self) -> str:
        return "# " + self.se.comment()


@dataclass(frozen=True)
class Residual:
    """A residual block.

    Post-activation (``pre_act=False``): ``out = BN(conv3x3(act1(BN(conv3x3(x)))))``, optional SE, then
    ``out + shortcut(x)`` and ``post`` (None: the bare add). Pre-activation: ``out = act1(BN(x))``,
    ``shortcut = proj(out)`` or ``x``, ``out = conv(act2(BN(conv(out))))``, optional SE, ``out + shortcut``.
    ``hidden``: act1 (with its BN) sits inside a :class:`HiddenActLeaf`.
    """

    pre_act: bool = False
    out: int = 4
    stride: int = 1
    shortcut: str = "identity"  # identity | projection
    act1: Act = Act("relu")
    act2: Act | None = None  # pre-activation: the middle activation (required); post: the post-add one
    se: SE | None = None
    add: str = "+"
    hidden: bool = False

    residual = True

    def __post_init__(self) -> None:
        if self.pre_act and self.act2 is None:
            raise ValueError("a pre-activation Residual needs act2 (the activation between its convs)")
        if self.shortcut not in ("identity", "projection"):
            raise ValueError(f"shortcut must be 'identity' or 'projection', got {self.shortcut!r}")
        if self.hidden and not self.act1.is_module:
            raise ValueError("hidden=True puts act1 inside a HiddenActLeaf: act1 must be a module spelling")

    @property
    def fork_is_input(self) -> bool:
        return not (self.pre_act and self.shortcut == "projection")

    def comment(self) -> str:
        se = f" -> {self.se.comment()}" if self.se else ""
        act1 = f"leaf[BN -> {self.act1.code}]" if self.hidden else f"BN -> {self.act1.code}"
        proj = "conv1x1" if self.shortcut == "projection" else "identity"
        if self.pre_act and self.act2 is not None:
            return (
                f"# pre-act residual: out = {act1}(x); shortcut = {proj}({'out' if proj != 'identity' else 'x'}); "
                f"conv3x3(->{self.out}, s{self.stride}) -> BN -> {self.act2.code} -> conv3x3{se}; "
                f"{ADD_SPELLINGS[self.add]}"
            )
        post = f" -> {self.act2.code}" if self.act2 else ""
        return (
            f"# post-act residual: conv3x3(->{self.out}, s{self.stride}) -> {act1} -> conv3x3 -> BN{se}; "
            f"shortcut = {proj}(x); {ADD_SPELLINGS[self.add]}{post}"
        )


@dataclass(frozen=True)
class Dense:
    """``torch.cat([x, *branches(x)], 1)`` with conv3×3-BN-act branches of ``growth`` channels each."""

    branches: tuple[Act, ...] = (Act("relu"),)
    growth: int = 4

    residual = False

    def comment(self) -> str:
        return "# dense: torch.cat([x] + [" + ", ".join(
            f"{a.code}(BN(conv3x3(x, ->{self.growth})))" for a in self.branches
        ) + "], 1)"


@dataclass(frozen=True)
class Hidden:
    """conv3×3 → :class:`HiddenActLeaf` (BN + act in a timm no-trace module)."""

    out: int = 4
    stride: int = 1
    act: Act = Act("relu")

    residual = False

    def comment(self) -> str:
        return f"# hidden: conv3x3(->{self.out}, s{self.stride}) -> HiddenActLeaf[BN -> {self.act.code}]"


@dataclass(frozen=True)
class ConvNeXt:
    """dwconv3×3 → permute(0,2,3,1) → LayerNorm → Linear(C, eC) → act → Linear → permute back → add."""

    act: Act = Act("gelu")
    expansion: int = 2
    add: str = "+"

    residual = True
    fork_is_input = True

    def comment(self) -> str:
        return (
            f"# convnext: out = dwconv3x3(x).permute(0, 2, 3, 1) -> LayerNorm -> Linear(x{self.expansion}) -> "
            f"{self.act.code} -> Linear -> permute(0, 3, 1, 2); shortcut = x; {ADD_SPELLINGS[self.add]}"
        )


@dataclass(frozen=True)
class ToTokens:
    """``x.flatten(2).transpose(1, 2)``: (B, C, H, W) → (B, L, C)."""

    residual = False

    def comment(self) -> str:
        return "# tokens: x = x.flatten(2).transpose(1, 2)"


@dataclass(frozen=True)
class TokenMLP:
    """(B, L, C): LayerNorm → Linear(C, eC) → act → Linear → residual add."""

    act: Act = Act("gelu")
    expansion: int = 2
    add: str = "+"

    residual = True
    fork_is_input = True

    def comment(self) -> str:
        return (
            f"# token mlp: out = LayerNorm(x) -> Linear(x{self.expansion}) -> {self.act.code} -> Linear; "
            f"shortcut = x; {ADD_SPELLINGS[self.add]}"
        )


@dataclass(frozen=True)
class Head:
    """[norm → act] → global pool → Linear, or Linear → mlp act → Linear."""

    norm_act: Act | None = None
    pool: str = "mean"  # mean | adaptive_avg_pool | pool_module   (tokens: always x.mean(1))
    mlp: Act | None = None
    classes: int = 3

    def comment(self) -> str:
        norm = f"norm -> {self.norm_act.code} -> " if self.norm_act else ""
        fc = f"Linear -> {self.mlp.code} -> Linear" if self.mlp else "Linear"
        return f"# head: {norm}global pool ({self.pool}) -> {fc}({self.classes})"


Block = Chain | SqueezeExcite | Residual | Dense | Hidden | ConvNeXt | ToTokens | TokenMLP


# ------------------------------------------------------------------------------------------ modules


@register_notrace_module
class HiddenActLeaf(nn.Module):
    """BN + activation in a module torch.fx does not trace (timm no-trace registry, like BatchNormAct2d)."""

    def __init__(self, channels: int, act: Act) -> None:
        super().__init__()
        if not act.is_module:
            raise ValueError("the activation inside a HiddenActLeaf must be a module")
        self.bn = nn.BatchNorm2d(channels)
        self.act = act.module()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x))


class _StemModule(nn.Module):
    def __init__(self, spec: Stem) -> None:
        super().__init__()
        self.spec = spec
        self.conv = _conv(3, spec.out, 3, spec.stride)
        self.bn = nn.BatchNorm2d(spec.out)
        _maybe_act_module(self, "act", spec.act)
        if spec.pool:
            self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _act(self, "act", self.spec.act, self.bn(self.conv(x)))
        return self.pool(x) if self.spec.pool else x


class _ConvBnAct(nn.Module):
    def __init__(self, cin: int, unit: Unit) -> None:
        super().__init__()
        self.spec = unit
        self.conv = _conv(cin, unit.out, unit.k, unit.stride)
        self.bn = nn.BatchNorm2d(unit.out)
        _maybe_act_module(self, "act", unit.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _act(self, "act", self.spec.act, self.bn(self.conv(x)))


class _SEModule(nn.Module):
    def __init__(self, channels: int, spec: SE) -> None:
        super().__init__()
        self.spec = spec
        self.channels = channels
        hidden = max(2, channels // 2)
        if spec.flat:
            self.fc1, self.fc2 = nn.Linear(channels, hidden), nn.Linear(hidden, channels)
        else:
            self.fc1 = nn.Conv2d(channels, hidden, 1)
            self.fc2 = nn.Conv2d(hidden, channels, 1)
        if spec.reduce == "pool_module":
            self.pool = nn.AdaptiveAvgPool2d(1)
        _maybe_act_module(self, "act", spec.act)
        _maybe_act_module(self, "gate", spec.gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduce = self.spec.reduce
        if reduce == "mean":
            s = x.mean((2, 3), keepdim=True)
        elif reduce == "adaptive_avg_pool":
            s = F.adaptive_avg_pool2d(x, 1)
        elif reduce == "pool_module":
            s = self.pool(x)
        else:
            s = x.mean((2, 3))
        s = self.fc2(_act(self, "act", self.spec.act, self.fc1(s)))
        gate = _act(self, "gate", self.spec.gate, s)
        if reduce == "flat_view":
            gate = gate.view(-1, self.channels, 1, 1)
        elif reduce == "flat_index":
            gate = gate[:, :, None, None]
        return _mul(x, gate, self.spec.mul)


class _SqueezeExciteBlock(nn.Module):
    def __init__(self, channels: int, spec: SqueezeExcite) -> None:
        super().__init__()
        self.se = _SEModule(channels, spec.se)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(x)


class _ResidualModule(nn.Module):
    def __init__(self, cin: int, spec: Residual) -> None:
        super().__init__()
        self.spec = spec
        out = spec.out
        if spec.pre_act:
            if spec.hidden:
                self.leaf1 = HiddenActLeaf(cin, spec.act1)
            else:
                self.bn1 = nn.BatchNorm2d(cin)
                _maybe_act_module(self, "act1", spec.act1)
            self.conv1 = _conv(cin, out, 3, spec.stride)
            self.bn2 = nn.BatchNorm2d(out)
            _maybe_act_module(self, "act2", spec.act2)
            self.conv2 = _conv(out, out, 3)
            if spec.shortcut == "projection":
                self.shortcut = _conv(cin, out, 1, spec.stride)
        else:
            self.conv1 = _conv(cin, out, 3, spec.stride)
            if spec.hidden:
                self.leaf1 = HiddenActLeaf(out, spec.act1)
            else:
                self.bn1 = nn.BatchNorm2d(out)
                _maybe_act_module(self, "act1", spec.act1)
            self.conv2 = _conv(out, out, 3)
            self.bn2 = nn.BatchNorm2d(out)
            if spec.shortcut == "projection":
                self.shortcut = nn.Sequential(_conv(cin, out, 1, spec.stride), nn.BatchNorm2d(out))
            _maybe_act_module(self, "act2", spec.act2)
        if spec.se is not None:
            self.se = _SEModule(out, spec.se)

    def _act1(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.hidden:
            return self.leaf1(x)
        return _act(self, "act1", self.spec.act1, self.bn1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.pre_act:
            out = self._act1(x)
            shortcut = self.shortcut(out) if spec.shortcut == "projection" else x
            out = self.conv1(out)
            out = _act(self, "act2", spec.act2, self.bn2(out))
            out = self.conv2(out)
        else:
            out = self._act1(self.conv1(x))
            out = self.bn2(self.conv2(out))
            shortcut = self.shortcut(x) if spec.shortcut == "projection" else x
        if spec.se is not None:
            out = self.se(out)
        out = _add(out, shortcut, spec.add)
        if not spec.pre_act and spec.act2 is not None:
            out = _act(self, "act2", spec.act2, out)
        return out


class _DenseModule(nn.Module):
    def __init__(self, cin: int, spec: Dense) -> None:
        super().__init__()
        self.branches = nn.ModuleList(_ConvBnAct(cin, Unit(spec.growth, 3, 1, a)) for a in spec.branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x] + [branch(x) for branch in self.branches], 1)


class _HiddenModule(nn.Module):
    def __init__(self, cin: int, spec: Hidden) -> None:
        super().__init__()
        self.conv = _conv(cin, spec.out, 3, spec.stride)
        self.leaf = HiddenActLeaf(spec.out, spec.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.leaf(self.conv(x))


class _ConvNeXtModule(nn.Module):
    def __init__(self, channels: int, spec: ConvNeXt) -> None:
        super().__init__()
        self.spec = spec
        self.dwconv = _conv(channels, channels, 3, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.fc1 = nn.Linear(channels, channels * spec.expansion)
        _maybe_act_module(self, "act", spec.act)
        self.fc2 = nn.Linear(channels * spec.expansion, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dwconv(x).permute(0, 2, 3, 1)
        out = self.fc2(_act(self, "act", self.spec.act, self.fc1(self.norm(out))))
        out = out.permute(0, 3, 1, 2)
        return _add(out, x, self.spec.add)


class _ToTokensModule(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class _TokenMLPModule(nn.Module):
    def __init__(self, channels: int, spec: TokenMLP) -> None:
        super().__init__()
        self.spec = spec
        self.norm = nn.LayerNorm(channels)
        self.fc1 = nn.Linear(channels, channels * spec.expansion)
        _maybe_act_module(self, "act", spec.act)
        self.fc2 = nn.Linear(channels * spec.expansion, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(_act(self, "act", self.spec.act, self.fc1(self.norm(x))))
        return _add(out, x, self.spec.add)


class _HeadModule(nn.Module):
    def __init__(self, channels: int, spec: Head, tokens: bool) -> None:
        super().__init__()
        self.spec = spec
        self.tokens = tokens
        if spec.norm_act is not None:
            self.norm = nn.LayerNorm(channels) if tokens else nn.BatchNorm2d(channels)
            _maybe_act_module(self, "act", spec.norm_act)
        if spec.pool == "pool_module" and not tokens:
            self.pool = nn.AdaptiveAvgPool2d(1)
        if spec.mlp is not None:
            self.fc1 = nn.Linear(channels, 2 * channels)
            _maybe_act_module(self, "mlp_act", spec.mlp)
            self.fc2 = nn.Linear(2 * channels, spec.classes)
        else:
            self.fc = nn.Linear(channels, spec.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.norm_act is not None:
            x = _act(self, "act", spec.norm_act, self.norm(x))
        if self.tokens:
            x = x.mean(1)
        elif spec.pool == "mean":
            x = x.mean((2, 3))
        elif spec.pool == "adaptive_avg_pool":
            x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        else:
            x = self.pool(x).flatten(1)
        if spec.mlp is not None:
            return self.fc2(_act(self, "mlp_act", spec.mlp, self.fc1(x)))
        return self.fc(x)


class GeneratedNet(nn.Module):
    """The network an :class:`Architecture` builds. ``untraceable`` adds a data-dependent branch."""

    def __init__(self, arch: Architecture, *, untraceable: bool = False) -> None:
        super().__init__()
        self.arch = arch
        self.untraceable = untraceable
        stem = arch.stem
        if stem.inline:
            self.conv1 = _conv(3, stem.out, 3, stem.stride)
            self.bn1 = nn.BatchNorm2d(stem.out)
            _maybe_act_module(self, "act1", stem.act)
            if stem.pool:
                self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.stem = _StemModule(stem)
        blocks = []
        state = arch.stem_state()
        for spec in arch.blocks:
            blocks.append(_build_block(spec, state))
            state = _next_state(spec, state)
        self.blocks = nn.Sequential(*blocks)
        self.head = _HeadModule(state.channels, arch.head, tokens=state.layout == "tokens")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.untraceable and bool(x.isnan().any()):  # data-dependent: torch.fx cannot trace this
            raise ValueError("NaN in the input")
        if self.arch.stem.inline:
            x = _act(self, "act1", self.arch.stem.act, self.bn1(self.conv1(x)))
            if self.arch.stem.pool:
                x = self.maxpool(x)
        else:
            x = self.stem(x)
        x = self.blocks(x)
        return self.head(x)


class UntraceableWrapper(nn.Module):
    """Wraps a network behind a data-dependent branch (like RobustBench's ``x.is_cuda`` check)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.isnan().any()):  # data-dependent: torch.fx cannot trace this
            raise ValueError("NaN in the input")
        return self.net(x)


def _build_block(spec: Block, state: _State) -> nn.Module:
    c = state.channels
    if isinstance(spec, Chain):
        units, cin = [], c
        for u in spec.units:
            units.append(_ConvBnAct(cin, u))
            cin = u.out
        return nn.Sequential(*units)
    if isinstance(spec, SqueezeExcite):
        return _SqueezeExciteBlock(c, spec)
    if isinstance(spec, Residual):
        if spec.shortcut == "identity" and (spec.stride != 1 or spec.out != c):
            raise ValueError(f"{spec!r}: an identity shortcut needs stride 1 and out == {c} (the input channels)")
        return _ResidualModule(c, spec)
    if isinstance(spec, Dense):
        return _DenseModule(c, spec)
    if isinstance(spec, Hidden):
        return _HiddenModule(c, spec)
    if isinstance(spec, ConvNeXt):
        return _ConvNeXtModule(c, spec)
    if isinstance(spec, ToTokens):
        return _ToTokensModule()
    if isinstance(spec, TokenMLP):
        return _TokenMLPModule(c, spec)
    raise TypeError(f"unknown block {spec!r}")


def _next_state(spec: Block, state: _State) -> _State:
    s = dataclasses.replace(state)
    if isinstance(spec, Chain):
        for u in spec.units:
            s = _State(u.out, _down(s.height, u.stride), _down(s.width, u.stride))
    elif isinstance(spec, (Residual, Hidden)):
        s = _State(spec.out, _down(s.height, spec.stride), _down(s.width, spec.stride))
    elif isinstance(spec, Dense):
        s.channels += spec.growth * len(spec.branches)
    elif isinstance(spec, ToTokens):
        s.layout = "tokens"
    return s


def _randomize_norms(model: nn.Module, seed: int) -> None:
    """Give BN running statistics and norm affine parameters non-trivial values (deterministically)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))


# ------------------------------------------------------------------------------------------ architecture


@dataclass(frozen=True)
class Architecture:
    """A generated image classifier. See the module docstring.

    Args:
        input_shape: ``(batch, 3, H, W)``.
        stem, blocks, head: the specs.
        root: ``traceable``; ``wrapper`` (an untraceable root around the traceable network, prefix
            ``net.``); ``split`` (the network's own forward is untraceable: its children are traced one
            by one).
    """

    input_shape: tuple[int, int, int, int] = (2, 3, 8, 8)
    stem: Stem = Stem()
    blocks: tuple[Block, ...] = ()
    head: Head = Head()
    root: str = "traceable"
    _truth: list[Truth] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_truth", [])  # cache of the ground truth, filled on first use

    # -- building ----------------------------------------------------------------------------------

    def stem_state(self) -> _State:
        """What the stem hands to the first block."""
        _, _, h, w = self.input_shape
        h, w = _down(h, self.stem.stride), _down(w, self.stem.stride)
        if self.stem.pool:
            h, w = _down(h, 2), _down(w, 2)
        return _State(self.stem.out, h, w)

    def build(self, seed: int = 0) -> nn.Module:
        """The model in eval mode, with weights fixed by ``seed``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = GeneratedNet(self, untraceable=self.root == "split")
        _randomize_norms(net, seed)
        model = UntraceableWrapper(net) if self.root == "wrapper" else net
        return model.eval()

    def example_input(self, seed: int = 0, batch: int | None = None) -> torch.Tensor:
        shape = (batch or self.input_shape[0], *self.input_shape[1:])
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    @property
    def prefix(self) -> str:
        return "net" if self.root == "wrapper" else ""

    @property
    def has_residual(self) -> bool:
        return any(b.residual for b in self.blocks)

    # -- readable source -----------------------------------------------------------------------------

    def source(self) -> str:
        """Python code that rebuilds this architecture, one comment per block saying what it does."""
        lines = [
            "from graphsparse.testing.architectures import *",
            "",
            "arch = Architecture(",
            f"    input_shape={self.input_shape!r},",
            f"    root={self.root!r},  # "
            + {
                "traceable": "the whole model traces",
                "wrapper": "UntraceableWrapper(net): the root does not trace, 'net' does",
                "split": "the root's forward does not trace; stem/blocks/head are traced one by one",
            }[self.root],
            f"    {self.stem.comment()}",
            f"    stem={self.stem!r},",
            "    blocks=(",
        ]
        for i, b in enumerate(self.blocks):
            lines.append(f"        {b.comment()}  [blocks.{i}]")
            lines.append(f"        {b!r},")
        lines += [
            "    ),",
            f"    {self.head.comment()}",
            f"    head={self.head!r},",
            ")",
            "model = arch.build()",
            "x = arch.example_input()",
        ]
        return "\n".join(lines)

    # -- ground truth --------------------------------------------------------------------------------

    @property
    def truth(self) -> Truth:
        """The sites graphsparse must find (forward order) and the gates it must not report."""
        if not self._truth:
            self._truth.append(self._compute_truth())
        return self._truth[0]

    def _compute_truth(self) -> Truth:
        em = _Emitter()
        p = self.prefix
        state = self.stem_state()
        # stem
        em.block = -1
        stem = self.stem
        owner = p if stem.inline else _join(p, "stem")
        attr = "act1" if stem.inline else "act"
        spatial = _down(self.input_shape[2], stem.stride) * _down(self.input_shape[3], stem.stride)
        if stem.inline and self.root == "split":
            # the root's own forward runs eagerly: its activation module is reached through the module tree
            em.site(id_base=_join(p, attr), op=stem.act.kind, role=_POSITION, layout="nchw", channels=stem.out,
                    spatial=spatial, module=_join(p, attr), reached="module_tree", is_output=not stem.pool)
        else:
            em.act(stem.act, owner, attr, role=_POSITION, layout="nchw", channels=stem.out, spatial=spatial,
                   is_output=not stem.pool)
        blocks_path = _join(p, "blocks")
        for i, spec in enumerate(self.blocks):
            em.block = i
            nxt = self.blocks[i + 1] if i + 1 < len(self.blocks) else None
            _emit_block(em, spec, _join(blocks_path, str(i)), state, nxt)
            state = _next_state(spec, state)
        em.block = len(self.blocks)
        _emit_head(em, self.head, _join(p, "head"), state)
        return _finish(em, self.blocks)


def _starts_with_dense(spec: Block | None) -> bool:
    """The block's first op is a 1×1 conv that is the only user of the block's input."""
    return isinstance(spec, Chain) and spec.units[0].k == 1


def _emit_se(em: _Emitter, se: SE, path: str, channels: int) -> None:
    hidden = max(2, channels // 2)
    layout = "nc" if se.flat else "nchw"
    em.act(se.act, path, "act", role="in_se", layout=layout, channels=hidden, spatial=None if se.flat else 1)
    em.gates.append((se.gate.site_module(path, "gate"), se.gate.kind))


def _emit_block(em: _Emitter, spec: Block, path: str, state: _State, nxt: Block | None) -> None:
    out_state = _next_state(spec, state)
    if isinstance(spec, Chain):
        h, w = state.height, state.width
        for j, u in enumerate(spec.units):
            h, w = _down(h, u.stride), _down(w, u.stride)
            last = j == len(spec.units) - 1
            following_dense = _starts_with_dense(nxt) if last else spec.units[j + 1].k == 1
            role = "mlp" if u.k == 1 and following_dense else _POSITION
            em.act(u.act, _join(path, str(j)), "act", role=role, layout="nchw", channels=u.out, spatial=h * w,
                   is_output=last)
    elif isinstance(spec, SqueezeExcite):
        _emit_se(em, spec.se, _join(path, "se"), state.channels)
    elif isinstance(spec, Residual):
        spatial_out = out_state.spatial
        if spec.pre_act:
            a1_channels, a1_spatial = state.channels, state.spatial
        else:
            a1_channels, a1_spatial = spec.out, spatial_out
        if spec.hidden:
            leaf = _join(path, "leaf1")
            em.site(id_base=_join(leaf, "act"), op=spec.act1.kind, role="main_path", layout="nchw",
                    channels=a1_channels, spatial=a1_spatial, module=_join(leaf, "act"), reached="module_tree")
        else:
            em.act(spec.act1, path, "act1", role="main_path", layout="nchw", channels=a1_channels,
                   spatial=a1_spatial)
        if spec.pre_act and spec.act2 is not None:
            em.act(spec.act2, path, "act2", role="main_path", layout="nchw", channels=spec.out,
                   spatial=spatial_out)
        if spec.se is not None:
            _emit_se(em, spec.se, _join(path, "se"), spec.out)
        if not spec.pre_act and spec.act2 is not None:
            em.act(spec.act2, path, "act2", role="after_addition", layout="nchw", channels=spec.out,
                   spatial=spatial_out)
        else:
            em.site(id_base=_join(path, "add"), op="add", role="after_addition", layout="nchw",
                    channels=spec.out, spatial=spatial_out, module=path)
    elif isinstance(spec, Dense):
        for j, act in enumerate(spec.branches):
            em.act(act, _join(path, f"branches.{j}"), "act", role=_POSITION, layout="nchw", channels=spec.growth,
                   spatial=state.spatial)
    elif isinstance(spec, Hidden):
        leaf = _join(path, "leaf")
        em.site(id_base=_join(leaf, "act"), op=spec.act.kind, role=_POSITION, layout="nchw", channels=spec.out,
                spatial=out_state.spatial, module=_join(leaf, "act"), reached="module_tree", is_output=True)
    elif isinstance(spec, ConvNeXt):
        em.act(spec.act, path, "act", role="mlp", layout="nhwc", channels=state.channels * spec.expansion,
               spatial=state.spatial)
        em.site(id_base=_join(path, "add"), op="add", role="after_addition", layout="nchw",
                channels=state.channels, spatial=state.spatial, module=path)
    elif isinstance(spec, TokenMLP):
        em.act(spec.act, path, "act", role="mlp", layout="tokens", channels=state.channels * spec.expansion,
               spatial=state.spatial)
        em.site(id_base=_join(path, "add"), op="add", role="after_addition", layout="tokens",
                channels=state.channels, spatial=state.spatial, module=path)


def _emit_head(em: _Emitter, head: Head, path: str, state: _State) -> None:
    tokens = state.layout == "tokens"
    if head.norm_act is not None:
        em.act(head.norm_act, path, "act", role=_POSITION, layout="tokens" if tokens else "nchw",
               channels=state.channels, spatial=state.spatial)
    if head.mlp is not None:
        em.act(head.mlp, path, "mlp_act", role="mlp", layout="nc", channels=2 * state.channels, spatial=None)


def _finish(em: _Emitter, blocks: Sequence[Block]) -> Truth:
    residual = [i for i, b in enumerate(blocks) if b.residual]
    pending = em.sites
    for s in pending:
        if s.role != _POSITION:
            continue
        if not residual:
            s.role = "main_path"
        elif s.block < residual[0]:
            first = blocks[residual[0]]
            # the output node of the block right before the first residual block is that block's fork
            # when the fork is the block input: not a *strict* ancestor of every fork, so not the stem
            is_fork = s.is_output and s.block == residual[0] - 1 and first.fork_is_input
            s.role = "main_path" if is_fork else "stem"
        elif s.block > residual[-1]:
            s.role = "head"
        else:
            s.role = "main_path"
    # ids: repeats of an id get _1, _2, ... in forward order
    seen: dict[str, int] = {}
    ids = []
    for s in pending:
        n = seen.get(s.id_base, 0)
        seen[s.id_base] = n + 1
        ids.append(s.id_base if n == 0 else f"{s.id_base}_{n}")
    # stages: a new stage whenever the spatial size / token count drops (SE internals do not count)
    stages, stage, last = [], 0, None
    for s in pending:
        if s.role != "in_se" and s.spatial is not None:
            if last is not None and s.spatial < last:
                stage += 1
            last = s.spatial
        stages.append(stage)
    firsts: dict[int, int] = {}
    lasts: dict[int, int] = {}
    for i, (s, st_) in enumerate(zip(pending, stages)):
        if s.role in ("main_path", "after_addition", "mlp"):
            firsts.setdefault(st_, i)
            lasts[st_] = i
    sites = tuple(
        ExpectedSite(
            id=sid, op=s.op, role=s.role, layout=s.layout, channel_axis=s.axis, channels=s.channels,
            reached=s.reached, module=s.module, stage=st_, first_in_stage=firsts.get(st_) == i,
            last_in_stage=lasts.get(st_) == i,
        )
        for i, (s, sid, st_) in enumerate(zip(pending, ids, stages))
    )
    gates = tuple(ExpectedGate(module, kind) for module, kind in em.gates)
    return Truth(sites, gates)


# ------------------------------------------------------------------------------------------ strategies


def _acts(kinds: Sequence[str], *, module_only: bool = False) -> st.SearchStrategy[Act]:
    def spellings(kind: str) -> st.SearchStrategy[Act]:
        names = [s for s in ACTIVATION_SPELLINGS[kind] if not module_only or _is_module_spelling(s)]
        return st.sampled_from(names).map(lambda s: Act(kind, s))

    return st.sampled_from(list(kinds)).flatmap(spellings)


def plain_acts(*, module_only: bool = False) -> st.SearchStrategy[Act]:
    """Activations that may feed anything (no gate kinds)."""
    return _acts(PLAIN_KINDS, module_only=module_only)


def mlp_acts() -> st.SearchStrategy[Act]:
    """Activations that feed a dense layer (gate kinds included: they are not gates there)."""
    return _acts(MLP_KINDS)


_CHANNELS = st.integers(4, 8)


@st.composite
def _se(draw) -> SE:
    return SE(
        act=draw(mlp_acts()),
        gate=draw(_acts(SE_GATES)),
        reduce=draw(st.sampled_from(["mean", "adaptive_avg_pool", "pool_module", "flat_view", "flat_index"])),
        mul=draw(st.sampled_from(list(MUL_SPELLINGS))),
    )


def _stride(draw, state: _State) -> int:
    return draw(st.sampled_from([1, 2])) if state.can_downsample() else 1


@st.composite
def _block(draw, state: _State, leaves: bool) -> Block:
    if state.layout == "tokens":
        return TokenMLP(act=draw(mlp_acts()), expansion=draw(st.sampled_from([2, 1])),
                        add=draw(st.sampled_from(list(ADD_SPELLINGS))))
    kinds = ["chain", "residual", "se", "dense", "convnext", "tokens"]
    if leaves:
        kinds.insert(4, "hidden")
    if state.channels > 12:
        kinds.remove("dense")
    kind = draw(st.sampled_from(kinds))
    if kind == "chain":
        units, s = [], state
        for _ in range(draw(st.integers(1, 3))):
            u = Unit(out=draw(_CHANNELS), k=draw(st.sampled_from([3, 1])), stride=_stride(draw, s),
                     act=draw(plain_acts()))
            units.append(u)
            s = _State(u.out, _down(s.height, u.stride), _down(s.width, u.stride))
        return Chain(tuple(units))
    if kind == "residual":
        pre_act = draw(st.booleans())
        shortcut = draw(st.sampled_from(["identity", "projection"]))
        if shortcut == "identity":
            out, stride = state.channels, 1
        else:
            out, stride = draw(_CHANNELS), _stride(draw, state)
        hidden = leaves and draw(st.booleans())
        act1 = draw(plain_acts(module_only=hidden))
        if pre_act:
            act2: Act | None = draw(plain_acts())
        else:
            act2 = draw(st.none() | plain_acts())
        se = draw(st.none() | _se())
        return Residual(pre_act=pre_act, out=out, stride=stride, shortcut=shortcut, act1=act1, act2=act2, se=se,
                        add=draw(st.sampled_from(list(ADD_SPELLINGS))), hidden=hidden)
    if kind == "se":
        return SqueezeExcite(draw(_se()))
    if kind == "dense":
        branches = tuple(draw(st.lists(plain_acts(), min_size=1, max_size=2)))
        return Dense(branches=branches, growth=draw(st.integers(2, 4)))
    if kind == "hidden":
        return Hidden(out=draw(_CHANNELS), stride=_stride(draw, state), act=draw(plain_acts(module_only=True)))
    if kind == "convnext":
        return ConvNeXt(act=draw(mlp_acts()), expansion=draw(st.sampled_from([2, 1])),
                        add=draw(st.sampled_from(list(ADD_SPELLINGS))))
    return ToTokens()


@st.composite
def random_architectures(
    draw,
    *,
    max_blocks: int = 5,
    roots: Sequence[str] = ("traceable", "wrapper", "split"),
    leaves: bool = True,
) -> Architecture:
    """Hypothesis strategy of :class:`Architecture`\\ s (valid by construction; shrinks to small ones).

    Args:
        max_blocks: most blocks between stem and head.
        roots: root kinds to draw from (``traceable``, ``wrapper``, ``split``); the first is preferred.
        leaves: allow :class:`HiddenActLeaf` (activations reached through the module tree).
    """
    n_blocks = draw(st.integers(0, max_blocks))
    root = draw(st.sampled_from(list(roots)))
    height, width = draw(st.integers(8, 16)), draw(st.integers(8, 16))
    inline = draw(st.booleans())
    stem = Stem(
        out=draw(_CHANNELS),
        act=draw(plain_acts(module_only=inline and root == "split")),
        stride=draw(st.sampled_from([1, 2])),
        pool=draw(st.booleans()),
        inline=inline,
    )
    arch = Architecture(input_shape=(2, 3, height, width), stem=stem, root=root)
    state = arch.stem_state()
    blocks: list[Block] = []
    for _ in range(n_blocks):
        block = draw(_block(state, leaves))
        blocks.append(block)
        state = _next_state(block, state)
    head = Head(
        norm_act=draw(st.none() | plain_acts()),
        pool=draw(st.sampled_from(["mean", "adaptive_avg_pool", "pool_module"])),
        mlp=draw(st.none() | mlp_acts()),
    )
    return dataclasses.replace(arch, blocks=tuple(blocks), head=head)


def huggingface_classifiers() -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    """Small random-init Hugging Face ``*ForImageClassification`` models, one per vision family.

    Returns ``{family: (build, input_shape)}``; ``build()`` makes the model (call ``torch.manual_seed``
    first for fixed weights). Configs are a few layers of a few channels, so capture takes about a second.
    Needs ``transformers`` (the ``transformers`` extra).
    """
    import transformers as T

    n = 4  # classes
    vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
               patch_size=8, num_labels=n)
    resnet_like = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=n)
    specs: dict[str, tuple[Any, Any, int]] = {
        "vit": (T.ViTForImageClassification, T.ViTConfig(**vit), 32),
        "deit": (T.DeiTForImageClassification, T.DeiTConfig(**vit), 32),
        "beit": (T.BeitForImageClassification, T.BeitConfig(**vit, use_relative_position_bias=True), 32),
        "swin": (T.SwinForImageClassification, T.SwinConfig(
            image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=n
        ), 32),
        "swinv2": (T.Swinv2ForImageClassification, T.Swinv2Config(
            image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=n
        ), 32),
        "convnext": (T.ConvNextForImageClassification, T.ConvNextConfig(
            num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=n
        ), 32),
        "convnextv2": (T.ConvNextV2ForImageClassification, T.ConvNextV2Config(
            num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=n
        ), 32),
        "resnet": (T.ResNetForImageClassification, T.ResNetConfig(**resnet_like, layer_type="basic"), 32),
        "regnet": (T.RegNetForImageClassification, T.RegNetConfig(**resnet_like, groups_width=8), 32),
        "mobilenet_v2": (T.MobileNetV2ForImageClassification, T.MobileNetV2Config(
            depth_multiplier=0.25, image_size=32, num_labels=n
        ), 32),
        "mobilevit": (T.MobileViTForImageClassification, T.MobileViTConfig(
            image_size=32, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_labels=n
        ), 32),
        "efficientnet": (T.EfficientNetForImageClassification, T.EfficientNetConfig(
            image_size=32, width_coefficient=0.25, depth_coefficient=0.2, hidden_dim=320, num_labels=n
        ), 32),
        "levit": (T.LevitForImageClassification, T.LevitConfig(
            image_size=64, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
            key_dim=[8, 8, 8], num_labels=n
        ), 64),
        "poolformer": (T.PoolFormerForImageClassification, T.PoolFormerConfig(
            hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_labels=n
        ), 32),
        "segformer": (T.SegformerForImageClassification, T.SegformerConfig(
            hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1],
            decoder_hidden_size=32, num_labels=n
        ), 32),
        "dinov2": (T.Dinov2ForImageClassification, T.Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, num_labels=n
        ), 32),
        # CvT indexes its per-stage drop-path list by stage, so stage i needs more than i blocks
        "cvt": (T.CvtForImageClassification, T.CvtConfig(
            embed_dim=[16, 24, 32], num_heads=[1, 1, 2], depth=[1, 2, 3], num_labels=n
        ), 32),
        "bit": (T.BitForImageClassification, T.BitConfig(**resnet_like, num_groups=2), 32),
    }
    return {
        family: (functools.partial(_build_eval, cls, config), (1, 3, size, size))
        for family, (cls, config, size) in specs.items()
    }


def _build_eval(cls: Any, config: Any) -> nn.Module:
    return cls(config).eval()
