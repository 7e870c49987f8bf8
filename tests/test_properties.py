"""Properties on random architectures (graphsparse.testing): the toolkit's invariants, stated once.

Profiles (tests/conftest.py): ``ci`` (default: fixed budget, derandomised) and ``thorough``
(``pytest tests/test_properties.py --hypothesis-profile=thorough``). A failure prints the generated
architecture as Python code (``note(arch.source())``) and its expected sites.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import string

import pytest
import torch
import yaml
from hypothesis import Phase, assume, example, given, note, settings
from hypothesis import strategies as st

import graphsparse
from graphsparse import RuleError, calibrate, find_sites, fuse_activations, make_plan, operators, parse_rules, rewrite
from graphsparse.ops import MeanSparse, backward_mode, fast
from graphsparse.planning.fuse_residual import fuse_residual_operators
from graphsparse.planning.plan import Plan
from graphsparse.planning.rewrite import rewrite_info
from graphsparse.testing import Architecture, random_architectures
from graphsparse.testing.architectures import (
    SE,
    Act,
    ConvNeXt,
    Head,
    Hidden,
    Residual,
    SqueezeExcite,
    Stem,
    TokenMLP,
    ToTokens,
)

_BUDGET = settings.default.max_examples  # the loaded profile's budget; each property scales it


def _budget(factor: float) -> int:
    return max(1, int(_BUDGET * factor))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models are tiny: one thread is faster, and immune to a loaded machine's OpenMP contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _note(arch: Architecture) -> None:
    note(arch.source())
    note("expected sites:\n" + arch.truth.table())


def _site_row(s) -> tuple:
    return (
        s.id, s.op, s.role, s.layout, s.channel_axis % len(s.shape), s.channels, s.reached, s.module,
        s.stage, s.first_in_stage, s.last_in_stage,
    )


def _truth_row(t) -> tuple:
    return (
        t.id, t.op, t.role, t.layout, t.channel_axis, t.channels, t.reached, t.module,
        t.stage, t.first_in_stage, t.last_in_stage,
    )


def _check_sites(arch: Architecture) -> list:
    sites = find_sites(arch.build(), arch.example_input())
    truth = arch.truth
    found, expected = [s.id for s in sites], [t.id for t in truth.sites]
    note("found sites:\n" + "\n".join(map(str, (_site_row(s) for s in sites))))
    assert sites.missed == [], f"capture's census saw activations run that are not sites: {sites.missed}"
    missing = [i for i in expected if i not in found]
    spurious = [i for i in found if i not in expected]
    assert not missing, f"recall < 100 %: sites not found {missing}"
    assert not spurious, f"precision < 100 %: unexpected sites {spurious}"
    for gate in truth.gates:  # a gate shares its module (and for functionals its id base) with sites
        count = sum(1 for s in sites if (s.module, s.op) == (gate.module, gate.op))
        expected_count = sum(1 for t in truth.sites if (t.module, t.op) == (gate.module, gate.op))
        assert count == expected_count, f"gate {gate} reported as a site"
    assert found == expected, "sites out of forward order"
    assert [s.depth for s in sites] == list(range(len(sites)))
    for s, t in zip(sites, truth.sites):
        assert _site_row(s) == _truth_row(t), f"site {s.id}: found {_site_row(s)}, expected {_truth_row(t)}"
    return sites


def _module_state(model: torch.nn.Module) -> list:
    """Each module's attribute names and the identity of every attribute, parameter, buffer, child and
    hook, and its train/eval flag: what find_sites and rewrite must leave as it was."""
    state = []
    for path, m in model.named_modules():
        dicts = {
            k: {n: id(x) for n, x in v.items()}
            for k, v in m.__dict__.items()
            if isinstance(v, dict) and (k in ("_parameters", "_buffers", "_modules") or "hook" in k)
        }
        state.append((path, {k: id(v) for k, v in m.__dict__.items()}, dicts, m.training))
    return state


# ------------------------------------------------------------------------------------------ the generator


@settings(max_examples=_budget(2))
@given(random_architectures())
def test_generated_source_rebuilds_the_architecture(arch):
    namespace: dict = {}
    exec(arch.source(), namespace)  # the printed counterexample is runnable code
    assert namespace["arch"] == arch
    with torch.no_grad():
        out = namespace["model"](namespace["x"])
    assert out.shape == (arch.input_shape[0], arch.head.classes)


# ------------------------------------------------------------------------------------------ site discovery


@settings(max_examples=_budget(4))
@given(random_architectures(roots=("traceable",)))
def test_site_discovery_matches_the_ground_truth(arch):
    """Recall and precision 100 %; ids, roles (SE internals in_se), layouts, channel axes, channels exact."""
    _note(arch)
    _check_sites(arch)


@settings(max_examples=_budget(1))
@given(random_architectures(), st.booleans())
def test_find_sites_and_rewrite_leave_the_model_as_it_was(arch, training):
    _note(arch)
    model = arch.build().train(training)
    before = _module_state(model)
    find_sites(model, arch.example_input())
    assert _module_state(model) == before
    rewrite(model, "full", arch.example_input())
    assert _module_state(model) == before


# Regression (found by this property): a functional activation in the forward of a module traced as its
# own graph got the id 'net..relu' instead of 'net.relu'.
@settings(max_examples=_budget(2), phases=[Phase.explicit, Phase.generate])
@example(Architecture(root="wrapper", stem=Stem(act=Act("relu", "functional"), inline=True)))
@given(random_architectures(roots=("wrapper",)))
def test_site_discovery_untraceable_wrapper_root(arch):
    _note(arch)
    _check_sites(arch)


# Regression (found by this property): with the children traced one by one, roles were decided per
# child graph, so stem and head activations became main_path.
@settings(max_examples=_budget(2), phases=[Phase.explicit, Phase.generate])
@example(Architecture(root="split", stem=Stem(pool=True), blocks=(ConvNeXt(),)))
@given(random_architectures(roots=("split",)))
def test_site_discovery_untraceable_split_root(arch):
    _note(arch)
    _check_sites(arch)


# ------------------------------------------------------------------------------------------ rules


def _selects(role=None, op=None):
    return lambda t: (role is None or t.role == role) and (op is None or t.op == op)


# what each built-in rule file means, stated on the ground truth: (selects, action, error when nothing)
_BUILTIN_DEFINITIONS = {
    "after_addition": (lambda t: t.role == "after_addition", "meansparse"),
    "main_path": (lambda t: t.role == "main_path", "meansparse"),
    "before_activations": (lambda t: t.op != "add" and t.role != "in_se", "meansparse"),
    "full": (lambda t: t.role != "in_se", "meansparse"),
    "sparta_stage_last": (
        lambda t: t.op == "relu" and t.last_in_stage and t.role in ("main_path", "after_addition"),
        "sparta",
    ),
}
# the non-optional rules of each file must match something: what they look for, on the ground truth
_MUST_MATCH = {
    "after_addition": lambda t: t.role == "after_addition",
    "main_path": lambda t: t.role == "main_path",
    "before_activations": lambda t: t.op != "add",
    "full": lambda t: True,
    "sparta_stage_last": _BUILTIN_DEFINITIONS["sparta_stage_last"][0],
}


def _rule_raises(name: str, truth) -> bool:
    if not any(_MUST_MATCH[name](t) for t in truth.sites):
        return True
    selects, action = _BUILTIN_DEFINITIONS[name]
    return action == "sparta" and any(selects(t) and t.layout not in ("nchw", "nhwc") for t in truth.sites)


def test_every_builtin_rule_has_a_definition_here():
    assert set(_BUILTIN_DEFINITIONS) <= set(graphsparse.builtin_rules())


@settings(max_examples=_budget(2))
@given(random_architectures(roots=("traceable",)))
def test_builtin_rules_select_what_their_definition_picks(arch):
    _note(arch)
    sites = find_sites(arch.build(), arch.example_input())
    for name, (selects, action) in _BUILTIN_DEFINITIONS.items():
        if _rule_raises(name, arch.truth):
            with pytest.raises(RuleError):
                make_plan(sites, name)
            continue
        plan = make_plan(sites, name)
        chosen = [(e.site.id, e.action) for e in plan.selected()]
        expected = [(t.id, action) for t in arch.truth.sites if selects(t)]
        assert chosen == expected, f"rule {name}"


# ------------------------------------------------------------------------------------------ rewrite


_REWRITE_RULES = ("after_addition", "before_activations", "full")


def _randomize_operators(model, seed: int, *, alpha: float | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for op in operators(model).values():
            op.mean.copy_(torch.randn(op.mean.shape, generator=gen))
            op.var.copy_(torch.rand(op.var.shape, generator=gen) * 2)
            if alpha is not None:
                op.alpha.fill_(alpha)


@settings(max_examples=_budget(2))
@given(random_architectures(), st.sampled_from(_REWRITE_RULES), st.integers(0, 2**16))
def test_rewrite_with_alpha_zero_is_bit_identical_and_deterministic(arch, rule, seed):
    _note(arch)
    note(f"rule: {rule}")
    model, x = arch.build(), arch.example_input()
    selects, _ = _BUILTIN_DEFINITIONS[rule]
    if _rule_raises(rule, arch.truth):
        with pytest.raises(RuleError):
            rewrite(model, rule, x)
    else:
        rewritten = rewrite(model, rule, x)
        assert len(operators(rewritten)) == sum(map(selects, arch.truth.sites))
        _randomize_operators(rewritten, seed)  # α = 0 is an identity whatever the statistics
        x2 = arch.example_input(seed=seed + 1, batch=3)
        with torch.no_grad():
            for inp in (x, x2):
                assert torch.equal(rewritten(inp), model(inp))
        again = rewrite(arch.build(), rule, arch.example_input())
        assert list(operators(again)) == list(operators(rewritten))
        assert rewrite_info(again).plan.to_json() == rewrite_info(rewritten).plan.to_json()
        assert list(again.state_dict()) == list(rewritten.state_dict())


# ------------------------------------------------------------------------------------------ fusion


@contextlib.contextmanager
def _fast_path_on_tiny_maps(on: bool):
    """The fast path's kernels on the generator's tiny maps too (``on``), or its default threshold."""
    before = fast.MIN_NUMEL
    fast.MIN_NUMEL = 1 if on else before
    try:
        yield
    finally:
        fast.MIN_NUMEL = before


@settings(max_examples=_budget(1.5))
@given(
    random_architectures(max_blocks=4),
    st.sampled_from(_REWRITE_RULES),
    st.integers(0, 2**16),
    st.sampled_from(["exact", "straight_through"]),
    st.booleans(),
)
def test_fusion_keeps_outputs_and_gradients_bit_for_bit(arch, rule, seed, mode, kernels):
    """``fuse_activations`` (operators absorbing the activation after them, in place where nothing else reads
    their input, in-place residual additions) changes no output bit, no gradient bit in either backward mode,
    and no state; on the kernels' path and on the plain formula's. Nor does the attack view of the fused model
    (``fuse_residual_operators``: a residual addition and its operator in one kernel pass)."""
    _note(arch)
    note(f"rule: {rule}, backward mode: {mode}, kernels on tiny maps: {kernels}")
    assume(not _rule_raises(rule, arch.truth))
    model = rewrite(arch.build(), rule, arch.example_input(), fuse=False)
    _randomize_operators(model, seed, alpha=0.5)
    fused = copy.deepcopy(model)
    fuse_activations(fused)
    assert list(fused.state_dict()) == list(model.state_dict())
    x = arch.example_input(seed=seed + 1, batch=3)
    w = torch.randn(model(x).shape, generator=torch.Generator().manual_seed(seed))
    view = fuse_residual_operators(fused)
    with _fast_path_on_tiny_maps(kernels), backward_mode(model, mode), backward_mode(fused, mode):
        with torch.no_grad():
            expected = model(x.clone())
            assert torch.equal(_bits(fused(x.clone())), _bits(expected))
            assert torch.equal(_bits(view(x.clone())), _bits(expected))
        grads = []
        for net in (model, fused, view):
            leaf = x.clone().requires_grad_()
            y = net(leaf)
            (grad,) = torch.autograd.grad((y * w).sum(), leaf)
            assert torch.equal(_bits(y.detach()), _bits(expected))
            grads.append(grad)
    assert torch.equal(_bits(grads[1]), _bits(grads[0]))
    assert torch.equal(_bits(grads[2]), _bits(grads[0]))


# ------------------------------------------------------------------------------------------ calibration


@st.composite
def _batch_splits(draw) -> list[int]:
    return draw(st.lists(st.integers(1, 3), min_size=1, max_size=4))


@settings(max_examples=_budget(1.5))
@given(random_architectures(max_blocks=4), _batch_splits(), st.integers(0, 2**16))
def test_calibration_equals_brute_force_float64(arch, split, seed):
    _note(arch)
    note(f"batch sizes: {split}")
    model = rewrite(arch.build(), "full", arch.example_input())  # the stem activation is always a site
    ops = operators(model)
    data = arch.example_input(seed=seed, batch=sum(split))
    batches = list(data.split(split))
    seen: dict[str, list[torch.Tensor]] = {site: [] for site in ops}
    handles = [
        op.register_forward_pre_hook(lambda m, args, site=site: seen[site].append(args[0].detach().clone()))
        for site, op in ops.items()
    ]
    try:
        with torch.no_grad():
            for b in batches:
                model(b)
    finally:
        for h in handles:
            h.remove()
    record = calibrate(model, batches)
    for site, op in ops.items():
        x = torch.cat(seen[site]).double()
        axis = op.channel_axis % x.dim()
        dims = [d for d in range(x.dim()) if d != axis]
        mean = x.mean(dims)
        var = ((x - mean.reshape([-1 if d == axis else 1 for d in range(x.dim())])) ** 2).mean(dims)
        moments = record.state.moments[site]
        scale = max(1.0, float(x.abs().max()))
        assert moments.count == x.numel() // x.shape[axis], site
        torch.testing.assert_close(moments.mean, mean, rtol=1e-10, atol=1e-12 * scale, msg=site)
        torch.testing.assert_close(moments.variance, var, rtol=1e-10, atol=1e-12 * scale**2, msg=site)
        torch.testing.assert_close(op.mean, mean.float(), rtol=2.5e-7, atol=1e-9 * scale, msg=site)
        torch.testing.assert_close(op.var, var.float(), rtol=2.5e-7, atol=1e-9 * scale**2, msg=site)


# ------------------------------------------------------------------------------------------ MeanSparse op


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


@st.composite
def _meansparse_cases(draw):
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    dtype = draw(st.sampled_from(_DTYPES))
    alpha = draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 4.0))
    seed = draw(st.integers(0, 2**32 - 1))
    specials = draw(st.lists(st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.0, "mean"]), max_size=4))
    zero_var = draw(st.lists(st.booleans(), max_size=shape[axis]))
    return shape, axis, dtype, alpha, seed, specials, zero_var


@settings(max_examples=_budget(8))
@given(_meansparse_cases())
def test_meansparse_is_idempotent_and_keeps_outside_the_band(case):
    shape, axis, dtype, alpha, seed, specials, zero_var = case
    channels = shape[axis]
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(channels, generator=gen)
    var = torch.rand(channels, generator=gen) * 2
    var[[i for i, z in enumerate(zero_var) if z]] = 0.0
    bshape = [1] * len(shape)
    bshape[axis] = channels
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + mean.double().reshape(bshape)
    flat = x64.reshape(-1)
    for v in specials:
        i = int(torch.randint(flat.numel(), (1,), generator=gen))
        flat[i] = mean.double().reshape(bshape).expand(shape).reshape(-1)[i] if v == "mean" else v
    x = x64.to(dtype)
    op = MeanSparse(channels, axis, alpha)
    with torch.no_grad():
        op.mean.copy_(mean)
        op.var.copy_(var)
        y = op(x)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert torch.equal(_bits(op(y)), _bits(y)), "not idempotent"
        if alpha == 0.0:
            assert torch.equal(_bits(y), _bits(x)), "alpha = 0 is not an exact identity"
    # the spec, in float64, away from the band's edge (rounding in the input's dtype decides there)
    mu = mean.to(dtype).double().reshape(bshape).expand(shape)
    thr = (torch.tensor(alpha, dtype=torch.float32) * var.sqrt()).to(dtype).double().reshape(bshape).expand(shape)
    d = (x.double() - mu).abs()
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    band = thr > 0
    inside = band & (d <= thr * (1 - 4 * eps) - 4 * tiny)
    outside = ~band | (d >= thr * (1 + 4 * eps) + 4 * tiny) | d.isnan()
    assert torch.equal(_bits(y)[outside], _bits(x)[outside]), "changed a value outside the band"
    assert torch.equal(y.double()[inside], mu[inside]), "a value inside the band is not the channel mean"
    assert bool((inside | outside | (y.double() == mu) | (_bits(y) == _bits(x))).all())


# ------------------------------------------------------------------------------------------ rule files


@functools.lru_cache(maxsize=1)
def _rule_sites():
    """Sites of a fixed architecture with every role, for parsing random rule files against."""
    arch = Architecture(
        input_shape=(2, 3, 12, 12),
        stem=Stem(out=4, pool=True),
        blocks=(
            Residual(out=4, act2=Act("relu")),
            Residual(pre_act=True, out=6, stride=2, shortcut="projection", act2=Act("gelu", "functional"),
                     se=SE()),
            Hidden(out=6),
            SqueezeExcite(SE(reduce="flat_view", gate=Act("hardsigmoid"))),
            ConvNeXt(),
            ToTokens(),
            TokenMLP(act=Act("silu", "functional")),
        ),
        head=Head(norm_act=Act("relu"), mlp=Act("gelu")),
    )
    with torch.random.fork_rng(devices=[]):
        return tuple(find_sites(arch.build(), arch.example_input()))


_NAMES = st.sampled_from(
    ["relu", "gelu", "add", "activation", "main_path", "after_addition", "in_se", "stem", "head", "mlp",
     "first", "last", "graph", "module_tree", "nchw", "nhwc", "tokens", "nc", "all", "meansparse", "skip",
     "sparta", "linear", "per_stage", "default", "Relu", "mainpath", "afteraddition", "", " ", "none"]
)
# YAML accepts these characters (the rest are hazards, see test_rule_files_with_yaml_hazards...)
_YAML_TEXT = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Cn")) | st.sampled_from("\t\n\r")
_SAFE_PRINTABLE = string.printable.replace("\x0b", "").replace("\x0c", "")
_SCALARS = (
    st.none() | st.booleans() | st.integers(-3, 12) | st.sampled_from([2**63, -(2**70)])
    | st.floats(allow_nan=True, allow_infinity=True) | _NAMES
    | st.sampled_from(["1-3", "3-1", "0-0", "-1", "1 - 2", "x-y", "re:blocks\\..*", "re:(", "re:[",
                       "blocks.*", "*", "layer?.*", "2020-13-45", "1e400", "0x1F", ".inf", ".nan"])
    | st.text(_YAML_TEXT, max_size=6)
)
_JUNK = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_NAMES | st.integers(-2, 5), inner, max_size=3),
    max_leaves=8,
)


def _maybe(value_strategy):
    return st.one_of(value_strategy, _JUNK)


def _choices(names):
    return _maybe(st.sampled_from(names) | st.lists(st.sampled_from(names), min_size=0, max_size=3))


_RANGES = _maybe(st.integers(-1, 6) | st.sampled_from(["0-2", "1-3", "2-1", "4"]) | st.lists(
    st.integers(-1, 6) | st.sampled_from(["0-2", "1-3"]) | st.lists(st.integers(-1, 6), max_size=3), max_size=3))

_SELECTOR = st.deferred(
    lambda: st.fixed_dictionaries(
        {},
        optional={
            "role": _choices(list(graphsparse.graph.sites.ROLES) + ["mainpath", "se"]),
            "op": _choices(["relu", "gelu", "silu", "add", "activation", "swish", "RELU"]),
            "id": _maybe(st.sampled_from(["blocks.*", "re:.*add", "re:(", "*act*", "stem.*"])),
            "module": _maybe(st.sampled_from(["blocks.1*", "re:blocks\\.[0-3]", "head"])),
            "module_class": _maybe(st.sampled_from(["ReLU", "*", "GELU", "Res*"])),
            "stage": _RANGES,
            "depth": _RANGES,
            "relative_depth": _maybe(st.lists(st.floats(-0.5, 1.5) | st.integers(-1, 2), max_size=3)),
            "position": _choices(["first", "last", "middle"]),
            "reached": _choices(["graph", "module_tree", "tree"]),
            "layout": _choices(["nchw", "nhwc", "tokens", "nc", "ncl", "NCHW"]),
            "not": _SELECTOR | _JUNK,
            "colour": _JUNK,
        },
    )
)
_ALPHA = _maybe(
    st.floats(-1, 3)
    | st.fixed_dictionaries({}, optional={"linear": _maybe(st.lists(st.floats(-1, 3), max_size=3)),
                                         "per_stage": _maybe(st.dictionaries(
                                             st.integers(-1, 4) | st.sampled_from(["1-2", "0-3", "default", "x"]),
                                             st.floats(-1, 3) | _JUNK, max_size=3)),
                                         "default": _maybe(st.floats(-1, 3)),
                                         "cosine": _JUNK})
)
_RULE = _maybe(
    st.fixed_dictionaries(
        {"select": st.sampled_from(["all", None]) | _SELECTOR | _JUNK},
        optional={
            "name": _maybe(st.text(string.ascii_letters, max_size=8)),
            "action": _choices(["meansparse", "skip", "sparta", "replace"]),
            "alpha": _ALPHA,
            "optional": _maybe(st.booleans()),
            "sparta": _maybe(st.dictionaries(st.sampled_from(["reduction", "width"]) | _SCALARS, _JUNK, max_size=2)),
            "selekt": _JUNK,
        },
    )
)
_DOCUMENTS = st.fixed_dictionaries(
    {},
    optional={
        "version": _maybe(st.just(1) | st.sampled_from([2, "1", 1.0])),
        "description": _maybe(st.text(_YAML_TEXT, max_size=10)),
        "alpha": _ALPHA,
        "rules": _maybe(st.lists(_RULE, max_size=3)),
        "rulez": _JUNK,
    },
)
# plain scalars written straight into YAML text: implicit types (sexagesimal, octal), anchors, flow syntax
_RAW_TOKENS = st.sampled_from(
    ["1", "1-3", "2001-12-14", "!!binary *", "!!python/object:os.system {}", "!!str 1", "&a [*a]", "*undefined",
     "1_000", "0o17", "1:30", ".inf", ".nan", "~", "yes", "on", "[1, 2", "{a: 1, a: 2}", "? [a, b]\n  : 1",
     "!!set {a, b}", "'quoted'", "\"\\x00\"", "relu", "all", "-1", "[0, 1]", "{linear: [0, 1]}", "0.5"]
)
_RAW_KEYS = st.sampled_from(["stage", "depth", "role", "op", "relative_depth", "position", "not", "layout"])


def _raw_rule_file(key: str, value: str, alpha: str, version: str = "1") -> str:
    return (
        f"version: {version}\nalpha: {alpha}\nrules:\n  - name: r\n    select:\n      {key}: {value}\n"
        f"    action: meansparse\n    optional: true\n"
    )


@st.composite
def _rule_texts(draw, tokens=_RAW_TOKENS) -> str:
    kind = draw(st.sampled_from(["document", "raw", "mutated", "text"]))
    if kind == "raw":
        version = draw(st.sampled_from(["1", "!!int 1", "'1'"]) | tokens)
        return _raw_rule_file(draw(_RAW_KEYS), draw(tokens), draw(tokens), version)
    if kind == "text":
        return draw(st.text(_YAML_TEXT, max_size=40))
    text = yaml.safe_dump(draw(_DOCUMENTS), sort_keys=False, allow_unicode=True)
    if kind == "mutated":
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 5))
        text = text[:at] + draw(st.text(_SAFE_PRINTABLE, max_size=6)) + text[at + cut :]
    return text


def _plan_or_rule_error(text: str) -> None:
    note(text)
    sites = _rule_sites()
    try:
        plan = make_plan(sites, parse_rules(text))
    except RuleError:
        pass  # a validation error: the expected failure mode
    else:
        assert isinstance(plan, Plan) and [e.site.id for e in plan] == [s.id for s in sites]


@settings(max_examples=_budget(12))
@given(_rule_texts())
def test_random_rule_files_give_a_plan_or_a_rule_error(text):
    _plan_or_rule_error(text)


# Scalars and characters that make PyYAML or float() raise something other than a YAMLError.
_BIG = "1" + "0" * 400
_HAZARDS = st.sampled_from(
    ["2020-13-45", "!!int abc", "!!float x", "!!timestamp 2020-99-99", _BIG, f"[0, {_BIG}]",
     f"{{linear: [0, {_BIG}]}}"]
)


@st.composite
def _hazardous_rule_texts(draw) -> str:
    if draw(st.booleans()):
        text = draw(_rule_texts())
        at = draw(st.integers(0, len(text)))
        return text[:at] + draw(st.sampled_from("\x00\x01\x08\x0b\x0c\x1f\x7f\x80\ufffe")) + text[at:]
    return draw(_rule_texts(tokens=_HAZARDS))


# Regressions (found by this property): a non-printable character (yaml ReaderError), '!!int abc' or
# '2020-13-45' scalars (ValueError) and integers beyond float range (OverflowError) escaped parse_rules.
@settings(max_examples=_budget(2), phases=[Phase.explicit, Phase.generate])
@example("\x1f")
@example("version: !!int abc\nrules: []\n")
@example("version: 1\nrules:\n- select: {stage: 2020-13-45}\n  action: skip\n")
@example(f"version: 1\nalpha: {_BIG}\nrules:\n- select: all\n  action: meansparse\n")
@given(_hazardous_rule_texts())
def test_rule_files_with_yaml_hazards_give_a_rule_error(text):
    _plan_or_rule_error(text)


# ------------------------------------------------------------------------------------------ save / load


@settings(max_examples=_budget(1))
@given(
    arch=random_architectures(max_blocks=4),
    rule=st.sampled_from(["full", "before_activations"]),
    seed=st.integers(0, 2**16),
)
def test_save_load_round_trip_is_exact_and_byte_stable(tmp_path_factory, arch, rule, seed):
    from graphsparse.artifact.io import load, save

    _note(arch)
    tmp = tmp_path_factory.mktemp("artifacts")
    x = arch.example_input()
    model = rewrite(arch.build(), rule, x)
    _randomize_operators(model, seed, alpha=0.5)
    first = save(model, tmp / "a.safetensors")
    loaded = load(first, base=arch.build(seed=1))  # other weights: the artifact's must replace them
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert rewrite_info(loaded).plan.to_json() == rewrite_info(model).plan.to_json()
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the same inputs give the same bytes: a second save, a fresh rewrite, and the loaded model
    remade = rewrite(arch.build(), rule, arch.example_input())
    _randomize_operators(remade, seed, alpha=0.5)
    paths = [
        save(model, tmp / "b.safetensors"),
        save(remade, tmp / "c.safetensors"),
        save(loaded, tmp / "d.safetensors"),
    ]
    data = first.read_bytes()
    assert all(p.read_bytes() == data for p in paths)
