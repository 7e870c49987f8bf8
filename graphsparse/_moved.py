"""Old import paths of modules that moved into the stage folders (issue 21); they keep working for one release.

``import graphsparse.evaluate`` (or ``graphsparse.models:load_demo_model`` in a recipe, or a pickle naming
``graphsparse.models.DemoPreActResNet``) gets the module at its new place, the same module object, with a
:class:`DeprecationWarning` naming the new path. A finder on ``sys.meta_path`` does it, so the old names need no
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


def new_name(name: str) -> str:
    """``name`` (a module, ``module.attr`` or ``module:attr``) with a moved module's old path replaced."""
    module, colon, attr = name.partition(":")
    parts = module.split(".")
    for i in range(len(parts), 1, -1):
        moved = MOVED.get(".".join(parts[:i]))
        if moved is not None:
            return ".".join([moved, *parts[i:]]) + colon + attr
    return name


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module path and loads it as the module at its new place."""

    def __init__(self) -> None:
        self._specs: dict[str, ModuleSpec | None] = {}  # old name -> the moved module's own spec

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
        module = importlib.import_module(new)
        self._specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        # the import system set module.__spec__ to the old name's spec; the module keeps its own
        module.__spec__ = self._specs.pop(module.__spec__.name, module.__spec__)


def install() -> None:
    """Puts the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
