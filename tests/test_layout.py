"""The package layout (docs/architecture.md): which stage may import which, no private names across modules, module
sizes, and the old module paths that still import for one release."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import graphsparse
from graphsparse._moved import MOVED, new_name

PACKAGE = Path(graphsparse.__file__).resolve().parent

# stage -> the stages it may import (besides itself and the shared top-level modules of BASE)
BASE = {"errors", "_files", "_compat", "_moved", "data", "distributed", "model_output"}
ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "ops": set(),
    "sources": set(),
    "graph": {"ops"},
    "planning": {"ops", "graph", "sources"},
    "artifact": {"ops", "graph", "sources", "planning"},
    "stats": {"ops", "graph", "sources", "planning", "artifact"},
    "robust": {"ops", "graph", "sources", "planning", "artifact"},
    "deploy": {"ops", "graph", "sources", "planning", "artifact"},
    "plots": {"ops", "graph", "sources", "planning", "artifact", "stats", "robust"},
    "testing": {"ops", "graph", "sources", "planning", "artifact"},
    "demo": {"ops", "graph", "sources", "planning", "artifact", "stats", "robust", "plots", "deploy"},
    "cli": {"ops", "graph", "sources", "planning", "artifact", "stats", "robust", "plots", "deploy", "demo"},
}
# modules over the size limit, and why
LONG_MODULES = {
    "testing/architectures.py": "a catalogue of test architectures, one small class or builder per entry",
}
MAX_LINES = 600


def _stage(module: str) -> str:
    """The stage of ``graphsparse.X...``: its folder, ``base`` for the shared top-level modules."""
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    head = parts[1]
    if head in BASE:
        return "base"
    if head == "__main__":
        return "cli"
    return head


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(source: str, module: str, is_package: bool) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) of every graphsparse import in ``source``, at any depth."""
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "graphsparse":
                found.append((node.lineno, target, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "graphsparse"]
    return found


def layout_problems(root: Path = PACKAGE) -> list[str]:
    """Every import that crosses the layout the wrong way, and every private name imported from another module."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        stage = _stage(module)
        for line, target, names in _imports(path.read_text(), module, path.name == "__init__.py"):
            where = f"{path.relative_to(root.parent)}:{line}"
            if target in MOVED or new_name(target) != target:
                problems.append(f"{where} imports {target}, an old path (use {new_name(target)})")
                continue
            submodules = {f"{target}.{n}" for n in names if importlib.util.find_spec(f"{target}.{n}") is not None} \
                if names and target.count(".") < 2 and (PACKAGE.parent / target.replace(".", "/")).is_dir() else set()
            for imported in submodules or {target}:
                other = _stage(imported)
                if stage != "package" and other not in ("base", "package", stage) and other not in ALLOWED[stage]:
                    problems.append(f"{where}: {stage} may not import {other} ({imported})")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                problems.append(f"{where} imports private {', '.join(private)} of {target}")
    return problems


def test_imports_follow_the_layout():
    assert layout_problems() == []


def test_the_layout_check_catches_a_forbidden_import(tmp_path):
    fake = tmp_path / "graphsparse"
    for stage, text in {
        "graph": "from graphsparse.robust.evaluate import evaluate\n",
        "stats": "from graphsparse.robust import attack_cache\n",
        "robust": "from graphsparse.stats.calibrate import _helper\n",
        "planning": "import graphsparse.evaluate\n",
    }.items():
        (fake / stage).mkdir(parents=True)
        (fake / stage / "__init__.py").write_text("")
        (fake / stage / "mod.py").write_text(text)
    problems = "\n".join(layout_problems(fake))
    assert "graph may not import robust" in problems
    assert "stats may not import robust" in problems
    assert "private _helper of graphsparse.stats.calibrate" in problems
    assert "robust may not import stats" in problems
    assert "an old path (use graphsparse.robust.evaluate)" in problems


def test_no_module_is_over_the_size_limit_without_a_reason():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert set(long) <= set(LONG_MODULES), {k: v for k, v in long.items() if k not in LONG_MODULES}


def test_every_stage_folder_says_what_it_owns_and_may_import():
    for folder in PACKAGE.iterdir():
        init = folder / "__init__.py"
        if folder.is_dir() and init.is_file() and folder.name not in ("assets",):
            doc = ast.get_docstring(ast.parse(init.read_text()))
            assert doc, f"{init} has no docstring"
            if folder.name in ALLOWED and folder.name not in ("ops", "cli", "testing", "deploy"):
                assert "May import" in doc, f"{init} does not say what it may import"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_import_the_moved_module_with_a_deprecation_warning(old):
    code = (
        "import importlib, sys, warnings\n"
        "warnings.simplefilter('error', DeprecationWarning)\n"
        f"new = importlib.import_module({MOVED[old]!r})\n"
        "try:\n"
        f"    importlib.import_module({old!r})\n"
        "except DeprecationWarning as w:\n"
        f"    assert {MOVED[old]!r} in str(w), w\n"
        "else:\n"
        "    raise SystemExit('no warning')\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        f"stand_in = importlib.import_module({old!r})\n"
        "public = [n for n in vars(new) if not n.startswith('_')]\n"
        "assert public and all(getattr(stand_in, n) is getattr(new, n) for n in public)\n"
        f"assert new.__spec__.name == {MOVED[old]!r}  # the moved module keeps its own spec\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr + done.stdout


def test_names_split_off_a_moved_module_are_found_under_its_old_path(monkeypatch):
    """Modules were split as they moved; a name imported from the old path is found in the module it went to,
    and patching it there (as tests of user code do) patches the function the package calls."""
    import warnings

    from graphsparse.planning import rule_parser
    from graphsparse.robust import attack_cache, attacks, pgd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old_evaluate = importlib.import_module("graphsparse.evaluate")
        from graphsparse.capture import operator_types
        from graphsparse.rules import parse_rules
        from graphsparse.train import NORMS
    assert old_evaluate.run_attack is attacks.run_attack and parse_rules is rule_parser.parse_rules
    assert NORMS is pgd.NORMS and operator_types.__module__ == "graphsparse.graph.tracer"
    monkeypatch.setattr(old_evaluate, "forward_batches", "patched")
    assert attacks.forward_batches == "patched"
    assert attack_cache.run_attack is attacks.run_attack
    with pytest.raises(AttributeError, match="now graphsparse.robust.evaluate"):
        old_evaluate.no_such_name  # noqa: B018


def test_a_pickle_and_a_recipe_written_before_the_move_still_load(tmp_path):
    """Whole-model pickles and artifact recipes name classes by module path; the old paths must keep loading."""
    import warnings

    import torch

    import graphsparse as gs
    from graphsparse.demo.models import DemoPreActResNet
    from graphsparse.sources.load import load_model

    model = DemoPreActResNet()
    path = tmp_path / "old.pt"
    DemoPreActResNet.__module__ = "graphsparse.models"  # as pickled before the move
    try:
        torch.save(model, path)
    finally:
        DemoPreActResNet.__module__ = "graphsparse.demo.models"
    assert b"graphsparse.models" in path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded, _ = load_model(str(path))
        built, _ = load_model("graphsparse.models:load_demo_model")
    assert type(loaded) is DemoPreActResNet
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    assert isinstance(built, DemoPreActResNet)
    assert gs.evaluate.__module__ == "graphsparse.robust.evaluate"
