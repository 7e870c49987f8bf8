"""Options shared by several commands, and the model loading they imply."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
import torch

__all__ = ["model_options", "load_cli_model"]


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--arch, --allow-module, --input-shape and --model-dir."""
    fn = click.option(
        "--model-dir",
        default=None,
        type=click.Path(file_okay=False),
        help="Where robustbench: weights are (MODEL_DIR/dataset/threat/ID.pt; default ./models).",
    )(fn)
    fn = click.option(
        "--input-shape",
        default=None,
        metavar="B,C,H,W",
        help="Probe input shape (default: from the model's timm config, else 1,3,224,224).",
    )(fn)
    fn = click.option(
        "--allow-module",
        "allow_modules",
        multiple=True,
        metavar="PKG",
        help="Trust classes from this package when unpickling MODEL (repeatable).",
    )(fn)
    fn = click.option(
        "--arch",
        default=None,
        metavar="SPEC",
        help="Architecture for a state-dict file: timm:NAME or pkg.module:Class.",
    )(fn)
    return fn


def load_cli_model(
    spec: str,
    arch: str | None,
    allow_modules: tuple[str, ...],
    input_shape: str | None,
    model_dir: str | None = None,
):
    """Load MODEL per the shared options; returns (model, recipe, example_input)."""
    from ..sources import default_input_shape, load_model, parse_input_shape

    options = {"model_dir": model_dir} if model_dir is not None else {}
    model, recipe = load_model(spec, arch=arch, allow_modules=allow_modules, **options)
    shape = parse_input_shape(input_shape) if input_shape else default_input_shape(model)
    return model, recipe, torch.randn(*shape, generator=torch.Generator().manual_seed(0))
