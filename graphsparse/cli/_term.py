"""One place for terminal output: rich tables and summaries on stdout, JSON when asked."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

__all__ = ["console", "output_suffix", "print_json", "print_next", "table"]


def console(stderr: bool = False) -> Console:
    """A rich console; no colour under NO_COLOR or CI, wide enough for site ids when not a terminal."""
    plain = bool(os.environ.get("NO_COLOR") or os.environ.get("CI"))
    width = None if sys.stdout.isatty() else 160
    return Console(stderr=stderr, no_color=plain, highlight=False, width=width, soft_wrap=False)


def print_next(
    command: str,
    artifact: Any,
    data: str,
    split: str,
    *,
    seed: int = 0,
    allow_modules: Sequence[str] = (),
    extra: str = "",
) -> None:
    """Print the ``next:`` line: the command that goes on with the pipeline, with the flags this run needed (the same
    split seed keeps the splits apart; the same trust lets the artifact's model be rebuilt)."""
    words = [f"graphsparse {command} {artifact} --data {data} --split {split}"]
    words += [f"--seed {seed}"] if seed else []
    words += [f"--allow-module {m}" for m in allow_modules]
    words += [extra] if extra else []
    console().print("next: " + " ".join(words), soft_wrap=True)  # one line, to copy


def print_json(data: Any) -> None:
    """Machine-readable output: plain JSON on stdout, nothing else."""
    click_echo = sys.stdout.write
    click_echo(json.dumps(data, indent=2, sort_keys=False) + "\n")


def table(columns: list[str], rows: list[list[Any]], *, title: str | None = None) -> Table:
    """A rich table with the given header and rows (cells are converted with str)."""
    t = Table(title=title, show_lines=False, header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    return t


def output_suffix(suffix: str, what: str):
    """A click callback refusing an output path named for another format than the one written (``-o out.pt``
    got a safetensors file that ``torch.load`` cannot read); the message names the option and a right name."""

    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is None or value.lower().endswith(suffix):
            return value
        path = Path(value)
        right = path.with_suffix(suffix) if path.suffix else path.with_name(path.name + suffix)
        raise click.BadParameter(
            f"{value!r}: the command writes {what}, so the name must end in {suffix}. Hint: -o {right}",
            ctx=ctx,
            param=param,
        )

    return check
