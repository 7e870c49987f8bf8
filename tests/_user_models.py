"""A user's own architecture, outside the trusted packages (for tests of allow_modules and class specs)."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """Conv -> ReLU -> pool -> linear, on 1-channel 8x8 inputs by default."""

    def __init__(self, in_chans: int = 1, width: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, width, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


def make_tiny(**kwargs) -> TinyNet:
    """A builder function (not a class): ``pkg.module:function`` specs call it."""
    return TinyNet(**kwargs)


def make_nothing() -> str:
    """A function that does not build a module."""
    return "not a model"


NOT_A_MODEL = 3
