"""``graphsparse export ARTIFACT --format onnx|pt2|torchscript``: a file that runs without graphsparse, verified."""

from __future__ import annotations

import click

from graphsparse.cli._term import console, print_json, table

_FORMATS = ("onnx", "pt2", "torchscript")


def _shape(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        shape = tuple(int(v) for v in value.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) < 2 or min(shape) < 1:
        raise click.BadParameter(f"expected positive integers such as 1,3,224,224, got {value!r}")
    return shape


@click.command("export")
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(_FORMATS), default="onnx", show_default=True,
              help="onnx (onnxruntime), pt2 (torch.export.load) or torchscript (traced; torch.jit.load).")
@click.option("-o", "--output", default=None, type=click.Path(), help="File to write (default: beside ARTIFACT).")
@click.option("--opset", type=click.IntRange(7, 30), default=None, help="ONNX opset (default: the exporter's).")
@click.option("--dynamic-batch", is_flag=True, help="Accept any batch size (default: the probe's).")
@click.option("--input-shape", default=None, metavar="B,C,H,W", callback=_shape,
              help="Input shape to export for (default: the artifact's probe shape).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Run the file in its own runtime against the model before writing it.")
@click.option("--data", "data_source", default=None, metavar="SRC",
              help="Verify on samples of this source too (mnist5k, digits, a .npz/.safetensors file, an image folder).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test", "all"]))
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split and of the random probe.")
@click.option("--n", "n", type=click.IntRange(0, 10_000), default=32, show_default=True,
              help="Number of data samples to verify on.")
@click.option("--allow-module", "allow_modules", multiple=True, metavar="PKG")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(artifact, fmt, output, opset, dynamic_batch, input_shape, verify, data_source, split, seed, n,
            allow_modules, as_json):
    """Export ARTIFACT to ONNX, a torch.export program or TorchScript that runs without graphsparse."""
    from graphsparse.deploy import default_path, export

    path = output or default_path(artifact, fmt)
    report = export(
        artifact, path, fmt, opset=opset, dynamic_batch=dynamic_batch, input_shape=input_shape, verify=verify,
        data=data_source, n=n, split=split, seed=seed, allow_modules=allow_modules,
    )
    if as_json:
        print_json(report.to_dict())
        return
    out = console()
    rows = [
        ["file", f"{report.path} ({report.bytes:,} bytes)"],
        ["input", f"{report.dtype} {tuple('batch' if d is None else d for d in report.input_shape)}"],
    ]
    check = report.verification
    if check is not None:
        rows += [
            ["runtime", check.runtime],
            ["samples", f"{check.samples} ({check.data_samples} from {data_source})" if data_source else
             f"{check.samples} (random probe)"],
            ["max |Δ| of the logits", f"{check.max_abs_diff:.3g} (tolerance {check.tolerance:.3g} per sample)"],
            ["argmax agreement", f"{check.argmax_agree}/{check.samples}"],
            ["MeanSparse inputs near a band edge",
             f"{check.band_edge_values:,} of {check.meansparse_values:,} in {check.band_edge_samples} samples "
             f"(within {check.edge_rel:.0e}·α·σ)"],
        ]
    out.print(table(["", "result"], rows, title=f"{artifact} → {fmt}"))
    if check is None:
        out.print("not verified (--no-verify)")
    elif check.over_tolerance:
        out.print(f"warning: {check.over_tolerance} samples differ beyond the tolerance, each with MeanSparse inputs "
                  "on a band edge, where the backend's last-bit rounding puts a value on the other side",
                  soft_wrap=True)
