"""Calibration: one pass of data through a rewritten model that fills every operator's statistics.

``calibrate(model, data)`` runs ``data`` through ``model`` in eval mode under ``torch.no_grad``, with every
operator's ``alpha`` temporarily 0 (so the statistics are those of the base model), and accumulates the
exact per-channel count, mean and sum of squared deviations (``M2``) of each operator's *input* in float64
with Chan's parallel update. Nothing but these accumulators is kept, so memory does not grow with the
data. At the end each operator's ``mean`` and ``var`` (population variance) buffers are replaced by the
float32 rounding of the float64 results.

The result does not depend on batch size, batch order or the number of processes:

- a pass can be checkpointed (``checkpoint=``) and resumed (``resume=``) with the same final result;
- under ``torch.distributed`` (``torchrun``; gloo on CPU, NCCL on GPU) each process reads its own shard
  (:func:`graphsparse.data.make_loader`) and the accumulators of all processes are merged exactly, so
  every process ends with the same statistics, equal to those of a single-process pass.

The function writes the buffers ``mean`` and ``var`` of every operator and nothing else; ``alpha`` and the
train/eval mode of every module are restored on exit, also when calibration fails.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

import graphsparse
from graphsparse.distributed import agree_on_failure, comm_device, rank_and_size
from graphsparse.errors import CalibrationError
from graphsparse.ops import operators
from graphsparse.stats.calibration_state import CalibrationState, all_merge
from graphsparse.stats.moments import RunningMoments

__all__ = ["CalibrationRecord", "calibrate"]


# -------------------------------------------------------------------------------------------- record


@dataclass
class CalibrationRecord:
    """What a calibration did; :meth:`to_dict` is JSON-able (stored in artifacts).

    Attributes:
        samples: samples folded in (all processes, including a resumed part).
        batches: batches folded in (all processes, including a resumed part).
        source: description of the data.
        date: ISO 8601 UTC time at which calibration finished.
        torch_version: ``torch.__version__``.
        graphsparse_version: ``graphsparse.__version__``.
        world_size: number of processes whose statistics were merged.
        sites: calibrated site ids, in forward order.
        resumed_batches: batches that came from a resumed state.
        stats_sha256: digest of the statistics written (:func:`graphsparse.artifact.records.stats_digest`); tuning
            and evaluation records made with other statistics are stale.
        state: the final (merged) accumulators; not part of :meth:`to_dict`.
    """

    samples: int
    batches: int
    source: str
    date: str
    torch_version: str
    graphsparse_version: str
    world_size: int = 1
    sites: list[str] = field(default_factory=list)
    resumed_batches: int = 0
    stats_sha256: str = ""
    state: CalibrationState | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The record as plain JSON types (without :attr:`state`)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "state"}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CalibrationRecord:
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        names = {f.name for f in fields(cls)} - {"state"}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------------------- calibrate


def _stat_operators(model: nn.Module) -> OrderedDict[str, nn.Module]:
    """The operators of ``model`` that carry statistics (``mean``/``var`` buffers), in forward order."""
    return OrderedDict(
        (site, op)
        for site, op in operators(model).items()
        if isinstance(getattr(op, "mean", None), torch.Tensor)
        and isinstance(getattr(op, "var", None), torch.Tensor)
    )


def _describe(data: Any) -> str:
    """A description of ``data`` from the ``source``/``split``/``seed`` of a graphsparse dataset, or ''."""
    obj = data
    for _ in range(3):  # DataLoader -> Subset (a shard) -> SplitDataset
        if isinstance(getattr(obj, "source", None), str):
            split, seed = getattr(obj, "split", None), getattr(obj, "seed", None)
            return (
                obj.source + (f":{split}" if split else "") + (f" (seed {seed})" if seed is not None else "")
            )
        obj = getattr(obj, "dataset", None)
    return ""


def _known_total(data: Any, max_samples: int | None) -> int | None:
    total: int | None = None
    if isinstance(data, torch.utils.data.DataLoader):
        try:
            total = len(data.sampler)  # type: ignore[arg-type]
        except TypeError:
            total = None
    elif isinstance(data, (list, tuple)):
        total = 0
        for item in data:
            x = (
                item
                if isinstance(item, torch.Tensor)
                else item[0]
                if isinstance(item, (list, tuple))
                else None
            )
            if not isinstance(x, torch.Tensor) or x.dim() == 0:
                return None if max_samples is None else max_samples
            total += x.shape[0]
    if max_samples is not None:
        total = max_samples if total is None else min(total, max_samples)
    return total


_BATCH = 256  # batch size for data given as samples rather than batches


def _as_batches(data: Any, rank: int, world_size: int) -> Iterable[Any]:
    """Batches from the forms tune and evaluate take too: a dataset of samples, an ``(x, y)`` pair of
    tensors, one tensor of inputs (each sharded by rank); iterables of batches pass through."""
    from torch.utils.data import Dataset, IterableDataset, TensorDataset

    from graphsparse.data import make_loader

    if isinstance(data, torch.Tensor):
        data = TensorDataset(data)
    elif (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
        and data[0].dim() >= 2
        and data[1].dim() == 1
        and len(data[0]) == len(data[1])
    ):
        data = TensorDataset(*data)
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
        return make_loader(data, _BATCH, rank=rank, world_size=world_size)
    return data


def _inputs(batch: Any, index: int, input_key: str | None) -> torch.Tensor:
    from graphsparse.data import batch_parts
    from graphsparse.errors import DataError

    try:
        x, _ = batch_parts(batch, input_key=input_key, labels=False, where=f"batch {index}")
    except DataError as e:
        raise CalibrationError(
            f"{e} (a {type(batch).__name__}; calibration takes input tensors, (inputs, labels) pairs or dicts)"
        ) from e
    return x


def _pre_hook(moments: RunningMoments, site: str, module: nn.Module, args: tuple[Any, ...]) -> None:
    x = args[0] if args else None
    axis = module.channel_axis
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not -x.dim() <= axis < x.dim():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise CalibrationError(f"site {site!r} received an input of shape {shape} with channel axis {axis}")
    if x.shape[axis] != moments.channels:
        raise CalibrationError(
            f"site {site!r} has {moments.channels} channels but its input has {x.shape[axis]} along axis "
            f"{axis} (shape {tuple(x.shape)}). Hint: the model changed since the operators were inserted"
        )
    moments.update(x, axis)


def _first_non_finite(moments: Mapping[str, RunningMoments]) -> str | None:
    """The first site (forward order) whose accumulators are NaN/Inf, with one device sync."""
    flags = torch.stack([torch.isfinite(m.mean).all() & torch.isfinite(m.m2).all() for m in moments.values()])
    bad = (~flags).nonzero().flatten().tolist()
    return list(moments)[bad[0]] if bad else None


def _start_state(
    ops: Mapping[str, nn.Module], resume: CalibrationState | None, source: str
) -> CalibrationState:
    if resume is None:
        moments = OrderedDict((site, RunningMoments(int(op.mean.numel()))) for site, op in ops.items())
        return CalibrationState(moments, 0, 0, source)
    missing = [s for s in ops if s not in resume.moments]
    extra = [s for s in resume.moments if s not in ops]
    if missing or extra:
        what = (
            f"has no statistics for site {missing[0]!r}" if missing else f"has an unknown site {extra[0]!r}"
        )
        raise CalibrationError(
            f"the resumed calibration state {what}. "
            "Hint: resume only a state saved for the same rewritten model"
        )
    for site, op in ops.items():
        if resume.moments[site].channels not in (None, int(op.mean.numel())):
            raise CalibrationError(
                f"the resumed calibration state has {resume.moments[site].channels} channels at site "
                f"{site!r}, the model has {op.mean.numel()}. "
                "Hint: resume only a state saved for the same rewritten model"
            )
    state = resume.copy()
    state.moments = OrderedDict((site, state.moments[site]) for site in ops)
    if source:
        state.source = source
    return state


def _local_pass(
    model: nn.Module,
    ops: Mapping[str, nn.Module],
    data: Iterable[Any],
    state: CalibrationState,
    *,
    skip: int,
    drop: int,
    dtype: torch.dtype | None,
    max_batches: int | None,
    max_samples: int | None,
    device: torch.device,
    progress: Callable[[int, int | None], None] | None,
    total: int | None,
    checkpoint: Path | None,
    checkpoint_every: int | None,
    input_key: str | None,
) -> None:
    modes = [(m, m.training) for m in model.modules()]
    alphas = [
        (op, op.alpha.detach().clone())
        for op in ops.values()
        if isinstance(getattr(op, "alpha", None), torch.Tensor)
    ]
    handles = []
    last_good: CalibrationState | None = None
    try:
        model.eval()
        with torch.no_grad():
            for op, _ in alphas:
                op.alpha.zero_()
            for site, op in ops.items():
                handles.append(op.register_forward_pre_hook(partial(_pre_hook, state.moments[site], site)))
            if progress is not None:
                progress(state.samples, total)
            last_good = state.copy() if checkpoint is not None else None  # what an interruption saves
            batches: Iterator[Any] = iter(data)
            skip -= 1 if drop else 0  # the batch a resumed state cut is read again, minus what it took
            for _ in range(skip):
                if next(batches, _END) is _END:
                    return
            index = skip  # index of the batch in ``data``, as an uninterrupted pass would number it
            while max_batches is None or state.batches < max_batches or drop:
                if max_samples is not None and state.samples >= max_samples:
                    break
                batch = next(batches, _END)
                if batch is _END:
                    break
                x = _inputs(batch, index, input_key)[drop:]
                whole = int(x.shape[0])
                if max_samples is not None:
                    x = x[: max_samples - state.samples]
                if x.shape[0] == 0:  # the cut batch had nothing left
                    drop, state.partial, index = 0, 0, index + 1
                    continue
                model(x.to(device, dtype if x.is_floating_point() else None, non_blocking=True))
                site = _first_non_finite(state.moments)
                if site is not None:
                    raise CalibrationError(
                        f"NaN or Inf reached site {site!r} in batch {index} "
                        "(the first such site in forward order). "
                        "Hint: check the data of that batch and the weights before that site"
                    )
                state.batches += 0 if drop else 1  # a cut batch was counted when it was cut
                state.partial = (drop + int(x.shape[0])) if int(x.shape[0]) < whole else 0
                state.samples += int(x.shape[0])
                drop = 0
                index += 1
                if checkpoint is not None:
                    last_good = state.copy()
                    if checkpoint_every and state.batches % checkpoint_every == 0:
                        state.save_state(checkpoint)
                if progress is not None:
                    progress(state.samples, total)
    except BaseException:
        # Ctrl-C (or an error) in the middle of a batch leaves some sites with part of it: save the state
        # of the last whole batch, so that resuming loses nothing and counts nothing twice
        if checkpoint is not None and last_good is not None:
            last_good.save_state(checkpoint)
        raise
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for op, alpha in alphas:
                op.alpha.copy_(alpha)
        for m, training in modes:
            m.training = training


_END = object()


def _check_resume(resume: CalibrationState, data: Any, source: str) -> None:
    """A state resumes only the data it was made on, read in batches of the same size (else skipping its
    batches would skip other samples)."""
    hint = "Hint: resume with the data and batch size of the interrupted pass, or start again without the state"
    if resume.source and source and resume.source != source:
        raise CalibrationError(f"the calibration state was made on {resume.source!r}, not on {source!r}. {hint}")
    if not isinstance(data, torch.utils.data.DataLoader) or not data.batch_size or not resume.batches:
        return
    size = int(data.batch_size)
    expected = (resume.batches - 1) * size + resume.partial if resume.partial else resume.batches * size
    try:
        whole = len(data.sampler)  # type: ignore[arg-type]  # a state of a finished pass holds them all
    except TypeError:
        whole = None
    if resume.samples not in (expected, whole):
        raise CalibrationError(
            f"the calibration state holds {resume.samples} samples in {resume.batches} batches, which batches of "
            f"{size} cannot give: it was saved with another batch size. {hint}"
        )


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise CalibrationError(f"{name} must be an int >= 0 or None, got {value!r}")


def calibrate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    max_batches: int | None = None,
    max_samples: int | None = None,
    device: str | torch.device | None = None,
    resume: CalibrationState | None = None,
    skip_batches: int | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    distributed: bool | None = None,
    source: str = "",
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    input_key: str | None = None,
) -> CalibrationRecord:
    """Fill the ``mean``/``var`` buffers of every operator of ``model`` from one pass over ``data``.

    Args:
        model: a rewritten model (with operators, see :func:`graphsparse.ops.operators`).
        data: any iterable of input tensors, ``(inputs, labels)`` pairs or dicts, e.g. a ``DataLoader``
            (:func:`graphsparse.data.make_loader` for one shard per process).
        max_batches: stop after this many batches in total (a resumed state's batches count).
        max_samples: stop after this many samples in total (the last batch is cut to fit).
        device: where inputs are moved; default the device of the operators' buffers. The model is not
            moved.
        resume: a :class:`~graphsparse.stats.calibration_state.CalibrationState` to continue from (``record.state``
            or a checkpoint read with :func:`~graphsparse.stats.calibration_state.load_state`); without it the
            statistics are replaced, never added to.
        skip_batches: batches of ``data`` to skip before reading; default ``resume.batches`` when
            resuming (``data`` restarts from the beginning), else 0.
        progress: called as ``progress(samples_done, total_or_None)`` after every batch (local counts).
        distributed: merge statistics across the ranks of ``torch.distributed``; ``None`` (default) does
            so when a process group is initialised.
        source: description of the data for the record; default taken from a graphsparse dataset.
        checkpoint: path of a ``.safetensors`` file to save this process's state to, every
            ``checkpoint_every`` batches, at the end of the pass, and when the pass is interrupted
            (``KeyboardInterrupt`` or an error: the state after the last whole batch). With several processes
            it must contain ``{rank}``.
        checkpoint_every: batches between checkpoints (``None``: only at the end).
        input_key: the key of the inputs when batches are dicts (default the first of ``image``,
            ``pixel_values``, ... present; :func:`graphsparse.data.batch_parts`).

    Returns:
        A :class:`CalibrationRecord`; its ``state`` holds the final merged accumulators. On a rewritten
        model it is also stored as ``rewrite_info(model).records["calibration"]`` (saved in artifacts).

    Raises:
        CalibrationError: no operators, no data, NaN/Inf at a site (the message names the site and the
            batch), an operator input that does not match its channel count, a bad resume state, or a
            failure on another rank.
    """
    ops = _stat_operators(model)
    if not ops:
        raise CalibrationError(
            "the model has no operators with statistics to calibrate. "
            "Hint: rewrite the model first (insert MeanSparse operators with a plan), then calibrate"
        )
    _check_limit("max_batches", max_batches)
    _check_limit("max_samples", max_samples)
    _check_limit("skip_batches", skip_batches)
    _check_limit("checkpoint_every", checkpoint_every)
    rank, world_size = rank_and_size(distributed, error=CalibrationError, caller="calibrate")
    first = next(iter(ops.values()))
    device = torch.device(device) if device is not None else first.mean.device
    state = _start_state(ops, resume, source or _describe(data))
    data = _as_batches(data, rank, world_size)
    weights = next((p for p in model.parameters() if p.is_floating_point()), None)
    resumed = state.batches
    if resume is not None and skip_batches is None:
        _check_resume(resume, data, source or _describe(data))
    skip = skip_batches if skip_batches is not None else (resume.batches if resume is not None else 0)
    drop = resume.partial if resume is not None and skip_batches is None else 0
    ckpt: Path | None = None
    if checkpoint is not None:
        if world_size > 1 and "{rank}" not in str(checkpoint):
            raise CalibrationError(
                f"checkpoint path {str(checkpoint)!r} is shared by {world_size} processes. "
                "Hint: put '{rank}' in the path, e.g. 'calib-{rank}.safetensors'"
            )
        ckpt = Path(str(checkpoint).replace("{rank}", str(rank)))

    error: BaseException | None = None
    try:
        _local_pass(
            model,
            ops,
            data,
            state,
            skip=skip,
            drop=drop,
            dtype=weights.dtype if weights is not None else None,
            max_batches=max_batches,
            max_samples=max_samples,
            device=device,
            progress=progress,
            total=_known_total(data, max_samples),
            checkpoint=ckpt,
            checkpoint_every=checkpoint_every,
            input_key=input_key,
        )
        if ckpt is not None:
            state.save_state(ckpt)
    except Exception as e:
        if world_size == 1:
            raise
        error = e
    final = state
    if world_size > 1:
        comm = comm_device(device)
        agree_on_failure(error, rank, world_size, comm, error_type=CalibrationError, what="calibration")
        final = all_merge(state, world_size, comm)

    if final.samples == 0 or all(m.count == 0 for m in final.moments.values()):
        raise CalibrationError(
            f"no data reached the operators ({final.batches} batches, {final.samples} samples"
            + (f" after skipping {skip} batches" if skip else "")
            + "). Hint: check that the data iterable is not empty"
        )
    unreached = [s for s, m in final.moments.items() if m.count == 0]
    if unreached:
        raise CalibrationError(
            f"site {unreached[0]!r} received no data during calibration ({len(unreached)} such sites). "
            "Hint: the operator is not on the model's forward path; remove it or check the rewrite"
        )
    with torch.no_grad():
        for site, op in ops.items():
            m = final.moments[site]
            op.mean.copy_(m.mean.to(device=op.mean.device, dtype=torch.float32))
            op.var.copy_(m.variance.to(device=op.var.device, dtype=torch.float32))
    from graphsparse.artifact.records import stats_digest, store_record, utc_now

    record = CalibrationRecord(
        samples=final.samples,
        batches=final.batches,
        source=final.source,
        date=utc_now(),
        torch_version=torch.__version__,
        graphsparse_version=graphsparse.__version__,
        world_size=world_size,
        sites=list(ops),
        resumed_batches=resumed,
        stats_sha256=stats_digest(model),
        state=final,
    )
    store_record(model, "calibration", record.to_dict())  # saved with the artifact, as tuning and evaluation are
    return record
