"""What a pickle may name (DESIGN §5): the policy :mod:`graphsparse.sources.safe_pickle` vets globals by.

Allowed with no flag: plain data types (numpy arrays, scalars, dtypes and random states; argparse and
``SimpleNamespace`` args; paths, dates; see :func:`data_global`); module and enum classes of
:data:`TRUSTED_PACKAGES`, which a file may only instantiate the way ``torch.save`` does, without running a
constructor (:func:`class_problem`); the tensor functions of :data:`FUNCTION_PREFIXES`. Never allowed without
naming them: anything of the :func:`denied` subpackages, whose classes run code when built. Allowed by the
user: whatever lies inside an ``--allow-module`` (:func:`user_allowed`).

Resolving a global (:func:`resolve_global`) has no side effects: a module is imported only if it is already
imported, or is found statically inside an imported package and is not a program (``__main__``); the caller
decides which packages may be imported at all, and untrusted names never reach it.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import sys
import types
import warnings
from collections.abc import Iterable
from typing import Any

from torch import nn

from graphsparse._compat import ensure_autoattack_alias

__all__ = [
    "FUNCTION_PREFIXES",
    "TRUSTED_PACKAGES",
    "Unresolvable",
    "class_problem",
    "data_global",
    "denied",
    "is_trusted_enum",
    "numpy_hidden_types",
    "resolve",
    "resolve_global",
    "user_allowed",
]

TRUSTED_PACKAGES = ("torch", "torchvision", "timm", "robustbench", "graphsparse")

# The weights-only unpickler lets an allowed global be *called* (REDUCE) with arguments taken from the
# file. Allowing every function of a trusted package would therefore re-open code execution:
# ``torch.hub.load(repo, ...)`` imports and runs a hubconf, ``torch.load`` unpickles another file without
# weights_only, and so on. Functions are allowed only from the pure tensor-op namespaces below
# (``torch._C._nn`` is where ``F.gelu`` & co. really live). Classes are allowed from trusted packages if
# they really are defined there (no re-exports of ``os``/``subprocess`` objects through a trusted module)
# and are modules or enums (see ``class_problem``).
FUNCTION_PREFIXES = ("torch.nn.functional", "torch._C._nn", "timm.layers")
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


def denied(name: str) -> bool:
    """True if ``name`` lies in one of the trusted subpackages whose classes can run code when built."""
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


def numpy_hidden_types() -> list[tuple[Any, str]]:
    """numpy types a pickle builds without naming them (a dtype's class, met by BUILD), as ``(object, name)``
    pairs; empty until :func:`data_global` has looked up a numpy name."""
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
        if denied(home):
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


class Unresolvable(Exception):
    """Why a global's object cannot be found without running code that vetting must not run (raised by
    :func:`resolve`; :func:`resolve_global` turns it into a ``LookupError``)."""


def _import_module(module: str) -> types.ModuleType:
    """An already imported module, or import one that is known to exist (found statically first)."""
    if module in sys.modules:
        return sys.modules[module]
    if "__main__" in module.split("."):
        raise Unresolvable(f"{module} is a program (a __main__ module runs when imported), which vetting never imports")
    if module.split(".")[0] == "robustbench":
        ensure_autoattack_alias()  # robustbench's modules import 'autoattack', which is pyautoattack on PyPI
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated-path FutureWarnings of old timm imports in robustbench
            return importlib.import_module(module)
    except (Exception, SystemExit) as e:  # ImportError, or an error (an exit) raised while the module ran
        raise Unresolvable(f"importing {module} failed ({type(e).__name__}: {e})") from e


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
        return resolve(name)
    except Unresolvable as e:
        raise LookupError(str(e)) from None


def resolve(name: str) -> Any:
    """:func:`resolve_global` as vetting uses it: raises :class:`Unresolvable` where the name does not resolve."""
    parts = name.split(".")
    if not all(p.isidentifier() for p in parts[:1]):
        raise Unresolvable("not a module path")
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
            raise Unresolvable(f"{'.'.join(parts[:i])} has no attribute path {'.'.join(parts[i:])}")
        if isinstance(obj, types.ModuleType):
            raise Unresolvable("the path runs through a module attribute")
    if isinstance(obj, types.ModuleType):
        raise Unresolvable("it names a module, not a class or function")
    return obj


_MISSING = object()


def is_trusted_enum(name: str) -> bool:
    """True if ``name`` is an enum class of a trusted package (calling an enum only looks up a member)."""
    # only trusted packages' ordinary modules are looked at: a name from the file must not import its module
    # before it is vetted (an untrusted callee gets the file refused anyway)
    if name.startswith("<") or name.split(".")[0] not in TRUSTED_PACKAGES or denied(name):
        return False
    try:
        obj = resolve(name)
    except Unresolvable:
        return False
    return isinstance(obj, type) and issubclass(obj, enum.Enum)
