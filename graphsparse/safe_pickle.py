"""Reading pickled checkpoints without running them (DESIGN §5).

A pickle can import and call any global it names, so the globals a file wants are listed *before* anything
is unpickled (torch's checkpoint scanner, or a static walk of the opcodes with pickletools), each one is
vetted (module and enum classes of trusted packages, pure tensor functions, and whatever the user names),
and the file is then read with ``torch.load(weights_only=True)`` allowing exactly those globals. Anything
else raises :class:`~graphsparse.errors.UnsafePickleError` without executing a byte of the file.
"""

from __future__ import annotations

import enum
import importlib
import io
import pickle
import pickletools
import re
import types
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelSourceError, UnsafePickleError

__all__ = ["TRUSTED_PACKAGES", "class_problem", "read_pickle", "user_allowed"]

TRUSTED_PACKAGES = ("torch", "torchvision", "timm", "robustbench", "graphsparse")

# The weights-only unpickler lets an allowed global be *called* (REDUCE) with arguments taken from the
# file. Allowing every function of a trusted package would therefore re-open code execution:
# ``torch.hub.load(repo, ...)`` imports and runs a hubconf, ``torch.load`` unpickles another file without
# weights_only, and so on. Functions are allowed only from the pure tensor-op namespaces below
# (``torch._C._nn`` is where ``F.gelu`` & co. really live). Classes are allowed from trusted packages if
# they really are defined there (no re-exports of ``os``/``subprocess`` objects through a trusted module)
# and are modules or enums (see ``class_problem``).
_FUNCTION_PREFIXES = ("torch.nn.functional", "torch._C._nn", "timm.layers")
# Trusted subpackages whose classes generate/execute code, spawn processes or touch the network or the
# file system when constructed (fx GraphModule codegen, torch.package importers, DataLoader workers,
# TCPStore, SummaryWriter, ...). Never needed to rebuild a classifier; allowed only if named explicitly.
_DENIED_PREFIXES = (
    "torch.fx",
    "torch.package",
    "torch.jit",
    "torch.hub",
    "torch.multiprocessing",
    "torch.distributed",
    "torch.utils",
    "torch._dynamo",
    "torch._inductor",
    "torch.compiler",
    "torch.export",
    "torch.onnx",
    "torch.profiler",
    "torch.testing",
    "torch._C._distributed_c10d",
    "torchvision.datasets",
    "torchvision.io",
    "timm.data",
    "timm.utils",
    "timm.models._hub",
)


def class_problem(cls: type) -> str | None:
    """Why a class of a trusted package may not be built from an untrusted file, or None if it may.

    A pickle builds objects with arguments of its choosing, so only the kinds of class a classifier is
    made of are allowed: modules and enums. Others in the same packages open files or run code when
    built (``torch.serialization._open_file(path, "wb")`` truncates any file the user can write), and so
    do modules derived from the code-generating packages above (an fx ``GraphModule`` execs its code).
    """
    if not issubclass(cls, (nn.Module, enum.Enum)):
        return (
            "neither a module nor an enum class; other classes can open files or run code when built "
            "from a pickle's arguments"
        )
    for base in cls.__mro__:
        home = str(getattr(base, "__module__", "") or "")
        if any(home == d or home.startswith(d + ".") for d in _DENIED_PREFIXES):
            return f"it derives from {home}.{base.__qualname__}, whose package generates or runs code"
    return None


def read_pickle(path: Path, allow_modules: Sequence[str]) -> Any:
    """torch.load(weights_only=True) allowing exactly the vetted globals; refuse before executing anything."""
    wanted = _pickle_globals(path)
    allowed, refused = _vet_globals(wanted, allow_modules)
    if refused:
        raise UnsafePickleError(_refusal_message(path, refused))
    # exact global names the user allowed also cover types the unpickler meets without a GLOBAL opcode
    # (e.g. numpy's dtype classes, which only appear while unpickling)
    for entry in allow_modules:
        obj = _resolve_global(entry) if "." in entry else None
        if obj is not None and all(name != entry for _, name in allowed):
            allowed.append((obj, entry))
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError, ValueError ...
        detail = str(e)
        if "WeightsUnpickler error:" in detail:  # drop torch's advice to retry with weights_only=False
            detail = detail.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n", 1)[0]
        built = re.search(r"allowlisted via `add_safe_globals`, but got <class '([\w.]+)'>", detail)
        if built:
            raise UnsafePickleError(
                f"refused to load {path}: while unpickling it builds a {built[1]} object, which is not "
                "allowed; nothing outside the allow list was executed. Only if you trust where the file "
                "comes from, allow it with "
                f"--allow-module {built[1]} (Python: allow_modules=[{built[1]!r}])"
            ) from e
        if "Unsupported operand" in detail:
            raise ModelSourceError(
                f"{path} was written with a pickle protocol above 2, which torch's weights-only loader "
                f"cannot read ({detail}); re-save it with torch.save's default protocol, or as .safetensors"
            ) from e
        if "persistent_load" in detail:
            raise ModelSourceError(
                f"{path} is a legacy (pre-zip) torch.save file holding a whole model, which cannot be read "
                "without running code; where the file is trusted, re-save model.state_dict() with "
                "torch.save and load it with --arch"
            ) from e
        raise ModelSourceError(
            f"could not read {path} as a torch.save checkpoint ({type(e).__name__}: {detail}); is it "
            "truncated or corrupt? Re-save it with torch.save, or as .safetensors"
        ) from e


def _pickle_globals(path: Path) -> list[str]:
    """Names (``module.qualname``) of the globals the pickle imports, minus torch's built-in safe ones.

    Nothing is unpickled: zip checkpoints are disassembled by torch, other files by pickletools.
    """
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    try:
        if is_zip:
            try:
                return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
            except pickle.UnpicklingError:
                # torch's scanner knows protocol 2 only; disassemble other protocols ourselves
                with zipfile.ZipFile(path) as archive:
                    member = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                    data = archive.read(member)
                return sorted(_scan_pickles(io.BytesIO(data), path, limit=1) - _torch_safe_globals())
        with open(path, "rb") as f:
            # legacy torch.save files are 5 consecutive pickles followed by raw storage bytes
            return sorted(_scan_pickles(f, path, limit=5) - _torch_safe_globals())
    except ModelSourceError:
        raise
    except Exception as e:  # truncated zip, TorchScript archive, unreadable file
        raise ModelSourceError(
            f"could not read {path} as a torch.save checkpoint ({type(e).__name__}: {e}); is it truncated or "
            "corrupt? Re-save it with torch.save, or as .safetensors"
        ) from e


_STRING_OPS = {
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_NO_STACK_OPS = {"PROTO", "FRAME", "MEMOIZE", "STOP"} | _PUT_OPS


def _scan_pickles(stream: Any, path: Path, *, limit: int) -> set[str]:
    """Statically list the globals of up to ``limit`` consecutive pickles (GLOBAL, INST, STACK_GLOBAL)."""
    found: set[str] = set()
    for index in range(limit):
        pushed: list[Any] = []  # what each stack-pushing op pushed: a str, or None for anything else
        memo: dict[Any, Any] = {}
        try:
            for op, arg, _ in pickletools.genops(stream):
                name = op.name
                if name in ("GLOBAL", "INST"):
                    module, _, qual = str(arg).partition(" ")
                    # Python 2 names, mapped as the unpicklers do (``__builtin__.set`` -> ``builtins.set``)
                    module, qual = NAME_MAPPING.get(
                        (module, qual), (IMPORT_MAPPING.get(module, module), qual)
                    )
                    found.add(f"{module}.{qual}")
                    pushed.append(None)
                elif name == "STACK_GLOBAL":
                    module, qual = pushed[-2:] if len(pushed) >= 2 else (None, None)
                    if isinstance(module, str) and isinstance(qual, str):
                        found.add(f"{module}.{qual}")
                    else:
                        found.add("<a global whose name is computed while unpickling>")
                    pushed.append(None)
                elif name in _STRING_OPS:
                    pushed.append(arg if isinstance(arg, str) else None)
                elif name in _GET_OPS:
                    pushed.append(memo.get(arg))
                elif name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif name in _PUT_OPS:
                    memo[arg] = pushed[-1] if pushed else None
                elif name not in _NO_STACK_OPS:
                    pushed.append(None)
                del pushed[:-2]
        except ValueError as e:  # not (or no longer) a pickle: truncated, or raw storage bytes
            if index == 0:
                raise ModelSourceError(
                    f"{path} is neither a torch.save zip archive nor a pickle ({e}); "
                    "is it truncated or corrupt?"
                ) from e
            break
        if not stream.read(1):
            break
        stream.seek(-1, io.SEEK_CUR)
    return found


def _torch_safe_globals() -> set[str]:
    try:
        from torch import _weights_only_unpickler

        return set(_weights_only_unpickler._get_allowed_globals())
    except Exception:  # private API moved: vet everything ourselves (stricter, never looser)
        return set()


def user_allowed(name: str, allow_modules: Iterable[str]) -> bool:
    """True if ``name`` is one of ``allow_modules`` or lies inside one of them (``pkg`` allows ``pkg.mod.C``)."""
    return any(name == m or name.startswith(m + ".") for m in allow_modules)


def _resolve_global(name: str) -> Any | None:
    """Import ``a.b.C`` as module ``a.b`` + attribute ``C`` (longest importable module first).

    Attribute chains may pass through classes (nested classes) but not through modules, so
    ``torch.nn.functional.torch.hub.load`` does not resolve to ``torch.hub.load``.
    """
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except Exception:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, _MISSING)
            if obj is _MISSING or isinstance(obj, types.ModuleType):
                obj = _MISSING
                break
        if obj is not _MISSING:
            return obj
    return None


_MISSING = object()


def _vet_globals(
    names: Sequence[str], allow_modules: Sequence[str]
) -> tuple[list[tuple[Any, str]], list[tuple[str, str]]]:
    """Split the pickle's globals into allowed ``(object, name)`` pairs and refused ``(name, reason)``."""
    allowed: list[tuple[Any, str]] = []
    refused: list[tuple[str, str]] = []
    for name in names:
        if name.startswith("<"):
            refused.append((name, "cannot be checked statically"))
            continue
        top = name.split(".")[0]
        by_user = user_allowed(name, allow_modules)
        exact = name in allow_modules
        if top not in TRUSTED_PACKAGES and not by_user:
            refused.append((name, f"package {top!r} is not trusted"))
            continue
        if not by_user and any(name == d or name.startswith(d + ".") for d in _DENIED_PREFIXES):
            refused.append(
                (name, "its package can run code, spawn processes or touch files/network when built")
            )
            continue
        obj = _resolve_global(name)
        if obj is None:
            refused.append((name, "cannot be imported here (missing package, or a path through a module)"))
            continue
        if exact:
            allowed.append((obj, name))
            continue
        home = str(getattr(obj, "__module__", None) or "")
        if isinstance(obj, type):
            if user_allowed(home, allow_modules):
                allowed.append((obj, name))
            elif home.split(".")[0] not in TRUSTED_PACKAGES:
                refused.append(
                    (
                        name,
                        f"it is really {home}.{getattr(obj, '__qualname__', '?')}, from an untrusted package",
                    )
                )
            elif (problem := class_problem(obj)) is not None:
                refused.append((name, problem))
            else:
                allowed.append((obj, name))
            continue
        if callable(obj) and any(
            user_allowed(name, [p]) and user_allowed(home, [p]) for p in _FUNCTION_PREFIXES
        ):
            allowed.append((obj, name))
            continue
        refused.append(
            (
                name,
                "a function, not a class; pickles may only call functions of torch.nn.functional "
                "and timm.layers",
            )
        )
    return allowed, refused


def _refusal_message(path: Path, refused: list[tuple[str, str]]) -> str:
    lines = "\n".join(f"  - {name}: {reason}" for name, reason in refused)
    flags = []
    for name, reason in refused:
        top = name.split(".")[0]
        flag = top if reason.startswith("package") else name
        if not name.startswith("<") and flag not in flags:
            flags.append(flag)
    how = " ".join(f"--allow-module {f}" for f in flags)
    return (
        f"refused to load {path}: its pickle imports globals that are not allowed. Nothing in the file was "
        f"executed.\n{lines}\nOnly if you trust where the file comes from, allow them with {how} "
        f"(Python: allow_modules={flags!r}), or load the weights as a state dict / .safetensors with --arch."
    )
