"""Adversarial training: PGD (Madry et al.) training or fine-tuning, deterministic, checkpointed, resumable.

``train(model, data, epochs=…)`` minimises the cross-entropy of PGD adversarial examples (random start,
inputs kept in ``[0, 1]``) with SGD + momentum and a cosine or step learning-rate schedule. It is used to
fine-tune SPARTA-rewritten models (``params=sparta_parameters(model)``) and to train the demo model.

Determinism: every epoch draws its batch order and PGD random starts from generators seeded by
``(seed, epoch)``, and the global RNG (dropout, drop-path) is re-seeded per epoch inside
``torch.random.fork_rng`` (the caller's RNG state is untouched). On CPU the same seed gives bit-identical
parameters, and a run resumed from a checkpoint ends with exactly the parameters of an uninterrupted run.

The attack is :func:`graphsparse.robust.pgd.pgd_attack`; the run's record and its checkpoint file are in
:mod:`graphsparse.robust.train_state`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from graphsparse.errors import closest
from graphsparse.robust.pgd import check_norm, pgd_attack
from graphsparse.robust.train_state import EpochRecord, TrainRecord, load_checkpoint, save_checkpoint

__all__ = ["SCHEDULES", "TrainProgress", "train"]

SCHEDULES = ("cosine", "step", "constant")
"""Learning-rate schedules of :func:`train`."""


@dataclass(frozen=True)
class TrainProgress:
    """What the ``progress`` callback of :func:`train` receives after every batch.

    Attributes:
        epoch: 1-based epoch number; ``epochs``: total epochs of the run.
        batch: batches done in this epoch; ``batches``: batches per epoch.
        loss, clean_acc, adv_acc: running means over this epoch so far.
        eps, lr: the values used for the batch.
        end_of_epoch: True for the call after an epoch's last batch (its figures are the epoch's).
    """

    epoch: int
    epochs: int
    batch: int
    batches: int
    loss: float
    clean_acc: float
    adv_acc: float
    eps: float
    lr: float
    end_of_epoch: bool


# ------------------------------------------------------------------------------------------------ helpers


_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


@contextmanager
def _frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Run in train mode without changing any BatchNorm running statistics (restored on exit)."""
    saved = [
        (m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in model.modules()
        if isinstance(m, _BN_TYPES) and m.track_running_stats and m.running_mean is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, count in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def _lr_at(lr: float, schedule: str, epoch: int, epochs: int, batch: int, batches: int) -> float:
    if schedule == "constant":
        return lr
    if schedule == "step":  # ×0.1 at 50 % and at 75 % of the epochs
        return lr * (0.1 ** ((epoch >= epochs // 2) + (epoch >= (3 * epochs) // 4)))
    t = (epoch * batches + batch) / max(1, epochs * batches)
    return lr * 0.5 * (1.0 + math.cos(math.pi * t))


def _eps_at(eps: float, warmup_epochs: int, epoch: int, batch: int, batches: int) -> float:
    if warmup_epochs <= 0:
        return eps
    done = epoch * batches + batch + 1
    return eps * min(1.0, done / (warmup_epochs * batches))


def _epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + epoch) % (2**63)


def _batches(
    data: Dataset | tuple[torch.Tensor, torch.Tensor], batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches of ``data`` in an order fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    tensors = data if isinstance(data, tuple) else getattr(data, "tensors", None)
    if isinstance(data, tuple) or (tensors is not None and getattr(data, "transform", None) is None):
        x_all, y_all = tensors
        order = torch.randperm(len(y_all), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            yield x_all[idx], y_all[idx]
        return
    order = torch.randperm(len(data), generator=g).tolist()
    yield from DataLoader(data, batch_size=batch_size, sampler=order, num_workers=0)


def _num_samples(data: Dataset | tuple[torch.Tensor, torch.Tensor]) -> int:
    if isinstance(data, tuple):
        x, y = data
        if len(x) != len(y):
            raise ValueError(f"data has {len(x)} inputs but {len(y)} labels")
        return len(y)
    return len(data)


def _param_list(model: nn.Module, params: Iterable[nn.Parameter] | None) -> list[nn.Parameter]:
    if params is None:
        out = [p for p in model.parameters() if p.requires_grad]
    else:
        owned = {id(p) for p in model.parameters()}
        out, seen = [], set()
        for p in params:
            if id(p) not in owned:
                raise ValueError("params contains a tensor that is not a parameter of the model")
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    if not out:
        raise ValueError("there are no parameters to train. Hint: pass params=… or unfreeze some (requires_grad=True)")
    return out


def _frozen_bn_modules(model: nn.Module, trained: list[nn.Parameter], explicit: bool) -> list[nn.Module]:
    """BatchNorm modules that stay in eval mode: those with affine parameters of which none is trained,
    and, when the trained parameters were chosen explicitly, those without affine parameters."""
    ids = {id(p) for p in trained}
    frozen = []
    for m in model.modules():
        if isinstance(m, _BN_TYPES):
            own = list(m.parameters(recurse=False))
            if (own and not any(id(p) in ids for p in own)) or (not own and explicit):
                frozen.append(m)
    return frozen


# --------------------------------------------------------------------------------------------------- train


def _validate(
    epochs: int,
    eps: float,
    steps: int,
    alpha_step: float | None,
    norm: str,
    schedule: str,
    *,
    batch_size: int,
    warmup: int,
) -> None:
    ints = {"epochs": epochs, "steps": steps, "batch_size": batch_size, "eps_warmup_epochs": warmup}
    for name, value in ints.items():
        low = 1 if name in ("epochs", "batch_size") else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if alpha_step is not None and not (math.isfinite(alpha_step) and alpha_step > 0):
        raise ValueError(f"alpha_step must be a finite number > 0 or None, got {alpha_step!r}")
    check_norm(norm)
    if schedule not in SCHEDULES:
        valid = ", ".join(SCHEDULES)
        raise ValueError(f"unknown schedule {schedule!r}{closest(schedule, SCHEDULES)}; valid: {valid}")


def train(
    model: nn.Module,
    data: Dataset | tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    eps: float = 0.3,
    alpha_step: float | None = None,
    steps: int = 10,
    norm: str = "Linf",
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    eps_warmup_epochs: int = 0,
    batch_size: int = 128,
    seed: int = 0,
    params: Iterable[nn.Parameter] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: Callable[[TrainProgress], None] | None = None,
    device: str | torch.device | None = None,
) -> TrainRecord:
    """PGD adversarial training (Madry et al.) of ``model`` on ``data``, in place.

    Each batch: PGD from a random start (model in train mode, BatchNorm running statistics untouched by
    the attack), then one SGD step on the cross-entropy of the adversarial examples.

    Args:
        model: the classifier (logits out; inputs in ``[0, 1]``). Trained in place; left in eval mode.
        data: a dataset of ``(x, y)`` pairs (e.g. ``load_dataset("mnist5k", split="train")``) or a tuple
            of tensors ``(x, y)``. Shuffled every epoch in an order fixed by ``(seed, epoch)``.
        epochs: total number of epochs (a resumed run counts the checkpoint's epochs).
        eps: radius of the threat ball (0.3 is the usual Linf radius for MNIST; 8/255 for CIFAR-10).
            ``0`` is standard (non-adversarial) training.
        alpha_step: PGD step size; default ``2.5 * eps / steps``. During ε warm-up it shrinks with ε.
        steps: PGD steps per batch.
        norm: ``"Linf"`` or ``"L2"``.
        lr, momentum, weight_decay: SGD settings.
        schedule: ``"cosine"`` (per batch, from ``lr`` to 0), ``"step"`` (×0.1 at 50 % and 75 % of the
            epochs) or ``"constant"``.
        eps_warmup_epochs: ε grows linearly (per batch) from ~0 to ``eps`` over this many epochs.
        batch_size: training batch size.
        seed: seed of the batch order, the PGD random starts and the global RNG (dropout) per epoch.
        params: the parameters to optimise (e.g. ``sparta_parameters(model)``); default every parameter
            with ``requires_grad``. BatchNorm layers whose affine parameters are all left out stay in
            eval mode, their running statistics untouched (affine-free ones too when ``params`` is given),
            so fine-tuning SPARTA after :func:`~graphsparse.ops.sparta.freeze_except_sparta` changes
            nothing else.
        checkpoint: path of a ``.safetensors`` file written atomically after every epoch.
        resume: continue from ``checkpoint`` when that file exists (its settings must match); a missing
            file starts a fresh run.
        progress: called with a :class:`TrainProgress` after every batch.
        device: where to train; the model is moved there. Default: the device of the model's parameters.

    Returns:
        A :class:`TrainRecord` with one :class:`EpochRecord` per epoch (those of a resumed checkpoint
        included).

    Raises:
        ValueError: an invalid setting, or no parameter to train.
        ArtifactError: the checkpoint to resume from is unreadable or was made with other settings.
    """
    _validate(epochs, eps, steps, alpha_step, norm, schedule, batch_size=batch_size, warmup=eps_warmup_epochs)
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")
    n = _num_samples(data)
    if n == 0:
        raise ValueError("data is empty. Hint: check the dataset split")
    step_size = float(alpha_step) if alpha_step is not None else 2.5 * eps / max(1, steps)
    settings: dict[str, Any] = {
        "epochs": epochs,
        "eps": float(eps),
        "alpha_step": step_size,
        "steps": steps,
        "norm": norm,
        "lr": float(lr),
        "momentum": float(momentum),
        "weight_decay": float(weight_decay),
        "schedule": schedule,
        "eps_warmup_epochs": eps_warmup_epochs,
        "batch_size": batch_size,
        "seed": int(seed),
    }
    if device is not None:
        model.to(device)
    first = next(model.parameters(), None)
    dev = torch.device(device) if device is not None else (first.device if first is not None else None)
    trained = _param_list(model, params)
    optimizer = torch.optim.SGD(trained, lr=lr, momentum=momentum, weight_decay=weight_decay)
    record = TrainRecord(settings=settings, checkpoint=str(checkpoint) if checkpoint is not None else "")
    ckpt = Path(checkpoint) if checkpoint is not None else None
    start = 0
    if resume and ckpt is not None and ckpt.is_file():
        start, record.epochs = load_checkpoint(ckpt, model, optimizer, settings)
        record.resumed_from = start
    frozen_bn = _frozen_bn_modules(model, trained, explicit=params is not None)
    batches = math.ceil(n / batch_size)
    devices = [dev] if dev is not None and dev.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            for epoch in range(start, epochs):
                rec = _train_epoch(model, data, optimizer, frozen_bn, settings, epoch, batches, dev, progress)
                record.epochs.append(rec)
                if ckpt is not None:
                    save_checkpoint(ckpt, model, optimizer, epoch + 1, record)
    finally:
        model.eval()
    return record


def _train_epoch(
    model: nn.Module,
    data: Dataset | tuple[torch.Tensor, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    frozen_bn: list[nn.Module],
    s: dict[str, Any],
    epoch: int,
    batches: int,
    device: torch.device | None,
    progress: Callable[[TrainProgress], None] | None,
) -> EpochRecord:
    seed = _epoch_seed(s["seed"], epoch)
    torch.manual_seed(seed)  # dropout / drop-path; inside fork_rng
    rng_device = device if device is not None and device.type != "cpu" else torch.device("cpu")
    rng = torch.Generator(device=rng_device).manual_seed(seed)
    model.train()
    for m in frozen_bn:
        m.eval()
    t0 = time.perf_counter()
    loss_sum = clean_ok = adv_ok = seen = 0.0
    eps_b = lr_b = 0.0
    for b, (x, y) in enumerate(_batches(data, s["batch_size"], seed)):
        if device is not None:
            x, y = x.to(device), y.to(device)
        eps_b = _eps_at(s["eps"], s["eps_warmup_epochs"], epoch, b, batches)
        lr_b = _lr_at(s["lr"], s["schedule"], epoch, s["epochs"], b, batches)
        for group in optimizer.param_groups:
            group["lr"] = lr_b
        step_b = s["alpha_step"] * (eps_b / s["eps"]) if s["eps"] > 0 else 0.0
        with _frozen_bn_stats(model):
            x_adv = pgd_attack(model, x, y, eps_b, step_b, s["steps"], s["norm"], rng)
            with torch.no_grad():
                clean_ok += (model(x).argmax(1) == y).sum().item()
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        k = len(y)
        seen += k
        loss_sum += loss.item() * k
        adv_ok += (logits.argmax(1) == y).sum().item()
        if progress is not None:
            progress(
                TrainProgress(
                    epoch=epoch + 1,
                    epochs=s["epochs"],
                    batch=b + 1,
                    batches=batches,
                    loss=loss_sum / seen,
                    clean_acc=clean_ok / seen,
                    adv_acc=adv_ok / seen,
                    eps=eps_b,
                    lr=lr_b,
                    end_of_epoch=b + 1 == batches,
                )
            )
    return EpochRecord(
        epoch=epoch + 1,
        loss=loss_sum / seen,
        clean_acc=clean_ok / seen,
        adv_acc=adv_ok / seen,
        eps=eps_b,
        lr=lr_b,
        samples=int(seen),
        seconds=time.perf_counter() - t0,
    )
