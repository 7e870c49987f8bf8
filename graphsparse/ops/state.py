"""Context managers and helpers over a model's state that every stage uses: its device, eval mode, and the α of
its MeanSparse operators kept across a block."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch import nn

from graphsparse.ops.meansparse import MeanSparse, operators

__all__ = ["alphas_kept", "eval_mode", "model_device"]


def model_device(model: nn.Module) -> torch.device:
    """The device of the first parameter or buffer of ``model`` (CPU for a model without tensors)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode; every module's previous mode is restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def alphas_kept(model: nn.Module) -> Iterator[OrderedDict[str, MeanSparse]]:
    """Yield the MeanSparse operators of ``model``; their α are restored on exit (also on error)."""
    ops = operators(model, types=(MeanSparse,))
    saved = {site: op.alpha.detach().clone() for site, op in ops.items()}
    try:
        yield ops
    finally:
        with torch.no_grad():
            for site, op in ops.items():
                op.alpha.copy_(saved[site])
