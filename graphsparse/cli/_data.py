"""Data options shared by calibrate / tune / eval, and a rich progress bar for long passes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

__all__ = [
    "POSITIVE",
    "calibrate_with_progress",
    "check_model_fits",
    "data_options",
    "open_dataset",
    "print_stale",
    "progress_bar",
    "sample_count",
]

POSITIVE = click.IntRange(min=1)
"""An int >= 1: counts are checked by click, before anything is loaded (0 is not 'all')."""


def sample_count(n: int | None, max_samples: int | None) -> int | None:
    """The number of samples ``--n`` and ``--max-samples`` allow together (None: all)."""
    given = [v for v in (n, max_samples) if v is not None]
    return min(given) if given else None


def data_options(default_split: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--data, --split, --seed, --batch-size, --max-samples."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn = click.option(
            "--image-size",
            callback=_image_size,
            default=None,
            metavar="N|H,W",
            help="Resize images to this size (default: image folders follow the model).",
        )(fn)
        fn = click.option(
            "--channels",
            type=click.Choice(["1", "3"]),
            default=None,
            help="Image folders: 1 reads them as grayscale (default: the model's input channels).",
        )(fn)
        fn = click.option(
            "--max-samples", type=POSITIVE, default=None, help="Use at most this many samples (default: all)."
        )(fn)
        fn = click.option("--batch-size", type=POSITIVE, default=128, show_default=True)(fn)
        fn = click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split permutation.")(fn)
        fn = click.option(
            "--split",
            default=default_split,
            show_default=True,
            type=click.Choice(["train", "val", "test", "all"]),
            help="Deterministic split of the source (70/10/20 %).",
        )(fn)
        fn = click.option(
            "--data",
            "data_source",
            required=True,
            metavar="SRC",
            help="mnist5k, digits, a .npz/.safetensors file with x/y, or an image folder.",
        )(fn)
        return fn

    return wrap


def _image_size(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    """``N`` or ``H,W`` -> ``(H, W)``; checked before anything is loaded."""
    if value is None:
        return None
    try:
        parts = [int(v) for v in value.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts, default=0) < 1:
        raise click.BadParameter(f"{value!r} is not a size: give N or H,W, e.g. 224 or 28,28")
    return (parts[0], parts[-1])


def open_dataset(
    source: str,
    split: str,
    seed: int,
    model: Any = None,
    input_shape: tuple[int, ...] = (),
    *,
    channels: int | str | None = None,
    image_size: tuple[int, int] | None = None,
):
    """The split of ``source``; image folders are preprocessed with the model's timm data config.

    With ``input_shape`` (B, C, H, W) the data's channel count is checked against the model's. Image folders
    follow the model: grayscale for a 1-channel model (or ``channels``), resized to ``image_size``, else to
    the size the model declares, else to the size it was captured at. Arrays are resized to ``image_size``.
    """
    from graphsparse.data import data_config_transform, load_dataset, model_input_size
    from graphsparse.errors import DataError

    channels = int(channels) if channels else None  # click's choice gives '1' or '3'
    transform = None
    if Path(source).is_dir():
        if channels is None and len(input_shape) == 4:
            channels = input_shape[1]
        size = image_size
        if size is None and (model is None or model_input_size(model) is None) and len(input_shape) == 4:
            size = tuple(input_shape[2:])  # the capture size: images of any size become one batchable size
        transform = data_config_transform(model, channels=channels, image_size=size)
    dataset = load_dataset(
        source, split=split, seed=seed, transform=transform, image_size=None if transform else image_size
    )
    if len(input_shape) == 4 and len(dataset):
        sample = tuple(dataset[0][0].shape)
        if len(sample) != 3 or sample[0] != input_shape[1]:
            layout = ""
            if len(sample) == 3 and sample[-1] == input_shape[1]:
                layout = " They look channels-last: store x as (N, C, H, W)."
            raise DataError(
                f"data source {source!r} gives images of shape {sample}, but the model takes "
                f"{input_shape[1]}-channel input {tuple(input_shape[1:])}.{layout} Hint: pick data that matches "
                "the model (image folders: --channels)."
            )
        if sample[1:] != tuple(input_shape[2:]):
            from graphsparse.cli._term import console

            console(stderr=True).print(
                f"warning: data source {source!r} gives {sample[1]}x{sample[2]} images, but the model was "
                f"captured on {input_shape[2]}x{input_shape[3]} inputs; its statistics will describe inputs of "
                "another size than it was built for (--image-size resizes them).",
                soft_wrap=True,
            )
    return dataset


def _items_per_second():
    """'123 items/s' column."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class _Speed(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:,.0f} items/s" if task.speed else "")

    return _Speed()


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Callable[..., None]]:
    """A rich progress bar (items/s, ETA) driven by the library's ``progress(done, total[, label])`` callback;
    a label (evaluate's "exact: apgd-ce: 40 of 64 robust") is shown after the description."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from graphsparse.cli._term import console

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _items_per_second(),
        TimeRemainingColumn(),
        console=console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int | None, label: str | None = None) -> None:
            text = f"{description} ({label})" if label else description
            bar.update(task, completed=done, total=total, description=text)

        yield update


def print_stale(records: dict) -> None:
    """Say which records describe other statistics than the artifact's (see graphsparse.records)."""
    from graphsparse.artifact.records import stale_records
    from graphsparse.cli._term import console

    out = console(stderr=True)
    for key in stale_records(records):
        record = records[key]
        command = {"tuning": "tune", "evaluation": "eval", "calibration": "calibrate"}.get(key, key)
        alpha = f" (it chose α = {record['chosen_alpha']:g}, still set)" if "chosen_alpha" in record else ""
        out.print(
            f"warning: the {key} record{alpha} of {record.get('date') or 'an earlier run'} was made with other "
            f"statistics than the artifact's and is marked stale. Hint: run `graphsparse {command}` again.",
            soft_wrap=True,
        )


def check_model_fits(model, dataset) -> None:
    """Warn when the model's output is not one logit per class of ``dataset`` (one sample, before a long pass).

    Calibration itself needs no labels (an ImageNet model may be calibrated on any images), so this is a
    warning here; tune and eval refuse such data.
    """
    import torch

    from graphsparse.cli._term import console
    from graphsparse.errors import EvaluationError
    from graphsparse.model_output import logits_of
    from graphsparse.ops.state import eval_mode
    from graphsparse.robust.samples import check_logits, data_classes

    classes = data_classes(dataset)
    if classes is None or not len(dataset):
        return
    weights = next((p for p in model.parameters() if p.is_floating_point()), None)
    x = dataset[0][0].unsqueeze(0)
    if weights is not None:
        x = x.to(weights.device, weights.dtype)
    with eval_mode(model), torch.no_grad():
        out = model(x)
    try:
        check_logits(logits_of(out), classes, where=f"the model (on data {getattr(dataset, 'source', '')!r})")
    except EvaluationError as e:
        console(stderr=True).print(
            f"warning: {e}. The statistics do not need labels, but tune and eval will refuse this data.",
            soft_wrap=True,
        )


def calibrate_with_progress(
    model,
    dataset,
    *,
    batch_size: int,
    max_samples: int | None,
    checkpoint: str | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
):
    """Calibrate ``model`` on ``dataset`` with a progress bar (warning first when its output is not one logit per
    class of the data); returns the CalibrationRecord.

    With ``checkpoint`` the state is saved there every ``checkpoint_every`` batches and when the pass is
    interrupted (Ctrl-C); ``resume`` continues from it.
    """
    from graphsparse.data import make_loader
    from graphsparse.errors import CalibrationError
    from graphsparse.stats.calibrate import calibrate
    from graphsparse.stats.calibration_state import load_state

    state = None
    if resume:
        if checkpoint is None or not Path(checkpoint).is_file():
            raise CalibrationError(
                f"no calibration state at {checkpoint!r} to resume. Hint: run without --resume to start the pass, "
                "with --checkpoint PATH to make it resumable"
            )
        state = load_state(checkpoint)
    check_model_fits(model, dataset)
    loader = make_loader(dataset, batch_size)
    with progress_bar("calibrating") as update:
        return calibrate(
            model,
            loader,
            max_samples=max_samples,
            progress=update,
            resume=state,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
        )
