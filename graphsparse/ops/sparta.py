"""SPARTA: a spatially attentive activation that replaces a ReLU (our reading of the paper).

For an input ``X`` of shape ``(B, C, H, W)``::

    Y = ReLU(X) ⊙ sigmoid(φs(X) ⊙ φc(X))        φs(X): (B, 1, H, W),  φc(X): (B, C, 1, 1), broadcast

- φs, the spatial net: 3×3 conv C→C', ReLU, 3×3 conv C'→C', ReLU, 3×3 conv C'→C', ReLU, 3×3 conv C'→1,
  then a 3×3 conv 1→1 whose 9 weights and bias are predicted for each sample by DPNet and applied as
  one grouped convolution over the batch.
- DPNet: global average pool of ``X`` → Linear C→C' → ReLU → Linear C'→10.
- φc, the channel net: 3×3 conv C→C, then global average pooling.

``C' = max(1, C // reduction)``; ``reduction=1`` is the paper's full width. No reference code was published
with the paper; every choice it leaves open is listed in ``docs/sparta.md``.

Initialisation: the last layer of each sub-net starts with small weights (×0.1 of PyTorch's default) and
a bias chosen so that ``φs ≈ φc ≈ sqrt(init_logit)`` (DPNet's bias predicts the identity kernel), hence
``sigmoid(φs ⊙ φc) ≈ sigmoid(init_logit)`` ≈ 0.95 by default: a fresh SPARTA is close to a plain ReLU,
so replacing the ReLUs of a trained network does not halve its activations, and every parameter still
receives a gradient from the first step.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graphsparse.errors import PlanError, closest

__all__ = [
    "SPARTA_TYPES",
    "Sparta",
    "make_sparta",
    "sparta_parameters",
    "freeze_except_sparta",
]

_LAST_LAYER_SCALE = 0.1
"""Factor applied to PyTorch's default initialisation of the last layer of each sub-net."""


def _dynamic_conv(s: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve each sample of ``s`` (B, 1, H, W) with its own 3×3 kernel + bias (``kernel``: (B, 10)).

    The batch is folded into the channel axis so that one grouped convolution (``groups=B``) applies the
    ``B`` kernels; zero padding keeps the spatial size.
    """
    b, h, w = s.shape[0], s.shape[2], s.shape[3]
    weight = kernel[:, :9].reshape(b, 1, 3, 3).to(s.dtype)
    bias = kernel[:, 9].to(s.dtype)
    out = F.conv2d(s.reshape(1, b, h, w), weight, bias, padding=1, groups=b)
    return out.reshape(b, 1, h, w)


torch.fx.wrap("_dynamic_conv")


def _check_input(x: torch.Tensor, channels: int) -> torch.Tensor:
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(
            f"Sparta({channels}) expects an NCHW input with {channels} channels, got shape {tuple(x.shape)}"
        )
    return x


torch.fx.wrap("_check_input")


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=True)


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class Sparta(nn.Module):
    """Spatially attentive activation: ``ReLU(x) * sigmoid(φs(x) * φc(x))`` for NCHW features.

    Args:
        channels: number of input channels ``C``.
        reduction: width divisor of the spatial net and of DPNet's hidden layer:
            ``C' = max(1, C // reduction)``. ``1`` is the paper's full width.
        site_id: id of the site the module replaced (key of :func:`graphsparse.ops.operators`).
        depth: index of that site along the forward pass.
        init_logit: the value of ``φs ⊙ φc`` at initialisation (up to small input-dependent terms); the
            gate starts near ``sigmoid(init_logit)`` (0.953 for the default 3.0). Must be > 0.

    Submodules:
        spatial: ``conv1``–``conv3`` (C→C'→C'→C', each followed by a ReLU) and ``conv4`` (C'→1).
        dpnet: ``fc1`` (C→C'), ReLU, ``fc2`` (C'→10: a 3×3 kernel and a bias per sample).
        channel: the 3×3 conv C→C of φc (global average pooling follows in ``forward``).

    Any ``H``, ``W`` and batch size (including 1) work; the output has the input's shape and dtype.
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 4,
        site_id: str = "",
        depth: int = 0,
        init_logit: float = 3.0,
    ) -> None:
        super().__init__()
        _check_positive_int("channels", channels)
        _check_positive_int("reduction", reduction)
        init_logit = float(init_logit)
        if not (math.isfinite(init_logit) and init_logit > 0):
            raise ValueError(f"init_logit must be a finite number > 0, got {init_logit!r}")
        self.channels = channels
        self.reduction = reduction
        self.width = max(1, channels // reduction)
        self.site_id = str(site_id)
        self.depth = int(depth)
        self.init_logit = init_logit
        c, w = channels, self.width
        self.spatial = nn.Sequential(
            OrderedDict(
                conv1=_conv3x3(c, w),
                act1=nn.ReLU(),
                conv2=_conv3x3(w, w),
                act2=nn.ReLU(),
                conv3=_conv3x3(w, w),
                act3=nn.ReLU(),
                conv4=_conv3x3(w, 1),
            )
        )
        self.dpnet = nn.Sequential(
            OrderedDict(fc1=nn.Linear(c, w), act=nn.ReLU(), fc2=nn.Linear(w, 10)),
        )
        self.channel = _conv3x3(c, c)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default init everywhere, then the near-ReLU start described in the module docstring."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.reset_parameters()
        root = math.sqrt(self.init_logit)
        identity = torch.zeros(10)
        identity[4] = 1.0  # centre tap of the 3×3 kernel; bias (index 9) 0
        with torch.no_grad():
            for last, bias in (
                (self.spatial.conv4, torch.full((1,), root)),
                (self.dpnet.fc2, identity),
                (self.channel, torch.full((self.channels,), root)),
            ):
                last.weight.mul_(_LAST_LAYER_SCALE)
                last.bias.copy_(bias)

    def kernels(self, x: torch.Tensor) -> torch.Tensor:
        """DPNet's prediction for ``x``: ``(B, 10)``, the 3×3 kernel (row-major) then the bias per sample."""
        return self.dpnet(x.mean(dim=(2, 3)))

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """``sigmoid(φs(x) ⊙ φc(x))``, shape ``(B, C, H, W)``: the factor applied to ``ReLU(x)``."""
        s = _dynamic_conv(self.spatial(x), self.kernels(x))
        c = self.channel(x).mean(dim=(2, 3), keepdim=True)
        return torch.sigmoid(s * c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # torch.jit.script skips the check, whose message it cannot compile
            x = _check_input(x, self.channels)
        return torch.relu(x) * self.gate(x)

    def extra_repr(self) -> str:
        return f"{self.channels}, reduction={self.reduction}, width={self.width}, site_id={self.site_id!r}"


SPARTA_TYPES: tuple[type[nn.Module], ...] = (Sparta,)
"""The SPARTA operator classes (to be collected by :func:`graphsparse.ops.operators`)."""

_PARAMS = ("reduction", "init_logit")


def make_sparta(site: Any, entry: Any) -> Sparta:
    """The :class:`Sparta` that replaces the activation at ``site`` (factory for ``apply_plan``).

    Args:
        site: a :class:`graphsparse.graph.sites.Site` with ``layout == "nchw"``.
        entry: its :class:`graphsparse.planning.plan.PlanEntry`; ``entry.params`` holds the rule's ``sparta:``
            mapping (``reduction``, ``init_logit``).

    Raises:
        PlanError: the site is not NCHW, or a parameter is unknown or invalid (the message names the site).
    """
    if site.layout != "nchw":
        raise PlanError(
            f"site {site.id!r}: SPARTA needs NCHW conv features, the site's layout is {site.layout!r}. "
            "Hint: add 'layout: nchw' to the rule's selector"
        )
    params = dict(entry.params)
    unknown = [k for k in params if k not in _PARAMS]
    if unknown:
        raise PlanError(
            f"site {site.id!r}: unknown SPARTA parameter {unknown[0]!r}{closest(unknown[0], _PARAMS)}. "
            f"Hint: valid parameters are {', '.join(_PARAMS)}"
        )
    try:
        return Sparta(site.channels, site_id=site.id, depth=site.depth, **params)
    except (TypeError, ValueError) as e:
        raise PlanError(f"site {site.id!r}: invalid SPARTA parameters {params!r}: {e}") from e


def sparta_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters of every :class:`Sparta` module in ``model``, each once, in module order."""
    seen: set[int] = set()
    for m in model.modules():
        if isinstance(m, SPARTA_TYPES):
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p


def freeze_except_sparta(model: nn.Module) -> int:
    """Make the SPARTA parameters the only trainable parameters of ``model`` (in place).

    Every other parameter gets ``requires_grad=False``; SPARTA parameters get ``requires_grad=True``.
    BatchNorm running statistics are buffers and are not affected; :func:`graphsparse.robust.train.train` with
    ``params=sparta_parameters(model)`` keeps the BatchNorm layers of frozen modules in eval mode.

    Returns:
        The number of trainable scalars (sum of ``numel`` of the SPARTA parameters); 0 when the model
        has no SPARTA module.
    """
    keep = {id(p) for p in sparta_parameters(model)}
    total = 0
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
        if id(p) in keep:
            total += p.numel()
    return total
