"""Small architectures that ship with graphsparse: the demo model.

``DemoPreActResNet`` is a pre-activation ResNet for 28×28 grey images (MNIST): 3 stages of 2 blocks,
GELU activations, ~175k parameters. Its adversarially trained weights ship as
``graphsparse/assets/demo_preact_mnist.safetensors`` (made by ``tools/train_demo_model.py``).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import torch
import torch.nn as nn

__all__ = ["DemoPreActResNet", "DEMO_WEIGHTS", "load_demo_model", "demo_model_info"]

DEMO_WEIGHTS = "demo_preact_mnist.safetensors"


class PreActBlock(nn.Module):
    """BN → act → conv → BN → act → conv, plus the shortcut (1×1 conv of the activated input when the shape
    changes, as in He et al. 2016)."""

    def __init__(self, cin: int, cout: int, stride: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.act1 = act()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = act()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if (stride != 1 or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.act2(self.bn2(out)))
        return out + shortcut


class DemoPreActResNet(nn.Module):
    """Pre-activation ResNet for small grey images.

    Args:
        num_classes: output classes.
        in_chans: input channels.
        widths: channels of the three stages.
        blocks: residual blocks per stage.
        act: ``gelu`` (the shipped demo model) or ``relu`` (for SPARTA experiments).
    """

    default_input_size = (1, 28, 28)  # (C, H, W) of MNIST, what the demo model was trained on
    # the spec of the shipped trained model: naming this class as a model source builds random weights, and
    # graphsparse.sources warns with this name
    trained_builder = "graphsparse.demo.models:load_demo_model"

    def __init__(self, num_classes: int = 10, in_chans: int = 1, widths: tuple[int, ...] = (16, 32, 64),
                 blocks: int = 2, act: str = "gelu") -> None:
        super().__init__()
        act_layer = {"gelu": nn.GELU, "relu": nn.ReLU}[act]
        self.stem = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(PreActBlock(cin, w, 2 if (b == 0 and i > 0) else 1, act_layer))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.act = act_layer()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.layers(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def demo_model_info() -> dict[str, Any]:
    """The training record stored with the shipped demo weights (command, settings, figures)."""
    from safetensors import safe_open

    path = resources.files("graphsparse.demo.assets").joinpath(DEMO_WEIGHTS)
    with resources.as_file(path) as p, safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("training", "{}"))


def load_demo_model() -> DemoPreActResNet:
    """The shipped adversarially trained demo model, in eval mode."""
    from safetensors.torch import load_file

    from graphsparse.errors import ModelSourceError

    path = resources.files("graphsparse.demo.assets").joinpath(DEMO_WEIGHTS)
    if not path.is_file():
        raise ModelSourceError(
            f"the demo weights ({DEMO_WEIGHTS}) are not in this installation. Hint: run "
            "`python tools/train_demo_model.py` from a source checkout."
        )
    model = DemoPreActResNet()
    with resources.as_file(path) as p:
        model.load_state_dict(load_file(str(p)), strict=True)
    return model.eval()
