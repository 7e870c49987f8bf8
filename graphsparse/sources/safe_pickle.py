"""Reading pickled checkpoints without running them (DESIGN §5).

A pickle can import and call any global it names, so the file is followed statically first
(:mod:`~graphsparse.sources.pickle_scan`: which globals it imports, and which of them it calls or hands to a
call). Each global is vetted against :mod:`~graphsparse.sources.pickle_policy`: plain data types (numpy
arrays, scalars, dtypes and random states; argparse and ``SimpleNamespace`` args; paths, dates; see
:func:`data_global`); module and enum classes of trusted packages, which the file may only instantiate the
way ``torch.save`` does, without running a constructor; the tensor functions of ``torch.nn.functional`` and
``timm.layers``; whatever the user names. The file is then read with ``torch.load(weights_only=True)``
allowing exactly those globals (:func:`read_pickle`). Anything else raises
:class:`~graphsparse.errors.UnsafePickleError` without executing a byte of the file.

Vetting has no side effects: a global's module is imported only if it is already imported, or belongs to
a trusted (or user-allowed) package and is not a program (``__main__``); untrusted names are never
imported. Its cost is linear in the file (at most :data:`MAX_PICKLE_OPCODES` opcodes are followed).

This module is the public entry: the policy's and the scan's public names are importable from here too.
"""

from __future__ import annotations

import importlib.util
import io
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from graphsparse.errors import ModelSourceError, UnsafePickleError
from graphsparse.sources.pickle_policy import (
    FUNCTION_PREFIXES,
    TRUSTED_PACKAGES,
    Unresolvable,
    class_problem,
    data_global,
    denied,
    numpy_hidden_types,
    resolve,
    resolve_global,
    user_allowed,
)
from graphsparse.sources.pickle_scan import MAX_PICKLE_OPCODES, PickleScan, scan_file, verify_zip

__all__ = [
    "MAX_PICKLE_OPCODES",
    "TRUSTED_PACKAGES",
    "PickleScan",
    "class_problem",
    "data_global",
    "read_pickle",
    "resolve_global",
    "scan_file",
    "user_allowed",
    "verify_zip",
]

# Refusal messages list this many globals, then count the rest.
_LISTED = 20


# ------------------------------------------------------------------------------------------ vetting


@dataclass(frozen=True)
class _Refusal:
    name: str
    reason: str
    flag: str | None  # the --allow-module value that admits it, or None where no flag can


def _vet_globals(
    names: Sequence[str], allow_modules: Sequence[str], calls: Iterable[str] = ()
) -> tuple[list[tuple[Any, str]], list[_Refusal]]:
    """Split the pickle's globals into allowed ``(object, name)`` pairs and refusals; ``calls`` are those
    the pickle calls (or hands to a call) with its own arguments."""
    calls = set(calls)
    allowed: list[tuple[Any, str]] = []
    refused: list[_Refusal] = []
    installed: dict[str, bool] = {}
    for name in names:
        if name.startswith("<"):
            refused.append(_Refusal(name, "cannot be checked statically; torch.save never writes one", None))
            continue
        data = data_global(name)
        if data is not None:
            allowed.append((data, name))
            continue
        top = name.split(".")[0]
        by_user = user_allowed(name, allow_modules)
        program = _program_problem(name, by_user)
        if program is not None:
            refused.append(program)
            continue
        if top not in TRUSTED_PACKAGES and not by_user:
            refused.append(_untrusted(name, top, called=name in calls, installed=installed))
            continue
        if not by_user and denied(name):
            reason = "its package can run code, spawn processes or touch files/network when built"
            refused.append(_Refusal(name, reason, name))
            continue
        try:
            obj = resolve(name)
        except Unresolvable as e:
            refused.append(_Refusal(name, f"cannot be imported here: {e}", None))
            continue
        if name in allow_modules:  # named exactly: the user vouches for it
            allowed.append((obj, name))
            continue
        home = str(getattr(obj, "__module__", None) or "")
        if isinstance(obj, type):
            if user_allowed(home, allow_modules):
                allowed.append((obj, name))
            elif home.split(".")[0] not in TRUSTED_PACKAGES:
                real = f"{home}.{getattr(obj, '__qualname__', '?')}"
                refused.append(_Refusal(name, f"it is really {real}, from an untrusted package", name))
            elif (problem := class_problem(obj, called=name in calls)) is not None:
                refused.append(_Refusal(name, problem, name))
            else:
                allowed.append((obj, name))
            continue
        if callable(obj) and any(user_allowed(name, [p]) and user_allowed(home, [p]) for p in FUNCTION_PREFIXES):
            allowed.append((obj, name))
        elif callable(obj) and by_user and user_allowed(home, allow_modules) and name not in calls:
            allowed.append((obj, name))  # a function of an allowed package, stored as a value, never called here
        else:
            why = "the file calls it while unpickling" if name in calls else "pickles may only call"
            refused.append(
                _Refusal(
                    name,
                    f"a function, not a class ({why}); functions of torch.nn.functional and timm.layers are "
                    "allowed, others only by their exact name",
                    name,
                )
            )
    return allowed, refused


def _program_problem(name: str, by_user: bool) -> _Refusal | None:
    """A refusal for a global of a program (a ``__main__`` module) that is not the running one, else None.

    Vetting never imports a ``__main__`` (it runs a command line when imported). The running program's
    own ``__main__`` is already imported: a class of the user's script can be allowed by name."""
    module = name.rpartition(".")[0]
    if "__main__" not in module.split("."):
        return None
    if module == "__main__":
        try:
            resolve(name)
        except Unresolvable:
            return _Refusal(
                name,
                "defined in the script that saved the file (__main__), which is not importable here; where "
                "it is trusted, save the model's state_dict and load it with --arch",
                None,
            )
        if by_user:
            return None
        return _Refusal(name, "defined in the running script (__main__), not in an installed package", name)
    if module in sys.modules:
        return None
    return _Refusal(name, f"{module} is a program (a __main__ module runs when imported), never imported", None)


def _untrusted(name: str, top: str, *, called: bool, installed: dict[str, bool]) -> _Refusal:
    """A global of an untrusted package: nothing of it is imported. The flag that admits it without a
    second try: its package if the file only stores it or builds it without a constructor (a class or a
    function held as a value), its exact name if the file calls it (a package flag admits no calls of
    functions). ``installed`` caches which top-level packages exist."""
    if top not in installed:
        try:
            installed[top] = importlib.util.find_spec(top) is not None  # top-level lookup: executes nothing
        except (ImportError, ValueError):
            installed[top] = False
    if not installed[top]:
        return _Refusal(name, f"package {top!r} is not trusted, and not installed here", None)
    return _Refusal(name, f"package {top!r} is not trusted", name if called else top)


def _refusal_message(path: Path, refused: list[_Refusal]) -> str:
    shown = "\n".join(f"  - {r.name}: {r.reason}" for r in refused[:_LISTED])
    if len(refused) > _LISTED:
        shown += f"\n  ... and {len(refused) - _LISTED} more"
    head = f"refused to load {path}: its pickle imports globals that are not allowed. Nothing in the file was executed."
    if any(r.flag is None for r in refused):
        missing = sorted({r.name.split(".")[0] for r in refused if r.reason.endswith("not installed here")})
        install = (
            f"install {', '.join(missing)} and retry, or "
            if missing and all(r.flag is not None or r.reason.endswith("not installed here") for r in refused)
            else ""
        )
        return (
            f"{head}\n{shown}\nNo --allow-module can admit all of them as they are: {install}load the weights "
            "as a state dict / .safetensors with --arch (only if you trust the file: re-save its state dict "
            "where it was made)."
        )
    flags: list[str] = []
    for r in refused:
        if r.flag is not None and r.flag not in flags:
            flags.append(r.flag)
    how = " ".join(f"--allow-module {f}" for f in flags)
    return (
        f"{head}\n{shown}\nOnly if you trust where the file comes from, allow them with {how} "
        f"(Python: allow_modules={flags!r}), or load the weights as a state dict / .safetensors with --arch."
    )


# ------------------------------------------------------------------------------------------ reading


def _torch_safe_globals() -> set[str]:
    try:
        from torch import _weights_only_unpickler

        return set(_weights_only_unpickler._get_allowed_globals())
    except Exception:  # private API moved: vet everything ourselves (stricter, never looser)
        return set()


def read_pickle(path: Path, allow_modules: Sequence[str]) -> Any:
    """torch.load(weights_only=True) allowing exactly the vetted globals; refuse before executing anything.

    Zip checkpoints are checked against their CRC-32s first (:func:`verify_zip`); legacy (pre-zip)
    ``torch.save`` files of whole modules load like zip ones (their module classes, which the legacy format
    stores as persistent ids, are read as the globals they are).

    Raises:
        UnsafePickleError: the file imports or builds something that is not allowed; the message lists it
            and says the one thing to do.
        ModelSourceError: the file is corrupt, truncated, not a checkpoint, or too large to vet.
    """
    path = Path(path)
    scan = scan_file(path)
    allowed, refused = _vet_globals(sorted(scan.imports - _torch_safe_globals()), allow_modules, scan.called())
    if refused:
        raise UnsafePickleError(_refusal_message(path, refused))
    # numpy builds the class of a dtype while unpickling, without naming it (BUILD needs it allowed)
    if any(name.split(".")[0] == "numpy" for _, name in allowed):
        allowed += numpy_hidden_types()
    # exact global names the user allowed also cover types the unpickler meets without a GLOBAL opcode
    for entry in allow_modules:
        if "." not in entry or any(name == entry for _, name in allowed):
            continue
        obj = data_global(entry)
        if obj is None:  # the user named it exactly (never a __main__ that is not running)
            try:
                obj = resolve(entry)
            except Unresolvable:
                obj = None
        if obj is not None:
            allowed.append((obj, entry))
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    source: Path | io.BytesIO = path
    if is_zip:
        verify_zip(path)
    elif scan.module_ids:
        source = io.BytesIO(_module_ids_as_globals(path, scan.module_ids))
        allowed.append((_module_id_class, _MODULE_ID_CLASS))
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(source, weights_only=True, map_location="cpu")
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError, ValueError ...
        raise _load_error(path, e) from e


def _module_id_class(module_id: tuple) -> type:
    """What torch's legacy loader returns for a ``('module', cls, source_file, source)`` persistent id."""
    return module_id[1]


_MODULE_ID_CLASS = "graphsparse.sources.safe_pickle._module_id_class"


def _module_ids_as_globals(path: Path, module_ids: list[tuple[int, int, str, str]]) -> bytes:
    """A legacy file's bytes with each ``('module', cls, source_file, source)`` persistent id read as the
    class it names, with the opcodes torch's weights-only unpickler knows (it has no POP): the id's tuple
    is handed to :func:`_module_id_class` (GLOBAL before its MARK; ``TUPLE1 REDUCE`` instead of
    ``BINPERSID``). The memo is untouched; nothing in a protocol-2 pickle or the storage records after it
    refers to file offsets."""
    data = path.read_bytes()
    module, _, qual = _MODULE_ID_CLASS.rpartition(".")
    edits: list[tuple[int, int, bytes]] = []  # (offset, bytes replaced, new bytes)
    for start, persid, _, _ in module_ids:
        if data[start : start + 1] != b"(" or data[persid : persid + 1] != b"Q":
            raise ModelSourceError(f"{path} holds a malformed legacy pickle at byte {persid}; is it corrupt?")
        edits += [(start, 0, f"c{module}\n{qual}\n".encode()), (persid, 1, b"\x85R")]
    out = bytearray()
    last = 0
    for offset, replaced, new in sorted(edits):
        out += data[last:offset] + new
        last = offset + replaced
    out += data[last:]
    return bytes(out)


def _load_error(path: Path, e: Exception) -> ModelSourceError:
    detail = str(e)
    if "WeightsUnpickler error:" in detail:  # drop torch's advice to retry with weights_only=False
        detail = detail.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n", 1)[0]
    built = re.search(r"allowlisted via `add_safe_globals`, but got <class '([\w.]+)'>", detail)
    if built:
        return UnsafePickleError(
            f"refused to load {path}: while unpickling it builds a {built[1]} object, which is not "
            "allowed; nothing outside the allow list was executed. Only if you trust where the file "
            "comes from, allow it with "
            f"--allow-module {built[1]} (Python: allow_modules=[{built[1]!r}])"
        )
    if "Unsupported operand" in detail:
        return ModelSourceError(
            f"{path} was written with a pickle protocol above 2, which torch's weights-only loader "
            f"cannot read ({detail}); re-save it with torch.save's default protocol, or as .safetensors"
        )
    if "persistent_load" in detail:
        return ModelSourceError(
            f"{path} is a legacy (pre-zip) torch.save file whose pickle refers to objects other than "
            f"tensors and module classes ({detail}); where the file is trusted, re-save model.state_dict() "
            "with torch.save and load it with --arch"
        )
    return ModelSourceError(
        f"could not read {path} as a torch.save checkpoint ({type(e).__name__}: {detail}); is it "
        "truncated or corrupt? Re-save it with torch.save, or as .safetensors"
    )
