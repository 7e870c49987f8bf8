"""Deployment: a rewritten model as an ONNX file, a ``torch.export`` program (``.pt2``) or traced TorchScript.

The exported file uses standard operators only and runs where graphsparse is not installed; :func:`export`
verifies it in its own runtime against the eager model (:mod:`graphsparse.deploy.verify`) before the file
appears at its destination, and writes the plan and provenance into its metadata
(:mod:`graphsparse.deploy.metadata`).

(The package is ``deploy``, not ``export``: a submodule named like the ``graphsparse.export`` function would
replace that function on the package as soon as it is imported.)
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from graphsparse.deploy.formats import FORMATS, ExportError
from graphsparse.deploy.metadata import provenance, read_export_metadata
from graphsparse.deploy.verify import Verification
from graphsparse.errors import closest
from graphsparse.ops.sparta import Sparta

__all__ = ["FORMATS", "ExportError", "ExportReport", "Verification", "default_path", "export", "read_export_metadata"]

_MAX_DATA_SAMPLES = 10_000


@dataclass
class ExportReport:
    """What :func:`export` wrote and what verifying it found (``verification`` is None with ``verify=False``)."""

    path: Path
    format: str
    dtype: str
    input_shape: tuple[int | None, ...]
    opset: int | None
    bytes: int
    metadata: dict[str, str]
    verification: Verification | None

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("format", "dtype", "opset", "bytes", "metadata")}
        out.update(path=str(self.path), input_shape=list(self.input_shape))
        out["verification"] = None if self.verification is None else self.verification.to_dict()
        return out


def default_path(artifact: str | os.PathLike[str], fmt: str) -> Path:
    """``model.after_addition.safetensors`` -> ``model.after_addition.onnx`` (``.pt2``, ``.torchscript.pt``)."""
    artifact = Path(artifact)
    stem = artifact.name.removesuffix(".safetensors")
    return artifact.with_name(stem + FORMATS[fmt])


def _check_format(fmt: str, opset: int | None, dtype: torch.dtype) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}{closest(fmt, FORMATS)}; formats: {', '.join(FORMATS)}")
    if opset is not None and fmt != "onnx":
        raise ExportError(f"an opset is an ONNX setting; format {fmt!r} has none. Hint: drop --opset")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or not 7 <= opset <= 30):
        raise ExportError(f"opset must be an integer between 7 and 30, got {opset!r}")
    needed = ("onnx", "onnxruntime", "onnxscript") if fmt == "onnx" else ()
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)}. Hint: pip install 'graphsparse[export]'")
    if fmt == "onnx" and dtype == torch.bfloat16:
        raise ExportError(
            "ONNX export of a bfloat16 model is refused: onnxruntime does not load bfloat16 convolutions ('Type "
            "tensor(bfloat16) of operator (Conv) is invalid'), so the file could be neither verified nor run. "
            "Hint: export the float32 or float16 model, or use "
            "--format pt2 or torchscript"
        )


def _check_destination(path: Path) -> None:
    if path.is_dir():
        raise ExportError(f"{path} is a directory; give a file name to write, e.g. {path / 'model.onnx'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {path}: {parent} is not a writable directory. Hint: choose another -o")


def _input_shape(shape: Sequence[int] | None, stored: tuple[int, ...]) -> tuple[int, ...]:
    value = tuple(shape) if shape is not None else tuple(stored or (1, 3, 224, 224))
    if len(value) < 2 or not all(type(v) is int and v > 0 for v in value):
        raise ExportError(f"input_shape must be positive integers such as 1,3,224,224, got {shape!r}")
    if math.prod(value) > 2**28:
        raise ExportError(f"input_shape {value} is too large for a probe ({math.prod(value):,} elements)")
    return value


def _load(source: nn.Module | str | os.PathLike[str], allow_modules: Sequence[str]):
    if isinstance(source, nn.Module):
        return source, None, None
    from graphsparse.artifact.io import load, read_metadata

    path = Path(source)
    meta = read_metadata(path)  # ArtifactError naming the file when it is not an artifact
    return load(path, allow_modules=allow_modules), path, meta


def _dtype_of(model: nn.Module) -> torch.dtype:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point() and t.dim() > 0:
            return t.dtype
    return torch.float32


def _samples(data: Any, n: int, split: str, seed: int, model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """Up to ``n`` inputs from ``data``: a data source name/path, a dataset of (x, y) pairs, or a tensor."""
    if data is None or n == 0:
        return torch.empty(0, *shape[1:])
    if isinstance(data, torch.Tensor):
        xs = data[:n]
    else:
        if isinstance(data, (str, os.PathLike)):
            from graphsparse.data import data_config_transform, load_dataset

            folder = Path(data).is_dir()
            data = load_dataset(str(data), split=split, seed=seed, transform=data_config_transform(model) if folder
                                else None)
        count = min(n, len(data))
        xs = torch.stack([torch.as_tensor(data[i][0]) for i in range(count)]) if count else torch.empty(0)
    if xs.numel() and tuple(xs.shape[1:]) != tuple(shape[1:]):
        raise ExportError(
            f"the data gives inputs of shape {tuple(xs.shape[1:])}, the export is for {tuple(shape[1:])}. "
            "Hint: pass --input-shape to match the data, or data of the model's input size"
        )
    return xs


def _batches(probe: torch.Tensor, xs: torch.Tensor, dynamic: bool) -> tuple[list[torch.Tensor], list[int]]:
    """The probe, then the samples in chunks the file accepts: the export batch size (the last one padded with
    copies of its first row), or with a dynamic batch, chunks of other sizes too."""
    size = probe.shape[0]
    batches, rows = [probe], [size]
    step = size + 1 if dynamic else size  # another batch size than the one traced
    for i in range(0, len(xs), step):
        chunk = xs[i : i + step].to(probe.dtype)
        rows.append(len(chunk))
        if not dynamic and len(chunk) < size:
            chunk = torch.cat([chunk, chunk[:1].expand(size - len(chunk), *chunk.shape[1:])])
        batches.append(chunk.contiguous())
    return batches, rows


def export(
    model_or_artifact_path: nn.Module | str | os.PathLike[str],
    path: str | os.PathLike[str],
    format: str = "onnx",
    *,
    opset: int | None = None,
    dynamic_batch: bool = False,
    input_shape: Sequence[int] | None = None,
    verify: bool = True,
    data: Any = None,
    n: int = 32,
    split: str = "test",
    seed: int = 0,
    allow_modules: Sequence[str] = (),
) -> ExportReport:
    """Export a rewritten model (or an artifact) to a file that runs without graphsparse, and verify it.

    Args:
        model_or_artifact_path: a model from :func:`graphsparse.rewrite` / :func:`graphsparse.load`, or the path
            of an artifact.
        path: the file to write (atomically; with ``verify``, only once the file passed).
        format: ``onnx`` (onnxruntime), ``pt2`` (``torch.export.load``) or ``torchscript`` (traced; ``torch.jit.load``).
        opset: ONNX opset (default: the exporter's; below 18 the legacy TorchScript-based exporter writes it).
        dynamic_batch: any batch size (else the batch size of ``input_shape``).
        input_shape: the input shape, e.g. ``(8, 3, 224, 224)`` (default: the artifact's probe shape).
        verify: run the file in its own runtime against the model (see :mod:`graphsparse.deploy.verify`).
        data: samples to verify on besides a random probe: a data source (``mnist5k``, a file, an image folder),
            a dataset of ``(x, y)`` pairs or a tensor of inputs.
        n: how many samples of ``data`` to use.
        split, seed: the split of a data source (default ``test``).
        allow_modules: packages trusted when the artifact's recipe refers to a pickled model file.

    Returns:
        An :class:`ExportReport`.

    Raises:
        ExportError: unknown format, a combination that cannot work (bfloat16 ONNX), an unwritable path, an export
            that fails, or a file whose outputs differ from the model's beyond what band edges explain.
        ArtifactError: the path is not a valid artifact.
    """
    from graphsparse._files import atomic_write
    from graphsparse.deploy import formats
    from graphsparse.deploy import verify as verifying

    dest = Path(path)
    if isinstance(format, str):
        format = format.lower()
    _check_format(format, opset, torch.float32)  # the dtype check follows once the model is known
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= _MAX_DATA_SAMPLES:
        raise ExportError(f"n must be an integer between 0 and {_MAX_DATA_SAMPLES}, got {n!r}")
    _check_destination(dest)
    model, artifact, artifact_meta = _load(model_or_artifact_path, allow_modules)
    dtype = _dtype_of(model)
    _check_format(format, opset, dtype)
    if dynamic_batch and format != "pt2" and any(isinstance(m, Sparta) for m in model.modules()):
        raise ExportError(
            f"a dynamic batch is refused for {format} with SPARTA: its per-sample kernels run as one convolution "
            "with a group per sample, and the group count is fixed in ONNX and in traced TorchScript. Hint: drop "
            "--dynamic-batch (export the batch size you serve), or use --format pt2"
        )
    from graphsparse.planning.rewrite import rewrite_info

    try:
        stored = tuple(rewrite_info(model).input_shape)
    except Exception:  # noqa: BLE001 - a model not made by rewrite: no stored probe shape
        stored = ()
    shape = _input_shape(input_shape, stored)
    if dynamic_batch and shape[0] == 1:
        shape = (2, *shape[1:])  # a batch of 1 would be specialised
    work = copy.deepcopy(model).cpu().eval()
    probe = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    xs = _samples(data, n, split, seed, model, shape) if verify else torch.empty(0)
    meta = provenance(
        model, artifact=artifact, artifact_meta=artifact_meta,
        input_shape=(None, *shape[1:]) if dynamic_batch else shape, dtype=dtype,
    )
    result: list[Verification] = []

    def write(tmp: str) -> None:
        formats.write(format, work, probe, tmp, opset=opset, dynamic_batch=dynamic_batch, meta=meta)
        if verify:
            batches, rows = _batches(probe, xs, dynamic_batch)
            check = verifying.verify(format, tmp, work, batches, rows, len(xs))
            if not check.passed:
                raise ExportError(check.message + f". Nothing was written to {dest}")
            result.append(check)

    try:
        atomic_write(dest, write)
    except OSError as e:
        raise ExportError(f"cannot write {dest}: {e.strerror or e}. Hint: choose another -o") from e
    return ExportReport(
        path=dest, format=format, dtype=str(dtype).removeprefix("torch."),
        input_shape=(None, *shape[1:]) if dynamic_batch else shape,
        opset=opset if format == "onnx" else None, bytes=dest.stat().st_size, metadata=meta,
        verification=result[0] if result else None,
    )
