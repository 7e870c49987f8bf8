"""Selectors: which sites a rule is about, and how a site is matched against one.

A :class:`Selector` is the parsed ``select:`` of a rule. Every key given must match; a value may be a
scalar or a list meaning any-of.

- ``role``: one of :data:`graphsparse.graph.sites.ROLES`.
- ``op``: an activation kind (``relu``, ``gelu``, ...), ``add`` (a residual-addition output that feeds no
  activation), or ``activation`` (any op except ``add``).
- ``id``, ``module``: glob (``layer1.*``) or regex with a ``re:`` prefix; both match the whole string.
- ``module_class``: glob on the class name.
- ``stage``: int, ``"1-3"`` range, or a list of those (any-of).
- ``depth``: int, ``"3-7"`` range, ``[lo, hi]`` (a list of exactly two ints is an inclusive range), or a
  list of ints / ranges with another length.
- ``relative_depth``: ``[lo, hi]`` within 0–1, inclusive.
- ``position``: ``first`` | ``last`` (in its stage).
- ``reached``: ``graph`` | ``module_tree``.  ``layout``: one of :data:`graphsparse.graph.sites.LAYOUTS`.
- ``not``: a selector mapping; sites it matches are excluded.

``select: all`` or ``select: {}`` matches every site. :mod:`graphsparse.planning.rule_parser` checks the
values; this module only matches them.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from graphsparse.graph.sites import Site

__all__ = ["SELECTOR_KEYS", "POSITIONS", "REACHED", "OP_ALIASES", "Range", "Selector", "fmt_range"]

SELECTOR_KEYS = (
    "role", "op", "id", "module", "module_class", "stage", "depth", "relative_depth",
    "position", "reached", "layout", "not",
)
POSITIONS = ("first", "last")
REACHED = ("graph", "module_tree")
OP_ALIASES = ("add", "activation")

Range = tuple[int, int]


@dataclass(frozen=True)
class Selector:
    """Which sites a rule is about. Unset fields (None) do not constrain; set fields are any-of.

    ``id`` and ``module`` patterns are globs, or regexes when they start with ``re:``.
    """

    role: tuple[str, ...] | None = None
    op: tuple[str, ...] | None = None
    id: tuple[str, ...] | None = None
    module: tuple[str, ...] | None = None
    module_class: tuple[str, ...] | None = None
    stage: tuple[Range, ...] | None = None
    depth: tuple[Range, ...] | None = None
    relative_depth: tuple[float, float] | None = None
    position: tuple[str, ...] | None = None
    reached: tuple[str, ...] | None = None
    layout: tuple[str, ...] | None = None
    exclude: Selector | None = None

    @property
    def selects_all(self) -> bool:
        return self == Selector()

    def matches(self, site: Site) -> bool:
        """True when every set field matches ``site`` and ``exclude`` (``not:``) does not."""
        if self.role is not None and site.role not in self.role:
            return False
        if self.op is not None and not any(_op_matches(op, site.op) for op in self.op):
            return False
        if self.id is not None and not any(_pattern_matches(p, site.id) for p in self.id):
            return False
        if self.module is not None and not any(_pattern_matches(p, site.module) for p in self.module):
            return False
        if self.module_class is not None and not any(
            fnmatch.fnmatchcase(site.module_class, p) for p in self.module_class
        ):
            return False
        if self.stage is not None and not _in_ranges(site.stage, self.stage):
            return False
        if self.depth is not None and not _in_ranges(site.depth, self.depth):
            return False
        if self.relative_depth is not None:
            lo, hi = self.relative_depth
            if not lo <= site.relative_depth <= hi:
                return False
        if self.position is not None and not any(
            (site.first_in_stage if p == "first" else site.last_in_stage) for p in self.position
        ):
            return False
        if self.reached is not None and site.reached not in self.reached:
            return False
        if self.layout is not None and site.layout not in self.layout:
            return False
        return not (self.exclude is not None and self.exclude.matches(site))

    def describe(self) -> str:
        """What the selector looks for, in words (``role in [after_addition], stage 1-3``)."""
        if self.selects_all:
            return "all sites"
        parts = []
        for key in SELECTOR_KEYS[:-1]:
            value = getattr(self, key)
            if value is None:
                continue
            if key in ("stage", "depth"):
                shown = ", ".join(fmt_range(r) for r in value)
                parts.append(f"{key} {shown}" if len(value) == 1 else f"{key} in [{shown}]")
            elif key == "relative_depth":
                parts.append(f"relative_depth {value[0]:g}–{value[1]:g}")
            elif len(value) == 1:
                parts.append(f"{key} {value[0]}")
            else:
                parts.append(f"{key} in [{', '.join(value)}]")
        if self.exclude is not None:
            parts.append(f"not ({self.exclude.describe()})")
        return ", ".join(parts)


def _op_matches(wanted: str, op: str) -> bool:
    return op != "add" if wanted == "activation" else op == wanted


def _pattern_matches(pattern: str, value: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], value) is not None
    return fnmatch.fnmatchcase(value, pattern)


def _in_ranges(value: int, ranges: tuple[Range, ...]) -> bool:
    return any(lo <= value <= hi for lo, hi in ranges)


def fmt_range(r: Range) -> str:
    """An inclusive ``(lo, hi)`` range as written in rule files: ``3`` or ``1-3``."""
    return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"

