"""A training run's record and its checkpoint: what :func:`graphsparse.robust.train.train` did (a
:class:`TrainRecord` of settings and one :class:`EpochRecord` per epoch) and the file it resumes from.

Checkpoint (``.safetensors``, written atomically after every epoch): tensors ``model/<state-dict key>`` and
``optimizer/<param index>/<state key>``; text metadata holds the epoch count, the per-epoch records, the
optimizer's param groups and the run's settings (checked on resume).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphsparse._files import atomic_write
from graphsparse.errors import ArtifactError

__all__ = ["EpochRecord", "TrainRecord", "load_checkpoint", "save_checkpoint"]

_FORMAT = "graphsparse.train/1"
_SETTINGS = (
    "epochs",
    "eps",
    "alpha_step",
    "steps",
    "norm",
    "lr",
    "momentum",
    "weight_decay",
    "schedule",
    "eps_warmup_epochs",
    "batch_size",
    "seed",
)


@dataclass(frozen=True)
class EpochRecord:
    """Figures of one epoch, measured on the training batches as they were trained on.

    Attributes:
        epoch: 1-based epoch number.
        loss: mean cross-entropy on the adversarial examples (before the update of each batch).
        clean_acc: accuracy on the clean batches (model in train mode, before the update).
        adv_acc: accuracy on the adversarial examples.
        eps: ε of the last batch of the epoch (smaller than the target during warm-up).
        lr: learning rate of the last batch of the epoch.
        samples: samples seen.
        seconds: wall time of the epoch.
    """

    epoch: int
    loss: float
    clean_acc: float
    adv_acc: float
    eps: float
    lr: float
    samples: int
    seconds: float


@dataclass
class TrainRecord:
    """What :func:`train` did: the settings and one :class:`EpochRecord` per epoch (resumed ones included).

    Attributes:
        settings: the run's settings (``eps``, ``steps``, ``lr``, …) as a JSON-able dict.
        epochs: per-epoch records, in order.
        resumed_from: the epoch the run was resumed from (0 for a fresh run).
        checkpoint: path of the checkpoint file ('' when none was written).
    """

    settings: dict[str, Any]
    epochs: list[EpochRecord] = field(default_factory=list)
    resumed_from: int = 0
    checkpoint: str = ""

    @property
    def last(self) -> EpochRecord | None:
        """The last epoch's record, or None before the first epoch."""
        return self.epochs[-1] if self.epochs else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": dict(self.settings),
            "epochs": [asdict(e) for e in self.epochs],
            "resumed_from": self.resumed_from,
            "checkpoint": self.checkpoint,
        }


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    record: TrainRecord,
) -> None:
    """Write ``model``'s and ``optimizer``'s state after ``epoch`` epochs, with ``record``'s settings and epochs."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            tensors[f"model/{key}"] = value.detach().cpu().contiguous().clone()
    state = optimizer.state_dict()
    for index, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value.detach().cpu().contiguous().clone()
    metadata = {
        "format": _FORMAT,
        "epoch": str(epoch),
        "settings": json.dumps(record.settings, sort_keys=True),
        "param_groups": json.dumps(state["param_groups"]),
        "epochs": json.dumps([asdict(e) for e in record.epochs]),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, settings: dict[str, Any]
) -> tuple[int, list[EpochRecord]]:
    """Load a checkpoint into ``model`` and ``optimizer``: the epochs done and their records.

    Raises:
        ArtifactError: the file is unreadable or damaged, was made with other ``settings``, or does not fit the
            model or the optimizer's parameters.
    """
    from safetensors import safe_open

    where = f"training checkpoint {str(path)!r}"
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupt files
        raise ArtifactError(f"{where} could not be read ({type(e).__name__}: {e})") from e
    if metadata.get("format") != _FORMAT:
        raise ArtifactError(
            f"{where} is not a graphsparse training checkpoint (format {metadata.get('format')!r}). "
            "Hint: pass resume=False to start afresh"
        )
    saved, epoch, epochs, param_groups = _checkpoint_metadata(metadata, where)
    changed = [k for k in _SETTINGS if saved.get(k) != settings.get(k)]
    if changed:
        diffs = ", ".join(f"{k}={saved.get(k)!r} (now {settings.get(k)!r})" for k in changed)
        raise ArtifactError(
            f"{where} was made with other settings: {diffs}. "
            "Hint: resume with the same settings, or pass resume=False to start afresh"
        )
    model_state = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{where} does not match the model: {e}") from e
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            index, _, name = key[len("optimizer/") :].partition("/")
            if not index.isdigit() or not name:
                raise ArtifactError(f"{where} has an unexpected tensor {key!r}. Hint: the file is damaged")
            opt_state.setdefault(int(index), {})[name] = value
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": param_groups})
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{where}: the optimizer state does not fit the parameters: {e}") from e
    return epoch, epochs


def _checkpoint_metadata(
    metadata: dict[str, str], where: str
) -> tuple[dict[str, Any], int, list[EpochRecord], list[dict[str, Any]]]:
    """The settings, epoch, epoch records and optimizer groups a checkpoint stores, each checked."""
    field = "settings"
    try:
        saved = json.loads(metadata[field])
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
        field = "epoch"
        epoch = int(metadata[field])
        field = "epochs"
        epochs = [EpochRecord(**e) for e in json.loads(metadata[field])]
        field = "param_groups"
        groups = json.loads(metadata[field])
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise ValueError("not a list of JSON objects")
    except (KeyError, ValueError, TypeError) as e:
        problem = "is missing" if isinstance(e, KeyError) else f"is invalid ({type(e).__name__}: {e})"
        raise ArtifactError(
            f"{where}: metadata field {field!r} {problem}. Hint: the file is damaged; "
            "pass resume=False to start afresh"
        ) from e
    return saved, epoch, epochs, groups
