"""An on/off switch read from an environment variable, with a ``with``-block form.

The fast path (``GRAPHSPARSE_FAST``), its C++ CPU kernel (``GRAPHSPARSE_CPU_KERNEL``) and its Triton kernel
(``GRAPHSPARSE_TRITON_KERNEL``) each have one;
modules expose its bound methods as their ``is_enabled`` / ``set_enabled`` / ``enabled`` functions.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Switch"]

_OFF = ("0", "false", "no", "off")


class Switch:
    """On unless the environment variable ``env`` is one of 0 / false / no / off (any case).

    ``on`` is a plain attribute, cheap to read on a hot path.
    """

    def __init__(self, env: str) -> None:
        self.env = env
        self.on = os.environ.get(env, "1").strip().lower() not in _OFF

    def is_enabled(self) -> bool:
        """Whether the switch is on."""
        return self.on

    def set_enabled(self, flag: bool) -> None:
        """Turn the switch on (True) or off (False)."""
        self.on = bool(flag)

    @contextmanager
    def enabled(self, flag: bool) -> Iterator[None]:
        """:meth:`set_enabled` for the duration of a ``with`` block (the previous setting is restored)."""
        previous = self.on
        self.on = bool(flag)
        try:
            yield
        finally:
            self.on = previous
