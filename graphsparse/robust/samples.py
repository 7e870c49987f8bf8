"""The evaluation samples shared by :func:`graphsparse.evaluate` and :func:`graphsparse.tune`.

:func:`pick_samples` picks ``n`` samples of any data (datasets, loaders, tensor pairs, iterables of batches)
deterministically, with the split bookkeeping of where they came from (:class:`Samples`); the argument checks
both commands share (:func:`check_positive`, :func:`check_radius`, :func:`check_logits`, :func:`model_classes`)
live here too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from graphsparse.data import batch_parts
from graphsparse.errors import EvaluationError

__all__ = [
    "UNKNOWN_INDICES",
    "Samples",
    "check_logits",
    "check_positive",
    "check_radius",
    "data_bookkeeping",
    "data_classes",
    "model_classes",
    "pick_samples",
]


@dataclass
class Samples:
    """The evaluation samples picked from some data, with the split bookkeeping of where they came from.

    Attributes:
        x: inputs, float32 ``(n, C, H, W)`` in ``[0, 1]``.
        y: labels, int64 ``(n,)``.
        positions: positions of the samples in the data given (sorted).
        indices: indices of the samples in the data *source* (``positions`` mapped through the
            ``indices`` of a graphsparse split / torch ``Subset``); equal to ``positions`` when the data
            carries no bookkeeping; empty when a loader's sampler reorders a split (unknown).
        split: the split name of a graphsparse dataset (``train``/``val``/``test``/``all``), or ``None``.
        source: the source description (``digits``, a path), or ``''``.
        total: number of samples in the data given.
        num_classes: classes of the data source (see :func:`data_classes`), or ``None`` when unknown.
    """

    x: torch.Tensor
    y: torch.Tensor
    positions: np.ndarray
    indices: np.ndarray
    split: str | None
    source: str
    total: int
    num_classes: int | None = None


def data_classes(data: Any) -> int | None:
    """The number of classes ``data`` says it has, following ``DataLoader``/``Subset`` wrappers: a
    ``num_classes`` int (graphsparse datasets) or a ``classes`` list (torchvision datasets); ``None`` when
    neither is found."""
    obj = data
    for _ in range(8):
        n = getattr(obj, "num_classes", None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
        classes = getattr(obj, "classes", None)
        if isinstance(classes, (list, tuple)) and classes:
            return len(classes)
        inner = getattr(obj, "dataset", None)
        if inner is None or inner is obj:
            return None
        obj = inner
    return None


def data_bookkeeping(data: Any) -> tuple[str | None, str, np.ndarray | None, list[str]]:
    """``(split, source, source_indices, splits_seen)`` of ``data``.

    Follows ``DataLoader.dataset`` and ``Subset.dataset`` down to a graphsparse ``SplitDataset``;
    ``source_indices[i]`` is the source index of position ``i`` of ``data`` (``None`` when unknown).
    ``splits_seen`` lists every ``split`` attribute met on the way (to refuse test data at any level).
    """
    obj = data
    mapping: np.ndarray | None = None  # position in `data` -> position in `obj`
    splits: list[str] = []
    for _ in range(8):
        if isinstance(obj, DataLoader):
            obj = obj.dataset
            continue
        split = getattr(obj, "split", None)
        if isinstance(split, str):
            splits.append(split)
        if isinstance(obj, Subset):
            idx = np.asarray(obj.indices, dtype=np.int64)
            mapping = idx if mapping is None else idx[mapping]
            obj = obj.dataset
            continue
        own = getattr(obj, "indices", None)
        if isinstance(split, str) and own is not None:
            idx = np.asarray(own, dtype=np.int64)
            mapping = idx if mapping is None else idx[mapping]
            return split, str(getattr(obj, "source", "")), mapping, splits
        break
    return (splits[0] if splits else None), "", None, splits


def pick_samples(
    data: Any, n: int | None, seed: int, *, input_key: str | None = None, label_key: str | None = None
) -> Samples:
    """Pick ``n`` samples of ``data`` deterministically (all of them when ``n`` is None or too large).

    Where the number of samples is known (datasets, loaders over them) the positions are the first ``n`` of
    a permutation seeded by ``seed``, sorted; otherwise (iterables, ``IterableDataset`` loaders) each
    sample gets a seeded random priority in stream order and the ``n`` smallest are kept. Either way a
    smaller ``n`` picks a subset of a larger one, and a loader or iterable is read as it is given (its
    sampler and ``collate_fn`` apply), batch by batch, keeping only the picked samples: reading stops after
    the last picked position when the total is known.

    Args:
        data: a map-style dataset of ``(x, y)`` samples (a graphsparse split, ``TensorDataset``,
            ``Subset``), a ``DataLoader``, an ``(x, y)`` pair of tensors, or any iterable of ``(x, y)``
            batches; samples and batches may be dicts (see :func:`graphsparse.data.batch_parts`).
        n: number of samples; ``None`` for all.
        seed: seed of the pick.
        input_key, label_key: the keys of inputs and labels in dict samples or batches.
    """
    check_positive("n", n)
    split, source, mapping, _ = data_bookkeeping(data)
    keys = {"input_key": input_key, "label_key": label_key}
    reordered = False
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], torch.Tensor)
        and isinstance(data[1], torch.Tensor)
        and data[0].dim() >= 2
        and data[1].dim() == 1
        and data[0].shape[0] == data[1].shape[0]
    ):
        total = data[0].shape[0]
        positions = _positions(total, n, seed)
        x, y = data[0][torch.from_numpy(positions)], data[1][torch.from_numpy(positions)]
    elif _is_map_style(data):
        total = len(data)
        positions = _positions(total, n, seed)
        tensors = getattr(data, "tensors", None)
        if (
            isinstance(tensors, tuple)
            and len(tensors) == 2
            and getattr(data, "transform", None) is None
            and all(isinstance(t, torch.Tensor) for t in tensors)
        ):
            index = torch.from_numpy(positions)
            x, y = tensors[0][index], tensors[1][index]
        else:
            items = [batch_parts(data[int(i)], where=f"sample {int(i)}", **keys) for i in positions]
            x = torch.stack([a for a, _ in items]) if items else torch.empty(0)
            y = torch.stack([b.reshape(()) for _, b in items]) if items else torch.empty(0)  # type: ignore[union-attr]
    else:
        if isinstance(data, DataLoader) and mapping is not None and not _in_order(data):
            reordered = True  # positions in the stream are not positions in the dataset
        x, y, positions, total = _stream_pick(data, n, seed, _stream_total(data), keys)
    if total == 0 or x.numel() == 0:
        raise EvaluationError("the data is empty. Hint: pass the test split of a data source")
    x = x.float()
    y = y.long().reshape(-1)
    if x.shape[0] != y.shape[0]:
        raise EvaluationError(f"{x.shape[0]} inputs but {y.shape[0]} labels. Hint: pass (x, y) pairs")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0 or not math.isfinite(lo + hi):
        raise EvaluationError(
            f"inputs have values in [{lo:g}, {hi:g}], expected [0, 1]. Hint: attacks work in pixel space; "
            "let the model normalise its inputs (RobustBench convention)"
        )
    if reordered:
        indices = np.empty(0, dtype=np.int64)  # unknown: not recorded, and not compared with tuning's
    elif mapping is not None and len(mapping) == total:
        indices = mapping[positions]
    else:
        indices = positions
    return Samples(
        x, y, positions, np.asarray(indices, dtype=np.int64), split, source, total, data_classes(data)
    )


UNKNOWN_INDICES = (
    "graphsparse: the loader's sampler reorders the data, so which source samples were read is unknown: no "
    "indices are recorded and the overlap with the samples used for tuning is not checked. Hint: pass the "
    "dataset, or a loader without shuffling"
)


def _in_order(loader: DataLoader) -> bool:
    """The loader reads its dataset in order (position i of the stream is sample i of the dataset)."""
    from torch.utils.data import BatchSampler, SequentialSampler

    if loader.batch_sampler is None:
        return isinstance(loader.sampler, SequentialSampler)
    return type(loader.batch_sampler) is BatchSampler and isinstance(loader.batch_sampler.sampler, SequentialSampler)


def _stream_total(data: Any) -> int | None:
    """How many samples iterating ``data`` gives, when that is known without reading it."""
    from torch.utils.data import BatchSampler

    if isinstance(data, DataLoader) and _is_map_style(data.dataset):
        try:
            if data.batch_sampler is None:
                return len(data.sampler)  # type: ignore[arg-type]
            if type(data.batch_sampler) is BatchSampler:
                if data.drop_last:
                    return len(data) * int(data.batch_size or 1)
                return len(data.sampler)  # type: ignore[arg-type]
        except TypeError:
            return None
    return None


def _stream_pick(
    data: Iterable[Any], n: int | None, seed: int, total: int | None, keys: dict[str, str | None]
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, int]:
    """``(x, y, positions, total)`` of the picked samples of an iterable of batches (or samples), read once."""
    wanted = None if total is None else _positions(total, n, seed)
    rng = np.random.default_rng(seed)
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    pos: list[np.ndarray] = []
    prio: list[np.ndarray] = []
    seen = 0
    for i, batch in enumerate(data):
        a, b = batch_parts(batch, where=f"batch {i}", **keys)
        assert b is not None  # labels=True
        if b.dim() == 0:  # one sample, not a batch
            a, b = a.unsqueeze(0), b.reshape(1)
        b = b.reshape(-1)
        count = int(a.shape[0])
        here = np.arange(seen, seen + count, dtype=np.int64)
        seen += count
        if wanted is not None:
            keep = np.isin(here, wanted)
        elif n is not None:
            p = rng.random(count)
            prio.append(p)
            keep = np.ones(count, dtype=bool)
        else:
            keep = np.ones(count, dtype=bool)
        if keep.any():
            index = torch.from_numpy(np.flatnonzero(keep))
            xs.append(a[index].detach().cpu())
            ys.append(b[index].detach().cpu())
            pos.append(here[keep])
        if wanted is None and n is not None and sum(len(q) for q in pos) > 2 * n:  # keep memory at O(n)
            xs, ys, pos, prio = _smallest(xs, ys, pos, prio, n)
        if wanted is not None and (len(wanted) == 0 or seen > int(wanted[-1])):
            break  # past the last picked position: the rest is not read
    if wanted is None and n is not None and pos:
        xs, ys, pos, prio = _smallest(xs, ys, pos, prio, n)
    if not xs:
        return torch.empty(0), torch.empty(0), np.empty(0, dtype=np.int64), seen
    positions = np.concatenate(pos)
    order = torch.from_numpy(np.argsort(positions, kind="stable"))
    return torch.cat(xs)[order], torch.cat(ys)[order], np.sort(positions), seen if wanted is None else total


def _smallest(
    xs: list[torch.Tensor], ys: list[torch.Tensor], pos: list[np.ndarray], prio: list[np.ndarray], n: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[np.ndarray], list[np.ndarray]]:
    """Keep the ``n`` samples of smallest priority (a seeded bottom-n sample of a stream of unknown length)."""
    p = np.concatenate(prio)
    keep = np.sort(np.argsort(p, kind="stable")[:n])
    index = torch.from_numpy(keep)
    return [torch.cat(xs)[index]], [torch.cat(ys)[index]], [np.concatenate(pos)[keep]], [p[keep]]


def _is_map_style(obj: Any) -> bool:
    return isinstance(obj, Dataset) and hasattr(obj, "__len__") and hasattr(obj, "__getitem__")


def _positions(total: int, n: int | None, seed: int) -> np.ndarray:
    if n is None or n >= total:
        return np.arange(total, dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(total)
    return np.sort(perm[:n]).astype(np.int64)


# -------------------------------------------------------------------------------------------- checks


def check_logits(out: Any, num_classes: int | None, where: str = "the model") -> int:
    """The number of logits in ``out``, a model's output on a batch; refuses anything but one logit per class.

    Raises:
        EvaluationError: ``out`` is not a ``(batch, classes)`` tensor, or its width is not ``num_classes``
            (a model without its classifier head gives features, e.g. timm's ``num_classes=0``).
    """
    hint = (
        "Hint: give a classifier whose last layer has one output per class of the data (a model built with "
        "timm's num_classes=0, or a feature extractor, has no classifier head)"
    )
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EvaluationError(
            f"{where} returns an output of shape {shape}, expected (batch, classes) logits"
            + (f" with {num_classes} classes" if num_classes else "")
            + f". {hint}"
        )
    n = int(out.shape[-1])
    if num_classes is not None and n != num_classes:
        raise EvaluationError(
            f"{where} gives {n} outputs per sample (output shape {tuple(out.shape)}), but the data has "
            f"{num_classes} classes: accuracy needs one logit per class. {hint}, or data of its classes"
        )
    return n


def model_classes(model: nn.Module, s: Samples, device: torch.device) -> int:
    """The number of class logits ``model`` gives, checked against the classes and labels of ``s``."""
    with torch.no_grad():
        out = model(s.x[:1].to(device))
    n = check_logits(out, s.num_classes)
    lo, hi = int(s.y.min()), int(s.y.max())
    if lo < 0 or hi >= n:
        raise EvaluationError(
            f"the labels run from {lo} to {hi}, but the model gives {n} class logits (labels 0 to {n - 1}). "
            "Hint: the data does not belong to this model, or its labels need remapping"
        )
    return n


def check_radius(eps: float, norm: str, s: Samples) -> None:
    """An L2/L1 ball that holds the whole [0, 1] cube of the inputs is no threat model: ε is mistyped."""
    d = int(s.x[0].numel())
    reach = {"L2": math.sqrt(d), "L1": float(d)}.get(norm)
    if reach is not None and eps >= reach:
        raise EvaluationError(
            f"eps = {eps:g} for {norm} reaches every image of {d} values in [0, 1] (the largest {norm} distance "
            f"is {reach:.4g}): ε is in [0, 1] pixel units. Hint: e.g. 0.5 for L2 on CIFAR-10, 3.0 on ImageNet"
        )


def check_positive(name: str, value: int | None, allow_none: bool = True) -> None:
    """Refuse ``value`` unless it is an int >= 1 (or None, when ``allow_none``); the message names ``name``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EvaluationError(f"{name} must be an int >= 1, got {value!r}")
