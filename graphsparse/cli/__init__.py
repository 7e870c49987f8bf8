"""The ``graphsparse`` command: a thin click group; one module per command."""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import os
from pathlib import Path

import click
from click.utils import make_default_short_help

from graphsparse.errors import GraphsparseError

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


# Command name -> its module. The root group lists the commands from here and imports a command's module only
# when that command runs (or its own --help is asked for), so `graphsparse --help` and `--version` stay light
# (no torch). The help line is read from the command's docstring in the module's source, without importing it.
# A module that is not there is left out.
COMMANDS: dict[str, str] = {
    "inspect": "inspect_cmd",
    "rewrite": "rewrite_cmd",
    "calibrate": "calibrate_cmd",
    "tune": "tune_cmd",
    "eval": "eval_cmd",
    "plot": "plot_cmd",
    "export": "export_cmd",
    "train": "train_cmd",
    "demo": "demo_cmd",
}


class _LazyGroup(_Group):
    """A group whose commands are imported when used (names from :data:`COMMANDS`)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, module in COMMANDS.items() if _spec(module) is not None]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMANDS.get(cmd_name)
        if module is None or _spec(module) is None:
            return None
        loaded = importlib.import_module(f"{__name__}.{module}")
        return getattr(loaded, "command", None) or getattr(loaded, f"{cmd_name}_command")

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)  # as click.Group lays it out
        rows = []
        for name in names:
            text = _docstring(name, COMMANDS[name])
            if text is None:  # not found in the source: ask the command itself
                command = self.get_command(ctx, name)
                rows.append((name, command.get_short_help_str(limit) if command is not None else ""))
            else:
                rows.append((name, make_default_short_help(text, limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _spec(module: str) -> importlib.machinery.ModuleSpec | None:
    return importlib.util.find_spec(f"{__name__}.{module}")


def _docstring(name: str, module: str) -> str | None:
    """The docstring of the function that ``@click.command(name)`` decorates in ``module``'s source."""
    spec = _spec(module)
    try:
        tree = ast.parse(Path(str(spec.origin)).read_text(encoding="utf-8"))
    except (AttributeError, OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for deco in node.decorator_list:
            if (
                isinstance(deco, ast.Call)
                and ast.unparse(deco.func) in ("click.command", "command")
                and deco.args
                and isinstance(deco.args[0], ast.Constant)
                and deco.args[0].value == name
            ):
                doc = ast.get_docstring(node)
                return doc.split("\n\n")[0].replace("\n", " ") if doc else ""
    return None


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="graphsparse")
def main() -> None:
    """Post-training activation surgery (MeanSparse, SPARTA) for robust image classifiers."""
