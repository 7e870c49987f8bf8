"""The demo: the shipped demo model (``models``, weights in ``assets/``) and the whole pipeline run on it
(``pipeline``: ``graphsparse demo``).

May import every stage; nothing but the CLI and users import it.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DemoResult", "DemoSettings", "run_demo"]


def __getattr__(name: str) -> Any:
    # ``from graphsparse.demo import run_demo`` as before the demo became a folder, without importing the
    # pipeline (torch, timm, every stage) when only the demo model is wanted
    if name in __all__:
        return getattr(importlib.import_module("graphsparse.demo.pipeline"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
