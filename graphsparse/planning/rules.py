"""Rule files: which sites get an operator, and with which α. The public entry: :func:`load_rules`,
:func:`builtin_rules` and the rule model (:class:`RuleSet`, :class:`Rule`, :class:`AlphaSpec`).

A rule file is YAML, parsed once (:func:`graphsparse.planning.rule_parser.parse_rules`) into frozen
dataclasses; nothing past the parser sees a raw dict. The format (``docs/rules.md`` has the long
version)::

    version: 1                       # required; the only version so far
    description: MeanSparse on every residual-addition output.
    alpha: 0.0                       # default α of meansparse rules that set none (optional, 0.0)
    rules:
      - name: additions              # optional label (default: ``rules[i]``)
        select: {role: after_addition}
        action: meansparse           # meansparse | sparta | skip
        alpha: 0.2                   # number | {linear: [start, end]} | {per_stage: {0: 0.1, 3: 0.3}}
        optional: false              # matching no site is an error unless true
        sparta: {reduction: 4}       # action sparta only: parameters passed to the operator

The selector keys are described in :mod:`graphsparse.planning.selectors`; which rule decides a site
(later rules override earlier ones, a matching ``skip`` always wins) in :mod:`graphsparse.planning.resolve`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphsparse.errors import RuleError, closest
from graphsparse.graph.sites import Site
from graphsparse.planning.resolve import Decision, resolve
from graphsparse.planning.selectors import Range, Selector, fmt_range

__all__ = [
    "ACTIONS",
    "AlphaSpec",
    "Rule",
    "RuleSet",
    "load_rules",
    "builtin_rules",
]

ACTIONS = ("meansparse", "sparta", "skip")

_BUILTIN_DIR = Path(__file__).resolve().parent / "builtin_rules"
_BUILTIN_SOURCE = "graphsparse/planning/builtin_rules/{name}.yaml"


# --------------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlphaSpec:
    """α for one rule (or the file's default): a constant, a linear schedule or per-stage values.

    Exactly one of ``constant``, ``linear`` and ``per_stage`` is set.

    Args:
        constant: the same α everywhere.
        linear: ``(start, end)``; a site at relative depth r gets ``start + (end - start) * r``.
        per_stage: ``((lo, hi), α)`` pairs, stages lo..hi inclusive, non-overlapping.
        default: α of stages ``per_stage`` does not list (None: the file's default α).
    """

    constant: float | None = None
    linear: tuple[float, float] | None = None
    per_stage: tuple[tuple[Range, float], ...] | None = None
    default: float | None = None

    def at(self, site: Site, fallback: float = 0.0) -> float:
        """α at ``site``; ``fallback`` serves stages a per-stage spec without ``default`` does not list."""
        if self.constant is not None:
            return self.constant
        if self.linear is not None:
            start, end = self.linear
            return start + (end - start) * float(site.relative_depth)
        for (lo, hi), value in self.per_stage or ():
            if lo <= site.stage <= hi:
                return value
        return self.default if self.default is not None else fallback

    def describe(self) -> str:
        if self.constant is not None:
            return f"{self.constant:g}"
        if self.linear is not None:
            return f"linear {self.linear[0]:g}→{self.linear[1]:g}"
        parts = [f"{fmt_range(r)}: {v:g}" for r, v in self.per_stage or ()]
        if self.default is not None:
            parts.append(f"default: {self.default:g}")
        return "per_stage {" + ", ".join(parts) + "}"


@dataclass(frozen=True)
class Rule:
    """One entry of ``rules:``.

    Args:
        index: position in the file's ``rules`` list.
        name: the ``name:`` label ('' when none was given; see :attr:`label`).
        select: which sites.
        action: ``meansparse``, ``sparta`` or ``skip``.
        alpha: α of a meansparse rule (None: the file's default).
        optional: matching no site is not an error.
        sparta: parameters of a sparta rule, as sorted ``(key, value)`` pairs (lists become tuples).
        line: 1-based line of the rule in its file, when known.
    """

    index: int
    name: str
    select: Selector
    action: str
    alpha: AlphaSpec | None = None
    optional: bool = False
    sparta: tuple[tuple[str, Any], ...] = ()
    line: int | None = None

    @property
    def label(self) -> str:
        """The rule's name, or ``rules[i]`` when it has none."""
        return self.name or f"rules[{self.index}]"

    @property
    def ref(self) -> str:
        """``rules[i]`` plus the name when there is one: ``rules[2] ('additions')``."""
        return f"rules[{self.index}] ({self.name!r})" if self.name else f"rules[{self.index}]"

    @property
    def sparta_params(self) -> dict[str, Any]:
        return dict(self.sparta)


@dataclass(frozen=True)
class RuleSet:
    """A parsed rule file.

    Args:
        rules: the rules, in file order.
        alpha: default α of meansparse rules that set none.
        description: the file's ``description``.
        version: format version (1).
        source: where it came from (a path, ``graphsparse/planning/builtin_rules/NAME.yaml`` for built-ins,
            or ``<string>``).
        text: the original file text, kept verbatim for artifacts.
    """

    rules: tuple[Rule, ...]
    alpha: AlphaSpec = field(default_factory=lambda: AlphaSpec(constant=0.0))
    description: str = ""
    version: int = 1
    source: str = "<string>"
    text: str = ""

    def __iter__(self):
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def resolve(self, sites: Sequence[Site]) -> tuple[Decision, ...]:
        """Shorthand for :func:`graphsparse.planning.resolve.resolve`."""
        return resolve(self, sites)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def builtin_rules() -> list[str]:
    """Names of the rule files shipped with graphsparse (``after_addition``, ``full``, ...)."""
    return sorted(p.stem for p in _BUILTIN_DIR.glob("*.yaml"))


def load_rules(name_or_path: str | Path | RuleSet) -> RuleSet:
    """Load a rule file by path or by name.

    Lookup order: an existing file at ``name_or_path``; else ``rules/NAME.yaml`` relative to the current
    directory; else the built-in ``graphsparse/planning/builtin_rules/NAME.yaml``. A :class:`RuleSet` passes through.

    Raises:
        RuleError: the file cannot be found or read, or is invalid.
    """
    if isinstance(name_or_path, RuleSet):
        return name_or_path
    raw = str(name_or_path)
    path = Path(raw)
    if path.is_file():
        return _read(path, raw)
    looks_like_path = isinstance(name_or_path, Path) or "/" in raw or "\\" in raw or path.suffix in (
        ".yaml", ".yml",
    )
    if not looks_like_path and raw:
        local = Path("rules") / f"{raw}.yaml"
        packaged = _BUILTIN_DIR / f"{raw}.yaml"
        # in a source checkout ./rules is the packaged folder: keep the machine-independent label
        if local.is_file() and not (packaged.is_file() and local.samefile(packaged)):
            return _read(local, str(local))
        if packaged.is_file():
            return _read(packaged, _BUILTIN_SOURCE.format(name=raw))
    builtins = builtin_rules()
    local_names = sorted(p.stem for p in Path("rules").glob("*.yaml")) if Path("rules").is_dir() else []
    candidates = sorted(set(builtins) | set(local_names))
    where = "no such file" if looks_like_path else f"not a file, not rules/{raw}.yaml, not a built-in"
    raise RuleError(
        f"unknown rule file {raw!r}: {where}{closest(path.stem if looks_like_path else raw, candidates)}. "
        f"Built-in rules: {', '.join(builtins)}"
        + (f"; in ./rules: {', '.join(local_names)}" if local_names else "")
        + ". Hint: pass a built-in name or the path of a YAML file."
    )


def _read(path: Path, source: str) -> RuleSet:
    # imported here: the parser builds this module's classes, so it imports this module at its top
    from graphsparse.planning.rule_parser import parse_rules

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RuleError(f"{source}: cannot read the rule file: {e}") from e
    return parse_rules(text, source=source)

