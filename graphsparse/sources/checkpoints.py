"""Weights files: read by content (safetensors, or pickles through :mod:`graphsparse.sources.safe_pickle`, which
vets every global a pickle wants to import before anything is unpickled; DESIGN §5), checkpoint dicts unwrapped to
the model or its state dict, and state dict keys fitted to the architecture (shared prefixes such as Lightning's
``model.`` or DDP's ``module.``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphsparse.errors import ModelSourceError, closest
from graphsparse.sources.builders import build_architecture
from graphsparse.sources.infer import timm_recipe, torchvision_recipe
from graphsparse.sources.recipes import Recipe
from graphsparse.sources.safe_pickle import read_pickle
from graphsparse.sources.specs import ACCEPTED_FORMS, FILE_SUFFIXES, looks_like_file, recipe_for_spec

# Checkpoint dict keys that hold the model or its state dict, in order of preference: the trained model's own
# entry before an EMA copy (choose another entry with checkpoint_key / --checkpoint-key).
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net", "ema", "model_ema", "state_dict_ema")
# How many shared leading key components (Lightning 'model.', DDP 'module.', torch.compile '_orig_mod.',
# nested) are tried when a state dict's keys do not match the architecture.
_MAX_PREFIX_DEPTH = 4


def load_model_file(
    path: Path,
    *,
    arch: str | None,
    allow_modules: Sequence[str],
    kwargs: Mapping[str, Any],
    strip_prefix: Sequence[str] = (),
    checkpoint_key: str | None = None,
) -> tuple[nn.Module, Recipe]:
    """The model in a weights file and its recipe (a whole model's inferred one, else a ``file`` recipe; a state dict
    is loaded into ``arch``'s architecture)."""
    if not path.is_file():
        raise ModelSourceError(f"model file {path} does not exist{closest(path.name, _siblings(path))}")
    arch_recipe = None
    if arch is not None:
        if looks_like_file(arch):
            raise ModelSourceError(
                f"--arch {arch!r} must be an architecture spec, not a file; {ACCEPTED_FORMS}"
            )
        arch_recipe = recipe_for_spec(arch, kwargs, role="--arch")
    elif kwargs:
        raise ModelSourceError(
            f"options {', '.join(kwargs)} only apply with an architecture (--arch) "
            f"when loading the file {path}"
        )

    kind = _file_format(path)
    if kind == "safetensors" or (kind == "unknown" and path.suffix.lower() == ".safetensors"):
        obj: Any = _read_safetensors(path)  # whatever the suffix: a renamed .safetensors file is still one
    elif path.suffix.lower() == ".safetensors":  # torch.load reads any *.safetensors path as safetensors
        raise ModelSourceError(
            f"{path} is named .safetensors but holds a torch.save checkpoint (it starts with {_head(path, 8)!r}), "
            f"not safetensors: rename it to {path.with_suffix('.pt').name}"
        )
    elif kind == "unknown" and path.suffix.lower() not in FILE_SUFFIXES:
        raise ModelSourceError(
            f"model file {path} is neither a torch.save checkpoint nor a safetensors file (it starts with "
            f"{_head(path)!r}); give a file written by torch.save or safetensors"
        )
    else:
        obj = read_pickle(path, allow_modules)
    obj = _unwrap(obj, path, checkpoint_key)

    if isinstance(obj, nn.Module) and arch_recipe is None:
        if strip_prefix:
            raise ModelSourceError(
                f"{path} holds a whole model ({type(obj).__name__}); --strip-prefix applies to state dicts "
                "loaded with --arch"
            )
        recipe = timm_recipe(obj) or torchvision_recipe(obj)
        return obj.eval(), recipe or Recipe("file", str(path.resolve()), {}, sha256=file_sha256(path))
    if arch_recipe is None:
        example = ", ".join(repr(k) for k in list(obj)[:3])
        raise ModelSourceError(
            f"{path} holds a state dict ({len(obj)} tensors, e.g. {example}), not a whole model: say which "
            "architecture it belongs to with --arch timm:NAME, --arch torchvision:NAME or --arch "
            "pkg.module:Class (Python: arch=...)"
        )
    state = obj.state_dict() if isinstance(obj, nn.Module) else obj
    model = build_architecture(arch_recipe, trusted=True, allow_modules=allow_modules)
    state, note = _fit_keys(dict(state), list(model.state_dict()), strip_prefix, path)
    _load_state(model, state, path, arch_recipe, note)
    return model.eval(), arch_recipe


def _file_format(path: Path) -> str:
    """``safetensors``, ``zip`` (torch.save), ``pickle`` (legacy torch.save) or ``unknown``, from the bytes."""
    head = _head(path, 16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 little-endian header length, then JSON
        size = int.from_bytes(head[:8], "little")
        if 0 < size <= path.stat().st_size - 8:
            return "safetensors"
    if head[:1] == b"\x80":  # a pickle's PROTO opcode (legacy torch.save starts with its magic number)
        return "pickle"
    return "unknown"


def _head(path: Path, n: int = 16) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise ModelSourceError(f"cannot read model file {path}: {e}") from e


def _siblings(path: Path) -> list[str]:
    try:
        return [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
    except OSError:
        return []


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise ModelSourceError(
            f"{path} is not a readable safetensors file ({e}); is it truncated or corrupt?"
        ) from e


def _unwrap(obj: Any, path: Path, checkpoint_key: str | None = None) -> nn.Module | dict[str, torch.Tensor]:
    """A whole module or a state dict, from whatever the file held (``checkpoint_key`` picks the entry)."""
    trail = []
    if checkpoint_key is not None:
        if not isinstance(obj, Mapping) or checkpoint_key not in obj:
            keys = [str(k) for k in obj] if isinstance(obj, Mapping) else []
            what = f"a dict with keys {', '.join(repr(k) for k in keys[:8])}" if keys else f"a {type(obj).__name__}"
            raise ModelSourceError(
                f"{path} has no entry {checkpoint_key!r} (--checkpoint-key){closest(checkpoint_key, keys)}; "
                f"it holds {what}"
            )
        trail.append(f"[{checkpoint_key!r}]")
        obj = obj[checkpoint_key]
    for _ in range(4):
        if isinstance(obj, nn.Module):
            return obj
        if _is_state_dict(obj):
            return {str(k): v for k, v in obj.items()}
        if isinstance(obj, Mapping):
            key = next((k for k in CHECKPOINT_KEYS if isinstance(obj.get(k), (Mapping, nn.Module))), None)
            if key is None:
                keys = ", ".join(repr(k) for k in list(obj)[:8])
                holders = [str(k) for k, v in obj.items() if isinstance(v, nn.Module) or _is_state_dict(v)]
                hint = (
                    f"; the weights look to be under {holders[0]!r}: pass --checkpoint-key {holders[0]} "
                    f"(Python: checkpoint_key={holders[0]!r})"
                    if holders and not trail
                    else ""
                )
                raise ModelSourceError(
                    f"{path}{''.join(trail)} is a dict with keys {keys or '(none)'}: "
                    "neither a state dict (all "
                    f"values tensors) nor a checkpoint holding one under {', '.join(CHECKPOINT_KEYS)}{hint}"
                )
            trail.append(f"[{key!r}]")
            obj = obj[key]
            continue
        raise ModelSourceError(
            f"{path}{''.join(trail)} holds a {type(obj).__name__}, not a model, state dict or checkpoint dict; "
            "give a file written by torch.save(model), torch.save(model.state_dict()) or safetensors"
        )
    raise ModelSourceError(f"{path}{''.join(trail)}: checkpoint dicts nested too deep to find the weights")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _fit_keys(
    state: dict[str, torch.Tensor], expected: list[str], strip_prefix: Sequence[str], path: Path
) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict with its keys fitted to the architecture's, and a note on what was done for messages.

    Explicit prefixes keep only the keys under them. Otherwise a leading component every key shares is
    removed (repeatedly: ``module._orig_mod.``) when that makes the key set exactly the architecture's.
    """
    for prefix in strip_prefix:
        kept = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not kept:
            raise ModelSourceError(
                f"no key of the state dict in {path} starts with {prefix!r} (--strip-prefix); "
                f"its keys start with {_leading(state)}"
            )
        state = kept
    if strip_prefix:
        return state, f"taken from under {''.join(strip_prefix)!r} (--strip-prefix)"
    want = set(expected)
    candidates = [("", state)]
    for _ in range(_MAX_PREFIX_DEPTH):
        current = candidates[-1][1]
        heads = {k.split(".", 1)[0] for k in current}
        if len(heads) != 1 or any("." not in k for k in current):
            break
        head = heads.pop() + "."
        candidates.append((candidates[-1][0] + head, {k[len(head) :]: v for k, v in current.items()}))
    for prefix, candidate in candidates:
        if set(candidate) == want:
            return candidate, f"without the prefix {prefix!r} every key shared" if prefix else ""
    # no exact fit: compare with the closest candidate, and name a prefix that selects the architecture's keys
    prefix, best = max(candidates, key=lambda c: len(want & set(c[1])))
    note = f"compared without the prefix {prefix!r} every key shares" if prefix else ""
    fits = [p for p in _leading_components(state) if {k[len(p) :] for k in state if k.startswith(p)} == want]
    if fits:
        others = f" (or {', '.join(fits[1:])})" if len(fits) > 1 else ""
        note += ("; " if note else "") + (
            f"the keys under {fits[0]!r} are exactly the architecture's: pass --strip-prefix {fits[0]}{others} "
            f"(Python: strip_prefix={fits[0]!r})"
        )
    return best, note


def _leading_components(state: Mapping[str, Any]) -> list[str]:
    """Leading key components ('model.'), most keys first."""
    counts: dict[str, int] = {}
    for k in state:
        if "." in k:
            head = k.split(".", 1)[0] + "."
            counts[head] = counts.get(head, 0) + 1
    return sorted(counts, key=lambda h: -counts[h])


def _leading(state: Mapping[str, Any]) -> str:
    heads = _leading_components(state)
    if heads:
        return ", ".join(repr(h) for h in heads[:6])
    return f"no shared prefix (e.g. {next(iter(state), '')!r})"


def _load_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, recipe: Recipe, note: str = ""
) -> None:
    try:
        model.load_state_dict(state, strict=True)
        return
    except RuntimeError as e:
        cause = e
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]

    def few(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

    parts = [f"{len(missing)} missing: {few(missing)}"] if missing else []
    parts += [f"{len(unexpected)} unexpected: {few(unexpected)}"] if unexpected else []
    parts += [f"{len(shapes)} with another shape (file vs model): {few(shapes)}"] if shapes else []
    detail = "; ".join(parts) or str(cause)
    if note and "--strip-prefix" in note:
        hint = note.split("; ")[-1]
        note = "; ".join(note.split("; ")[:-1])
    else:
        hint = "check --arch and its options (--num-classes, --model-kwargs JSON; Python: keyword arguments)"
        classes = _num_classes_hint(expected, state)
        if classes is not None and not missing and not unexpected:
            hint = (
                f"the file's classifier has {classes} classes: pass --num-classes {classes} "
                f"(Python: num_classes={classes})"
            )
    keys = f"; keys {note}" if note else ""
    raise ModelSourceError(f"the weights in {path} do not fit {recipe} ({detail}{keys}); {hint}") from cause


def _num_classes_hint(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> int | None:
    """The class count, when the only tensors of another shape are the classifier's (dim 0 differs, once)."""
    differ = [(state[k], v) for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if not differ or len(differ) > 2:
        return None
    if not all(a.dim() == b.dim() >= 1 and a.shape[1:] == b.shape[1:] for a, b in differ):
        return None
    counts = {int(a.shape[0]) for a, _ in differ}
    return counts.pop() if len(counts) == 1 else None


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file's bytes (a ``file`` recipe records it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
