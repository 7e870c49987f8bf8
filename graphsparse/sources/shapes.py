"""Probe input shapes: parsing ``1,3,224,224``, and a model's default shape read from its timm config,
transformers config or first convolution.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from graphsparse.errors import ModelSourceError
from graphsparse.sources.hf import transformers_input_shape

if TYPE_CHECKING:
    from graphsparse.sources.recipes import Recipe

__all__ = ["default_input_shape", "parse_input_shape"]

def parse_input_shape(text: str) -> tuple[int, ...]:
    """Parse ``"1,3,224,224"`` (also ``1x3x224x224``) into a tuple of positive ints."""
    parts = [p.strip() for p in re.split(r"[,x×]", str(text).strip().strip("()[]"))]
    if not parts or any(not p.isdigit() or int(p) <= 0 for p in parts) or len(parts) < 2:
        raise ModelSourceError(
            f"input shape {text!r} is not a list of positive integers with a batch dimension; "
            "write it like 1,3,224,224"
        )
    return tuple(int(p) for p in parts)


def default_input_shape(model: nn.Module, *, recipe: Recipe | None = None) -> tuple[int, ...]:
    """A probe input shape: timm's ``pretrained_cfg['input_size']`` (or a model's own ``default_input_size``,
    C×H×W) with batch 1, 32×32 for RobustBench CIFAR models, else ``(1, C, 224, 224)`` with C read from the
    first convolution (3 if none)."""
    in_chans = input_channels(model)
    cfg = timm_cfg(model)
    size = cfg.get("input_size") if cfg is not None else getattr(model, "default_input_size", None)
    if isinstance(size, (tuple, list)) and len(size) == 3:
        c, h, w = size
        return (1, in_chans or int(c), int(h), int(w))
    hf_shape = transformers_input_shape(model)
    if hf_shape is not None:
        return hf_shape
    if recipe is not None and recipe.kind == "robustbench":
        size = 224 if recipe.kwargs.get("dataset") == "imagenet" else 32
        return (1, in_chans or 3, size, size)
    if type(model).__module__.startswith("robustbench."):
        inner = next((m for m in model.modules() if timm_cfg(m) is not None), None)
        if inner is not None:
            return default_input_shape(inner)
        return (1, in_chans or 3, 32, 32)  # RobustBench's own architectures are the CIFAR ones
    return (1, in_chans or 3, 224, 224)


def timm_cfg(model: nn.Module) -> Mapping[str, Any] | None:
    """A timm model's ``pretrained_cfg`` (or ``default_cfg``), or None."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    return cfg if isinstance(cfg, Mapping) else None


def input_channels(model: nn.Module) -> int | None:
    """The input channel count: timm's ``in_chans``, its first conv's, or the first convolution's; None without one."""
    if isinstance(getattr(model, "in_chans", None), int):  # timm models record it (TResNet's stem sees 16x)
        return model.in_chans
    cfg = timm_cfg(model)
    first = cfg.get("first_conv") if cfg is not None else None
    if isinstance(first, str) and first:
        try:
            channels = getattr(model.get_submodule(first), "in_channels", None)
            if isinstance(channels, int):
                return channels
        except AttributeError:
            pass
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    return conv.in_channels if conv is not None else None
