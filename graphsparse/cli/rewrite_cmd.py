"""``graphsparse rewrite MODEL --rule R``: insert operators per a rule file and write the artifact."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from graphsparse.cli._options import load_cli_model, model_options
from graphsparse.cli._term import console, output_suffix, print_next


def default_output(model_spec: str, rule: str) -> Path:
    """``model.pt`` → ``model.<rule>.safetensors`` beside it; ``timm:NAME`` → ``./NAME.<rule>.safetensors``."""
    rule_name = Path(rule).stem
    path = Path(model_spec)
    if path.suffix and path.exists():
        return path.with_name(f"{path.stem}.{rule_name}.safetensors")
    name = model_spec.split(":", 1)[-1].replace("/", "_").replace(":", "_").replace("@", "_")
    return Path(f"{name}.{rule_name}.safetensors")


@click.command("rewrite")
@click.argument("model")
@click.option("--rule", required=True, help="Built-in rule name (after_addition, ...) or a YAML path.")
@model_options
@click.option("--alpha", type=float, default=None, help="α for every MeanSparse site (overrides the rule file).")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    callback=output_suffix(".safetensors", "a safetensors artifact (not a torch pickle)"),
    help="Artifact path (.safetensors).",
)
@click.option("--data", "data_source", default=None, metavar="SRC", help="Also calibrate on this data source.")
@click.option("--split", default="train", show_default=True, type=click.Choice(["train", "val", "test", "all"]))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--max-samples", type=click.IntRange(min=1), default=None)
def command(
    model,
    rule,
    arch,
    allow_modules,
    input_shape,
    model_dir,
    alpha,
    output,
    data_source,
    split,
    seed,
    batch_size,
    max_samples,
):
    """Rewrite MODEL with RULE and save the artifact.

    MODEL: timm:NAME, torchvision:NAME, transformers:TYPE, hf:ORG/NAME, robustbench:ID, pkg.module:Class or
    pkg.module:function, or a model file (a pickled module, a state dict or a checkpoint dict with --arch).
    """
    from graphsparse.artifact.io import save
    from graphsparse.planning.rewrite import rewrite, rewrite_info
    from graphsparse.sources.builders import package_to_trust

    module, recipe, example = load_cli_model(model, arch, allow_modules, input_shape, model_dir)
    needed = package_to_trust(recipe, allow_modules)  # naming a class trusts it for this run only
    trust = tuple(allow_modules) + ((needed,) if needed else ())
    rewritten = rewrite(module, rule, example, alpha=alpha, recipe=recipe.to_json())
    info = rewrite_info(rewritten)
    out = console()
    selected = info.plan.selected()
    actions = Counter(e.action for e in selected)
    roles = Counter(e.site.role for e in selected)
    out.print(
        f"{model}: {len(info.plan.entries)} sites, {len(selected)} rewritten with rule {rule!r} ("
        + ", ".join(f"{n} {a}" for a, n in actions.items())
        + "; "
        + ", ".join(f"{n} {r}" for r, n in roles.items())
        + ")"
    )
    if data_source is not None:
        from graphsparse.cli._data import calibrate_with_progress, open_dataset

        record = calibrate_with_progress(
            rewritten,
            open_dataset(data_source, split, seed, module, tuple(example.shape)),
            batch_size=batch_size,
            max_samples=max_samples,
        )
        out.print(f"calibrated on {record.samples} samples ({record.source})")
    path = save(rewritten, output or default_output(model, rule))
    out.print(f"wrote {path}")
    if data_source is None and actions.get("meansparse"):
        print_next("calibrate", path, "SRC", "train", allow_modules=trust)
    elif actions.get("meansparse"):
        print_next("tune", path, data_source, "val", seed=seed, allow_modules=trust)
