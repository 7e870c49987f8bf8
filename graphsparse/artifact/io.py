"""Artifacts: one ``.safetensors`` file per rewritten model, with no pickle anywhere.

Tensors: the rewritten model's whole ``state_dict`` (base weights and operator tensors). String metadata:

=====================  ==============================================================================
``format``             ``graphsparse-artifact``
``format_version``     ``1``
``plan``               the applied plan (JSON, :meth:`Plan.to_json`)
``rules``              the rule file text
``recipe``             how to rebuild the base model (JSON, :class:`~graphsparse.sources.recipes.Recipe`)
``input_shape``        the probe input shape used for capture (JSON list)
``records``            calibration / tuning / evaluation records (JSON object)
``versions``           graphsparse, torch, timm, safetensors, python versions (JSON object)
``tensors_sha256``     digest of every tensor's name, dtype, shape and bytes, in key order
``metadata_sha256``    digest of the metadata fields above
=====================  ==============================================================================

The digests catch truncation, bit rot and edits made without graphsparse; they are not a signature.
``load`` rebuilds the base model from the recipe, re-applies the stored plan, checks that every planned
site still exists with the same channels, and loads the tensors strictly.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from graphsparse._files import atomic_write
from graphsparse.artifact.records import mark_stale, stats_digest
from graphsparse.errors import ArtifactError, GraphsparseError
from graphsparse.planning.plan import Plan
from graphsparse.planning.rewrite import RewriteInfo, apply_plan, rewrite_info

__all__ = ["save", "load", "read_metadata", "FORMAT", "FORMAT_VERSION", "atomic_write"]

FORMAT = "graphsparse-artifact"
FORMAT_VERSION = "1"
_DIGESTED = ("format", "format_version", "plan", "rules", "recipe", "input_shape", "records", "versions")


def _versions() -> dict[str, str]:
    import safetensors
    import timm

    from graphsparse import __version__

    return {
        "graphsparse": __version__,
        "torch": torch.__version__.split("+")[0],
        "timm": timm.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _metadata_digest(meta: dict[str, str]) -> str:
    h = hashlib.sha256()
    for key in _DIGESTED:
        h.update(f"{key}={meta.get(key, '')}\n".encode())
    return h.hexdigest()


def save(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write a rewritten model (weights, operator tensors, plan, recipe, records) to one safetensors file.

    Args:
        model: a model returned by :func:`graphsparse.rewrite` or :func:`load`.
        path: destination ``.safetensors`` path; written atomically.

    Returns:
        The path written.

    Warns:
        UserWarning: ``path`` does not end in ``.safetensors`` (``model.pt`` would promise a torch pickle, which
            ``torch.load`` then fails to read); the file is written all the same.
    """
    info = rewrite_info(model)
    if not str(path).lower().endswith(".safetensors") and not Path(path).is_dir():  # a directory: atomic_write says
        warnings.warn(
            f"{path}: graphsparse artifacts are safetensors files (no pickle); this name promises another format "
            f"and torch.load cannot read it. Hint: name it {Path(path).with_suffix('.safetensors').name}; load it "
            "with graphsparse.load.",
            UserWarning,
            stacklevel=2,
        )
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "plan": info.plan.to_json(),
        "rules": info.plan.text,
        "recipe": info.recipe,
        "input_shape": json.dumps(list(info.input_shape)),
        "records": json.dumps(info.records, sort_keys=True, default=str),
        "versions": json.dumps(_versions(), sort_keys=True),
    }
    meta["tensors_sha256"] = _tensors_digest(tensors)
    meta["metadata_sha256"] = _metadata_digest(meta)
    data = _canonical_safetensors(tensors, meta)
    return atomic_write(path, data)


def _canonical_safetensors(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    """safetensors bytes with a sorted JSON header, so equal inputs give byte-identical files.

    (safetensors writes its metadata map in hash order, which differs from run to run.)
    """
    raw = safetensors_bytes(tensors, metadata=meta)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__", {}).items()))}
    ordered.update(sorted(header.items()))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data section to 8 bytes
    return len(text).to_bytes(8, "little") + text + raw[8 + n :]


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of an artifact, validated (format, version, metadata digest)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such artifact file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: not a readable safetensors file ({exc}); it may be truncated") from exc
    if meta.get("format") != FORMAT:
        raise ArtifactError(
            f"{path}: not a graphsparse artifact (metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r})"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {meta.get('format_version')!r} is not supported (this graphsparse "
            f"reads {FORMAT_VERSION!r}). Hint: use the graphsparse version listed in its 'versions' metadata."
        )
    if meta.get("metadata_sha256") != _metadata_digest(meta):
        raise ArtifactError(
            f"{path}: the metadata does not match its digest (metadata_sha256): the plan, recipe or records were "
            "modified after saving. Refusing to load."
        )
    records = _json_field(meta, "records", path)
    if isinstance(records, dict) and mark_stale(records):  # flagged against the calibration record's digest
        meta["records"] = json.dumps(records, sort_keys=True, default=str)
    return meta


def _json_field(meta: dict[str, str], key: str, path: Path) -> Any:
    try:
        return json.loads(meta[key]) if meta.get(key) else None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: metadata field {key!r} is not valid JSON ({exc})") from exc


# The probe that load() builds from ``input_shape`` runs through the model once, and the digest is not a
# signature: without a cap a crafted file could ask for any allocation. 2**26 elements still admits a
# 1×3×4096×4096 probe.
MAX_PROBE_ELEMENTS = 2**26


def _probe_shape(meta: dict[str, str], path: Path) -> tuple[int, ...]:
    """The stored probe shape, checked: a list of positive ints (empty: unknown) of bounded size."""
    value = _json_field(meta, "input_shape", path)
    if value is None:
        return ()
    ints = isinstance(value, list) and all(type(v) is int and v > 0 for v in value)
    if not ints or len(value) > 8:
        raise ArtifactError(
            f"{path}: metadata field 'input_shape' must be a list of at most 8 positive integers such as "
            f"[1, 3, 224, 224], not {meta['input_shape'][:80]!r}: the file was not written by graphsparse or "
            "was edited since. Hint: make the artifact again with `graphsparse rewrite`."
        )
    if math.prod(value) > MAX_PROBE_ELEMENTS:
        raise ArtifactError(
            f"{path}: metadata field 'input_shape' {value} asks for a probe of {math.prod(value):,} elements, "
            f"more than the {MAX_PROBE_ELEMENTS:,} a capture probe needs. Refusing to build it."
        )
    return tuple(value)


def _saved_dtype(base: nn.Module, tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype the artifact stores the base model's weights in (float32 if it has none)."""
    for key, value in base.state_dict().items():
        saved = tensors.get(key)
        if value.is_floating_point() and saved is not None and saved.is_floating_point():
            return saved.dtype
    return torch.float32


def load(
    path: str | os.PathLike[str],
    *,
    allow_modules: Sequence[str] = (),
    base: nn.Module | None = None,
    fuse: bool = True,
) -> nn.Module:
    """Rebuild a rewritten model from an artifact written by :func:`save`.

    Args:
        path: the ``.safetensors`` artifact.
        allow_modules: packages whose classes may be imported when the recipe refers to a pickled file.
        base: the base model to rewrite instead of rebuilding it from the recipe (e.g. a model built in a
            notebook); its weights are replaced by the artifact's.
        fuse: return the fused form, as :func:`graphsparse.rewrite` does (the same outputs, gradients and
            ``state_dict``, faster); ``False`` for one graph node per activation.

    Raises:
        ArtifactError: the file is not a valid, untampered artifact, or it does not match the rebuilt model.
    """
    from graphsparse.graph.capture import capture
    from graphsparse.sources.load import build_from_recipe
    from graphsparse.sources.recipes import Recipe

    path = Path(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: tensor data cannot be read ({exc}); the file may be truncated") from exc
    if _tensors_digest(tensors) != meta.get("tensors_sha256"):
        raise ArtifactError(
            f"{path}: tensor data does not match its digest (tensors_sha256): the weights or operator tensors "
            "were modified or corrupted after saving. Refusing to load."
        )
    try:
        plan = Plan.from_json(meta["plan"])
    except (GraphsparseError, KeyError) as exc:
        raise ArtifactError(f"{path}: metadata field 'plan' is invalid: {exc}") from exc
    input_shape = _probe_shape(meta, path)
    records = _json_field(meta, "records", path) or {}
    if not isinstance(records, dict):
        raise ArtifactError(
            f"{path}: metadata field 'records' must be a JSON object (calibration, tuning, evaluation), "
            f"not {type(records).__name__}"
        )
    if base is None:
        if not meta.get("recipe"):
            raise ArtifactError(
                f"{path}: the artifact has no base-model recipe. Hint: pass the base model: load(path, base=model)."
            )
        try:
            recipe = Recipe.from_json(meta["recipe"])
            base = build_from_recipe(recipe, allow_modules=allow_modules)
        except GraphsparseError as exc:
            raise ArtifactError(f"{path}: cannot rebuild the base model from its recipe: {exc}") from exc
    dtype = _saved_dtype(base, tensors)
    if any(t.is_floating_point() and t.dtype != dtype for t in base.state_dict().values()):
        base = copy.deepcopy(base).to(dtype)  # a half-precision artifact rebuilds a half model; `base` stays
    example = torch.zeros(*(input_shape or (1, 3, 224, 224)), dtype=dtype)
    cap = capture(base, example, copy=True)
    try:
        model = apply_plan(cap, plan, input_shape=input_shape, recipe=meta.get("recipe", ""))
    except GraphsparseError as exc:
        raise ArtifactError(f"{path}: {exc}") from exc
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:4]}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:4]}")
        if wrong:
            parts.append(f"shape mismatch for {wrong[:4]}")
        raise ArtifactError(f"{path}: the artifact does not match the rebuilt model: " + "; ".join(parts))
    model.load_state_dict(tensors, strict=True)
    info: RewriteInfo = rewrite_info(model)
    info.records = dict(records)
    mark_stale(info.records, stats_digest(model))  # records made with other statistics are flagged
    model.eval()
    if fuse:
        from graphsparse.planning.fuse import fuse_activations

        fuse_activations(model)
    return model
