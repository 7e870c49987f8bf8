"""Plans: rules applied to sites, α override, summaries, JSON round-trip, table and HTML display."""

from __future__ import annotations

import dataclasses
import json

import pytest
from rich.console import Console
from rich.table import Table

from graphsparse.errors import PlanError, RuleError
from graphsparse.planning.plan import Plan, PlanEntry, make_plan
from graphsparse.planning.rule_parser import parse_rules
from graphsparse.planning.rules import load_rules

try:  # tests/ as a package, or on sys.path (pytest's default rootdir-less import mode)
    from .test_rules import N_BLOCKS, N_STAGES, build_sites, preact_sites, resnet18_sites, rules_text
except ImportError:
    from test_rules import N_BLOCKS, N_STAGES, build_sites, preact_sites, resnet18_sites, rules_text

N_BLOCKS_TOTAL = N_STAGES * N_BLOCKS


def test_one_entry_per_site_in_site_order():
    sites = resnet18_sites()
    plan = make_plan(sites, load_rules("after_addition"))
    assert [e.site for e in plan.entries] == sites
    assert len(plan) == len(sites) and list(plan) == list(plan.entries)
    for entry in plan:
        if entry.site.role == "after_addition":
            assert (entry.action, entry.rule_index, entry.rule_name) == ("meansparse", 0, "additions")
            assert entry.rule_source == "graphsparse/planning/builtin_rules/after_addition.yaml:6"
        else:
            assert (entry.action, entry.rule_index) == ("skip", None)
            assert entry.rule_name == entry.rule_source == ""
    assert plan.source == "graphsparse/planning/builtin_rules/after_addition.yaml"
    assert plan.text == load_rules("after_addition").text


def test_make_plan_accepts_a_rule_name():
    sites = resnet18_sites()
    assert make_plan(sites, "main_path") == make_plan(sites, load_rules("main_path"))


def test_selected_and_alphas():
    sites = resnet18_sites()
    rules = parse_rules(rules_text(
        "- {select: {role: after_addition}, action: meansparse, alpha: {per_stage: {1: 0.1, 2: 0.2}}}",
        "- {select: {role: stem}, action: sparta}",
        header="alpha: 0.5\n",
    ))
    plan = make_plan(sites, rules)
    adds = [s for s in sites if s.role == "after_addition"]
    selected = [s.id for s in sites if s.role in ("after_addition", "stem")]
    assert [e.site.id for e in plan.selected()] == selected
    assert plan.alphas() == {s.id: {1: 0.1, 2: 0.2}.get(s.stage, 0.5) for s in adds}
    assert "relu" not in plan.alphas()  # sparta entries have no α
    assert plan["relu"].action == "sparta"


def test_alpha_override_replaces_every_meansparse_alpha_only():
    sites = resnet18_sites()
    rules = parse_rules(rules_text(
        "- {select: all, action: meansparse, alpha: {linear: [0.1, 0.9]}}",
        "- {select: {stage: 4, position: last}, action: sparta, sparta: {reduction: 8}}",
    ))
    plan = make_plan(sites, rules, alpha=0.35)
    assert plan.alpha_override == 0.35
    for e in plan:
        assert e.alpha == (0.0 if e.action == "sparta" else 0.35)
    assert [e.site.id for e in plan if e.action == "sparta"] == [f"layer4.{N_BLOCKS - 1}.relu_1"]
    assert make_plan(sites, rules, alpha=0).alphas() == {s.id: 0.0 for s in sites[:-1]}


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.2"])
def test_bad_alpha_override_is_a_plan_error(bad):
    with pytest.raises(PlanError, match="alpha override"):
        make_plan(resnet18_sites(), "after_addition", alpha=bad)


def test_sparta_entries_carry_zero_alpha_and_params():
    plan = make_plan(resnet18_sites(), "sparta_stage_last", alpha=0.4)
    sparta = [e for e in plan if e.action == "sparta"]
    assert len(sparta) == N_STAGES
    for e in sparta:
        assert e.alpha == 0.0
        assert e.sparta_params == {"reduction": 4}
    assert all(e.params == () for e in plan if e.action != "sparta")


def test_summary_counts_per_action_and_role():
    sites = resnet18_sites()
    summary = make_plan(sites, "main_path").summary()
    n_skip = len(sites) - N_BLOCKS_TOTAL
    assert summary == {
        "total": len(sites),
        "actions": {"meansparse": N_BLOCKS_TOTAL, "skip": n_skip},
        "roles": {
            "stem": {"skip": 1},
            "main_path": {"meansparse": N_BLOCKS_TOTAL},
            "after_addition": {"skip": N_BLOCKS_TOTAL},
        },
    }
    line = make_plan(sites, "main_path").describe()
    assert line.startswith(f"{len(sites)} sites: {N_BLOCKS_TOTAL} meansparse, {n_skip} skip")


def test_duplicate_site_ids_are_refused():
    sites = resnet18_sites()
    clash = dataclasses.replace(sites[2], id=sites[1].id)
    with pytest.raises(PlanError, match="appears twice"):
        make_plan([*sites[:2], clash, *sites[3:]], "full")


def test_rule_errors_pass_through():
    with pytest.raises(RuleError, match="matches no site"):
        make_plan(preact_sites(), "sparta_stage_last")


# --------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------


def _mixed_plan() -> Plan:
    rules = parse_rules(rules_text(
        "- {name: adds, select: {op: add}, action: meansparse, alpha: {linear: [0.05, 0.3]}}",
        "- {select: {role: main_path, position: first}, action: sparta,"
        "   sparta: {reduction: 2, kernel: [3, 3]}}",
        "- {select: {role: head}, action: skip}",
    ), source="mixed.yaml")
    sites = [dataclasses.replace(s, graph_module=f"gm{s.stage}") for s in preact_sites()]
    return make_plan(sites, rules)


def test_json_round_trip_is_equal_and_keeps_graph_fields():
    plan = _mixed_plan()
    text = plan.to_json()
    back = Plan.from_json(text)
    assert back == plan
    assert back.to_json() == text
    # Site equality ignores node/graph_module; check they survive too.
    graph_fields = [(e.site.node, e.site.graph_module) for e in plan]
    assert [(e.site.node, e.site.graph_module) for e in back] == graph_fields
    assert all(node and gm for node, gm in graph_fields)
    assert {e.action for e in back} == {"meansparse", "sparta", "skip"}
    sparta = next(e for e in back if e.action == "sparta")
    assert sparta.sparta_params == {"kernel": (3, 3), "reduction": 2}


def test_json_is_deterministic_and_plain():
    a, b = _mixed_plan().to_json(), _mixed_plan().to_json()
    assert a == b
    data = json.loads(a)
    assert data["source"] == "mixed.yaml"
    assert data["entries"][0]["site"]["shape"] == list(preact_sites()[0].shape)
    assert set(data["entries"][0]["site"]) == set(preact_sites()[0].to_dict()) | {"node", "graph_module"}


def test_json_with_alpha_override_round_trips():
    plan = make_plan(resnet18_sites(), "full", alpha=0.125)
    assert Plan.from_json(plan.to_json()) == plan
    assert Plan.from_json(plan.to_json()).alpha_override == 0.125


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: "not json", "not valid JSON"),
        (lambda d: {**d, "format": "other"}, "format"),
        (lambda d: {**d, "version": 9}, "version"),
        (lambda d: {**d, "entries": {}}, "entries"),
        (lambda d: {**d, "entries": [{**d["entries"][0], "action": "boost"}]}, r"entries\[0\]\.action"),
        (lambda d: {**d, "entries": [{**d["entries"][0], "alpha": -1}]}, r"entries\[0\]\.alpha"),
        (lambda d: {**d, "entries": [{**d["entries"][0], "site": {"id": "x"}}]}, r"entries\[0\]\.site"),
        (lambda d: {**d, "entries": [{**d["entries"][0], "rule_index": "0"}]}, "rule_index"),
    ],
)
def test_bad_plan_json_is_a_plan_error(mutate, expected):
    data = json.loads(_mixed_plan().to_json())
    changed = mutate(data)
    text = changed if isinstance(changed, str) else json.dumps(changed)
    with pytest.raises(PlanError, match=expected):
        Plan.from_json(text)


# --------------------------------------------------------------------------------------------------
# Display
# --------------------------------------------------------------------------------------------------


def test_rich_table_has_the_columns_and_rows():
    plan = make_plan(resnet18_sites(), "after_addition", alpha=0.25)
    table = plan.__rich__()
    assert isinstance(table, Table)
    assert [str(c.header) for c in table.columns] == ["site", "op", "role", "stage", "action", "α", "rule"]
    assert table.row_count == len(plan)
    console = Console(record=True, width=200, color_system=None)
    console.print(plan)
    out = console.export_text()
    assert "layer4.1.relu_1" in out and "additions" in out and "0.25" in out


def test_print_shows_the_table_as_plain_text():
    plan = make_plan(resnet18_sites(), "after_addition", alpha=0.25)
    text = str(plan)
    assert text.splitlines()[0].strip() == "plan" and "site" in text and "rule" in text
    assert "layer4.1.relu_1" in text and "0.25" in text and plan.describe() in " ".join(text.split())
    assert "\x1b[" not in text  # no terminal escapes


def test_print_in_a_notebook_shows_the_table_once(monkeypatch):
    """In Jupyter rich's Console displays what it prints by itself; str(plan) must only return the text."""
    import rich.console
    import rich.jupyter

    shown = []
    monkeypatch.setattr(rich.console, "_is_jupyter", lambda: True)
    monkeypatch.setattr(rich.jupyter, "display", lambda *args, **kwargs: shown.append(args))
    assert Console().is_jupyter  # the detection is on
    plan = make_plan(resnet18_sites(), "after_addition", alpha=0.25)
    text = str(plan)
    assert shown == []
    assert "layer4.1.relu_1" in text and "0.25" in text and "\x1b[" not in text
    assert "<table>" in plan._repr_html_()


def test_html_repr_escapes():
    sites = build_sites([
        {"id": "<lambda>.act", "op": "relu", "role": "stem", "stage": 0, "module": "<lambda>"},
        {"id": "b&c", "op": "relu", "role": "head", "stage": 0},
    ])
    text = rules_text("- {name: '<b>bold</b>', select: all, action: meansparse}")
    rules = parse_rules(text, source="<x>.yaml")
    page = make_plan(sites, rules)._repr_html_()
    assert page.startswith("<table>") and page.endswith("</table>")
    assert "<lambda>" not in page and "&lt;lambda&gt;.act" in page
    assert "<b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "b&amp;c" in page and "&lt;x&gt;.yaml" in page
    assert page.count("<tr>") == len(sites) + 1


def test_plan_entry_is_frozen():
    entry = make_plan(resnet18_sites(), "full").entries[0]
    assert isinstance(entry, PlanEntry)
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.alpha = 1.0  # type: ignore[misc]
