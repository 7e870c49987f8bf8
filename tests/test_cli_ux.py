"""The CLI's everyday surface: start-up cost, what it prints on every run, artifact names."""

from __future__ import annotations

import os
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

import graphsparse
from graphsparse.cli import COMMANDS, main

_HEAVY = ("torch", "timm", "numpy", "safetensors", "matplotlib")

_RUN_CLI = """
import runpy, sys
sys.argv = ["graphsparse", *{args!r}]
try:
    runpy.run_module("graphsparse", run_name="__main__")
except SystemExit as exc:
    code = exc.code
print("LOADED", sorted(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)
"""


def _loaded_after(code: str) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stderr.splitlines() if x.startswith("LOADED"))
    return line, done.stdout


@pytest.mark.parametrize("args", [("--help",), ("--version",), ("rewrite", "--help")], ids=["help", "version", "cmd"])
def test_help_and_version_do_not_import_torch(args):
    loaded, out = _loaded_after(_RUN_CLI.format(args=args, heavy=_HEAVY))
    if args[0] == "rewrite":  # a command's own help imports its module, not the others'
        assert "Rewrite MODEL" in out
        return
    assert loaded == "LOADED []"
    assert ("version" in out) if args == ("--version",) else ("rewrite" in out and "calibrate" in out)


def test_import_graphsparse_is_light_and_every_public_name_is_there():
    code = (
        "import sys, graphsparse\n"
        f"print('LOADED', sorted(m for m in {_HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
    )
    assert _loaded_after(code)[0] == "LOADED []"
    for name in graphsparse.__all__:
        assert getattr(graphsparse, name) is not None, name
    assert set(graphsparse.__all__) <= set(dir(graphsparse))
    with pytest.raises(AttributeError, match="no_such_name"):
        graphsparse.no_such_name  # noqa: B018


def test_public_functions_named_like_their_module_stay_functions_after_the_module_is_imported():
    """`import graphsparse.calibrate` (the module's old path, still importable) binds the package attribute to
    the submodule; the public name must still be the function."""
    code = (
        "import graphsparse as gs\n"
        "import graphsparse.calibrate, graphsparse.tune, graphsparse.train, graphsparse.plan, graphsparse.capture\n"
        "import graphsparse.evaluate, graphsparse.stats.calibrate, graphsparse.robust.evaluate\n"
        "from graphsparse import calibrate, tune, train, plan, capture, evaluate\n"
        "for f in (gs.calibrate, gs.tune, gs.train, gs.plan, gs.capture, gs.evaluate, calibrate, tune, train, plan):\n"
        "    assert callable(f) and type(f).__name__ == 'function', f\n"
        "assert gs.calibrate.__module__ == 'graphsparse.stats.calibrate' and gs.plan.__module__ == 'graphsparse'\n"
        "print('LOADED ok', file=__import__('sys').stderr)\n"
    )
    assert _loaded_after(code)[0] == "LOADED ok"
    named_like = sorted(graphsparse._SHADOWED)  # public names that are also a module's old (deprecated) path
    code = (
        "import importlib, graphsparse as gs\n"
        f"for name in {named_like!r}:\n"
        "    importlib.import_module('graphsparse.' + name)\n"
        "    assert type(getattr(gs, name)).__name__ == 'function', name\n"
        "print('LOADED ok', file=__import__('sys').stderr)\n"
    )
    assert "rewrite" in named_like and _loaded_after(code)[0] == "LOADED ok"


def test_submodules_are_attributes_of_the_package_as_before():
    """`import graphsparse as gs; gs.models.load_demo_model()` worked when the package imported every stage."""
    code = (
        "import graphsparse as gs\n"
        "assert callable(gs.models.load_demo_model) and callable(gs.io.save) and gs.ops.MeanSparse is gs.MeanSparse\n"
        "assert callable(gs.sources.default_input_shape) and 'after_addition' in gs.rules.builtin_rules()\n"
        "try:\n    gs.no_such_module\nexcept AttributeError:\n    print('LOADED ok', file=__import__('sys').stderr)\n"
    )
    assert _loaded_after(code)[0] == "LOADED ok"


def test_help_lists_each_command_with_its_own_first_line():
    out = CliRunner().invoke(main, ["--help"], terminal_width=200).output
    ctx = click.Context(main)
    listed = main.list_commands(ctx)
    assert {"inspect", "rewrite", "calibrate", "tune", "eval", "plot", "demo"} <= set(listed)
    assert set(listed) <= set(COMMANDS)
    for name in listed:
        command = main.get_command(ctx, name)
        assert command is not None and command.name == name
        first = command.help.split("\n\n")[0].replace("\n", " ")
        assert f"  {name}" in out and first.split(".")[0] in out, name
    assert main.get_command(ctx, "no-such-command") is None


def test_a_command_not_installed_is_left_out(monkeypatch):
    monkeypatch.setitem(COMMANDS, "frobnicate", "frobnicate_cmd")
    assert "frobnicate" not in main.list_commands(click.Context(main))
    res = CliRunner().invoke(main, ["frobnicate"])
    assert res.exit_code == 2 and "No such command" in res.output


@pytest.mark.parametrize("trigger", ["cpu_kernel.available()", "from torch.utils import cpp_extension"])
def test_no_cuda_home_notice_on_cpu_machines(tmp_path, trigger):
    """Building the CPU kernel, and inductor compiling graphsparse's kernels, import torch.utils.cpp_extension,
    which logs `No CUDA runtime is found, using CUDA_HOME=...` on a machine with a CUDA toolkit and no GPU:
    graphsparse drops that one record, not others."""
    code = (
        "import logging\n"
        "from graphsparse.ops import cpu_kernel\n"
        f"{trigger}\n"
        "logging.getLogger('torch.utils.cpp_extension').warning('another notice')\n"
    )
    env = {**os.environ, "CUDA_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}  # a toolkit, no GPU
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    assert "No CUDA runtime" not in done.stderr
    assert "another notice" in done.stderr


def _run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def demo_artifact(tmp_path_factory):
    """A calibrated artifact of the demo architecture on the digits data (8×8), α = 0, and one of its sites."""
    art = tmp_path_factory.mktemp("demo") / "demo.safetensors"
    res = _run("rewrite", "graphsparse.demo.models:DemoPreActResNet", "--rule", "after_addition", "--input-shape",
               "1,1,8,8", "--data", "digits", "--max-samples", "256", "-o", str(art))
    assert res.exit_code == 0, res.output
    return art, next(iter(graphsparse.operators(graphsparse.load(art))))


@pytest.mark.slow
def test_plot_site_draws_the_alpha_asked_for(demo_artifact, tmp_path, monkeypatch):
    """plot --site --alpha A draws the band of A (the artifact's α is 0 here: both panels were the same)."""
    import graphsparse.plots

    art, site = demo_artifact
    drawn = []
    real = graphsparse.plots.plot_site_histogram
    monkeypatch.setattr(
        graphsparse.plots, "plot_site_histogram", lambda *a, **k: drawn.append(k["alpha"]) or real(*a, **k)
    )
    common = ("plot", str(art), "--site", site, "--max-samples", "16")
    res = _run(*common, "-o", str(tmp_path / "a0.png"))
    assert res.exit_code == 0, res.output
    assert "α = 0" in res.output and "--alpha" in res.output  # says why the panels are the same
    res = _run(*common, "--alpha", "0.5", "-o", str(tmp_path / "a05.png"))
    assert res.exit_code == 0, res.output
    assert "α = 0.5" in res.output and "note:" not in res.output
    assert drawn == [0.0, 0.5]
    assert (tmp_path / "a05.png").read_bytes() != (tmp_path / "a0.png").read_bytes()
    res = _run(*common, "--alpha", "-1", "-o", str(tmp_path / "bad.png"))
    assert res.exit_code == 2 and "--alpha" in res.output
    res = _run("plot", str(art), "--tuning", "--alpha", "0.5")
    assert res.exit_code == 2 and "--site" in res.output


@pytest.mark.parametrize(
    "args,suffix",
    [
        (("rewrite", "timm:no_such_model", "--rule", "full", "-o", "{tmp}/out.pt"), ".safetensors"),
        (("rewrite", "timm:no_such_model", "--rule", "full", "-o", "{tmp}/out"), ".safetensors"),
        (("plot", "{art}", "--tuning", "-o", "{tmp}/curve.jpg"), ".png"),
    ],
    ids=["rewrite-pt", "rewrite-bare", "plot-jpg"],
)
def test_an_output_named_for_another_format_is_refused_before_any_work(tmp_path, args, suffix):
    """`-o out.pt` wrote a safetensors file under a pickle's name without a word; now the option is refused
    (usage error, exit 2) before the model is even looked up, with the name to use instead."""
    art = tmp_path / "a.safetensors"
    art.write_bytes(b"not read: the option is checked first")
    args = [a.format(tmp=tmp_path, art=art) for a in args]
    res = _run(*args)
    assert res.exit_code == 2, res.output
    wanted = str(tmp_path / ("out" if args[0] == "rewrite" else "curve")) + suffix
    assert "'-o'" in res.output and suffix in res.output and f"-o {wanted}" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_an_output_with_the_right_suffix_in_any_case_is_accepted(tmp_path):
    from graphsparse.cli._term import output_suffix

    check = output_suffix(".safetensors", "an artifact")
    assert check(None, None, str(tmp_path / "Model.SafeTensors")) == str(tmp_path / "Model.SafeTensors")
    assert check(None, None, None) is None


def test_every_lazy_name_is_exported_and_visible_to_type_checkers():
    """graphsparse/__init__.py lists each public name three times (the lazy table, the TYPE_CHECKING imports,
    __all__); a name added to one list only would be missing for users or for type checkers."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(graphsparse))
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    typed = {
        alias.asname or alias.name: f"{node.module}"
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert typed == dict(graphsparse._LAZY)
    assert set(graphsparse.__all__) == set(graphsparse._LAZY) | {"plan"}
    assert len(graphsparse.__all__) == len(set(graphsparse.__all__))
