"""The ``graphsparse`` command: a thin click group; one module per command."""

from __future__ import annotations

import os

import click

from ..errors import GraphsparseError

__all__ = ["main"]


class _Group(click.Group):
    """Turns library errors into one line on stderr (exit 1); tracebacks only with GRAPHSPARSE_DEBUG=1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GraphsparseError as exc:
            if os.environ.get("GRAPHSPARSE_DEBUG"):
                raise
            raise click.ClickException(str(exc)) from exc
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            if os.environ.get("GRAPHSPARSE_DEBUG"):
                raise
            raise click.ClickException(
                f"unexpected {type(exc).__name__}: {exc} (set GRAPHSPARSE_DEBUG=1 to see the traceback)"
            ) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="graphsparse")
def main() -> None:
    """Post-training activation surgery (MeanSparse, SPARTA) for robust image classifiers."""


def _register() -> None:
    from . import inspect_cmd

    main.add_command(inspect_cmd.inspect_command)
    for name in ("rewrite_cmd", "calibrate_cmd", "tune_cmd", "eval_cmd", "demo_cmd", "plot_cmd", "train_cmd"):
        try:
            module = __import__(f"{__name__}.{name}", fromlist=["command"])
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            continue
        main.add_command(module.command)


_register()
