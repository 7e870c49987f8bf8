"""Parsing and validating the text of a rule file into a :class:`~graphsparse.planning.rules.RuleSet`.

Every check names the file, the line, the key path (``rules[2].select.role``), what was expected and,
for a typo, the closest valid name; nothing past :func:`parse_rules` sees a raw dict. The format is
described in :mod:`graphsparse.planning.rules`, the selector keys in :mod:`graphsparse.planning.selectors`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, NoReturn

import yaml

from graphsparse.errors import RuleError, closest
from graphsparse.graph.sites import LAYOUTS, ROLES
from graphsparse.planning.rules import ACTIONS, AlphaSpec, Rule, RuleSet
from graphsparse.planning.selectors import OP_ALIASES, POSITIONS, REACHED, SELECTOR_KEYS, Range, Selector, fmt_range

__all__ = ["TOP_LEVEL_KEYS", "RULE_KEYS", "ALPHA_KEYS", "parse_rules"]

TOP_LEVEL_KEYS = ("version", "description", "alpha", "rules")
RULE_KEYS = ("name", "select", "action", "alpha", "optional", "sparta")
ALPHA_KEYS = ("linear", "per_stage", "default")

_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


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
                ctx.fail(kpath, f"stage {fmt_range(rng)} overlaps stage {fmt_range(other)} given before")
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
# Helpers
# --------------------------------------------------------------------------------------------------


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
