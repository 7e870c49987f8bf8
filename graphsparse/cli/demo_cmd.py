"""``graphsparse demo``: the whole pipeline on the embedded demo model, in a few minutes on a CPU."""

from __future__ import annotations

import time

import click

from graphsparse.cli._term import console, table


@click.command("demo")
@click.option("--fast", is_flag=True, help="Reduced setting (fewer α values, samples and attack steps).")
@click.option("--output-dir", type=click.Path(file_okay=False), default="graphsparse-demo", show_default=True)
def command(fast, output_dir):
    """Inspect, rewrite (after_addition), calibrate, tune α, evaluate honestly and save, on MNIST-5k."""
    from graphsparse.cli.eval_cmd import report_table
    from graphsparse.demo.pipeline import run_demo

    out = console()
    t0 = time.perf_counter()
    result = run_demo(output_dir, fast=fast, log=lambda line: out.print(line))
    ev = result.evaluation
    attacks = ev["attacks"]
    rows = report_table(ev)
    out.print(
        table(
            ["model", "clean %"] + [f"{a} %" for a in attacks],
            rows,
            title=f"demo: MNIST-5k test split, {ev['n']} samples, L∞ ε = {result.eps:g}, α = "
            f"{result.chosen_alpha:g} (chosen on the validation split)",
        )
    )
    out.print(ev["verdict"])
    for w in ev["warnings"]:
        out.print(f"warning: {w}")
    out.print(f"artifact: {result.artifact}")
    out.print(f"α curve:  {result.curve_png} ({result.curve_csv.name})")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    out.print(f"done in {time.perf_counter() - t0:.0f} s ({stages})")
