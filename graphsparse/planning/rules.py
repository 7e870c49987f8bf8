"""Rule files: which sites get an operator, and with which α.

A rule file is YAML, parsed once into frozen dataclasses (:class:`RuleSet`, :class:`Rule`,
:class:`Selector`, :class:`AlphaSpec`); nothing past :func:`parse_rules` sees a raw dict. The format
(``docs/rules.md`` has the long version)::

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

Selectors: every key given must match; a value may be a scalar or a list meaning any-of.

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

``select: all`` or ``select: {}`` matches every site.

Precedence: rules apply in file order and a later rule overrides an earlier one on the sites both match,
except that a matching ``skip`` rule always wins (the last matching ``skip`` is the deciding rule). A
site no rule matches is skipped with no deciding rule.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from graphsparse.errors import RuleError, closest
from graphsparse.graph.sites import LAYOUTS, ROLES, Site

__all__ = [
    "ACTIONS",
    "SELECTOR_KEYS",
    "AlphaSpec",
    "Selector",
    "Rule",
    "RuleSet",
    "Decision",
    "load_rules",
    "parse_rules",
    "builtin_rules",
    "resolve",
]

ACTIONS = ("meansparse", "sparta", "skip")
SELECTOR_KEYS = (
    "role", "op", "id", "module", "module_class", "stage", "depth", "relative_depth",
    "position", "reached", "layout", "not",
)
TOP_LEVEL_KEYS = ("version", "description", "alpha", "rules")
RULE_KEYS = ("name", "select", "action", "alpha", "optional", "sparta")
ALPHA_KEYS = ("linear", "per_stage", "default")
POSITIONS = ("first", "last")
REACHED = ("graph", "module_tree")
OP_ALIASES = ("add", "activation")
SPARTA_LAYOUTS = ("nchw",)

_BUILTIN_DIR = Path(__file__).resolve().parent / "builtin_rules"
_BUILTIN_SOURCE = "graphsparse/planning/builtin_rules/{name}.yaml"
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")

Range = tuple[int, int]


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
        parts = [f"{_fmt_range(r)}: {v:g}" for r, v in self.per_stage or ()]
        if self.default is not None:
            parts.append(f"default: {self.default:g}")
        return "per_stage {" + ", ".join(parts) + "}"


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
                shown = ", ".join(_fmt_range(r) for r in value)
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
        source: where it came from (a path, ``graphsparse/rules/NAME.yaml`` for built-ins, or ``<string>``).
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
        """Shorthand for :func:`resolve`."""
        return resolve(self, sites)


@dataclass(frozen=True)
class Decision:
    """What the rules decided for one site: the action, its α (0.0 unless meansparse), the rule."""

    action: str
    alpha: float
    rule: Rule | None


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def builtin_rules() -> list[str]:
    """Names of the rule files shipped with graphsparse (``after_addition``, ``full``, ...)."""
    return sorted(p.stem for p in _BUILTIN_DIR.glob("*.yaml"))


def load_rules(name_or_path: str | Path | RuleSet) -> RuleSet:
    """Load a rule file by path or by name.

    Lookup order: an existing file at ``name_or_path``; else ``rules/NAME.yaml`` relative to the current
    directory; else the built-in ``graphsparse/rules/NAME.yaml``. A :class:`RuleSet` passes through.

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
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RuleError(f"{source}: cannot read the rule file: {e}") from e
    return parse_rules(text, source=source)


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError as e:
            raise yaml.constructor.ConstructorError(
                None, None, f"unhashable mapping key {key!r}", key_node.start_mark
            ) from e
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first given on line {first})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

_Path = tuple[Any, ...]


class _Context:
    """Error reporting for one file: turns a key path into ``source:line: rules[2].select.role: ...``."""

    def __init__(self, source: str, root: yaml.Node | None):
        self.source = source
        self.root = root

    def line(self, path: _Path) -> int | None:
        node = self.root
        best = node.start_mark.line + 1 if node is not None else None
        for part in path:
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in node.value:
                    if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(part):
                        node = value_node
                        best = key_node.start_mark.line + 1
                        break
                else:
                    return best
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
                best = node.start_mark.line + 1
            else:
                return best
        return best

    def fail(self, path: _Path, message: str) -> NoReturn:
        line = self.line(path)
        where = f"{self.source}:{line}" if line is not None else self.source
        raise RuleError(f"{where}: {_fmt_path(path)}: {message}" if path else f"{where}: {message}")


def parse_rules(text: str, *, source: str = "<string>") -> RuleSet:
    """Parse and validate the text of a rule file.

    Args:
        text: YAML text.
        source: name used in error messages and kept on the result (a path, usually).

    Raises:
        RuleError: naming the file, the line, the rule index and field, what was expected, and the
            closest valid name for typos.
    """
    try:
        return _parse_rules(text, source)
    except RuleError:
        raise
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as e:
        # PyYAML's reader and tag constructors (`!!int abc`, bad dates) and huge numbers fail outside
        # the validator's own checks
        raise RuleError(f"{source}: invalid value: {e}. Hint: quote strings and use plain numbers.") from e


def _parse_rules(text: str, source: str) -> RuleSet:
    loader = _Loader(text)  # its reader errors are turned into RuleError by parse_rules
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        column = f", column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(p) for p in (e.context, e.problem) if p)
        raise RuleError(f"{where}: YAML syntax error{column}: {problem}") from e
    except yaml.YAMLError as e:
        raise RuleError(f"{source}: YAML syntax error: {e}") from e
    finally:
        loader.dispose()

    ctx = _Context(source, root)
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {_type_name(data)}"
        ctx.fail((), f"expected a mapping with keys {', '.join(TOP_LEVEL_KEYS)} at the top level, got {got}")
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            ctx.fail((key,), _unknown("top-level key", key, TOP_LEVEL_KEYS))

    if "version" not in data:
        ctx.fail((), "missing 'version'; expected 'version: 1' at the top level")
    version = data["version"]
    if type(version) is not int or version != 1:
        ctx.fail(("version",), f"unsupported version {version!r}; expected 1")

    description = data.get("description", "")
    if description is None:
        description = ""
    if not isinstance(description, str):
        ctx.fail(("description",), f"expected a string, got {_type_name(description)}")

    alpha = _parse_alpha(ctx, ("alpha",), data["alpha"]) if "alpha" in data else AlphaSpec(constant=0.0)

    if "rules" not in data:
        ctx.fail((), "missing 'rules'; expected a list of rules at the top level")
    raw_rules = data["rules"]
    if not isinstance(raw_rules, list) or not raw_rules:
        got = "an empty list" if raw_rules == [] else _type_name(raw_rules)
        ctx.fail(("rules",), f"expected a non-empty list of rules, got {got}")
    rules = tuple(_parse_rule(ctx, i, raw) for i, raw in enumerate(raw_rules))

    return RuleSet(
        rules=rules, alpha=alpha, description=description.strip(), version=version, source=source, text=text
    )


def _parse_rule(ctx: _Context, index: int, raw: Any) -> Rule:
    path: _Path = ("rules", index)
    if not isinstance(raw, dict):
        ctx.fail(path, f"expected a mapping with keys {', '.join(RULE_KEYS)}, got {_type_name(raw)}")
    for key in raw:
        if key not in RULE_KEYS:
            ctx.fail((*path, key), _unknown("rule key", key, RULE_KEYS))

    name = raw.get("name", "")
    if name is None:
        name = ""
    if not isinstance(name, str):
        ctx.fail((*path, "name"), f"expected a string, got {_type_name(name)}")

    if "select" not in raw:
        ctx.fail(path, "missing 'select'; expected a selector mapping or 'all'")
    select = _parse_select(ctx, (*path, "select"), raw["select"], allow_all=True)

    if "action" not in raw:
        ctx.fail(path, f"missing 'action'; expected one of {', '.join(ACTIONS)}")
    action = raw["action"]
    if not isinstance(action, str) or action not in ACTIONS:
        ctx.fail((*path, "action"), _unknown("action", action, ACTIONS))

    alpha = None
    if "alpha" in raw:
        if action != "meansparse":
            ctx.fail(
                (*path, "alpha"),
                f"alpha applies to action meansparse only, this rule's action is {action!r}"
                + (" (SPARTA has no α; its parameters go under 'sparta:')" if action == "sparta" else ""),
            )
        alpha = _parse_alpha(ctx, (*path, "alpha"), raw["alpha"])

    optional = raw.get("optional", False)
    if not isinstance(optional, bool):
        ctx.fail((*path, "optional"), f"expected true or false, got {optional!r}")

    sparta: tuple[tuple[str, Any], ...] = ()
    if "sparta" in raw:
        if action != "sparta":
            ctx.fail(
                (*path, "sparta"), f"sparta parameters need action sparta, this rule's action is {action!r}"
            )
        params = raw["sparta"]
        if params is None:
            params = {}
        if not isinstance(params, dict):
            ctx.fail((*path, "sparta"), f"expected a mapping of parameters, got {_type_name(params)}")
        items = []
        for key, value in params.items():
            if not isinstance(key, str):
                ctx.fail((*path, "sparta", key), f"parameter names must be strings, got {_type_name(key)}")
            items.append((key, _freeze_param(ctx, (*path, "sparta", key), value)))
        sparta = tuple(sorted(items))

    return Rule(
        index=index, name=name, select=select, action=action, alpha=alpha, optional=optional,
        sparta=sparta, line=ctx.line(path),
    )


def _freeze_param(ctx: _Context, path: _Path, value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            ctx.fail(path, f"expected a finite number, got {value!r}")
        return value
    if isinstance(value, list):
        return tuple(_freeze_param(ctx, (*path, i), v) for i, v in enumerate(value))
    ctx.fail(path, f"expected a number, string, boolean or list of those, got {_type_name(value)}")


def _parse_select(ctx: _Context, path: _Path, raw: Any, *, allow_all: bool) -> Selector:
    if raw == "all" and allow_all:
        return Selector()
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        expected = "a selector mapping or 'all'" if allow_all else "a selector mapping"
        ctx.fail(path, f"expected {expected}, got {raw!r}")
    fields: dict[str, Any] = {}
    for key, value in raw.items():
        kpath = (*path, key)
        if key not in SELECTOR_KEYS:
            ctx.fail(kpath, _unknown("selector key", key, SELECTOR_KEYS))
        if key == "role":
            fields["role"] = _parse_choices(ctx, kpath, value, ROLES, "role")
        elif key == "op":
            fields["op"] = _parse_ops(ctx, kpath, value)
        elif key in ("id", "module"):
            fields[key] = _parse_patterns(ctx, kpath, value, regex=True)
        elif key == "module_class":
            fields[key] = _parse_patterns(ctx, kpath, value, regex=False)
        elif key == "stage":
            fields[key] = _parse_ranges(ctx, kpath, value, pair_is_range=False)
        elif key == "depth":
            fields[key] = _parse_ranges(ctx, kpath, value, pair_is_range=True)
        elif key == "relative_depth":
            fields[key] = _parse_relative_depth(ctx, kpath, value)
        elif key == "position":
            fields[key] = _parse_choices(ctx, kpath, value, POSITIONS, "position")
        elif key == "reached":
            fields[key] = _parse_choices(ctx, kpath, value, REACHED, "reached value")
        elif key == "layout":
            fields[key] = _parse_choices(ctx, kpath, value, LAYOUTS, "layout")
        else:  # not
            fields["exclude"] = _parse_select(ctx, kpath, value, allow_all=False)
    return Selector(**fields)


def _as_list(ctx: _Context, path: _Path, value: Any) -> list[Any]:
    items = value if isinstance(value, list) else [value]
    if not items:
        ctx.fail(path, "expected a value or a non-empty list, got an empty list")
    return items


def _parse_choices(
    ctx: _Context, path: _Path, value: Any, choices: Sequence[str], what: str
) -> tuple[str, ...]:
    out = []
    for item in _as_list(ctx, path, value):
        if not isinstance(item, str) or item not in choices:
            ctx.fail(path, _unknown(what, item, choices))
        out.append(item)
    return tuple(out)


def _parse_ops(ctx: _Context, path: _Path, value: Any) -> tuple[str, ...]:
    from graphsparse.graph import activations  # imports torch; only needed when a rule names an op

    known = sorted(set(activations.ACTIVATION_KINDS)) + list(OP_ALIASES)
    out = []
    for item in _as_list(ctx, path, value):
        if not isinstance(item, str) or item not in known:
            ctx.fail(
                path,
                _unknown("op", item, known)
                + " ('activation' means any op except 'add'; more kinds: "
                "graphsparse.graph.activations.register_activation_module)",
            )
        out.append(item)
    return tuple(out)


def _parse_patterns(ctx: _Context, path: _Path, value: Any, *, regex: bool) -> tuple[str, ...]:
    out = []
    for item in _as_list(ctx, path, value):
        if not isinstance(item, str) or not item:
            kind = "a glob or 're:' regex" if regex else "a glob"
            ctx.fail(path, f"expected {kind} (a non-empty string), got {item!r}")
        if regex and item.startswith("re:"):
            try:
                re.compile(item[3:])
            except re.error as e:
                ctx.fail(path, f"regex {item[3:]!r} does not compile: {e}")
        out.append(item)
    return tuple(out)


def _parse_ranges(
    ctx: _Context, path: _Path, value: Any, *, pair_is_range: bool, what: str = ""
) -> tuple[Range, ...]:
    what = what or str(path[-1])
    if (
        pair_is_range
        and isinstance(value, list)
        and len(value) == 2
        and all(type(v) is int for v in value)
    ):
        return (_check_range(ctx, path, value[0], value[1]),)
    out = []
    for item in _as_list(ctx, path, value):
        if type(item) is int:
            out.append(_check_range(ctx, path, item, item))
        elif isinstance(item, str) and (m := _RANGE.match(item)):
            out.append(_check_range(ctx, path, int(m.group(1)), int(m.group(2))))
        elif isinstance(item, str) and item.strip().isdigit():
            out.append(_check_range(ctx, path, int(item), int(item)))
        elif pair_is_range and isinstance(item, list) and len(item) == 2 and all(
            type(v) is int for v in item
        ):
            out.append(_check_range(ctx, path, item[0], item[1]))
        else:
            forms = "an int, a 'lo-hi' range like '1-3'"
            forms += ", [lo, hi]" if pair_is_range else ""
            ctx.fail(path, f"bad {what} {item!r}; expected {forms}, or a list of those")
    return tuple(out)


def _check_range(ctx: _Context, path: _Path, lo: int, hi: int) -> Range:
    if lo < 0 or hi < 0:
        ctx.fail(path, f"must be ≥ 0, got {lo if lo < 0 else hi}")
    if lo > hi:
        ctx.fail(path, f"empty range {lo}-{hi}; expected lo ≤ hi")
    return (lo, hi)


def _parse_relative_depth(ctx: _Context, path: _Path, value: Any) -> tuple[float, float]:
    if not (isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)):
        ctx.fail(path, f"expected [lo, hi], two numbers within 0-1, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not (0.0 <= lo <= hi <= 1.0):
        ctx.fail(path, f"expected 0 ≤ lo ≤ hi ≤ 1, got [{lo:g}, {hi:g}]")
    return (lo, hi)


def _parse_alpha(ctx: _Context, path: _Path, value: Any) -> AlphaSpec:
    expected = "a number ≥ 0, {linear: [start, end]} or {per_stage: {STAGE: α, ...}}"
    if _is_number(value) or isinstance(value, bool):
        return AlphaSpec(constant=_alpha_value(ctx, path, value))
    if not isinstance(value, dict) or not value:
        ctx.fail(path, f"bad α {value!r}; expected {expected}")
    for key in value:
        if key not in ALPHA_KEYS:
            ctx.fail((*path, key), _unknown("α form", key, ALPHA_KEYS))
    forms = [k for k in ("linear", "per_stage") if k in value]
    if len(forms) != 1:
        ctx.fail(path, f"expected exactly one of 'linear' or 'per_stage', got {sorted(map(str, value))}")
    if "linear" in value:
        if "default" in value:
            ctx.fail((*path, "default"), "'default' goes with per_stage, not linear")
        lin = value["linear"]
        if not (isinstance(lin, list) and len(lin) == 2 and all(_is_number(v) for v in lin)):
            ctx.fail((*path, "linear"), f"expected [start, end], two numbers ≥ 0, got {lin!r}")
        start = _alpha_value(ctx, (*path, "linear", 0), lin[0])
        end = _alpha_value(ctx, (*path, "linear", 1), lin[1])
        return AlphaSpec(linear=(start, end))

    stages = value["per_stage"]
    if not isinstance(stages, dict) or not stages:
        ctx.fail(
            (*path, "per_stage"), f"expected a mapping STAGE: α (e.g. {{0: 0.1, 3: 0.3}}), got {stages!r}"
        )
    default = _alpha_value(ctx, (*path, "default"), value["default"]) if "default" in value else None
    entries: list[tuple[Range, float]] = []
    for key, alpha in stages.items():
        kpath = (*path, "per_stage", key)
        if key == "default":
            if default is not None:
                ctx.fail(kpath, "default α given twice (inside per_stage and next to it)")
            default = _alpha_value(ctx, kpath, alpha)
            continue
        if isinstance(key, (list, dict)) or isinstance(key, bool):
            ctx.fail(kpath, f"expected a stage number or 'lo-hi' range as key, got {key!r}")
        (rng,) = _parse_ranges(ctx, kpath, key, pair_is_range=False, what="stage")
        for other, _ in entries:
            if rng[0] <= other[1] and other[0] <= rng[1]:
                ctx.fail(kpath, f"stage {_fmt_range(rng)} overlaps stage {_fmt_range(other)} given before")
        entries.append((rng, _alpha_value(ctx, kpath, alpha)))
    entries.sort()
    return AlphaSpec(per_stage=tuple(entries), default=default)


def _alpha_value(ctx: _Context, path: _Path, value: Any) -> float:
    if not _is_number(value):
        ctx.fail(path, f"expected α as a number ≥ 0, got {value!r} ({_type_name(value)})")
    value = float(value)
    if not math.isfinite(value):
        ctx.fail(path, f"expected a finite α, got {value!r}")
    if value < 0:
        ctx.fail(path, f"α must be ≥ 0 (it scales the standard deviation), got {value:g}")
    return value


# --------------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------------


def resolve(rules: RuleSet, sites: Sequence[Site]) -> tuple[Decision, ...]:
    """Decide the action of every site, in site order.

    Later rules override earlier ones; a matching ``skip`` rule wins wherever it stands. Meansparse α
    comes from the deciding rule's spec, else the file's default; other actions get α 0.0.

    Raises:
        RuleError: a non-optional rule matches no site (all such rules are listed), or a sparta rule
            decides a site SPARTA cannot replace (an ``add`` site, or a layout without spatial axes).
    """
    matched = [False] * len(rules.rules)
    decisions = []
    for site in sites:
        deciding: Rule | None = None
        skip: Rule | None = None
        for rule in rules.rules:
            if rule.select.matches(site):
                matched[rule.index] = True
                deciding = rule
                if rule.action == "skip":
                    skip = rule
        rule = skip or deciding
        if rule is None:
            decisions.append(Decision("skip", 0.0, None))
        elif rule.action == "meansparse":
            fallback = rules.alpha.at(site)
            alpha = rule.alpha.at(site, fallback) if rule.alpha is not None else fallback
            decisions.append(Decision("meansparse", alpha, rule))
        else:
            decisions.append(Decision(rule.action, 0.0, rule))

    unmatched = [r for r in rules.rules if not matched[r.index] and not r.optional]
    if unmatched:
        lines = [f"{_rule_where(rules, r)}: {r.ref} matches no site; it looked for {r.select.describe()}"
                 f"{_available(r.select, sites)}" for r in unmatched]
        raise RuleError("; ".join(lines) + _unmatched_hint(sites))

    for site, decision in zip(sites, decisions):
        rule = decision.rule
        if decision.action == "sparta" and rule is not None:
            if site.op == "add":
                raise RuleError(
                    f"{_rule_where(rules, rule)}: {rule.ref}.select: action sparta decides site {site.id!r}, "
                    "a residual-addition output with no activation to replace. Hint: add 'op: activation' "
                    "to the selector."
                )
            if site.layout not in SPARTA_LAYOUTS:
                raise RuleError(
                    f"{_rule_where(rules, rule)}: {rule.ref}.select: action sparta decides site {site.id!r} "
                    f"with layout {site.layout!r}; SPARTA needs spatial features "
                    f"({' or '.join(SPARTA_LAYOUTS)}). Hint: add 'layout: nchw' to the selector."
                )
    return tuple(decisions)


def _unmatched_hint(sites: Sequence[Site]) -> str:
    """Why rules match nothing: the model (then 'optional: true' is the fix), or a capture that found
    nothing or missed activations that ran (then it is not)."""
    missed = list(getattr(sites, "missed", ()))  # a SiteList says what capture saw run but could not reach
    if not sites:
        return (
            ". Capture found no site at all in this model (no activation or residual addition it can see), "
            "so no rule can match. Hint: `graphsparse inspect MODEL` lists the modules that stayed opaque"
            + (f" and the {len(missed)} activation place(s) capture missed" if missed else "")
            + "."
        )
    if missed:
        return (
            f". Capture missed {len(missed)} activation place(s) that ran ({'; '.join(missed[:3])}"
            f"{'; ...' if len(missed) > 3 else ''}): the sites the rule looks for may be among them. Hint: "
            "`graphsparse inspect MODEL` lists them; mark the rule 'optional: true' only if it is meant for "
            "other architectures."
        )
    return (
        ". Hint: mark the rule 'optional: true' if it is meant for other architectures, "
        "or list the model's sites with `graphsparse inspect MODEL`."
    )


def _rule_where(rules: RuleSet, rule: Rule) -> str:
    return f"{rules.source}:{rule.line}" if rule.line is not None else rules.source


def _available(select: Selector, sites: Sequence[Site]) -> str:
    """' (the sites have roles [...], stages 0-4)' for the fields the selector constrains."""
    if not sites:
        return " (there are no sites)"
    shown = []
    for key in ("role", "op", "layout", "reached"):
        if getattr(select, key) is not None or (key == "role" and select.selects_all):
            values = list(dict.fromkeys(getattr(s, key) for s in sites))
            label = "reached" if key == "reached" else f"{key}s"
            shown.append(f"{label} {', '.join(values)}")
    for key in ("stage", "depth"):
        if getattr(select, key) is not None:
            values = [getattr(s, key) for s in sites]
            shown.append(f"{key}s {min(values)}-{max(values)}")
    if select.exclude is not None and not shown:
        shown.append(f"roles {', '.join(dict.fromkeys(s.role for s in sites))}")
    count = f"{len(sites)} site" + ("s" if len(sites) != 1 else "")
    if not shown:
        return f" ({count})"
    return f" (the {count} {'have' if len(sites) != 1 else 'has'} {'; '.join(shown)})"


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _op_matches(wanted: str, op: str) -> bool:
    return op != "add" if wanted == "activation" else op == wanted


def _pattern_matches(pattern: str, value: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], value) is not None
    return fnmatch.fnmatchcase(value, pattern)


def _in_ranges(value: int, ranges: tuple[Range, ...]) -> bool:
    return any(lo <= value <= hi for lo, hi in ranges)


def _fmt_range(r: Range) -> str:
    return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"


def _fmt_path(path: _Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    return {dict: "mapping", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _unknown(what: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        return f"expected a {what} from {', '.join(map(str, choices))}, got {value!r} ({_type_name(value)})"
    listed = ", ".join(map(str, choices))
    return f"unknown {what} {value!r}{closest(value, choices)}; expected one of {listed}"
