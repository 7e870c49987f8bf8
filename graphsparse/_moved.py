"""Old import paths of modules that moved into the stage folders (issue 21); they keep working for one release.

``import graphsparse.evaluate`` (or ``graphsparse.models:load_demo_model`` in a recipe, or a pickle naming
``graphsparse.models.DemoPreActResNet``) gets a stand-in module under the old name, with a
:class:`DeprecationWarning` naming the new path. Its attributes are those of the module at its new place, then of
the modules split off it (``graphsparse.evaluate.run_attack`` is ``graphsparse.robust.attacks.run_attack``); setting
one (a test's monkeypatch) sets it where it lives. A finder on ``sys.meta_path`` does it, so the old names need no
files in the package folder.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings
from importlib.machinery import ModuleSpec
from typing import Any

# old module -> new module
MOVED: dict[str, str] = {
    "graphsparse.activations": "graphsparse.graph.activations",
    "graphsparse.capture": "graphsparse.graph.capture",
    "graphsparse.roles": "graphsparse.graph.roles",
    "graphsparse.sites": "graphsparse.graph.sites",
    "graphsparse.fuse": "graphsparse.planning.fuse",
    "graphsparse.plan": "graphsparse.planning.plan",
    "graphsparse.rewrite": "graphsparse.planning.rewrite",
    "graphsparse.rules": "graphsparse.planning.rules",
    "graphsparse.io": "graphsparse.artifact.io",
    "graphsparse.records": "graphsparse.artifact.records",
    "graphsparse.safe_pickle": "graphsparse.sources.safe_pickle",
    "graphsparse.calibrate": "graphsparse.stats.calibrate",
    "graphsparse.histograms": "graphsparse.stats.histograms",
    "graphsparse.moments": "graphsparse.stats.moments",
    "graphsparse.attack_cache": "graphsparse.robust.attack_cache",
    "graphsparse.eval_report": "graphsparse.robust.eval_report",
    "graphsparse.eval_state": "graphsparse.robust.eval_state",
    "graphsparse.evaluate": "graphsparse.robust.evaluate",
    "graphsparse.per_sample": "graphsparse.robust.per_sample",
    "graphsparse.train": "graphsparse.robust.train",
    "graphsparse.tune": "graphsparse.robust.tune",
    "graphsparse.models": "graphsparse.demo.models",
}


# old module -> the modules split off its new home, where the rest of its old names now live
SPLIT_OFF: dict[str, tuple[str, ...]] = {
    "graphsparse.calibrate": ("graphsparse.stats.calibration_state",),
    "graphsparse.capture": ("graphsparse.graph.census", "graphsparse.graph.tracer"),
    "graphsparse.evaluate": ("graphsparse.robust.attacks", "graphsparse.robust.samples", "graphsparse.ops.state"),
    "graphsparse.rules": (
        "graphsparse.planning.rule_parser",
        "graphsparse.planning.selectors",
        "graphsparse.planning.resolve",
    ),
    "graphsparse.train": ("graphsparse.robust.pgd", "graphsparse.robust.train_state"),
}


def new_name(name: str) -> str:
    """``name`` (a module, ``module.attr`` or ``module:attr``) with a moved module's old path replaced."""
    module, colon, attr = name.partition(":")
    parts = module.split(".")
    for i in range(len(parts), 1, -1):
        moved = MOVED.get(".".join(parts[:i]))
        if moved is not None:
            return ".".join([moved, *parts[i:]]) + colon + attr
    return name


class OldPath(types.ModuleType):
    """A moved module under its old name: reads and writes go to the module that holds the name now."""

    def __init__(self, name: str, homes: tuple[str, ...]) -> None:
        super().__init__(name)
        object.__setattr__(self, "_homes", homes)
        self.__doc__ = f"Deprecated path of {homes[0]}."

    def _home_of(self, name: str) -> types.ModuleType | None:
        for home in self._homes:
            module = importlib.import_module(home)
            if name in vars(module):
                return module
        return None

    def __getattr__(self, name: str) -> Any:
        home = self._home_of(name)
        if home is None:
            raise AttributeError(f"module {self.__name__!r} (now {self._homes[0]}) has no attribute {name!r}")
        return getattr(home, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("__"):  # the import system's own attributes (__spec__, __loader__, ...)
            object.__setattr__(self, name, value)
            return
        setattr(self._home_of(name) or importlib.import_module(self._homes[0]), name, value)

    def __delattr__(self, name: str) -> None:
        home = self._home_of(name)
        if home is None:
            raise AttributeError(name)
        delattr(home, name)

    def __dir__(self) -> list[str]:
        return sorted({n for home in self._homes for n in dir(importlib.import_module(home))})


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module path and loads it as an :class:`OldPath` of the module at its new place."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: ModuleSpec) -> types.ModuleType:
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; import it from there (the old path goes in the next release)",
            DeprecationWarning,
            stacklevel=2,
        )
        importlib.import_module(new)  # an error in the new module shows now, under its own name
        return OldPath(spec.name, (new, *SPLIT_OFF.get(spec.name, ())))

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def install() -> None:
    """Puts the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
