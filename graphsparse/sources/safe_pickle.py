"""Reading pickled checkpoints without running them (DESIGN §5).

A pickle can import and call any global it names, so the file is followed statically first (pickletools'
opcodes on a symbolic stack): which globals it imports, and which of them it calls or hands to a call.
Each global is vetted: plain data types (numpy arrays, scalars, dtypes and random states; argparse and
``SimpleNamespace`` args; paths, dates; see :func:`data_global`); module and enum classes of trusted
packages, which the file may only instantiate the way ``torch.save`` does, without running a constructor;
the tensor functions of ``torch.nn.functional`` and ``timm.layers``; whatever the user names. The file is
then read with ``torch.load(weights_only=True)`` allowing exactly those globals. Anything else raises
:class:`~graphsparse.errors.UnsafePickleError` without executing a byte of the file.

Vetting has no side effects: a global's module is imported only if it is already imported, or belongs to
a trusted (or user-allowed) package and is not a program (``__main__``); untrusted names are never
imported. Its cost is linear in the file (at most :data:`MAX_PICKLE_OPCODES` opcodes are followed).
"""

from __future__ import annotations

import enum
import gc
import importlib
import importlib.util
import io
import pickle
import pickletools
import re
import sys
import types
import warnings
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphsparse._compat import ensure_autoattack_alias
from graphsparse.errors import ModelSourceError, UnsafePickleError

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

TRUSTED_PACKAGES = ("torch", "torchvision", "timm", "robustbench", "graphsparse")

# A model checkpoint's pickle is small (tensor data lives outside it: zip records, or raw bytes after a legacy
# file's pickles): ~20 opcodes per tensor, ~10^5 for a large model. Following more would only let a crafted
# file keep the scan busy; the scan is linear, so this caps its time (seconds) and memory (hundreds of MB).
MAX_PICKLE_OPCODES = 5_000_000
# Refusal messages list this many globals, then count the rest.
_LISTED = 20

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


def _denied(name: str) -> bool:
    return any(name == d or name.startswith(d + ".") for d in _DENIED_PREFIXES)


# ------------------------------------------------------------------------------------------ plain data

# Standard-library types that hold data and run no code when built from a pickle's arguments (what torch's
# weights_only users allowlist for research checkpoints: argparse args, SimpleNamespace configs, paths).
# ``bytes``/``bytearray``/``range`` are left out: called with one big int they allocate without bound.
_STDLIB_DATA = {
    "argparse.Namespace": ("argparse", "Namespace"),
    "types.SimpleNamespace": ("types", "SimpleNamespace"),
    "collections.OrderedDict": ("collections", "OrderedDict"),
    "collections.Counter": ("collections", "Counter"),
    "pathlib.PurePath": ("pathlib", "PurePath"),
    "pathlib.PurePosixPath": ("pathlib", "PurePosixPath"),
    "pathlib.PureWindowsPath": ("pathlib", "PureWindowsPath"),
    "pathlib.Path": ("pathlib", "Path"),
    "pathlib.PosixPath": ("pathlib", "PosixPath"),
    "pathlib.WindowsPath": ("pathlib", "WindowsPath"),
    "datetime.datetime": ("datetime", "datetime"),
    "datetime.date": ("datetime", "date"),
    "datetime.time": ("datetime", "time"),
    "datetime.timedelta": ("datetime", "timedelta"),
    "datetime.timezone": ("datetime", "timezone"),
    **{
        f"builtins.{t}": ("builtins", t)
        for t in ("list", "dict", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str", "slice")
    },
}


def _defaultdict_as_dict(default_factory: Any = None, *items: Any) -> dict:
    """Stands in for ``collections.defaultdict`` while unpickling: torch's weights-only loader fills only
    plain dicts (SETITEMS), so a checkpoint's defaultdict loads as a dict of the same items; its factory is
    dropped, never called."""
    return dict(*items)


def _numpy_data() -> dict[str, Any]:
    """numpy's data types and the functions numpy's own pickles call to rebuild them, by every name a
    numpy 1.x or 2.x pickle uses. These build arrays, scalars, dtypes and random states from bytes and
    check what they are given (``_reconstruct`` only makes ndarray subtypes; ``scalar`` refuses object
    dtypes; a random state's ``__setstate__`` validates it). No numpy function that runs code is here."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    out: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for prefix in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[f"{prefix}._reconstruct"] = core.multiarray._reconstruct
        out[f"{prefix}.scalar"] = core.multiarray.scalar
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: one class per dtype, met by BUILD while unpickling
    for attr in dir(dtypes) if dtypes is not None else ():
        cls = getattr(dtypes, attr)
        if isinstance(cls, type) and issubclass(cls, np.dtype):
            out[f"numpy.dtypes.{attr}"] = cls
    for scalar in set(np.sctypeDict.values()):
        if scalar is not np.object_:
            out[f"numpy.{scalar.__name__}"] = scalar
    random = np.random
    pickled = getattr(random, "_pickle", None)
    for attr in ("__generator_ctor", "__bit_generator_ctor", "__randomstate_ctor"):
        if hasattr(pickled, attr):
            out[f"numpy.random._pickle.{attr}"] = getattr(pickled, attr)
    if hasattr(random, "__RandomState_ctor"):  # numpy < 1.17
        out["numpy.random.__RandomState_ctor"] = random.__RandomState_ctor
    for cls in (
        random.Generator,
        random.RandomState,
        random.MT19937,
        random.PCG64,
        random.Philox,
        random.SFC64,
        getattr(random, "PCG64DXSM", None),
        random.SeedSequence,
        random.BitGenerator,
    ):
        if cls is not None:
            out[f"{cls.__module__}.{cls.__name__}"] = cls
    unpickle_seq = getattr(random.bit_generator, "__pyx_unpickle_SeedSequence", None)
    if unpickle_seq is not None:  # Cython's helper: SeedSequence.__new__(type) refuses other types
        out["numpy.random.bit_generator.__pyx_unpickle_SeedSequence"] = unpickle_seq
    return out


_NUMPY_DATA: dict[str, Any] | None = None


def data_global(name: str) -> Any | None:
    """The object a pickle's global ``name`` stands for if it is plain data allowed with no flag, else None.

    Plain data: numpy arrays, scalars, dtypes and random states (``np.random.get_state()``, a
    ``Generator``/``RandomState`` and its bit generator); ``argparse.Namespace``, ``types.SimpleNamespace``,
    ``OrderedDict``/``Counter``/``defaultdict`` (loaded as a dict: its factory is never called),
    pathlib paths, ``datetime`` values, and the builtin container and number types. Only the standard
    library and numpy (a dependency of torch) are imported to answer, and only for their own names.
    """
    global _NUMPY_DATA
    if name == "collections.defaultdict":
        return _defaultdict_as_dict
    if name in _STDLIB_DATA:
        module, attr = _STDLIB_DATA[name]
        return getattr(importlib.import_module(module), attr, None)
    if name.split(".")[0] == "numpy":
        if _NUMPY_DATA is None:
            try:
                _NUMPY_DATA = _numpy_data()
            except Exception:  # numpy missing or reorganised: nothing of it is data then
                _NUMPY_DATA = {}
        return _NUMPY_DATA.get(name)
    return None


def _numpy_hidden_types() -> list[tuple[Any, str]]:
    """numpy types a pickle builds without naming them (a dtype's class, met by BUILD)."""
    return [(obj, name) for name, obj in (_NUMPY_DATA or {}).items() if isinstance(obj, type)]


# ------------------------------------------------------------------------------------------ classes


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
        if _denied(home):
            what = "is" if base is cls else "derives from"
            return f"it {what} {home}.{base.__qualname__}, from a package whose classes can run code when built"
    if called and not issubclass(cls, enum.Enum):
        return (
            "the file has its constructor run (called directly or handed to a call) with arguments of its "
            "own, which torch.save never does for a module; constructors can download or read files"
        )
    return None


def user_allowed(name: str, allow_modules: Iterable[str]) -> bool:
    """True if ``name`` is one of ``allow_modules`` or lies inside one of them (``pkg`` allows ``pkg.mod.C``)."""
    return any(name == m or name.startswith(m + ".") for m in allow_modules)


class _Unresolvable(Exception):
    """Why a global's object cannot be found without running code that vetting must not run."""


def _import_module(module: str) -> types.ModuleType:
    """An already imported module, or import one that is known to exist (found statically first)."""
    if module in sys.modules:
        return sys.modules[module]
    if "__main__" in module.split("."):
        raise _Unresolvable(
            f"{module} is a program (a __main__ module runs when imported), which vetting never imports"
        )
    if module.split(".")[0] == "robustbench":
        ensure_autoattack_alias()  # robustbench's modules import 'autoattack', which is pyautoattack on PyPI
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated-path FutureWarnings of old timm imports in robustbench
            return importlib.import_module(module)
    except (Exception, SystemExit) as e:  # ImportError, or an error (an exit) raised while the module ran
        raise _Unresolvable(f"importing {module} failed ({type(e).__name__}: {e})") from e


def resolve_global(name: str) -> Any:
    """The object a pickle's global ``module.qualname`` names, found without running a program.

    Module by module from the top package: a submodule is imported only if it is already imported or
    found statically (``importlib.util.find_spec`` inside its imported parent package, which executes
    nothing) and is not a ``__main__``; the rest is an attribute chain, which may pass through classes
    (nested classes) but not through modules, so ``torch.nn.functional.torch.hub.load`` does not resolve
    to ``torch.hub.load``. The caller decides which packages may be imported at all (trusted ones and
    those the user allows); untrusted names must never reach this function.

    Raises:
        LookupError: the name does not resolve here; the message says why.
    """
    try:
        return _resolve(name)
    except _Unresolvable as e:
        raise LookupError(str(e)) from None


def _resolve(name: str) -> Any:
    parts = name.split(".")
    if not all(p.isidentifier() for p in parts[:1]):
        raise _Unresolvable("not a module path")
    obj: Any = _import_module(parts[0])
    i = 1
    while i < len(parts):  # is the next part a submodule (imported already, or of a package)?
        sub = ".".join(parts[: i + 1])
        if sub not in sys.modules:
            if not hasattr(obj, "__path__"):  # a plain module: the rest are attributes
                break
            if parts[i] == "__main__":
                _import_module(sub)  # raises: a program
            try:
                found = parts[i].isidentifier() and importlib.util.find_spec(sub) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                break
        obj = _import_module(sub)
        i += 1
    for attr in parts[i:]:
        obj = getattr(obj, attr, _MISSING)
        if obj is _MISSING:
            raise _Unresolvable(f"{'.'.join(parts[:i])} has no attribute path {'.'.join(parts[i:])}")
        if isinstance(obj, types.ModuleType):
            raise _Unresolvable("the path runs through a module attribute")
    if isinstance(obj, types.ModuleType):
        raise _Unresolvable("it names a module, not a class or function")
    return obj


_MISSING = object()


def _is_enum(name: str) -> bool:
    # only trusted packages' ordinary modules are looked at: a name from the file must not import its module
    # before it is vetted (an untrusted callee gets the file refused anyway)
    if name.startswith("<") or name.split(".")[0] not in TRUSTED_PACKAGES or _denied(name):
        return False
    try:
        obj = _resolve(name)
    except _Unresolvable:
        return False
    return isinstance(obj, type) and issubclass(obj, enum.Enum)


# ------------------------------------------------------------------------------------------ the scan


@dataclass
class PickleScan:
    """What a file's pickles would do, found without unpickling them.

    Attributes:
        imports: every global the pickles import (``module.qualname``).
        calls: the globals they call (REDUCE, INST, OBJ), with arguments of their own, and every global
            held by a value that is called. A class that is only instantiated without running its
            constructor (NEWOBJ, as ``torch.save`` writes every module) is not among them.
        opcodes: how many opcodes were followed.
        module_ids: in a legacy file, each ``('module', cls, source_file, source)`` persistent id (how the
            legacy format stores a module's class): offsets of its MARK and BINPERSID, module, qualname.
    """

    imports: set[str] = field(default_factory=set)
    calls: set[str] = field(default_factory=set)
    opcodes: int = 0
    # per callee (or "<computed>"), the argument values of its calls
    _passed: dict[str, list[_Slot]] = field(default_factory=dict, repr=False)
    # values that are called (a partial, a call's result): whatever they hold may run
    _called_values: list[_Slot] = field(default_factory=list, repr=False)
    module_ids: list[tuple[int, int, str, str]] = field(default_factory=list, repr=False)

    def called(self) -> set[str]:
        """The globals that may run during unpickling: those called, and those passed to a call that is
        not known to only store its arguments."""
        roots = [
            value
            for callee, values in self._passed.items()
            if callee not in _STORES_ITS_ARGUMENTS and not _is_enum(callee)
            for value in values
        ]
        return self.calls | _held(roots)


# Callables a legitimate checkpoint calls that keep their arguments without calling them.
_STORES_ITS_ARGUMENTS = frozenset(
    {
        "builtins.set",
        "builtins.frozenset",
        "builtins.list",
        "builtins.tuple",
        "builtins.dict",
        "collections.OrderedDict",
        "collections.Counter",
        "collections.defaultdict",  # loaded as a dict: the factory is dropped (``_defaultdict_as_dict``)
        "types.SimpleNamespace",
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
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.dtype",
        "numpy.ndarray",
    }
)


class _Slot:
    """A value on the symbolic stack that holds globals: a global itself (``name``), or a value built from
    others (``kids``). Values are kept by identity, so a container filled after it was memoized or handed to
    a call is seen through every reference. Values that hold no global are ``_PLAIN`` or a ``str``."""

    __slots__ = ("kids", "name", "parts", "module_id", "start")

    def __init__(self, kids: list[_Slot] | None = None, name: str | None = None) -> None:
        self.kids = kids
        self.name = name
        self.parts: tuple[str, str] | None = None  # (module, qualname) of a literal global
        self.module_id: _Slot | None = None  # the class of a legacy ('module', cls, file, source) tuple
        self.start = -1  # file offset of that tuple's MARK


_PLAIN = _Slot()  # numbers, bytes, None, and tuples of them: hold no global, never filled
_Value = Any  # _Slot | str


def _holds(value: _Value) -> bool:
    return value.__class__ is _Slot and value is not _PLAIN


def _held(roots: Iterable[_Value]) -> set[str]:
    """The globals held by ``roots``, through any depth of containers: one walk, each value once."""
    found: set[str] = set()
    seen: set[int] = set()
    todo = [r for r in roots if _holds(r)]
    while todo:
        slot = todo.pop()
        if id(slot) in seen:
            continue
        seen.add(id(slot))
        if slot.name is not None:
            found.add(slot.name)
        if slot.kids:
            todo.extend(slot.kids)
    return found


def scan_file(path: Path) -> PickleScan:
    """Scan a ``torch.save`` file (zip or legacy) or a plain pickle; nothing is unpickled.

    Raises:
        ModelSourceError: the file is not a pickle or torch.save archive, is malformed, or has more than
            :data:`MAX_PICKLE_OPCODES` opcodes.
    """
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    try:
        if is_zip:
            try:  # torch's own list, kept beside ours as a second opinion
                torch_listed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
            except pickle.UnpicklingError:  # torch's scanner knows protocol 2 only
                torch_listed = set()
            scan = _scan_pickles(io.BytesIO(_zip_data_pickle(path)), path, limit=1, legacy=False)
            scan.imports |= torch_listed
            return scan
        with open(path, "rb") as f:
            # legacy torch.save files are 5 consecutive pickles followed by raw storage bytes
            return _scan_pickles(f, path, limit=5, legacy=True)
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


def verify_zip(path: Path) -> None:
    """Check every member of a zip checkpoint against the CRC-32 the archive records for it.

    torch's reader does not check them, so bytes damaged inside a weight load silently. Members written
    without a CRC (``torch.serialization.set_crc32_options(False)`` records 0) are skipped.

    Raises:
        ModelSourceError: a member's bytes do not match its CRC (the member is named), or the archive is
            unreadable.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 or info.is_dir():
                    continue
                try:
                    with archive.open(info) as member:
                        while member.read(1 << 24):
                            pass
                except zipfile.BadZipFile as e:
                    raise ModelSourceError(
                        f"{path} is corrupt: its member {info.filename!r} does not match the checksum (CRC-32) "
                        f"the archive records for it ({e}); the file was damaged after it was written "
                        "(a partial download or copy?). Fetch or copy it again"
                    ) from e
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ModelSourceError(
            f"could not read {path} as a zip archive ({type(e).__name__}: {e}); is it truncated or corrupt?"
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
_COMPUTED = "<a global whose name is computed while unpickling>"
# Opcodes that fill the object below their other operands in place (it stays on the stack).
_FILLERS = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}
# Opcodes whose result may be filled later: it gets a value of its own even when it holds nothing yet.
_MUTABLE = {"EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "LIST", "DICT", "PERSID", "BINPERSID"}


def _scan_pickles(stream: Any, path: Path, *, limit: int, legacy: bool) -> PickleScan:
    """Statically follow up to ``limit`` consecutive pickles on a symbolic stack, in time and memory linear
    in the opcodes (at most ``MAX_PICKLE_OPCODES``)."""
    collecting = gc.isenabled()
    gc.disable()  # the values form long chains; the cyclic collector would re-walk them over and over
    try:
        return _follow(stream, path, limit=limit, legacy=legacy)
    finally:
        if collecting:
            gc.enable()


def _follow(stream: Any, path: Path, *, limit: int, legacy: bool) -> PickleScan:
    scan = PickleScan()
    for index in range(limit):
        stack: list[_Value] = []
        marks: list[tuple[int, int]] = []  # (stack depth, file offset) of each open MARK
        memo: dict[Any, _Value] = {}
        try:
            for op, arg, pos in pickletools.genops(stream):
                scan.opcodes += 1
                if scan.opcodes > MAX_PICKLE_OPCODES:
                    raise ModelSourceError(
                        f"{path} holds a pickle of more than {MAX_PICKLE_OPCODES:,} opcodes, which vetting "
                        "does not follow to the end (a model checkpoint's pickle has far fewer: tensor data "
                        "is stored outside it). Where the file is trusted, re-save its state dict as "
                        ".safetensors or with torch.save and load it with --arch"
                    )
                try:
                    _step(op, arg, pos, stack, marks, memo, scan, legacy)
                except (IndexError, KeyError) as e:
                    raise ModelSourceError(
                        f"{path} holds a malformed pickle (at byte {pos}, {op.name} finds no operand or memo "
                        "entry); is it corrupt?"
                    ) from e
        except ValueError as e:  # not (or no longer) a pickle: truncated, or raw storage bytes
            if index == 0:
                raise ModelSourceError(
                    f"{path} is neither a torch.save zip archive nor a pickle ({e}); is it truncated or corrupt?"
                ) from e
            break
        if not stream.read(1):
            break
        stream.seek(-1, io.SEEK_CUR)
    scan.calls |= _held(scan._called_values)
    return scan


def _call(scan: PickleScan, func: _Value, args: _Value) -> _Slot:
    """Record a call of ``func`` with arguments ``args``; the result may hold them."""
    if isinstance(func, _Slot) and func.name is not None:
        scan.calls.add(func.name)
        callee = func.name
    else:  # a computed callable (a partial, a call's result) runs whatever it holds
        if _holds(func):
            scan._called_values.append(func)
        callee = "<computed>"
    if _holds(args):
        scan._passed.setdefault(callee, []).append(args)
        return _Slot([args])
    return _Slot()


def _pop_to_mark(stack: list[_Value], marks: list[tuple[int, int]]) -> list[_Value]:
    mark = marks.pop()[0]
    items = stack[mark:]
    del stack[mark:]
    return items


def _built(items: list[_Value], mutable: bool) -> _Value:
    """The value an opcode builds from ``items``."""
    kids = [v for v in items if v.__class__ is _Slot and v is not _PLAIN]
    return _Slot(kids) if kids else _Slot() if mutable else _PLAIN


def _step(
    op: Any,
    arg: Any,
    pos: int,
    stack: list[_Value],
    marks: list[tuple[int, int]],
    memo: dict[Any, _Value],
    scan: PickleScan,
    legacy: bool,
) -> None:
    """One opcode's effect on the symbolic stack (pickletools' stack_before / stack_after for the rest)."""
    name = op.name
    if name == "TUPLE1":  # the commonest opcode of a crafted stream: kept short
        top = stack[-1]
        stack[-1] = _Slot([top]) if top.__class__ is _Slot and top is not _PLAIN else _PLAIN
    elif name == "MARK":
        marks.append((len(stack), pos))
    elif name in ("GLOBAL", "INST"):
        module, _, qual = str(arg).partition(" ")
        # Python 2 names, mapped as the unpicklers do (``__builtin__.set`` -> ``builtins.set``)
        module, qual = NAME_MAPPING.get((module, qual), (IMPORT_MAPPING.get(module, module), qual))
        glob = _Slot(name=f"{module}.{qual}")
        glob.parts = (module, qual)
        scan.imports.add(glob.name)
        if name == "INST":  # calls the class with the items since the mark
            stack.append(_call(scan, glob, _built(_pop_to_mark(stack, marks), False)))
        else:
            stack.append(glob)
    elif name == "STACK_GLOBAL":
        qual, module = stack.pop(), stack.pop()
        if isinstance(module, str) and isinstance(qual, str):
            glob = _Slot(name=f"{module}.{qual}")
            glob.parts = (module, qual)
        else:
            glob = _Slot(name=_COMPUTED)
        scan.imports.add(str(glob.name))
        stack.append(glob)
    elif name.startswith("EXT"):  # a global from copyreg's extension registry
        scan.imports.add(_COMPUTED)
        stack.append(_Slot(name=_COMPUTED))
    elif name == "REDUCE":
        args = stack.pop()
        stack.append(_call(scan, stack.pop(), args))
    elif name == "OBJ":  # the class, then its arguments, since the mark
        items = _pop_to_mark(stack, marks)
        stack.append(_call(scan, items[0], _built(items[1:], False)))
    elif name in ("NEWOBJ", "NEWOBJ_EX"):  # cls.__new__(cls, *args): no constructor runs; it holds its class
        items = [stack.pop() for _ in range(2 if name == "NEWOBJ_EX" else 1)]
        items.append(stack.pop())
        stack.append(_built(items, True))
    elif name in _STRING_OPS:
        stack.append(arg if isinstance(arg, str) else _PLAIN)
    elif name in _GET_OPS:
        stack.append(memo[arg])
    elif name in _PUT_OPS:
        memo[arg] = stack[-1]
    elif name == "MEMOIZE":
        memo[len(memo)] = stack[-1]
    elif name == "DUP":
        stack.append(stack[-1])
    elif name in ("TUPLE", "TUPLE2", "TUPLE3"):
        start = marks[-1][1] if name == "TUPLE" and marks else -1
        items = _pop_to_mark(stack, marks) if name == "TUPLE" else _pop_n(stack, int(name[-1]))
        value = _built(items, False)
        if legacy and len(items) == 4 and items[0] == "module" and isinstance(items[1], _Slot) and items[1].parts:
            value = _Slot([items[1]])  # torch.save's legacy persistent id of a module class
            value.module_id = items[1]
            value.start = start
        stack.append(value)
    elif name == "BINPERSID" and stack and isinstance(stack[-1], _Slot) and stack[-1].module_id is not None:
        pid = stack.pop()
        cls = pid.module_id
        if cls is not None and cls.parts is not None and pid.start >= 0:
            scan.module_ids.append((pid.start, pos, *cls.parts))
        stack.append(cls)  # the legacy loader returns the class itself
    else:
        before = list(op.stack_before)
        popped: list[_Value] = []
        if pickletools.markobject in before:
            popped = _pop_to_mark(stack, marks)
            before = before[: before.index(pickletools.markobject)]
        popped = _pop_n(stack, len(before)) + popped
        if name in _FILLERS:  # the container (or instance) now holds what went in
            target, added = popped[0], [v for v in popped[1:] if _holds(v)]
            if added:
                if target is _PLAIN or isinstance(target, str):  # a plain value is never filled for real
                    target = _Slot()
                if target.kids is None:
                    target.kids = added
                else:
                    target.kids.extend(added)
            stack.append(target)
        elif op.stack_after:
            stack.append(_built(popped, name in _MUTABLE))


def _pop_n(stack: list[_Value], n: int) -> list[_Value]:
    if n > len(stack):
        raise IndexError(n)
    items = stack[len(stack) - n :]
    del stack[len(stack) - n :]
    return items


def _torch_safe_globals() -> set[str]:
    try:
        from torch import _weights_only_unpickler

        return set(_weights_only_unpickler._get_allowed_globals())
    except Exception:  # private API moved: vet everything ourselves (stricter, never looser)
        return set()


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
        if not by_user and _denied(name):
            reason = "its package can run code, spawn processes or touch files/network when built"
            refused.append(_Refusal(name, reason, name))
            continue
        try:
            obj = _resolve(name)
        except _Unresolvable as e:
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
        if callable(obj) and any(user_allowed(name, [p]) and user_allowed(home, [p]) for p in _FUNCTION_PREFIXES):
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
            _resolve(name)
        except _Unresolvable:
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
        allowed += _numpy_hidden_types()
    # exact global names the user allowed also cover types the unpickler meets without a GLOBAL opcode
    for entry in allow_modules:
        if "." not in entry or any(name == entry for _, name in allowed):
            continue
        obj = data_global(entry)
        if obj is None:  # the user named it exactly (never a __main__ that is not running)
            try:
                obj = _resolve(entry)
            except _Unresolvable:
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
