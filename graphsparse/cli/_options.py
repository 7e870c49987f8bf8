"""Options shared by several commands, and the model loading they imply."""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Callable
from typing import Any

import click
import torch

__all__ = ["model_options", "load_cli_model"]

# The options below reach load_cli_model through the click context, so a command's signature names only
# the four it always had (arch, allow_modules, input_shape, model_dir).
_CONTEXT_KEY = "graphsparse.model_options"
_CONTEXT_OPTIONS = ("strip_prefix", "checkpoint_key", "num_classes", "model_kwargs")


def _json_object(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except ValueError as e:
        raise click.BadParameter(
            f"{value!r} is not JSON ({e}); write an object such as '{{\"drop_rate\": 0.1}}'", ctx, param
        ) from e
    if not isinstance(parsed, dict):
        raise click.BadParameter(
            f"must be a JSON object of keyword arguments such as '{{\"drop_rate\": 0.1}}', got {value!r}", ctx, param
        )
    return parsed


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--arch, --allow-module, --input-shape, --model-dir, and the options load_cli_model reads from the context
    (--num-classes, --model-kwargs, --strip-prefix, --checkpoint-key)."""

    body = fn

    @functools.wraps(body)
    def command(*args: Any, **kwargs: Any) -> Any:
        click.get_current_context().meta[_CONTEXT_KEY] = {k: kwargs.pop(k) for k in _CONTEXT_OPTIONS}
        return body(*args, **kwargs)

    fn = command
    fn = click.option(
        "--checkpoint-key",
        default=None,
        metavar="KEY",
        help="The entry of a checkpoint dict that holds the weights (default: state_dict, model, ... before "
        "ema/model_ema).",
    )(fn)
    fn = click.option(
        "--strip-prefix",
        default=None,
        metavar="PREFIX",
        help="Keep only the state-dict keys under PREFIX (e.g. model.), without it. A prefix every key shares "
        "(module., _orig_mod., model.) is removed by itself when that makes the keys fit.",
    )(fn)
    fn = click.option(
        "--model-kwargs",
        default=None,
        metavar="JSON",
        callback=_json_object,
        help="Constructor keyword arguments of MODEL (or of --arch) as a JSON object, e.g. '{\"drop_rate\": 0.1}'.",
    )(fn)
    fn = click.option(
        "--num-classes",
        type=click.IntRange(min=1),
        default=None,
        help="Classes of the classifier head (the constructor's num_classes).",
    )(fn)
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
        help="Probe input shape (default: from the model's timm or Hugging Face config, else 1,3,224,224).",
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
        help="Architecture for a state-dict file: timm:NAME, torchvision:NAME, pkg.module:Class or "
        "pkg.module:function.",
    )(fn)
    return fn


def load_cli_model(
    spec: str,
    arch: str | None,
    allow_modules: tuple[str, ...],
    input_shape: str | None,
    model_dir: str | None = None,
):
    """Load MODEL per the shared options; returns (model, recipe, example_input).

    Warnings from loading (e.g. a class named bare, with random weights) are printed as ``warning:`` lines on
    stderr.
    """
    from graphsparse.errors import ModelSourceError
    from graphsparse.sources.load import load_model
    from graphsparse.sources.shapes import default_input_shape, parse_input_shape

    ctx = click.get_current_context(silent=True)
    extra = (ctx.meta.get(_CONTEXT_KEY) if ctx is not None else None) or {}
    options: dict[str, Any] = dict(extra.get("model_kwargs") or {})
    num_classes = extra.get("num_classes")
    if num_classes is not None:
        if options.get("num_classes", num_classes) != num_classes:
            raise ModelSourceError(
                f"--num-classes {num_classes} and --model-kwargs num_classes={options['num_classes']!r} disagree; "
                "give one of them"
            )
        options["num_classes"] = num_classes
    if model_dir is not None:
        options["model_dir"] = model_dir
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        model, recipe = load_model(
            spec,
            arch=arch,
            allow_modules=allow_modules,
            strip_prefix=extra.get("strip_prefix"),
            checkpoint_key=extra.get("checkpoint_key"),
            **options,
        )
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    shape = parse_input_shape(input_shape) if input_shape else default_input_shape(model)
    return model, recipe, torch.randn(*shape, generator=torch.Generator().manual_seed(0))
