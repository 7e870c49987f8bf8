"""``graphsparse calibrate ARTIFACT --data SRC``: fill the operators' statistics, update the artifact."""

from __future__ import annotations

from pathlib import Path

import click

from graphsparse.cli._data import POSITIVE, calibrate_with_progress, data_options, open_dataset, print_stale
from graphsparse.cli._term import console, print_next, table


@click.command("calibrate")
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False))
@data_options(default_split="train")
@click.option("--allow-module", "allow_modules", multiple=True, metavar="PKG")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write here instead.")
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="PATH",
    help="Save the pass's state here (every --checkpoint-every batches, and on Ctrl-C) so it can be resumed.",
)
@click.option("--checkpoint-every", type=POSITIVE, default=10, show_default=True, metavar="N")
@click.option("--resume", is_flag=True, help="Continue the pass saved in --checkpoint (same data and batch size).")
def command(
    artifact,
    data_source,
    split,
    seed,
    batch_size,
    max_samples,
    channels,
    image_size,
    allow_modules,
    output,
    checkpoint,
    checkpoint_every,
    resume,
):
    """Calibrate the MeanSparse statistics of ARTIFACT on one pass over the data (updated atomically)."""
    from graphsparse.artifact.io import load, save
    from graphsparse.ops import operators
    from graphsparse.planning.rewrite import rewrite_info

    if resume and checkpoint is None:
        raise click.UsageError("--resume continues the pass saved in --checkpoint PATH: give that too")
    model = load(artifact, allow_modules=allow_modules)
    data = open_dataset(
        data_source, split, seed, model, rewrite_info(model).input_shape, channels=channels, image_size=image_size
    )
    try:
        record = calibrate_with_progress(
            model,
            data,
            batch_size=batch_size,
            max_samples=max_samples,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
            resume=resume,
        )
    except KeyboardInterrupt:
        if checkpoint is None or not Path(checkpoint).is_file():
            raise
        from graphsparse.stats.calibration_state import load_state

        state = load_state(checkpoint)
        console(stderr=True).print(
            f"interrupted: {state.batches} batches ({state.samples} samples) are saved in {checkpoint}. "
            "Hint: run the same command with --resume to go on from there.",
            soft_wrap=True,
        )
        raise SystemExit(130) from None
    path = save(model, output or artifact)
    rows = []
    for site_id, op in operators(model).items():
        if not hasattr(op, "var"):
            continue
        sigma = op.var.sqrt()
        dead = int((op.var == 0).sum())
        rows.append(
            [
                site_id,
                op.channels,
                f"{op.mean.min():.3g} … {op.mean.max():.3g}",
                f"{sigma.min():.3g} … {sigma.max():.3g}",
                dead or "",
            ]
        )
    out = console()
    out.print(table(["site", "channels", "μ range", "σ range", "dead (σ=0)"], rows))
    out.print(f"calibrated {len(rows)} sites on {record.samples} samples of {record.source}; wrote {path}")
    if checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)  # the pass is done and its statistics are in the artifact
    print_stale(rewrite_info(model).records)
    print_next("tune", path, data_source, "val", seed=seed, allow_modules=allow_modules)
