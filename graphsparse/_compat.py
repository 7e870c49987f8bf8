"""Small shims for third-party packages that are installed under another name than they import (DESIGN §6)."""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["ensure_autoattack_alias"]

# pyautoattack's submodules that robustbench (or a pickle of its objects) may import as ``autoattack.X``
_AUTOATTACK_SUBMODULES = ("autoattack", "state", "autopgd_base", "fab_pt", "square", "checks", "other_utils")


def ensure_autoattack_alias() -> bool:
    """Make ``import autoattack`` resolve to PyPI's ``pyautoattack`` unless a real ``autoattack`` is installed.

    robustbench imports a module ``autoattack`` (the GitHub package), while PyPI's AutoAttack is
    ``pyautoattack``; robustbench cannot be imported without one of them. The submodules robustbench uses
    (``autoattack.state``) are aliased too, so each is one module object under both names. Idempotent and
    cheap to call many times; importing robustbench afterwards is the caller's business.

    Returns:
        True if ``autoattack`` is importable afterwards (the real package, or the alias).
    """
    if "autoattack" in sys.modules:
        return True
    try:
        real = importlib.util.find_spec("autoattack") is not None  # static: nothing is imported
    except (ImportError, ValueError):
        real = False
    if real:
        return True
    try:
        import pyautoattack
    except ImportError:
        return False
    sys.modules["autoattack"] = pyautoattack
    for sub in _AUTOATTACK_SUBMODULES:
        try:
            module = importlib.import_module(f"pyautoattack.{sub}")
        except ImportError:
            continue
        sys.modules.setdefault(f"autoattack.{sub}", module)
    return True
