"""``graphsparse plot ARTIFACT``: the α curve (--tuning) or a site's channel histogram (--site)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from graphsparse.cli._data import open_dataset
from graphsparse.cli._term import console, output_suffix


@click.command("plot")
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False))
@click.option("--tuning", is_flag=True, help="Clean and robust accuracy versus α, chosen α marked.")
@click.option("--site", default=None, help="Site id: histogram of its input with μ and the band ±α·σ.")
@click.option("--channel", type=int, default=None, help="Channel of --site (default: all channels pooled).")
@click.option(
    "--alpha",
    type=click.FloatRange(min=0),
    default=None,
    help="α to draw --site with (default: the artifact's; at α = 0 both panels are the same).",
)
@click.option("--data", "data_source", default=None, help="Data for --site (default: the calibration source).")
@click.option("--split", default="train", show_default=True, type=click.Choice(["train", "val", "test", "all"]))
@click.option("--seed", type=int, default=None, help="Seed of the split (default: the calibration's, else 0).")
@click.option("--max-samples", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--allow-module", "allow_modules", multiple=True, metavar="PKG")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), default=None, callback=output_suffix(".png", "a PNG image")
)
def command(artifact, tuning, site, channel, alpha, data_source, split, seed, max_samples, allow_modules, output):
    """Draw a PNG from ARTIFACT (the paper's Figure 1 or Figure 3)."""
    from graphsparse.artifact.io import load
    from graphsparse.errors import GraphsparseError
    from graphsparse.planning.rewrite import rewrite_info
    from graphsparse.plots import plot_site_histogram, plot_tuning

    if tuning == (site is not None):
        raise click.UsageError("give exactly one of --tuning or --site ID")
    if tuning and (alpha is not None or channel is not None):
        raise click.UsageError("--alpha and --channel go with --site, not --tuning")
    model = load(artifact, allow_modules=allow_modules)
    stem = Path(artifact).name.removesuffix(".safetensors")
    if tuning:
        record = rewrite_info(model).records.get("tuning")
        if not record:
            raise GraphsparseError(f"{artifact}: no tuning record. Hint: run `graphsparse tune {artifact} ...` first.")
        path = plot_tuning(record, output or Path(artifact).with_name(f"{stem}.tuning.png"))
    else:
        from graphsparse.data import make_loader
        from graphsparse.ops import operators
        from graphsparse.stats.histograms import record_histograms

        ops = operators(model)
        if site not in ops:
            from graphsparse.errors import PlanError, closest

            raise PlanError(f"{artifact}: no operator at site {site!r}{closest(site, ops)}")
        calibration = rewrite_info(model).records.get("calibration") or {}
        recorded = str(calibration.get("source", ""))  # e.g. "mnist5k:train (seed 0)"
        source = data_source or recorded.split(":")[0]
        if not source:
            raise GraphsparseError(f"{artifact}: no calibration record to take the data from. Hint: pass --data SRC.")
        if seed is None:
            found = re.search(r"\(seed (\d+)\)$", recorded)
            seed = int(found[1]) if found and not data_source else 0
        dataset = open_dataset(source, split, seed, model, rewrite_info(model).input_shape)
        loader = make_loader(dataset, 128)
        hist = record_histograms(model, loader, sites=[site], max_batches=-(-max_samples // 128))[site]
        drawn = float(ops[site].alpha) if alpha is None else alpha
        path = plot_site_histogram(
            hist, site, ops[site], output or Path(artifact).with_name(f"{stem}.{site}.png"), channel=channel,
            alpha=drawn,
        )
        console().print(f"wrote {path} (site {site}, α = {drawn:g})")
        if drawn == 0:
            console().print(
                "note: at α = 0 MeanSparse moves nothing, so both panels are the same; pass --alpha A to see the "
                "band that α would block"
            )
        return
    console().print(f"wrote {path}")
