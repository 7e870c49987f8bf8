"""Reading pickled checkpoints without running them (DESIGN §5).

A pickle can import and call any global it names, so the file is followed statically first (pickletools'
opcodes on a symbolic stack): which globals it imports, and which of them it calls or hands to a call.
Each global is vetted: module and enum classes of trusted packages, which the file may only instantiate
the way ``torch.save`` does, without running a constructor; the tensor functions of
``torch.nn.functional`` and ``timm.layers``; whatever the user names. The file is then read with
``torch.load(weights_only=True)`` allowing exactly those globals. Anything else raises
:class:`~graphsparse.errors.UnsafePickleError` without executing a byte of the file.
"""

from __future__ import annotations

import enum
import importlib
import io
import pickle
import pickletools
import re
import types
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelSourceError, UnsafePickleError

__all__ = ["TRUSTED_PACKAGES", "PickleScan", "class_problem", "read_pickle", "scan_file", "user_allowed"]

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
    "timm.task",  # training tasks: the distillation teacher builds a pretrained model from a path or URL
)


def class_problem(cls: type, *, called: bool = False) -> str | None:
    """Why a class of a trusted package may not be built from an untrusted file, or None if it may.

    Only the kinds of class a classifier is made of are allowed: modules and enums. Others in the same
    packages open files or run code when built (``torch.serialization._open_file(path, "wb")`` truncates
    any file the user can write), and so do modules derived from the code-generating packages above (an fx
    ``GraphModule`` execs its code). ``called``: the pickle calls the class with arguments of its own,
    which runs its constructor; ``torch.save`` never does that for a module (it restores modules without
    calling them), and a module's constructor may download or read files (timm's distillation teacher
    builds a pretrained model from a path or URL it is given).
    """
    if not issubclass(cls, (nn.Module, enum.Enum)):
        return (
            "neither a module nor an enum class; other classes can open files or run code when built "
            "from a pickle's arguments"
        )
    for base in cls.__mro__:
        home = str(getattr(base, "__module__", "") or "")
        if any(home == d or home.startswith(d + ".") for d in _DENIED_PREFIXES):
            what = "is" if base is cls else "derives from"
            return f"it {what} {home}.{base.__qualname__}, from a package whose classes can run code when built"
    if called and not issubclass(cls, enum.Enum):
        return (
            "the file has its constructor run (called directly or handed to a call) with arguments of its "
            "own, which torch.save never does for a module; constructors can download or read files"
        )
    return None


def read_pickle(path: Path, allow_modules: Sequence[str]) -> Any:
    """torch.load(weights_only=True) allowing exactly the vetted globals; refuse before executing anything."""
    scan = scan_file(path)
    allowed, refused = _vet_globals(sorted(scan.imports - _torch_safe_globals()), allow_modules, scan.called())
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


@dataclass
class PickleScan:
    """What a file's pickles would do, found without unpickling them.

    Attributes:
        imports: every global the pickles import (``module.qualname``).
        calls: the globals they call (REDUCE, INST, OBJ), with arguments of their own. A class that is
            only instantiated without running its constructor (NEWOBJ, as ``torch.save`` writes every
            module) is not among them.
        passed: for each called global (or ``<computed>``), the globals found in its arguments, which
            it may call in turn (``torch._tensor._rebuild_from_type_v2(func, ...)`` calls ``func``).
    """

    imports: set[str] = field(default_factory=set)
    calls: set[str] = field(default_factory=set)
    passed: dict[str, set[str]] = field(default_factory=dict)

    def called(self) -> set[str]:
        """The globals that may run during unpickling: those called, and those passed to a call that is
        not known to only store its arguments."""
        out = set(self.calls)
        for callee, held in self.passed.items():
            if callee not in _STORES_ITS_ARGUMENTS and not _is_enum(callee):
                out |= held
        return out


# Callables a legitimate checkpoint calls that keep their arguments without calling them.
_STORES_ITS_ARGUMENTS = frozenset(
    {
        "builtins.set",
        "builtins.frozenset",
        "collections.OrderedDict",
        "functools.partial",
        "_codecs.encode",
        "torch.Size",
        "torch.device",
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch._utils._rebuild_qtensor",
        "torch._utils._rebuild_sparse_tensor",
        "torch._utils._rebuild_nested_tensor",
        "torch._utils._rebuild_meta_tensor_no_storage",
        "torch._utils._rebuild_device_tensor_from_cpu_tensor",
    }
)


def _is_enum(name: str) -> bool:
    # only trusted packages are imported to find out: a name from the file must not import its module
    # before it is vetted (an untrusted callee gets the file refused anyway)
    trusted = not name.startswith("<") and name.split(".")[0] in TRUSTED_PACKAGES
    obj = _resolve_global(name) if trusted else None
    return isinstance(obj, type) and issubclass(obj, enum.Enum)


def scan_file(path: Path) -> PickleScan:
    """Scan a ``torch.save`` file (zip or legacy) or a plain pickle; nothing is unpickled."""
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    try:
        if is_zip:
            try:  # torch's own list, kept beside ours as a second opinion
                torch_listed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
            except pickle.UnpicklingError:  # torch's scanner knows protocol 2 only
                torch_listed = set()
            scan = _scan_pickles(io.BytesIO(_zip_data_pickle(path)), path, limit=1)
            scan.imports |= torch_listed
            return scan
        with open(path, "rb") as f:
            # legacy torch.save files are 5 consecutive pickles followed by raw storage bytes
            return _scan_pickles(f, path, limit=5)
    except ModelSourceError:
        raise
    except Exception as e:  # truncated zip, TorchScript archive, unreadable file
        raise ModelSourceError(
            f"could not read {path} as a torch.save checkpoint ({type(e).__name__}: {e}); is it truncated or "
            "corrupt? Re-save it with torch.save, or as .safetensors"
        ) from e


def _zip_data_pickle(path: Path) -> bytes:
    """The pickle ``torch.load`` reads from a zip checkpoint, read by torch's own archive reader: a zip can
    hold two members of one name, and Python's zipfile might not pick the one torch unpickles."""
    with torch.serialization._open_zipfile_reader(str(path)) as reader:
        return reader.get_record("data.pkl")


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
_COMPUTED = "<a global whose name is computed while unpickling>"


@dataclass(eq=False)
class _Slot:
    """A value on the symbolic stack: the globals it is or may hold (kept by identity, so a container filled
    after it was memoized is seen through the memo), and its text when it is a string."""

    holds: set[str] = field(default_factory=set)
    name: str | None = None  # the global it is
    text: str | None = None


# Opcodes that fill the object below their other operands in place (it stays on the stack).
_FILLERS = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}


def _scan_pickles(stream: Any, path: Path, *, limit: int) -> PickleScan:
    """Statically follow up to ``limit`` consecutive pickles on a symbolic stack."""
    scan = PickleScan()
    for index in range(limit):
        stack: list[_Slot] = []
        marks: list[int] = []
        memo: dict[Any, _Slot] = {}
        try:
            for op, arg, pos in pickletools.genops(stream):
                try:
                    _step(op, arg, stack, marks, memo, scan)
                except (IndexError, KeyError) as e:
                    raise ModelSourceError(
                        f"{path} holds a malformed pickle (at byte {pos}, {op.name} finds no operand or memo "
                        "entry); is it corrupt?"
                    ) from e
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
    return scan


def _call(scan: PickleScan, func: _Slot, args: set[str]) -> _Slot:
    """Record a call of ``func`` with arguments holding ``args``; the result may hold them too."""
    if func.name is not None:
        scan.calls.add(func.name)
    else:  # a computed callable (a partial, a call's result) runs whatever it holds
        scan.calls |= func.holds
    scan.passed.setdefault(func.name or "<computed>", set()).update(args)
    return _Slot(set(args))


def _pop_to_mark(stack: list[_Slot], marks: list[int]) -> list[_Slot]:
    mark = marks.pop()
    items = stack[mark:]
    del stack[mark:]
    return items


def _step(op: Any, arg: Any, stack: list[_Slot], marks: list[int], memo: dict[Any, _Slot], scan: PickleScan) -> None:
    """One opcode's effect on the symbolic stack (pickletools' stack_before / stack_after for the rest)."""
    name = op.name
    if name == "MARK":
        marks.append(len(stack))
    elif name in ("GLOBAL", "INST"):
        module, _, qual = str(arg).partition(" ")
        # Python 2 names, mapped as the unpicklers do (``__builtin__.set`` -> ``builtins.set``)
        module, qual = NAME_MAPPING.get((module, qual), (IMPORT_MAPPING.get(module, module), qual))
        found = f"{module}.{qual}"
        scan.imports.add(found)
        if name == "INST":  # calls the class with the items since the mark
            held = set().union(*(s.holds for s in _pop_to_mark(stack, marks)))
            stack.append(_call(scan, _Slot({found}, found), held))
        else:
            stack.append(_Slot({found}, found))
    elif name == "STACK_GLOBAL":
        qual, module = stack.pop(), stack.pop()
        found = f"{module.text}.{qual.text}" if module.text is not None and qual.text is not None else _COMPUTED
        scan.imports.add(found)
        stack.append(_Slot({found}, found))
    elif name.startswith("EXT"):  # a global from copyreg's extension registry
        scan.imports.add(_COMPUTED)
        stack.append(_Slot({_COMPUTED}, _COMPUTED))
    elif name == "REDUCE":
        args = stack.pop()
        stack.append(_call(scan, stack.pop(), args.holds))
    elif name == "OBJ":  # the class, then its arguments, since the mark
        items = _pop_to_mark(stack, marks)
        stack.append(_call(scan, items[0], set().union(*(s.holds for s in items[1:]))))
    elif name in ("NEWOBJ", "NEWOBJ_EX"):  # cls.__new__(cls, *args): no constructor runs
        held = set().union(*(stack.pop().holds for _ in range(2 if name == "NEWOBJ_EX" else 1)))
        stack.pop()
        stack.append(_Slot(held))
    elif name in _STRING_OPS:
        stack.append(_Slot(text=arg if isinstance(arg, str) else None))
    elif name in _GET_OPS:
        stack.append(memo[arg])
    elif name in _PUT_OPS:
        memo[arg] = stack[-1]
    elif name == "MEMOIZE":
        memo[len(memo)] = stack[-1]
    elif name == "DUP":
        stack.append(stack[-1])
    else:
        before = list(op.stack_before)
        popped: list[_Slot] = []
        if pickletools.markobject in before:
            popped = _pop_to_mark(stack, marks)
            before = before[: before.index(pickletools.markobject)]
        if len(before) > len(stack):
            raise IndexError(name)
        popped = stack[len(stack) - len(before) :] + popped
        del stack[len(stack) - len(before) :]
        held = set().union(*(s.holds for s in popped))
        if name in _FILLERS:  # the container (or instance) now holds what went in
            popped[0].holds |= held
            stack.append(popped[0])
        else:
            stack.extend(_Slot(set(held)) for _ in op.stack_after)


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
    names: Sequence[str], allow_modules: Sequence[str], calls: Iterable[str] = ()
) -> tuple[list[tuple[Any, str]], list[tuple[str, str]]]:
    """Split the pickle's globals into allowed ``(object, name)`` pairs and refused ``(name, reason)``;
    ``calls`` are those the pickle calls with its own arguments."""
    calls = set(calls)
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
            elif (problem := class_problem(obj, called=name in calls)) is not None:
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
