"""Resolution: what a rule set decides for each site, and why a rule that matches nothing is an error.

Precedence: rules apply in file order and a later rule overrides an earlier one on the sites both match,
except that a matching ``skip`` rule always wins (the last matching ``skip`` is the deciding rule). A
site no rule matches is skipped with no deciding rule. Meansparse α comes from the deciding rule's
:class:`~graphsparse.planning.rules.AlphaSpec`, else the file's default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from graphsparse.errors import RuleError
from graphsparse.graph.sites import Site
from graphsparse.planning.selectors import Selector

if TYPE_CHECKING:  # rules.py imports this module for RuleSet.resolve; the classes are only annotations here
    from graphsparse.planning.rules import Rule, RuleSet

__all__ = ["SPARTA_LAYOUTS", "Decision", "resolve"]

SPARTA_LAYOUTS = ("nchw",)


@dataclass(frozen=True)
class Decision:
    """What the rules decided for one site: the action, its α (0.0 unless meansparse), the rule."""

    action: str
    alpha: float
    rule: Rule | None


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

