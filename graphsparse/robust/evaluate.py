"""Honest robustness evaluation: base model, exact gradient and straight-through (BPDA) side by side.

``evaluate(model, data)`` measures clean accuracy and the robust accuracy under each requested attack,
run through the real AutoAttack code (PyPI ``pyautoattack``), for three versions of the same model:

- ``base``: every MeanSparse α set to 0, which makes the operators exact identities, so this *is* the
  original model (α is restored afterwards);
- ``exact``: the rewritten model attacked with its true gradient (zero inside every blocked band);
- ``bpda``: the rewritten model attacked with an identity gradient through every MeanSparse
  (:func:`graphsparse.ops.straight_through`); the forward pass, and so every prediction, is unchanged.

MeanSparse has a zero gradient inside its band, so a gain of ``exact`` over ``base`` may only mean that
the attack lost its gradient. The report's :attr:`EvalReport.verdict` says plainly whether the gain holds
under BPDA or vanishes (gradient masking). AutoAttack's own check warnings (zero gradients, randomised
or dynamic defence, probabilities instead of logits, ...) are captured from its logger and from
``warnings`` and listed in :attr:`EvalReport.warnings`, together with graphsparse's own check: the share
of samples whose input gradient of the cross-entropy loss is exactly zero (AutoAttack only checks this
for its DLR losses).

Attack names (``attacks=``): each entry is one evaluation.

- ``apgd-ce``, ``apgd-t``, ``apgd-dlr``, ``fab``, ``fab-t``, ``square``: that AutoAttack component alone
  (``version='custom'``), with the parameters of AutoAttack's ``standard`` version (1 restart, up to 9
  target classes);
- ``autoattack`` (alias ``standard``): the standard AutoAttack cascade
  (APGD-CE, APGD-T, FAB-T, Square); robust accuracy is the worst case over the four;
- a custom cascade: a list of component names, or the names joined by ``+`` (``"apgd-ce+apgd-t"``).

Accuracies are percentages (0–100) of the ``n`` evaluation samples.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from graphsparse.artifact.records import stats_digest, store_record, utc_now  # store_record's old home: importable here
from graphsparse.data import batch_parts
from graphsparse.errors import GraphsparseError, PlanError, closest
from graphsparse.model_output import logits_output
from graphsparse.ops import MeanSparse, operators, set_alpha, straight_through
from graphsparse.ops.state import alphas_kept, eval_mode, model_device
from graphsparse.robust.eval_report import EvalReport, VariantResult, _pct, _verdict
from graphsparse.robust.per_sample import PerSample, lead_sentence

__all__ = [
    "ATTACKS",
    "VARIANTS",
    "EvaluationError",
    "EvalReport",
    "VariantResult",
    "evaluate",
    "attack_key",
]

ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
"""AutoAttack components that can be named alone or in a custom cascade."""

_STANDARD_NAMES = ("autoattack", "standard", "aa")

VARIANTS = ("base", "exact", "bpda")
"""The three versions of a model every robust number is measured for."""

_NORMS = {"linf": "Linf", "inf": "Linf", "l_inf": "Linf", "l2": "L2", "l1": "L1"}

_AA_LOGGER = "auto-attack"


class EvaluationError(GraphsparseError):
    """An evaluation or tuning request is invalid (unknown attack or norm, bad ε or sample count)."""


# ------------------------------------------------------------------------------------------- options


def attack_key(attack: str | Sequence[str]) -> str:
    """The canonical name of an attack entry: ``apgd-ce``, ``autoattack`` or ``apgd-ce+apgd-t``.

    Raises:
        EvaluationError: an unknown attack name (the message names the closest valid one).
    """
    parts = _attack_parts(attack)
    return "autoattack" if parts is None else "+".join(parts)


def _attack_parts(attack: str | Sequence[str]) -> list[str] | None:
    """Component names of an attack entry; ``None`` for the standard AutoAttack."""
    if isinstance(attack, str):
        name = attack.strip().lower()
        if name in _STANDARD_NAMES:
            return None
        parts = [p.strip() for p in name.split("+")]
    else:
        parts = [str(p).strip().lower() for p in attack]
    if not parts or any(not p for p in parts):
        raise EvaluationError(f"empty attack name in {attack!r}. Hint: use one of {', '.join(ATTACKS)} or 'autoattack'")
    for p in parts:
        if p not in ATTACKS:
            raise EvaluationError(
                f"unknown attack {p!r}{closest(p, ATTACKS + _STANDARD_NAMES)}. "
                f"Hint: use one of {', '.join(ATTACKS)}, 'autoattack', or a list of components"
            )
    if len(set(parts)) != len(parts):
        raise EvaluationError(f"attack {attack!r} names a component twice. Hint: name each one once")
    return parts


def _check_norm(norm: str) -> str:
    canonical = _NORMS.get(str(norm).strip().lower())
    if canonical is None:
        raise EvaluationError(f"unknown norm {norm!r}{closest(str(norm), ('Linf', 'L2', 'L1'))}. Hint: use Linf or L2")
    return canonical


def _check_eps(eps: float, norm: str = "Linf") -> float:
    try:
        value = float(eps)
    except (TypeError, ValueError) as e:
        raise EvaluationError(f"eps must be a number, got {eps!r}") from e
    if not (math.isfinite(value) and value > 0):
        raise EvaluationError(f"eps must be a finite number > 0, got {eps!r}. Hint: e.g. 8/255 for Linf")
    if norm == "Linf" and value >= 1:
        raise EvaluationError(
            f"eps = {eps!r} for Linf covers the whole [0, 1] pixel range: ε is in [0, 1] pixel units. "
            f"Hint: {value:g}/255 = {value / 255:.4f}"
        )
    return value


def check_threat(eps: float, norm: str) -> tuple[float, str]:
    """``(eps, norm)`` checked and canonical (``Linf``/``L2``/``L1``), before anything is loaded.

    Raises:
        EvaluationError: an unknown norm, ε not a finite number > 0, or an L∞ ε of 1 or more (ε is in ``[0, 1]``
            pixel units: 8/255, not 8).
    """
    canonical = _check_norm(norm)
    return _check_eps(eps, canonical), canonical


def _check_radius(eps: float, norm: str, s: Samples) -> None:
    """An L2/L1 ball that holds the whole [0, 1] cube of the inputs is no threat model: ε is mistyped."""
    d = int(s.x[0].numel())
    reach = {"L2": math.sqrt(d), "L1": float(d)}.get(norm)
    if reach is not None and eps >= reach:
        raise EvaluationError(
            f"eps = {eps:g} for {norm} reaches every image of {d} values in [0, 1] (the largest {norm} distance "
            f"is {reach:.4g}): ε is in [0, 1] pixel units. Hint: e.g. 0.5 for L2 on CIFAR-10, 3.0 on ImageNet"
        )


def _check_positive(name: str, value: int | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EvaluationError(f"{name} must be an int >= 1, got {value!r}")


# ---------------------------------------------------------------------------------------------- data


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
    _check_positive("n", n)
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


# ------------------------------------------------------------------------------------- model helpers


@contextlib.contextmanager
def variant(model: nn.Module, name: str) -> Iterator[None]:
    """Make ``model`` behave as variant ``name`` (``base``, ``exact`` or ``bpda``) inside the block."""
    if name == "base":
        with alphas_kept(model) as ops:
            if ops:
                set_alpha(model, 0.0)
            yield
    elif name == "bpda":
        with straight_through(model):
            yield
    else:
        yield


def _forward_batches(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            out.append(model(x[i : i + batch_size].to(device)).argmax(1).cpu())
    return torch.cat(out)


def correct_clean(model: nn.Module, s: Samples, batch_size: int, device: torch.device) -> int:
    """Number of samples ``model`` classifies correctly."""
    return int((_forward_batches(model, s.x, batch_size, device) == s.y).sum())


def zero_gradient_count(model: nn.Module, s: Samples, batch_size: int, device: torch.device) -> int:
    """Samples whose input gradient of the cross-entropy loss is exactly zero everywhere."""
    count = 0
    for i in range(0, s.x.shape[0], batch_size):
        x = s.x[i : i + batch_size].to(device).requires_grad_(True)
        y = s.y[i : i + batch_size].to(device)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, [x], allow_unused=True)
        if grad is None:
            count += x.shape[0]
        else:
            count += int((grad.reshape(grad.shape[0], -1).abs().sum(1) == 0).sum())
    return count


# ------------------------------------------------------------------------------------------ attacks


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _captured_warnings() -> Iterator[list[str]]:
    """Collect AutoAttack's logger warnings and any ``warnings.warn`` inside the block (not printed)."""
    logger = logging.getLogger(_AA_LOGGER)
    handler = _Capture()
    old_level = logger.level
    messages: list[str] = []
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(f"AutoAttack: {m}" for m in handler.messages)
        for w in caught:
            if w.category is Warning or "pyautoattack" in str(w.filename):
                messages.append(f"AutoAttack: {w.message}")
            else:
                messages.append(f"{w.category.__name__}: {w.message}")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _set_steps(attack: Any, steps: int) -> None:
    """Give an APGD attack ``steps`` iterations, with its step-size schedule recomputed as in its __init__."""
    attack.n_iter = steps
    attack.n_iter_orig = steps
    attack.n_iter_2 = max(int(0.22 * steps), 1)
    attack.n_iter_min = max(int(0.06 * steps), 1)
    attack.size_decr = max(int(0.03 * steps), 1)


def _reset_dynamic_check() -> None:
    """pyautoattack's dynamic-defence check counts calls in a module-global dict that is never reset, so
    one detection would be reported for every later model; start each run from zero."""
    try:
        from pyautoattack import checks
    except ImportError:  # pragma: no cover - evaluate() imports AutoAttack first
        return
    funcs = getattr(checks, "funcs", None)
    if isinstance(funcs, dict):
        for k in funcs:
            funcs[k] = 0


def _import_autoattack() -> Any:
    try:
        from pyautoattack import AutoAttack
    except ImportError as e:
        raise EvaluationError(
            "AutoAttack is not installed (PyPI package 'pyautoattack'). Hint: pip install 'graphsparse[eval]'"
        ) from e
    return AutoAttack


_DLR_ATTACKS = ("apgd-dlr", "apgd-t", "fab-t")


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


def _n_classes(model: nn.Module, s: Samples, device: torch.device) -> int:
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


def _check_classes(entries: Sequence[str | Sequence[str]], n_classes: int) -> None:
    """AutoAttack's DLR losses read the 3rd and 4th largest logits; refuse them below 4 classes."""
    if n_classes >= 4:
        return
    for entry in entries:
        parts = _attack_parts(entry)
        used = [p for p in (parts if parts is not None else ["apgd-t", "fab-t"]) if p in _DLR_ATTACKS]
        if used:
            raise EvaluationError(
                f"attack {attack_key(entry)!r} uses the DLR loss ({', '.join(used)}), which needs at least "
                f"4 classes; the model has {n_classes}. Hint: use apgd-ce"
            )


def run_attack(
    model: nn.Module,
    s: Samples,
    attack: str | Sequence[str],
    *,
    eps: float,
    norm: str,
    batch_size: int,
    seed: int,
    device: torch.device,
    n_classes: int,
    steps: int | None = None,
    check_randomized: bool = True,
) -> tuple[torch.Tensor, list[str]]:
    """Run one attack entry through AutoAttack on ``model`` as it is now.

    Returns:
        ``(robust, messages)``: per sample (bool, CPU), still classified correctly after the attack; the
        warnings AutoAttack (or anything it called) raised, plus graphsparse's checks of its output.

    ``check_randomized=False`` skips AutoAttack's check for a randomised model (two forward passes of the first
    batch, repeated for every chunk otherwise: 11% of an evaluation of the demo model at 10 steps).
    """
    AutoAttack = _import_autoattack()
    parts = _attack_parts(attack)
    with _captured_warnings() as messages:
        if parts is None:
            aa = AutoAttack(model, eps=eps, norm=norm, version="standard", seed=seed, device=device)
        else:
            aa = AutoAttack(model, eps=eps, norm=norm, version="custom", attacks=list(parts), seed=seed, device=device)
            # the parameters AutoAttack's standard version uses for each component
            aa.apgd.n_restarts = 1
            aa.apgd_targeted.n_restarts = 1
            aa.fab.n_restarts = 1
        targets = max(1, min(9, n_classes - 1))
        aa.apgd_targeted.n_target_classes = targets
        aa.fab.n_target_classes = targets
        if steps is not None:
            _set_steps(aa.apgd, steps)
            _set_steps(aa.apgd_targeted, steps)
            aa.fab.n_iter = steps
        if not check_randomized:
            aa.version = "rand"  # after __init__, 'rand' only skips that check (pyautoattack 0.2)
        _reset_dynamic_check()
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # AutoAttack reseeds the global generator
            x_adv, y_adv = aa.run_standard_evaluation(s.x, s.y, batch_size=batch_size)
    robust = y_adv.cpu() == s.y
    count = int(robust.sum())
    delta = (x_adv.cpu() - s.x).reshape(s.x.shape[0], -1)
    size = {"Linf": delta.abs().amax(1), "L2": delta.norm(dim=1), "L1": delta.abs().sum(1)}[norm]
    if bool((size > eps * (1 + 1e-4) + 1e-6).any()) or float(x_adv.min()) < 0 or float(x_adv.max()) > 1:
        messages.append(
            f"graphsparse: adversarial examples leave the {norm} ball of radius {eps:g} or [0, 1] "
            f"(largest perturbation {float(size.max()):.6g})"
        )
    recheck = int((_forward_batches(model, x_adv.cpu(), batch_size, device) == s.y).sum())
    if recheck != count:
        messages.append(
            f"graphsparse: re-evaluating AutoAttack's adversarial examples gives {recheck} robust samples, "
            f"AutoAttack counted {count}"
        )
    return robust, messages


# ----------------------------------------------------------------------------------------- evaluate


def evaluate(
    model: nn.Module,
    data: Any,
    *,
    attacks: Iterable[str | Sequence[str]] = ("apgd-ce",),
    eps: float = 8 / 255,
    norm: str = "Linf",
    n: int | None = None,
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device | None = None,
    base_alpha_zero: bool = True,
    steps: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    input_key: str | None = None,
    label_key: str | None = None,
    cache: Any = None,
    state: str | os.PathLike[str] | None = None,
) -> EvalReport:
    """Clean and robust accuracy of ``model`` as base (α = 0), exact-gradient and BPDA variants.

    The model's α, backward modes, train/eval modes and device are restored on exit, also on error; the
    global torch random state is left as it was. Results are deterministic for a seed. When ``model``
    was made by :func:`graphsparse.rewrite`, the report is also stored as
    ``rewrite_info(model).records["evaluation"]``.

    Args:
        model: a rewritten model (MeanSparse operators inside) taking ``[0, 1]`` pixels.
        data: the **test** split: a dataset of ``(x, y)``, a DataLoader (read as given, sampler and
            ``collate_fn`` included), an ``(x, y)`` pair of tensors or an iterable of ``(x, y)`` batches;
            samples and batches may be dicts.
        attacks: attack entries (see the module docstring): ``apgd-ce``, ``apgd-t``, ``autoattack``, a
            list of components for a custom cascade.
        eps: radius of the threat model (in ``[0, 1]`` pixel units: 8/255, not 8; an L∞ ε of 1 or more is
            refused).
        norm: ``Linf`` or ``L2`` (``L1`` is passed through to AutoAttack too).
        n: number of samples, picked deterministically by ``seed``; ``None`` for all.
        batch_size: batch size of the attacks and of the clean pass.
        seed: seed of the sample pick and of AutoAttack's random starts.
        device: where to evaluate; default the model's device.
        base_alpha_zero: measure the base model as the model with every α = 0; ``False`` skips it
            (e.g. for operators that have no identity setting).
        steps: iterations of APGD/APGD-T/FAB; ``None`` keeps AutoAttack's 100 (a smaller number makes a
            weaker, cheaper attack: use it for tests and quick looks only).
        progress: called as ``progress(done, total, label)`` after each attack chunk and attack run, counting
            samples attacked over all variants and attacks (``label``: variant, attack, robust so far).
        input_key, label_key: the keys of inputs and labels when samples or batches are dicts (default the
            first present of ``image``/``pixel_values``/... and ``label``/``labels``/...;
            :func:`graphsparse.data.batch_parts`).
        cache: a file (or :class:`graphsparse.robust.attack_cache.AttackCache`) keeping the original model's
            per-sample results across runs; None keeps them for this call only.
        state: a file where every finished attack chunk is saved; a rerun with the same arguments resumes
            from it (:mod:`graphsparse.eval_state`); removed when the evaluation finishes.

    Attacks run in chunks of ``batch_size`` samples (:mod:`graphsparse.attack_cache`), so a sample's outcome
    does not depend on the other chunks.

    Returns:
        An :class:`EvalReport`.

    Raises:
        EvaluationError: unknown attack or norm, bad ε/n/batch size, empty data, inputs outside
            ``[0, 1]``, pyautoattack not installed.
    """
    eps, norm = check_threat(eps, norm)
    _check_positive("batch_size", batch_size, allow_none=False)
    _check_positive("steps", steps)
    if isinstance(attacks, str):
        attacks = [attacks]
    if not isinstance(attacks, Iterable):
        raise EvaluationError(f"attacks must be a list of attack names, e.g. ['apgd-ce'], not {attacks!r}")
    entries = list(attacks)
    if not entries:
        raise EvaluationError("no attack to run. Hint: attacks=('apgd-ce',) or ('autoattack',)")
    keys = [attack_key(a) for a in entries]
    if len(set(keys)) != len(keys):
        raise EvaluationError(f"attack list {keys} names an attack twice. Hint: name each one once")
    _import_autoattack()
    s = pick_samples(data, n, seed, input_key=input_key, label_key=label_key)
    _check_radius(eps, norm, s)
    n_eval = int(s.x.shape[0])
    ops = operators(model, types=(MeanSparse,))
    alphas = {site: float(op.alpha) for site, op in ops.items()}
    digest = stats_digest(model)
    messages: list[str] = []
    if not ops:
        messages.append("graphsparse: the model has no MeanSparse operators; base, exact and bpda are the same model")
    from graphsparse.graph.capture import operator_types

    others = [site for site in operators(model, types=operator_types()) if site not in ops]
    if others and base_alpha_zero:
        messages.append(
            f"graphsparse: {len(others)} operators are not MeanSparse (e.g. {others[0]!r}) and stay in the 'base' "
            "model, which is therefore not the original model"
        )
    if s.split is not None and s.split != "test":
        messages.append(f"graphsparse: evaluated on the {s.split!r} split; report numbers on the 'test' split")
    if s.split is not None and not len(s.indices):
        messages.append(UNKNOWN_INDICES)
    tuned = _tuned_on(model, s)
    if tuned:
        messages.append(
            f"graphsparse: {tuned} of the {n_eval} evaluated samples of {s.source} were used to tune alpha; these "
            "numbers are optimistic. Hint: evaluate on the 'test' split, with the split seed used for tuning"
        )
    from graphsparse.distributed import rank_and_size
    from graphsparse.robust.attack_cache import (
        AttackCache,
        measure_variant,
        model_digest,
        samples_digest,
    )
    from graphsparse.robust.eval_state import EvalState

    variants = [v for v in VARIANTS if v != "base" or base_alpha_zero]
    total = len(variants) * len(keys) * n_eval  # samples to attack, over every variant and attack
    done = 0
    home = model_device(model)
    target = torch.device(device) if device is not None else home
    sdigest = samples_digest(s)
    store = cache if isinstance(cache, AttackCache) else AttackCache(cache)
    settings = {"eps": eps, "norm": norm, "seed": seed, "steps": steps, "batch_size": batch_size}
    saved = None
    if state is not None:
        rank, world_size = rank_and_size()  # each rank keeps its own chunks
        path = state if world_size == 1 else f"{os.fspath(state)}.rank{rank}-of-{world_size}"
        args = {"model": model_digest(model, without_meansparse=False), "samples": sdigest, "attacks": keys}
        saved = EvalState(path, dict(args, variants=variants, device=target.type, world_size=world_size, **settings))

    def step(label: str, seen: int, robust: int, finished: bool) -> None:
        nonlocal done
        if finished:
            done += n_eval
        if progress is not None:  # the other ranks attack as many samples alongside
            now = done if finished else done + min(n_eval, seen * rank_and_size()[1])
            progress(now, total, f"{label}: {robust} of {seen} robust")

    results: dict[str, VariantResult] = {}
    flags = PerSample()
    try:
        if target != home:
            model.to(target)
        with eval_mode(model), logits_output(model):
            n_classes = _n_classes(model, s, target)
            _check_classes(entries, n_classes)
            for v in variants:
                with variant(model, v):
                    clean, zero, robust, msgs = measure_variant(
                        model, s, v, entries, samples=sdigest, cache=store, state=saved, device=target,
                        n_classes=n_classes, progress=step, **settings,
                    )
                if zero:
                    messages.append(
                        f"{v}: graphsparse: {zero} of {n_eval} samples have an all-zero input gradient of "
                        "the cross-entropy loss; gradient attacks cannot start from them"
                        + (" (gradient masking; compare with bpda)" if v == "exact" and ops else "")
                    )
                r = VariantResult(clean=_pct(int(clean.sum()), n_eval), zero_gradient=_pct(zero, n_eval))
                for key in keys:
                    r.robust[key] = _pct(int(robust[key].sum()), n_eval)
                    messages.extend(_summarise(msgs[key], f"{v}/{key}"))
                results[v] = r
                flags.clean[v], flags.robust[v] = clean, robust
    finally:
        if target != home:
            model.to(home)
    where = s.indices if len(s.indices) == n_eval else s.positions
    worst = {a: _pct(int(flags.worst_case(a).sum()), n_eval) for a in keys}
    masked = {a: flags.masked(a, where) for a in keys}
    parts = {"base": results.get("base"), "exact": results["exact"], "bpda": results["bpda"], "attacks": keys}
    gains, masking, verdict = _verdict(parts, n_eval)
    masking = masking or any(masked.values())
    report = EvalReport(
        base=results.get("base"),
        exact=results["exact"],
        bpda=results["bpda"],
        attacks=keys,
        n=n_eval,
        eps=eps,
        norm=norm,
        seed=seed,
        batch_size=batch_size,
        steps=steps,
        split=s.split,
        source=s.source,
        indices=[int(i) for i in s.indices],
        alphas=alphas,
        warnings=messages,
        gains=gains,
        gradient_masking=masking,
        verdict=f"{lead_sentence(worst, masked, n_eval)} {verdict}",
        date=utc_now(),
        stats_sha256=digest,
        worst_case=worst,
        masked_samples=masked,
        per_sample=flags,
    )
    store_record(model, "evaluation", report.to_dict())
    if saved is not None:
        saved.finish()
    return report


def _tuned_on(model: nn.Module, s: Samples) -> int:
    """How many of ``s`` (by source index) the model's tuning record says were used to choose α."""
    from graphsparse.planning.rewrite import rewrite_info

    try:
        record = rewrite_info(model).records.get("tuning") or {}
    except PlanError:  # not a rewritten model: no record
        return 0
    if not s.source or record.get("source") != s.source:
        return 0
    return len(set(int(i) for i in s.indices) & set(int(i) for i in record.get("indices", ())))


def _summarise(messages: list[str], where: str) -> list[str]:
    """One line per distinct message, in first-seen order, with a repeat count."""
    counts: OrderedDict[str, int] = OrderedDict()
    for m in messages:
        counts[m] = counts.get(m, 0) + 1
    out = []
    for m, c in counts.items():
        out.append(f"{where}: {m}" + (f" (x{c})" if c > 1 else ""))
    return out
