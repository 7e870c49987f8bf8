"""Plan: the result of applying a rule file to a model's sites.

``make_plan(sites, rules)`` gives one :class:`PlanEntry` per site, in site order: the action
(``meansparse``, ``sparta`` or ``skip``), its α, its SPARTA parameters, and the rule that decided it.
A plan prints as a rich table, renders as HTML in notebooks, and round-trips through JSON
(``Plan.from_json(plan.to_json()) == plan``); the same inputs always give the same JSON text.
"""

from __future__ import annotations

import html
import io
import json
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from graphsparse.errors import PlanError, closest
from graphsparse.graph.sites import ROLES, Site
from graphsparse.planning.rules import ACTIONS, RuleSet, load_rules

__all__ = ["Plan", "PlanEntry", "make_plan"]

PLAN_FORMAT = "graphsparse.plan"
PLAN_VERSION = 1
_SITE_FIELDS = tuple(f.name for f in fields(Site))


@dataclass(frozen=True)
class PlanEntry:
    """What happens at one site.

    Args:
        site: the site.
        action: ``meansparse``, ``sparta`` or ``skip``.
        alpha: α of a meansparse entry; 0.0 otherwise (SPARTA has no α).
        rule_index: index of the deciding rule in the file's ``rules`` list; None when no rule matched.
        rule_name: the deciding rule's name (``rules[i]`` when unnamed); '' when no rule matched.
        rule_source: ``FILE:LINE`` of the deciding rule ('' when no rule matched).
        params: SPARTA parameters as sorted ``(key, value)`` pairs; empty for other actions.
    """

    site: Site
    action: str
    alpha: float
    rule_index: int | None
    rule_name: str
    rule_source: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def sparta_params(self) -> dict[str, Any]:
        return dict(self.params)

    def to_dict(self) -> dict[str, Any]:
        site = self.site.to_dict()
        site["node"] = self.site.node
        site["graph_module"] = self.site.graph_module
        return {
            "site": site,
            "action": self.action,
            "alpha": self.alpha,
            "rule_index": self.rule_index,
            "rule_name": self.rule_name,
            "rule_source": self.rule_source,
            "params": {k: _thaw(v) for k, v in self.params},
        }


@dataclass(frozen=True)
class Plan:
    """A plan for a model: one entry per site, in site order, plus the rule file it came from.

    Args:
        entries: one :class:`PlanEntry` per site.
        source: the rule file's source (path or built-in name).
        text: the rule file's text, verbatim.
        alpha_override: the α that replaced every meansparse α (``make_plan(alpha=...)``), or None.
    """

    entries: tuple[PlanEntry, ...]
    source: str = ""
    text: str = ""
    alpha_override: float | None = None

    def __iter__(self) -> Iterator[PlanEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, site_id: str) -> PlanEntry:
        """The entry of the site with id ``site_id``."""
        for entry in self.entries:
            if entry.site.id == site_id:
                return entry
        hint = closest(site_id, (e.site.id for e in self.entries))
        raise KeyError(f"no site {site_id!r} in the plan{hint}")

    def selected(self) -> tuple[PlanEntry, ...]:
        """Entries whose action is not ``skip``."""
        return tuple(e for e in self.entries if e.action != "skip")

    def alphas(self) -> dict[str, float]:
        """Site id → α for the meansparse entries."""
        return {e.site.id: e.alpha for e in self.entries if e.action == "meansparse"}

    def summary(self) -> dict[str, Any]:
        """Counts: ``{"total": n, "actions": {action: n}, "roles": {role: {action: n}}}``.

        Actions and roles appear in their canonical order, and only when present.
        """
        by_action = Counter(e.action for e in self.entries)
        by_role: dict[str, Counter[str]] = {}
        for e in self.entries:
            by_role.setdefault(e.site.role, Counter())[e.action] += 1
        role_order = [r for r in ROLES if r in by_role] + sorted(r for r in by_role if r not in ROLES)
        return {
            "total": len(self.entries),
            "actions": {a: by_action[a] for a in ACTIONS if by_action[a]},
            "roles": {r: {a: by_role[r][a] for a in ACTIONS if by_role[r][a]} for r in role_order},
        }

    def describe(self) -> str:
        """One line: ``17 sites: 8 meansparse, 9 skip (rules/after_addition.yaml)``."""
        counts = ", ".join(f"{n} {a}" for a, n in self.summary()["actions"].items())
        where = f" ({self.source})" if self.source else ""
        override = f", α overridden to {self.alpha_override:g}" if self.alpha_override is not None else ""
        return f"{len(self.entries)} sites: {counts or 'none'}{override}{where}"

    # ----------------------------------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "source": self.source,
            "text": self.text,
            "alpha_override": self.alpha_override,
            "entries": [e.to_dict() for e in self.entries],
        }

    def to_json(self) -> str:
        """Deterministic JSON text (same plan → same text)."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Read a plan written by :meth:`to_json`.

        Raises:
            PlanError: the text is not JSON or not a plan, naming the entry and field at fault.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan JSON: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"plan JSON: expected an object with \"format\": {PLAN_FORMAT!r}")
        if data.get("version") != PLAN_VERSION:
            version = data.get("version")
            raise PlanError(f"plan JSON: unsupported version {version!r}; expected {PLAN_VERSION}")
        raw_entries = data.get("entries")
        if not isinstance(raw_entries, list):
            raise PlanError("plan JSON: \"entries\" must be a list")
        entries = tuple(_entry_from_dict(i, raw) for i, raw in enumerate(raw_entries))
        override = data.get("alpha_override")
        if override is not None and not _is_alpha(override):
            raise PlanError(f"plan JSON: alpha_override must be a number ≥ 0 or null, got {override!r}")
        return cls(
            entries=entries,
            source=str(data.get("source", "")),
            text=str(data.get("text", "")),
            alpha_override=None if override is None else float(override),
        )

    # ------------------------------------------------------------------------------------- display

    def _rows(self) -> list[tuple[str, ...]]:
        rows = []
        for e in self.entries:
            if e.action == "meansparse":
                alpha = f"{e.alpha:g}"
            elif e.action == "sparta" and e.params:
                alpha = " ".join(f"{k}={_thaw(v)}" for k, v in e.params)
            else:
                alpha = ""
            rows.append((e.site.id, e.site.op, e.site.role, str(e.site.stage), e.action, alpha, e.rule_name))
        return rows

    def __rich__(self) -> Any:
        from rich.table import Table

        table = Table(title="plan", caption=self.describe(), title_justify="left")
        site_width = min(max((len(e.site.id) for e in self.entries), default=4), 48)
        table.add_column("site", min_width=site_width)  # the id is what users copy into rules
        for column in ("op", "role", "stage", "action", "α", "rule"):
            table.add_column(column, justify="right" if column in ("stage", "α") else "left")
        style = {"meansparse": "green", "sparta": "magenta", "skip": "dim"}
        for row in self._rows():
            table.add_row(*row, style=style.get(row[4]))
        return table

    def __str__(self) -> str:
        """The same table as plain text, for ``print(plan)`` outside rich and notebooks."""
        from rich.console import Console

        # force_jupyter=False: in a notebook rich would also display the table itself (print showed it twice)
        console = Console(file=io.StringIO(), record=True, width=160, color_system=None, force_jupyter=False)
        console.print(self)
        return console.export_text().rstrip() + "\n"

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{c}</th>" for c in ("site", "op", "role", "stage", "action", "α", "rule"))
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
            for row in self._rows()
        )
        caption = html.escape(self.describe())
        return (
            f"<table><caption>{caption}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>"
        )


def make_plan(
    sites: Sequence[Site], rules: RuleSet | str | Path, *, alpha: float | None = None
) -> Plan:
    """Apply a rule file to sites.

    Args:
        sites: the model's sites, in forward order (ids must be unique).
        rules: a :class:`RuleSet`, or a rule name / path for :func:`graphsparse.planning.rules.load_rules`.
        alpha: when given, the α of every meansparse entry (overrides the rule file).

    Raises:
        RuleError: the rule file is invalid, or a non-optional rule matches no site.
        PlanError: ``alpha`` is negative or not finite, or site ids repeat.
    """
    ruleset = load_rules(rules)
    if alpha is not None and not _is_alpha(alpha):
        raise PlanError(f"alpha override must be a finite number ≥ 0, got {alpha!r}")
    seen: set[str] = set()
    for site in sites:
        if site.id in seen:
            raise PlanError(f"site id {site.id!r} appears twice; site ids must be unique")
        seen.add(site.id)

    entries = []
    for site, decision in zip(sites, ruleset.resolve(sites), strict=True):
        rule = decision.rule
        value = decision.alpha
        if decision.action == "meansparse" and alpha is not None:
            value = float(alpha)
        entries.append(
            PlanEntry(
                site=site,
                action=decision.action,
                alpha=value,
                rule_index=rule.index if rule is not None else None,
                rule_name=rule.label if rule is not None else "",
                rule_source=_rule_source(ruleset, rule.line) if rule is not None else "",
                params=rule.sparta if rule is not None and decision.action == "sparta" else (),
            )
        )
    return Plan(
        entries=tuple(entries),
        source=ruleset.source,
        text=ruleset.text,
        alpha_override=None if alpha is None else float(alpha),
    )


def _rule_source(ruleset: RuleSet, line: int | None) -> str:
    return f"{ruleset.source}:{line}" if line is not None else ruleset.source


def _is_alpha(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _thaw(value: Any) -> Any:
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


def _entry_from_dict(index: int, raw: Any) -> PlanEntry:
    where = f"plan JSON: entries[{index}]"
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: expected an object")
    site_data = raw.get("site")
    if not isinstance(site_data, dict):
        raise PlanError(f"{where}.site: expected an object")
    unknown = sorted(set(site_data) - set(_SITE_FIELDS))
    missing = [f for f in _SITE_FIELDS if f not in site_data and f not in ("node", "graph_module")]
    if unknown or missing:
        raise PlanError(f"{where}.site: unknown fields {unknown}, missing fields {missing}")
    try:
        site = Site(**{**site_data, "shape": tuple(site_data["shape"])})
    except TypeError as e:
        raise PlanError(f"{where}.site: {e}") from e
    action = raw.get("action")
    if action not in ACTIONS:
        raise PlanError(f"{where}.action: expected one of {', '.join(ACTIONS)}, got {action!r}")
    alpha = raw.get("alpha")
    if not _is_alpha(alpha):
        raise PlanError(f"{where}.alpha: expected a number ≥ 0, got {alpha!r}")
    rule_index = raw.get("rule_index")
    if rule_index is not None and (type(rule_index) is not int or rule_index < 0):
        raise PlanError(f"{where}.rule_index: expected an int ≥ 0 or null, got {rule_index!r}")
    params = raw.get("params", {})
    if not isinstance(params, dict):
        raise PlanError(f"{where}.params: expected an object")
    return PlanEntry(
        site=site,
        action=action,
        alpha=float(alpha),
        rule_index=rule_index,
        rule_name=str(raw.get("rule_name", "")),
        rule_source=str(raw.get("rule_source", "")),
        params=tuple(sorted((str(k), _freeze(v)) for k, v in params.items())),
    )
