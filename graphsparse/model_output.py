"""A model's output seen as its logits: Hugging Face classifiers return a ``ModelOutput`` (a mapping whose
``logits`` entry is the ``(batch, classes)`` tensor); attacks, tuning and evaluation need the tensor itself."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

__all__ = ["logits_of", "logits_output"]


def logits_of(output: Any) -> Any:
    """``output['logits']`` when ``output`` is a mapping that holds logits, else ``output`` unchanged."""
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    return output


@contextlib.contextmanager
def logits_output(model: nn.Module) -> Iterator[nn.Module]:
    """While inside, calling ``model`` gives its logits tensor (a forward hook replaces a mapping output by
    its ``logits``); the hook is removed on exit, so the model is left as it was."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        logits = logits_of(output)
        return None if logits is output else logits

    handle = model.register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()
