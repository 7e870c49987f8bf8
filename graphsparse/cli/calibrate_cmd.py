"""``graphsparse calibrate ARTIFACT --data SRC``: fill the operators' statistics, update the artifact."""

from __future__ import annotations

import click

from ._data import calibrate_with_progress, data_options, open_dataset, print_stale
from ._term import console, print_next, table


@click.command("calibrate")
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False))
@data_options(default_split="train")
@click.option("--allow-module", "allow_modules", multiple=True, metavar="PKG")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write here instead.")
def command(artifact, data_source, split, seed, batch_size, max_samples, channels, image_size, allow_modules, output):
    """Calibrate the MeanSparse statistics of ARTIFACT on one pass over the data (updated atomically)."""
    from ..io import load, save
    from ..ops import operators
    from ..rewrite import rewrite_info

    model = load(artifact, allow_modules=allow_modules)
    record = calibrate_with_progress(
        model,
        open_dataset(
            data_source, split, seed, model, rewrite_info(model).input_shape, channels=channels, image_size=image_size
        ),
        batch_size=batch_size,
        max_samples=max_samples,
    )
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
    print_stale(rewrite_info(model).records)
    print_next("tune", path, data_source, "val", seed=seed, allow_modules=allow_modules)
