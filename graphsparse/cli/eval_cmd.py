"""``graphsparse eval ARTIFACT --data SRC --split test``: clean and robust accuracy, base / exact / BPDA."""

from __future__ import annotations

import contextlib

import click

from graphsparse.cli._data import POSITIVE, data_options, open_dataset, print_stale, progress_bar, sample_count
from graphsparse.cli._dist import join_torchrun, leaves_torchrun
from graphsparse.cli._term import console, print_json, table

_LABELS = {"base": "base (α = 0)", "exact": "rewritten, exact gradient", "bpda": "rewritten, BPDA gradient"}


def report_table(report: dict) -> list:
    """Rows of variant × (clean, one column per attack) from an ``EvalReport.to_dict()``, led by the per-sample
    worst case over the exact and BPDA attacks (the honest figure)."""
    rows = []
    worst = report.get("worst_case") or {}
    if worst:
        clean = f"{report['exact']['clean']:.2f}"
        label = "rewritten, worst of exact/BPDA per sample"
        rows.append([label, clean] + [f"{worst[a]:.2f}" for a in report["attacks"]])
    for name, label in _LABELS.items():
        v = report.get(name)
        if v is not None:
            rows.append([label, f"{v['clean']:.2f}"] + [f"{v['robust'][a]:.2f}" for a in report["attacks"]])
    return rows


@click.command("eval")
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False))
@data_options(default_split="test")
@click.option(
    "--attack",
    "attacks",
    multiple=True,
    default=("apgd-ce",),
    show_default=True,
    help="apgd-ce, apgd-t, autoattack, or a custom chain like apgd-ce+square (repeatable).",
)
@click.option("--eps", type=float, default=8 / 255, show_default=True, help="Radius in [0, 1] pixel units (8/255).")
@click.option("--norm", type=click.Choice(["Linf", "L2"]), default="Linf", show_default=True)
@click.option("--n", "n", type=POSITIVE, default=None, help="Number of evaluation samples (default: all).")
@click.option("--steps", type=POSITIVE, default=None, help="APGD iterations (default: AutoAttack's).")
@click.option("--allow-module", "allow_modules", multiple=True, metavar="PKG")
@click.option(
    "--state",
    "state",
    type=click.Path(dir_okay=False),
    default=None,
    help="Progress file, saved after every attack chunk; rerun with the same arguments to resume "
    "[default: ARTIFACT.eval-state.json].",
)
@click.option(
    "--cache",
    "cache",
    type=click.Path(dir_okay=False),
    default=None,
    help="Per-sample results of the original model, reused by later runs [default: ARTIFACT.attack-cache.json].",
)
@click.option("--no-cache", is_flag=True, help="Attack the original model again; keep no cache file.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@leaves_torchrun
def command(
    artifact,
    data_source,
    split,
    seed,
    batch_size,
    max_samples,
    channels,
    image_size,
    attacks,
    eps,
    norm,
    n,
    steps,
    allow_modules,
    state,
    cache,
    no_cache,
    as_json,
):
    """Evaluate ARTIFACT honestly: every robust number with the exact and the straight-through gradient."""
    from graphsparse.artifact.io import load, save
    from graphsparse.planning.rewrite import rewrite_info
    from graphsparse.robust.attacks import check_threat
    from graphsparse.robust.evaluate import evaluate

    check_threat(eps, norm)  # a mistyped ε is refused before the artifact is loaded
    rank = join_torchrun()  # under torchrun each rank attacks its share of the chunks; rank 0 writes
    model = load(artifact, allow_modules=allow_modules)  # the fused form: same outputs, fewer memory passes
    data = open_dataset(
        data_source, split, seed, model, rewrite_info(model).input_shape, channels=channels, image_size=image_size
    )
    print_stale({k: v for k, v in rewrite_info(model).records.items() if k == "tuning"})  # α chosen for other stats
    with progress_bar("evaluating") if rank == 0 else contextlib.nullcontext(lambda *_: None) as update:
        report = evaluate(
            model,
            data,
            attacks=attacks,
            eps=eps,
            norm=norm,
            n=sample_count(n, max_samples),
            batch_size=batch_size,
            seed=seed,
            steps=steps,
            progress=update,
            cache=None if no_cache else (cache or f"{artifact}.attack-cache.json"),
            state=state or f"{artifact}.eval-state.json",
        )
    if rank != 0:
        return  # the same report as rank 0's, which writes and prints it
    path = save(model, artifact)  # evaluate recorded its report in the artifact's records
    written = f"wrote the evaluation record ({report.n} samples, {report.date}) into {path}"
    if as_json:
        print_json(report.to_dict())
        console(stderr=True).print(written, soft_wrap=True)  # stdout holds the JSON alone
        return
    out = console()
    out.print(
        table(
            ["model", "clean %"] + [f"{a} %" for a in report.attacks],
            report_table(report.to_dict()),
            title=f"{artifact}: {report.n} samples of {report.source}, {report.norm} ε = {report.eps:.4g}",
        )
    )
    out.print(report.verdict)
    for w in report.warnings:
        out.print(f"warning: {w}")
    out.print(written, soft_wrap=True)
