"""``graphsparse tune ARTIFACT --data SRC --split val``: choose α on validation data only."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import click

from graphsparse.cli._data import POSITIVE, data_options, open_dataset, progress_bar, sample_count
from graphsparse.cli._dist import join_torchrun, leaves_torchrun
from graphsparse.cli._term import console, print_next, table


@click.command("tune")
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False))
@data_options(default_split="val")
@click.option("--alphas", default=None, help="Comma-separated α grid (default 0,0.05,…,0.5).")
@click.option("--attack", default="apgd-ce", show_default=True)
@click.option("--eps", type=float, default=8 / 255, show_default=True, help="Radius in [0, 1] pixel units (8/255).")
@click.option("--norm", type=click.Choice(["Linf", "L2"]), default="Linf", show_default=True)
@click.option("--n", "n", type=POSITIVE, default=None, help="Number of validation samples (default: all).")
@click.option("--steps", type=POSITIVE, default=None, help="APGD iterations (default: AutoAttack's).")
@click.option("--max-clean-drop", type=float, default=0.5, show_default=True, help="In percentage points.")
@click.option("--bpda", is_flag=True, help="Also attack with straight-through gradients; choose on the worse.")
@click.option("--per-stage", is_flag=True, help="Then a coordinate search of α per stage.")
@click.option("--allow-module", "allow_modules", multiple=True, metavar="PKG")
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where to write the curve (CSV, JSON, PNG); default beside the artifact.",
)
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
    alphas,
    attack,
    eps,
    norm,
    n,
    steps,
    max_clean_drop,
    bpda,
    per_stage,
    allow_modules,
    out_dir,
):
    """Sweep α on the validation split, set the chosen α in ARTIFACT and draw the α curve."""
    from graphsparse.artifact.io import load, save
    from graphsparse.planning.rewrite import rewrite_info
    from graphsparse.plots import plot_tuning
    from graphsparse.robust.attacks import check_threat
    from graphsparse.robust.tune import SplitWarning, tune

    grid = _parse_alphas(alphas) if alphas else None
    check_threat(eps, norm)  # a mistyped ε is refused before the artifact is loaded
    rank = join_torchrun()  # under torchrun each rank attacks its share of the chunks; rank 0 writes
    model = load(artifact, allow_modules=allow_modules)  # the fused form: same outputs, fewer memory passes
    data = open_dataset(
        data_source, split, seed, model, rewrite_info(model).input_shape, channels=channels, image_size=image_size
    )
    bar = progress_bar("tuning") if rank == 0 else contextlib.nullcontext(lambda *_: None)
    with bar as update, warnings.catch_warnings():
        warnings.simplefilter("ignore", SplitWarning)  # printed below with the other warnings
        result = tune(
            model,
            data,
            alphas=grid,
            attack=attack,
            eps=eps,
            norm=norm,
            n=sample_count(n, max_samples),
            batch_size=batch_size,
            max_clean_drop=max_clean_drop,
            bpda=bpda,
            per_stage=per_stage,
            seed=seed,
            steps=steps,
            progress=update,
            attack_cache=f"{artifact}.attack-cache.json",
        )
    if rank != 0:
        return  # the same result as rank 0's, which writes and prints it
    path = save(model, artifact)
    stem = Path(artifact).name.removesuffix(".safetensors")
    folder = Path(out_dir) if out_dir else Path(artifact).parent
    csv, png = result.to_csv(folder / f"{stem}.tuning.csv"), plot_tuning(result, folder / f"{stem}.tuning.png")
    result.to_json(folder / f"{stem}.tuning.json")
    rows = [
        [
            f"{p.alpha:g}",
            f"{p.clean:.2f}",
            f"{p.robust:.2f}",
            "" if p.robust_bpda is None else f"{p.robust_bpda:.2f}",
            "◀" if p.alpha == result.chosen_alpha else "",
        ]
        for p in result.curve
    ]
    out = console()
    out.print(
        table(
            ["α", "clean %", f"{attack} %", "BPDA %", "chosen"],
            rows,
            title=f"{result.n} samples of {result.source} ({result.split} split)",
        )
    )
    out.print(
        f"chosen α = {result.chosen_alpha:g} (clean drop ≤ {max_clean_drop:g} points), set with the tuning record in "
        f"{path}; wrote {csv}, {png}",
        soft_wrap=True,
    )
    for w in result.warnings:
        out.print(f"warning: {w}", soft_wrap=True)
    print_next("eval", artifact, data_source, "test", seed=seed, allow_modules=allow_modules, extra="--attack apgd-ce")


def _parse_alphas(text: str) -> list[float]:
    try:
        return [float(a) for a in text.split(",")]
    except ValueError as e:
        raise click.BadParameter(
            f"{text!r} is not a comma-separated list of numbers, e.g. 0,0.1,0.2", param_hint="--alphas"
        ) from e
