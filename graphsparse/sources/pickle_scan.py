"""Following a pickle without running it (DESIGN §5): the opcode walk behind
:mod:`graphsparse.sources.safe_pickle`.

A pickle can import and call any global it names, so the file is followed statically (pickletools' opcodes on
a symbolic stack): which globals it imports, and which of them it calls or hands to a call
(:class:`PickleScan`). Nothing is unpickled and nothing the file names is imported. The walk is linear in the
file, in time and memory (values are shared, never copied), and follows at most :data:`MAX_PICKLE_OPCODES`
opcodes. Zip checkpoints are also checked against their CRC-32s (:func:`verify_zip`).
"""

from __future__ import annotations

import gc
import io
import pickle
import pickletools
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphsparse.errors import ModelSourceError
from graphsparse.sources.pickle_policy import is_trusted_enum

__all__ = ["MAX_PICKLE_OPCODES", "PickleScan", "scan_file", "verify_zip"]

# A model checkpoint's pickle is small (tensor data lives outside it: zip records, or raw bytes after a legacy
# file's pickles): ~20 opcodes per tensor, ~10^5 for a large model. Following more would only let a crafted
# file keep the scan busy; the scan is linear, so this caps its time (seconds) and memory (hundreds of MB).
MAX_PICKLE_OPCODES = 5_000_000


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
            if callee not in _STORES_ITS_ARGUMENTS and not is_trusted_enum(callee)
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
