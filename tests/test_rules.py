"""Rule files: parsing, validation messages, selector matching, precedence, α schedules, lookup.

Sites come from small hand-made factories that mimic real architectures; every expected count below is
derived from how the factory builds its list, not copied from a run.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest

from graphsparse.errors import RuleError
from graphsparse.graph.sites import Site
from graphsparse.planning.resolve import resolve
from graphsparse.planning.rule_parser import parse_rules
from graphsparse.planning.rules import AlphaSpec, Rule, RuleSet, builtin_rules, load_rules
from graphsparse.planning.selectors import Selector

# --------------------------------------------------------------------------------------------------
# Site factories
# --------------------------------------------------------------------------------------------------

N_STAGES = 4
N_BLOCKS = 2  # per stage, resnet18-like


def build_sites(specs: list[dict]) -> list[Site]:
    """Sites from (id, op, role, stage, ...) specs; depth, relative depth and first/last are derived."""
    n = len(specs)
    sites = []
    for depth, spec in enumerate(specs):
        stage = spec["stage"]
        channels = spec.get("channels", 64)
        layout = spec.get("layout", "nchw")
        shape = (1, channels, 8, 8) if layout == "nchw" else (1, 8, 8, channels)
        sites.append(
            Site(
                id=spec["id"],
                op=spec["op"],
                role=spec["role"],
                layout=layout,
                channel_axis=1 if layout == "nchw" else -1,
                channels=channels,
                depth=depth,
                stage=stage,
                last_in_stage=depth == n - 1 or specs[depth + 1]["stage"] != stage,
                first_in_stage=depth == 0 or specs[depth - 1]["stage"] != stage,
                module=spec.get("module", spec["id"]),
                module_class=spec.get("module_class", "ReLU"),
                reached=spec.get("reached", "graph"),
                shape=shape,
                relative_depth=depth / (n - 1) if n > 1 else 0.0,
                node=spec["id"].replace(".", "_"),
                graph_module="",
            )
        )
    return sites


def resnet18_sites(*, cifar: bool = False) -> list[Site]:
    """torchvision resnet18: stem relu, then per BasicBlock a main-path relu and the relu after the add.

    At ImageNet size the stem runs at 112² (its own stage 0) and layerS at stage S; the CIFAR variant
    has no max-pool, so the stem shares stage 0 with layer1.
    """
    specs = [{"id": "relu", "op": "relu", "role": "stem", "stage": 0}]
    for s in range(1, N_STAGES + 1):
        stage = s - 1 if cifar else s
        for b in range(N_BLOCKS):
            module = f"layer{s}.{b}.relu"  # one ReLU module called twice
            specs.append({"id": module, "op": "relu", "role": "main_path", "stage": stage, "module": module})
            specs.append(
                {"id": f"{module}_1", "op": "relu", "role": "after_addition", "stage": stage,
                 "module": module}
            )
    return build_sites(specs)


def seresnet_sites() -> list[Site]:
    """SE-ResNet18-like: as resnet18 plus one relu inside each block's squeeze-excitation gate."""
    specs = [{"id": "act1", "op": "relu", "role": "stem", "stage": 0}]
    for s in range(1, N_STAGES + 1):
        for b in range(N_BLOCKS):
            p = f"layer{s}.{b}"
            specs += [
                {"id": f"{p}.act1", "op": "relu", "role": "main_path", "stage": s},
                {"id": f"{p}.se.act", "op": "relu", "role": "in_se", "stage": s, "channels": 4},
                {"id": f"{p}.act2", "op": "relu", "role": "after_addition", "stage": s},
            ]
    return build_sites(specs)


def preact_sites() -> list[Site]:
    """Pre-activation ResNet18-like (SiLU): two main-path activations and a bare add per block, head act."""
    specs = []
    for s in range(N_STAGES):
        for b in range(N_BLOCKS):
            p = f"layer{s}.{b}"
            specs += [
                {"id": f"{p}.act1", "op": "silu", "role": "main_path", "stage": s, "module_class": "SiLU"},
                {"id": f"{p}.act2", "op": "silu", "role": "main_path", "stage": s, "module_class": "SiLU"},
                {"id": f"{p}.add", "op": "add", "role": "after_addition", "stage": s, "module": p,
                 "module_class": "PreActBlock"},
            ]
    specs.append({"id": "act", "op": "silu", "role": "head", "stage": N_STAGES - 1, "module_class": "SiLU"})
    return build_sites(specs)


CONVNEXT_DEPTHS = (2, 2, 6, 2)


def convnext_sites() -> list[Site]:
    """ConvNeXt-like: per block a channels-last MLP gelu and a bare residual add; no stem/head act."""
    specs = []
    for s, n_blocks in enumerate(CONVNEXT_DEPTHS):
        for b in range(n_blocks):
            p = f"stages.{s}.blocks.{b}"
            specs += [
                {"id": f"{p}.mlp.act", "op": "gelu", "role": "mlp", "stage": s, "layout": "nhwc",
                 "module_class": "GELU", "reached": "module_tree"},
                {"id": f"{p}.add", "op": "add", "role": "after_addition", "stage": s, "module": p,
                 "module_class": "ConvNeXtBlock"},
            ]
    return build_sites(specs)


def decided(sites: list[Site], rules: RuleSet) -> dict[str, tuple[str, float, int | None]]:
    """Site id → (action, α, deciding rule index)."""
    return {
        s.id: (d.action, d.alpha, d.rule.index if d.rule else None)
        for s, d in zip(sites, resolve(rules, sites))
    }


def chosen(sites: list[Site], rules: RuleSet, action: str = "meansparse") -> set[str]:
    return {sid for sid, (a, _, _) in decided(sites, rules).items() if a == action}


def rules_text(*rules: str, header: str = "") -> str:
    body = "".join(textwrap.indent(textwrap.dedent(r).strip("\n"), "  ") + "\n" for r in rules)
    return f"version: 1\n{header}rules:\n{body}"


# --------------------------------------------------------------------------------------------------
# Built-in rules
# --------------------------------------------------------------------------------------------------

BUILTINS = ("after_addition", "main_path", "before_activations", "full", "sparta_stage_last")


def test_builtins_are_listed_and_described():
    assert set(BUILTINS) <= set(builtin_rules())
    for name in BUILTINS:
        rules = load_rules(name)
        assert rules.description, name
        assert rules.source == f"graphsparse/planning/builtin_rules/{name}.yaml"
        assert rules.text.startswith("version: 1")


def test_builtins_on_resnet18():
    sites = resnet18_sites()
    by_role = {role: {s.id for s in sites if s.role == role} for role in ("main_path", "after_addition")}
    n_blocks = N_STAGES * N_BLOCKS
    assert len(by_role["after_addition"]) == len(by_role["main_path"]) == n_blocks

    assert chosen(sites, load_rules("after_addition")) == by_role["after_addition"]
    assert chosen(sites, load_rules("main_path")) == by_role["main_path"]
    everything = {s.id for s in sites}
    assert len(everything) == 1 + 2 * n_blocks == 17
    assert chosen(sites, load_rules("before_activations")) == everything
    assert chosen(sites, load_rules("full")) == everything

    stage_last = {f"layer{s}.{N_BLOCKS - 1}.relu_1" for s in range(1, N_STAGES + 1)}
    assert chosen(sites, load_rules("sparta_stage_last"), "sparta") == stage_last
    assert chosen(sites, load_rules("sparta_stage_last"), "meansparse") == set()


def test_sparta_stage_last_when_stem_shares_a_stage():
    sites = resnet18_sites(cifar=True)
    stage_last = {f"layer{s}.{N_BLOCKS - 1}.relu_1" for s in range(1, N_STAGES + 1)}
    assert chosen(sites, load_rules("sparta_stage_last"), "sparta") == stage_last


def test_builtins_skip_squeeze_excitation():
    sites = seresnet_sites()
    in_se = {s.id for s in sites if s.role == "in_se"}
    assert len(in_se) == N_STAGES * N_BLOCKS
    outside = {s.id for s in sites} - in_se
    for name in ("before_activations", "full"):
        rules = load_rules(name)
        assert chosen(sites, rules) == outside, name
        skip_index = next(r.index for r in rules if r.action == "skip")
        for sid in in_se:
            assert decided(sites, rules)[sid] == ("skip", 0.0, skip_index)


def test_builtins_on_preact_with_bare_additions():
    sites = preact_sites()
    adds = {s.id for s in sites if s.op == "add"}
    acts = {s.id for s in sites if s.op != "add"}
    assert len(adds) == N_STAGES * N_BLOCKS and len(acts) == 2 * N_STAGES * N_BLOCKS + 1
    assert chosen(sites, load_rules("after_addition")) == adds
    assert chosen(sites, load_rules("before_activations")) == acts
    assert chosen(sites, load_rules("full")) == adds | acts
    assert chosen(sites, load_rules("main_path")) == acts - {"act"}
    with pytest.raises(RuleError, match=r"rules\[0\] \('stage-last-relu'\) matches no site"):
        resolve(load_rules("sparta_stage_last"), sites)


def test_builtins_on_convnext():
    sites = convnext_sites()
    n_blocks = sum(CONVNEXT_DEPTHS)
    gelus = {s.id for s in sites if s.op == "gelu"}
    adds = {s.id for s in sites if s.op == "add"}
    assert len(gelus) == len(adds) == n_blocks
    assert chosen(sites, load_rules("before_activations")) == gelus
    assert chosen(sites, load_rules("after_addition")) == adds
    assert chosen(sites, load_rules("full")) == gelus | adds
    with pytest.raises(RuleError) as info:
        resolve(load_rules("main_path"), sites)
    message = str(info.value)
    assert "graphsparse/planning/builtin_rules/main_path.yaml" in message
    assert "rules[0] ('main-path') matches no site" in message
    assert "role main_path" in message and "mlp" in message  # what it wanted, what there is


# --------------------------------------------------------------------------------------------------
# Precedence
# --------------------------------------------------------------------------------------------------


def test_later_rules_override_earlier_ones():
    rules = parse_rules(rules_text(
        "- {select: all, action: meansparse, alpha: 0.1}",
        "- {select: {stage: 2}, action: meansparse, alpha: 0.3}",
        "- {select: {stage: 2, role: after_addition}, action: sparta}",
    ))
    sites = resnet18_sites()
    got = decided(sites, rules)
    for s in sites:
        if s.stage == 2 and s.role == "after_addition":
            assert got[s.id] == ("sparta", 0.0, 2)
        elif s.stage == 2:
            assert got[s.id] == ("meansparse", 0.3, 1)
        else:
            assert got[s.id] == ("meansparse", 0.1, 0)


def test_explicit_skip_wins_whatever_its_position():
    rules = parse_rules(rules_text(
        "- {select: {role: main_path}, action: skip}",
        "- {select: all, action: meansparse, alpha: 0.2}",
        "- {select: {stage: 3}, action: meansparse, alpha: 0.4}",
    ))
    sites = resnet18_sites()
    got = decided(sites, rules)
    for s in sites:
        if s.role == "main_path":
            assert got[s.id] == ("skip", 0.0, 0)
        else:
            assert got[s.id] == ("meansparse", 0.4 if s.stage == 3 else 0.2, 2 if s.stage == 3 else 1)


def test_unmatched_sites_are_skipped_without_a_rule():
    rules = parse_rules(rules_text("- {select: {stage: 1}, action: meansparse}"))
    got = decided(resnet18_sites(), rules)
    assert {sid for sid, v in got.items() if v == ("skip", 0.0, None)} == {
        s.id for s in resnet18_sites() if s.stage != 1
    }


# --------------------------------------------------------------------------------------------------
# α
# --------------------------------------------------------------------------------------------------


def test_file_default_alpha_and_rule_alpha():
    rules = parse_rules(rules_text(
        "- {select: {role: main_path}, action: meansparse}",
        "- {select: {role: after_addition}, action: meansparse, alpha: 0.7}",
        header="alpha: 0.25\n",
    ))
    for s in resnet18_sites():
        action, alpha, _ = decided(resnet18_sites(), rules)[s.id]
        expected = {"main_path": 0.25, "after_addition": 0.7}.get(s.role)
        assert (action, alpha) == (("meansparse", expected) if expected is not None else ("skip", 0.0))


def test_per_stage_alpha_lands_on_its_stages():
    rules = parse_rules(rules_text(
        "- {select: all, action: meansparse, alpha: {per_stage: {1: 0.1, 3: 0.3, '4': 0.4}}}",
        "- {select: {role: after_addition}, action: meansparse,"
        "   alpha: {per_stage: {2-3: 0.9, default: 0.05}}}",
        header="alpha: 0.5\n",
    ))
    sites = resnet18_sites()
    got = decided(sites, rules)
    for s in sites:
        if s.role == "after_addition":
            expected = 0.9 if s.stage in (2, 3) else 0.05
        else:
            expected = {1: 0.1, 3: 0.3, 4: 0.4}.get(s.stage, 0.5)  # unlisted stages: the file's α
        assert got[s.id][1] == pytest.approx(expected), s.id


def test_per_stage_default_next_to_per_stage():
    rules = parse_rules(
        rules_text("- {select: all, action: meansparse, alpha: {per_stage: {0: 1}, default: 2}}")
    )
    got = decided(resnet18_sites(), rules)
    assert {s.id: got[s.id][1] for s in resnet18_sites()} == {
        s.id: 1.0 if s.stage == 0 else 2.0 for s in resnet18_sites()
    }


def test_linear_alpha_follows_relative_depth():
    rules = parse_rules(rules_text("- {select: all, action: meansparse, alpha: {linear: [0.1, 0.5]}}"))
    sites = resnet18_sites()
    got = decided(sites, rules)
    n = len(sites)
    for i, s in enumerate(sites):
        assert got[s.id][1] == pytest.approx(0.1 + 0.4 * i / (n - 1))
    assert got[sites[0].id][1] == pytest.approx(0.1)
    assert got[sites[-1].id][1] == pytest.approx(0.5)


def test_top_level_alpha_may_be_a_schedule():
    rules = parse_rules(rules_text(
        "- {select: {role: main_path}, action: meansparse}",
        "- {select: {role: after_addition}, action: meansparse, alpha: {per_stage: {1: 0.9}}}",
        header="alpha: {per_stage: {2: 0.2}}\n",
    ))
    got = decided(resnet18_sites(), rules)
    for s in resnet18_sites():
        if s.role == "main_path":
            assert got[s.id][1] == (0.2 if s.stage == 2 else 0.0)
        elif s.role == "after_addition":
            assert got[s.id][1] == {1: 0.9, 2: 0.2}.get(s.stage, 0.0)  # unlisted → the file's schedule


def test_alpha_spec_at():
    site = resnet18_sites()[5]
    assert AlphaSpec(constant=0.3).at(site) == 0.3
    assert AlphaSpec(per_stage=(((9, 9), 1.0),)).at(site, fallback=0.125) == 0.125


# --------------------------------------------------------------------------------------------------
# Selectors
# --------------------------------------------------------------------------------------------------


def ids_for(select: str, sites: list[Site] | None = None) -> set[str]:
    sites = resnet18_sites() if sites is None else sites
    rules = parse_rules(rules_text(f"- {{select: {select}, action: meansparse, optional: true}}"))
    return chosen(sites, rules)


def test_selector_keys():
    sites = resnet18_sites()
    ids = {s.id for s in sites}
    by = lambda pred: {s.id for s in sites if pred(s)}  # noqa: E731

    assert ids_for("all") == ids_for("{}") == ids
    assert ids_for("{role: [stem, main_path]}") == by(lambda s: s.role in ("stem", "main_path"))
    assert ids_for("{id: 'layer2.*'}") == by(lambda s: s.id.startswith("layer2."))
    assert ids_for("{id: 're:layer[13]\\.\\d\\.relu'}") == {
        f"layer{s}.{b}.relu" for s in (1, 3) for b in range(N_BLOCKS)
    }
    assert ids_for("{id: 're:layer1'}") == set()  # regexes match the whole id
    assert ids_for("{module: 'layer4.1.*'}") == {"layer4.1.relu", "layer4.1.relu_1"}
    assert ids_for("{module_class: 'Re*'}") == ids
    assert ids_for("{stage: '2-3'}") == by(lambda s: s.stage in (2, 3))
    assert ids_for("{stage: [1, 4]}") == by(lambda s: s.stage in (1, 4))  # a stage list is any-of
    assert ids_for("{depth: 0}") == {"relu"}
    assert ids_for("{depth: [3, 5]}") == by(lambda s: 3 <= s.depth <= 5)  # two ints: a range
    assert ids_for("{depth: [1, 3, 5]}") == by(lambda s: s.depth in (1, 3, 5))
    assert ids_for("{depth: [[0, 1], '15-16']}") == by(lambda s: s.depth in (0, 1, 15, 16))
    assert ids_for("{relative_depth: [0.5, 1.0]}") == by(lambda s: s.depth / (len(sites) - 1) >= 0.5)
    assert ids_for("{position: first}") == by(lambda s: s.id == "relu" or s.id.endswith(".0.relu"))
    assert ids_for("{position: last, stage: 1}") == {f"layer1.{N_BLOCKS - 1}.relu_1"}
    assert ids_for("{reached: graph}") == ids
    assert ids_for("{reached: module_tree}") == set()
    assert ids_for("{layout: nchw}") == ids
    assert ids_for("{not: {role: stem}}") == ids - {"relu"}
    assert ids_for("{role: after_addition, not: {stage: [1, 2], not: {position: last}}}") == by(
        lambda s: s.role == "after_addition" and (s.stage > 2 or s.last_in_stage)
    )


def test_op_selector_and_activation_alias():
    sites = preact_sites()
    assert ids_for("{op: activation}", sites) == {s.id for s in sites if s.op != "add"}
    assert ids_for("{op: add}", sites) == {s.id for s in sites if s.op == "add"}
    assert ids_for("{op: [relu, gelu]}", sites) == set()
    assert ids_for("{op: silu, role: head}", sites) == {"act"}


def test_selector_describe_names_every_constraint():
    rules = parse_rules(rules_text(
        "- {select: {role: [main_path, stem], stage: '1-2', depth: [0, 4], not: {id: 'x*'}}, action: skip}"
    ))
    text = rules.rules[0].select.describe()
    for part in ("role in [main_path, stem]", "stage 1-2", "depth 0-4", "not (id x*)"):
        assert part in text


# --------------------------------------------------------------------------------------------------
# Matching nothing
# --------------------------------------------------------------------------------------------------


def test_rule_matching_nothing_is_an_error_naming_it():
    text = rules_text(
        "- {name: additions, select: {role: after_addition}, action: meansparse}",
        "- {select: {stage: 7, role: head}, action: meansparse}",
    )
    with pytest.raises(RuleError) as info:
        resolve(parse_rules(text, source="mine.yaml"), resnet18_sites())
    message = str(info.value)
    assert "mine.yaml:4" in message
    assert "rules[1] matches no site" in message
    assert "role head" in message and "stage 7" in message
    assert "stages 0-4" in message
    assert "optional: true" in message
    assert "additions" not in message


def test_optional_rule_may_match_nothing():
    text = rules_text(
        "- {select: {role: after_addition}, action: meansparse}",
        "- {select: {role: in_se}, action: skip, optional: true}",
    )
    got = decided(resnet18_sites(), parse_rules(text))
    assert sum(a == "meansparse" for a, _, _ in got.values()) == N_STAGES * N_BLOCKS


def test_every_non_optional_unmatched_rule_is_reported():
    text = rules_text("- {select: {stage: 8}, action: skip}", "- {select: {role: mlp}, action: meansparse}")
    with pytest.raises(RuleError) as info:
        resolve(parse_rules(text), resnet18_sites())
    assert "rules[0] matches no site" in str(info.value) and "rules[1] matches no site" in str(info.value)


def test_sparta_on_a_bare_addition_is_refused():
    text = rules_text("- {select: {role: after_addition}, action: sparta}")
    with pytest.raises(RuleError, match=r"rules\[0\].*layer0\.0\.add.*op: activation"):
        resolve(parse_rules(text), preact_sites())


def test_sparta_on_token_layout_is_refused():
    sites = build_sites(
        [{"id": "blocks.0.mlp.act", "op": "gelu", "role": "mlp", "stage": 0, "layout": "tokens"}]
    )
    with pytest.raises(RuleError, match="layout 'tokens'"):
        resolve(parse_rules(rules_text("- {select: all, action: sparta}")), sites)


# --------------------------------------------------------------------------------------------------
# Validation messages
# --------------------------------------------------------------------------------------------------

GOOD_RULE = "- {select: {role: main_path}, action: meansparse}"

# (rule text placed as rules[1], substrings the message must contain)
BAD_RULES = [
    ("- {selct: {role: stem}, action: meansparse}", ["rules[1].selct", "did you mean 'select'"]),
    ("- {select: {rol: stem}, action: meansparse}", ["rules[1].select.rol", "did you mean 'role'"]),
    ("- {select: {role: after_adition}, action: meansparse}",
     ["rules[1].select.role", "unknown role 'after_adition'", "did you mean 'after_addition'"]),
    ("- {select: {role: 3}, action: meansparse}", ["rules[1].select.role", "expected a role"]),
    ("- {select: {op: rellu}, action: meansparse}", ["rules[1].select.op", "did you mean 'relu'"]),
    ("- {select: {position: lats}, action: meansparse}", ["rules[1].select.position", "did you mean 'last'"]),
    ("- {select: {reached: graf}, action: meansparse}", ["rules[1].select.reached", "did you mean 'graph'"]),
    ("- {select: {layout: nhcw}, action: meansparse}", ["rules[1].select.layout", "did you mean"]),
    ("- {select: {role: []}, action: meansparse}", ["rules[1].select.role", "empty list"]),
    ("- {select: everything, action: meansparse}", ["rules[1].select", "'all'"]),
    ("- {select: {not: all}, action: meansparse}", ["rules[1].select.not", "selector mapping"]),
    ("- {select: {not: {rloe: stem}}, action: meansparse}",
     ["rules[1].select.not.rloe", "did you mean 'role'"]),
    ("- {select: {id: 're:layer['}, action: meansparse}", ["rules[1].select.id", "does not compile"]),
    ("- {select: {module: 're:(a'}, action: meansparse}", ["rules[1].select.module", "does not compile"]),
    ("- {select: {stage: '3-1'}, action: meansparse}", ["rules[1].select.stage", "lo ≤ hi"]),
    ("- {select: {stage: 'one'}, action: meansparse}", ["rules[1].select.stage", "'lo-hi'"]),
    ("- {select: {stage: -1}, action: meansparse}", ["rules[1].select.stage", "≥ 0"]),
    ("- {select: {stage: 1.5}, action: meansparse}", ["rules[1].select.stage", "expected an int"]),
    ("- {select: {depth: [5, 2]}, action: meansparse}", ["rules[1].select.depth", "lo ≤ hi"]),
    ("- {select: {relative_depth: [0.5, 1.5]}, action: meansparse}",
     ["rules[1].select.relative_depth", "≤ 1"]),
    ("- {select: {relative_depth: 0.5}, action: meansparse}", ["rules[1].select.relative_depth", "[lo, hi]"]),
    ("- {select: all, action: meansparce}", ["rules[1].action", "did you mean 'meansparse'"]),
    ("- {select: all}", ["rules[1]", "missing 'action'", "meansparse, sparta, skip"]),
    ("- {action: skip}", ["rules[1]", "missing 'select'"]),
    ("- {select: all, action: meansparse, alpha: high}", ["rules[1].alpha", "bad α 'high'", "number ≥ 0"]),
    ("- {select: all, action: meansparse, alpha: true}", ["rules[1].alpha", "expected α as a number"]),
    ("- {select: all, action: meansparse, alpha: -0.1}", ["rules[1].alpha", "≥ 0"]),
    ("- {select: all, action: meansparse, alpha: .nan}", ["rules[1].alpha", "finite"]),
    ("- {select: all, action: meansparse, alpha: {linear: [0.1]}}",
     ["rules[1].alpha.linear", "[start, end]"]),
    ("- {select: all, action: meansparse, alpha: {linear: [0.1, x]}}",
     ["rules[1].alpha.linear", "[start, end]"]),
    ("- {select: all, action: meansparse, alpha: {linear: [0.1, -1]}}", ["rules[1].alpha.linear[1]", "≥ 0"]),
    ("- {select: all, action: meansparse, alpha: {liner: [0, 1]}}",
     ["rules[1].alpha.liner", "did you mean 'linear'"]),
    ("- {select: all, action: meansparse, alpha: {linear: [0, 1], per_stage: {0: 1}}}",
     ["rules[1].alpha", "exactly one of"]),
    ("- {select: all, action: meansparse, alpha: {per_stage: {0: -2}}}",
     ["rules[1].alpha.per_stage[0]", "≥ 0"]),
    ("- {select: all, action: meansparse, alpha: {per_stage: {x: 1}}}",
     ["rules[1].alpha.per_stage.x", "'lo-hi'"]),
    ("- {select: all, action: meansparse, alpha: {per_stage: {0-2: 1, 2: 3}}}",
     ["rules[1].alpha.per_stage[2]", "overlaps"]),
    ("- {select: all, action: meansparse, alpha: {per_stage: []}}", ["rules[1].alpha.per_stage", "STAGE: α"]),
    ("- {select: all, action: skip, alpha: 0.1}", ["rules[1].alpha", "meansparse only", "'skip'"]),
    ("- {select: all, action: sparta, alpha: 0.1}", ["rules[1].alpha", "SPARTA has no α"]),
    ("- {select: all, action: meansparse, sparta: {reduction: 4}}", ["rules[1].sparta", "action sparta"]),
    ("- {select: all, action: sparta, sparta: [4]}", ["rules[1].sparta", "mapping of parameters"]),
    ("- {select: all, action: sparta, sparta: {width: {a: 1}}}",
     ["rules[1].sparta.width", "expected a number"]),
    ("- {select: all, action: meansparse, optional: maybe}", ["rules[1].optional", "true or false"]),
    ("- {name: [a], select: all, action: meansparse}", ["rules[1].name", "expected a string"]),
    ("- just a string", ["rules[1]", "expected a mapping"]),
]


@pytest.mark.parametrize(("rule", "expected"), BAD_RULES, ids=[r for r, _ in BAD_RULES])
def test_bad_rule_messages(rule, expected):
    text = rules_text(GOOD_RULE, rule)
    with pytest.raises(RuleError) as info:
        parse_rules(text, source="rules/bad.yaml")
    message = str(info.value)
    assert message.startswith("rules/bad.yaml:4:"), message  # file and the rule's line
    for part in expected:
        assert part in message, (part, message)


BAD_FILES = [
    ("- a\n- b\n", ["bad.yaml:1", "expected a mapping", "got a list"]),
    ("", ["bad.yaml", "empty file"]),
    ("version: 1\nrules: [\n  {select: all\n", ["bad.yaml:4", "YAML syntax error"]),
    ("version: 1\nrules:\n  - select: all\n   action: skip\n", ["bad.yaml:4", "YAML syntax error"]),
    ("version: 1\nrules:\n  - {select: all, action: skip, action: meansparse}\n",
     ["bad.yaml:3", "duplicate key 'action'"]),
    ("version: 1\nrule:\n  - {select: all, action: skip}\n",
     ["bad.yaml:2", "'rule'", "did you mean 'rules'"]),
    ("version: 2\nrules:\n  - {select: all, action: skip}\n", ["bad.yaml:1", "version", "expected 1"]),
    ("version: '1'\nrules:\n  - {select: all, action: skip}\n", ["version", "expected 1"]),
    ("rules:\n  - {select: all, action: skip}\n", ["bad.yaml", "missing 'version'"]),
    ("version: 1\n", ["missing 'rules'"]),
    ("version: 1\nrules: []\n", ["bad.yaml:2", "rules", "non-empty list"]),
    ("version: 1\nrules: {select: all}\n", ["rules", "non-empty list", "mapping"]),
    ("version: 1\nalpha: -1\nrules:\n  - {select: all, action: skip}\n", ["bad.yaml:2", "alpha", "≥ 0"]),
    ("version: 1\ndescription: [x]\nrules:\n  - {select: all, action: skip}\n", ["description", "string"]),
    ("version: 1\n---\nversion: 1\n", ["bad.yaml", "YAML syntax error"]),
    ("version: 1\nrules:\n  - {select: all, alpha: {per_stage: {[1]: 2}}}\n", ["bad.yaml:3", "unhashable"]),
]


@pytest.mark.parametrize(("text", "expected"), BAD_FILES, ids=[t[:30] for t, _ in BAD_FILES])
def test_bad_file_messages(text, expected):
    with pytest.raises(RuleError) as info:
        parse_rules(text, source="rules/bad.yaml")
    for part in expected:
        assert part in str(info.value), (part, str(info.value))


ODD_VALUES = ["null", "true", "1.5", "-3", "'x'", "[]", "[1, [2]]", "{a: 1}", ".inf", "[0, 1]", "'1-2'"]


@pytest.mark.parametrize("key", ["role", "op", "id", "module", "module_class", "stage", "depth",
                                 "relative_depth", "position", "reached", "layout", "not"])
def test_odd_selector_values_give_rule_errors_or_parse(key):
    """Whatever the value, parsing either succeeds or raises RuleError (never another exception)."""
    for value in ODD_VALUES:
        try:
            parse_rules(rules_text(f"- {{select: {{{key}: {value}}}, action: meansparse}}"))
        except RuleError as e:
            assert f"rules[0].select.{key}" in str(e)


@pytest.mark.parametrize("key", ["name", "select", "action", "alpha", "optional", "sparta"])
def test_odd_rule_values_give_rule_errors_or_parse(key):
    for value in ODD_VALUES + ["{linear: 1}", "{per_stage: 3}"]:
        base = {"select": "all", "action": "sparta" if key == "sparta" else "meansparse", key: value}
        body = ", ".join(f"{k}: {v}" for k, v in base.items())
        try:
            parse_rules(rules_text(f"- {{{body}}}"))
        except RuleError as e:
            assert "rules[0]" in str(e)


# --------------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------------


def _walk(value):
    yield value
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _walk(getattr(value, f.name))
    elif isinstance(value, tuple):
        for item in value:
            yield from _walk(item)


def test_parsed_rules_are_frozen_dataclasses_without_raw_containers():
    text = rules_text(
        "- {name: a, select: {role: [stem], stage: '1-2', not: {id: x}}, action: meansparse, "
        "alpha: {per_stage: {0: 1, default: 2}}}",
        "- {select: all, action: sparta, sparta: {reduction: 4, kernel: [3, 3]}}",
    )
    rules = parse_rules(text)
    assert all(not isinstance(v, (dict, list, set)) for v in _walk(rules))
    assert isinstance(rules.rules[0], Rule) and isinstance(rules.rules[0].select, Selector)
    assert rules.rules[1].sparta_params == {"kernel": (3, 3), "reduction": 4}
    assert hash(rules) == hash(parse_rules(text))
    with pytest.raises(dataclasses.FrozenInstanceError):
        rules.rules[0].action = "skip"  # type: ignore[misc]


def test_rule_labels_lines_and_text_are_kept():
    text = rules_text("- {name: first, select: all, action: skip}", "- {select: all, action: meansparse}")
    rules = parse_rules(text, source="here.yaml")
    assert (rules.text, rules.source) == (text, "here.yaml")
    assert [r.label for r in rules] == ["first", "rules[1]"]
    lines = text.splitlines()
    assert [lines[r.line - 1].strip().startswith("- {") for r in rules] == [True, True]
    assert [r.line for r in rules] == [3, 4]


# --------------------------------------------------------------------------------------------------
# Lookup
# --------------------------------------------------------------------------------------------------


def test_load_by_path(tmp_path: Path):
    path = tmp_path / "custom.yaml"
    text = rules_text("- {select: {role: stem}, action: meansparse, alpha: 0.5}")
    path.write_text(text)
    for arg in (path, str(path)):
        rules = load_rules(arg)
        assert rules.text == text and rules.source == str(path)
    assert load_rules(rules) is rules  # a RuleSet passes through


def test_local_rules_directory_shadows_builtins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "rules").mkdir()
    text = rules_text("- {select: {role: stem}, action: skip}")
    (tmp_path / "rules" / "after_addition.yaml").write_text(text)
    (tmp_path / "rules" / "mine.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    assert load_rules("after_addition").text == text
    assert load_rules("after_addition").source == str(Path("rules") / "after_addition.yaml")
    assert load_rules("mine").text == text
    assert load_rules("full").source == "graphsparse/planning/builtin_rules/full.yaml"  # falls back to the package
    with pytest.raises(RuleError, match=r"did you mean 'mine'\?.*in \./rules: after_addition, mine"):
        load_rules("mien")


def test_load_from_package_reads_the_packaged_file():
    import graphsparse

    packaged = Path(graphsparse.__file__).parent / "planning" / "builtin_rules" / "full.yaml"
    assert load_rules("full").text == packaged.read_text()


def test_unknown_rule_name_lists_builtins_and_closest():
    with pytest.raises(RuleError) as info:
        load_rules("after_additon")
    message = str(info.value)
    assert "did you mean 'after_addition'" in message
    for name in BUILTINS:
        assert name in message


def test_missing_path_is_a_rule_error(tmp_path: Path):
    with pytest.raises(RuleError, match=re.escape("no such file")):
        load_rules(tmp_path / "nope.yaml")
    with pytest.raises(RuleError, match="no such file"):
        load_rules("somewhere/full.yaml")


def test_invalid_builtin_style_file_names_its_path(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("version: 1\nrules:\n  - {select: {role: stemm}, action: skip}\n")
    expected = re.escape(f"{path}:3: rules[0].select.role") + ".*did you mean 'stem'"
    with pytest.raises(RuleError, match=expected):
        load_rules(path)
