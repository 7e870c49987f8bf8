"""Rewrite: α = 0 bit-identity on real architectures, rule counts, per-stage α, determinism, leaves."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphsparse as gs
from graphsparse.planning.rewrite import OperatorSlot


def _randomise_stats(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for op in gs.operators(model).values():
        op.mean.copy_(torch.randn(op.mean.shape, generator=g))
        op.var.copy_(torch.rand(op.var.shape, generator=g) + 0.5)


def _assert_identity(model: nn.Module, rewritten: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.equal(model.eval()(x), rewritten(x))


def _models(robustbench_archs=None):
    yield "resnet18", timm.create_model("resnet18"), (2, 3, 32, 32)
    yield "seresnet18", timm.create_model("seresnet18"), (2, 3, 32, 32)
    yield "efficientnet_b0", timm.create_model("efficientnet_b0"), (2, 3, 32, 32)
    yield "convnext_atto", timm.create_model("convnext_atto", conv_mlp=False), (2, 3, 32, 32)
    yield "vit", timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8), (2, 3, 32, 32)


@pytest.mark.parametrize("name,model,shape", list(_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_alpha_zero_is_bit_identical_even_with_statistics(name, model, shape):
    x = torch.randn(*shape)
    rewritten = gs.rewrite(model, "full", x)
    assert len(gs.operators(rewritten)) > 0
    _assert_identity(model, rewritten, x)  # fresh operators (μ = σ = 0)
    _randomise_stats(rewritten)
    _assert_identity(model, rewritten, x)  # α = 0 with real statistics
    gs.set_alpha(rewritten, 0.5)
    with torch.no_grad():
        assert not torch.equal(model(x), rewritten(x))


def test_robustbench_architectures_alpha_zero(robustbench_archs):
    dm, ra = robustbench_archs
    models = [
        dm.DMWideResNet(depth=16, width=1, activation_fn=dm.Swish),
        dm.DMPreActResNet(depth=18, width=0, activation_fn=nn.SiLU, use_cuda=False),
        ra.NormalizedWideResNet(
            mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), stem_width=16, depth=(1, 1, 1), stage_width=(16, 32, 64),
            groups=(1, 1, 1), activation_fn=nn.SiLU, se_ratio=0.25, se_activation=nn.ReLU, se_order=2,
        ),
    ]
    x = torch.randn(2, 3, 32, 32)
    for model in models:
        rewritten = gs.rewrite(model, "full", x)
        _randomise_stats(rewritten)
        _assert_identity(model, rewritten, x)


def test_builtin_rules_on_resnet18():
    model, x = timm.create_model("resnet18"), torch.randn(1, 3, 32, 32)
    expected = {"after_addition": {"after_addition": 8}, "main_path": {"main_path": 8},
                "before_activations": {"stem": 1, "main_path": 8, "after_addition": 8},
                "full": {"stem": 1, "main_path": 8, "after_addition": 8}}
    for rule, roles in expected.items():
        rewritten = gs.rewrite(model, rule, x)
        ops = gs.operators(rewritten)
        plan = gs.rewrite_info(rewritten).plan
        by_id = {e.site.id: e.site for e in plan.entries}
        assert Counter(by_id[i].role for i in ops) == roles, rule


def test_builtin_rules_on_preact_wrn_se_net_and_convnext(robustbench_archs):
    dm, _ = robustbench_archs
    x = torch.randn(1, 3, 32, 32)
    preact = dm.DMPreActResNet(depth=18, width=0, activation_fn=nn.SiLU, use_cuda=False)
    ops = gs.operators(gs.rewrite(preact, "after_addition", x))
    assert len(ops) == 8 and all(i.endswith(".add") for i in ops)  # pre-activation: additions feed no activation
    assert len(gs.operators(gs.rewrite(preact, "before_activations", x))) == 17

    se = timm.create_model("seresnet18")
    sites = gs.find_sites(se, x)
    in_se = {s.id for s in sites if s.role == "in_se"}
    ops = gs.operators(gs.rewrite(se, "before_activations", x))
    assert len(in_se) == 8 and not in_se & set(ops) and len(ops) == len(sites) - 8

    convnext = timm.create_model("convnext_atto", conv_mlp=False)
    ops = gs.operators(gs.rewrite(convnext, "full", x))
    assert sum(op.channel_axis == -1 for op in ops.values()) == 12  # MLP GELUs, channels-last
    assert sum(op.channel_axis == 1 for op in ops.values()) == 12  # residual additions, NCHW


def test_per_stage_alpha_lands_on_the_right_sites():
    rule = gs.parse_rules(
        "version: 1\nrules:\n  - select: {role: after_addition}\n    action: meansparse\n"
        "    alpha: {per_stage: {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4}}\n"
    )
    rewritten = gs.rewrite(timm.create_model("resnet18"), rule, torch.randn(1, 3, 32, 32))
    for site_id, op in gs.operators(rewritten).items():
        stage = int(site_id[len("layer")])
        assert float(op.alpha) == pytest.approx(0.1 * stage)


def test_rewrite_is_deterministic_and_leaves_the_base_model_alone():
    model, x = timm.create_model("resnet18"), torch.randn(1, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = gs.rewrite(model, "full", x)
    b = gs.rewrite(model, "full", x)
    assert list(a.state_dict()) == list(b.state_dict())
    assert gs.rewrite_info(a).plan.to_json() == gs.rewrite_info(b).plan.to_json()
    assert a.code == b.code
    assert not any(isinstance(m, gs.MeanSparse) for m in model.modules())
    gs.set_alpha(a, 0.3)
    _randomise_stats(a)
    next(a.parameters()).data.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_every_modules_own_mode_survives_capture():
    model = timm.create_model("resnet10t").train()
    model.bn1.eval()  # a frozen BatchNorm inside a model in training mode
    modes = {name: m.training for name, m in model.named_modules()}
    gs.find_sites(model, torch.randn(1, 3, 32, 32))
    gs.rewrite(model, "after_addition", torch.randn(1, 3, 32, 32))
    assert {name: m.training for name, m in model.named_modules()} == modes


@pytest.mark.parametrize("name", ["resnet10t", "test_efficientnet"])  # operators in the graph / in leaf modules
def test_a_rewritten_model_is_not_rewritten_again(name):
    x = torch.randn(1, 3, 32, 32)
    rewritten = gs.rewrite(timm.create_model(name), "full", x)
    with pytest.raises(gs.errors.PlanError, match="already holds a graphsparse operator"):
        gs.rewrite(rewritten, "full", x)


def test_a_probe_that_is_not_a_tensor_is_named():
    with pytest.raises(gs.errors.CaptureError, match="one tensor batch"):
        gs.find_sites(timm.create_model("resnet10t"), (torch.randn(1, 3, 32, 32),))


def test_a_compiled_model_is_seen_through():
    model, x = timm.create_model("resnet10t").eval(), torch.randn(1, 3, 32, 32)
    compiled = torch.compile(model)
    assert [s.id for s in gs.find_sites(compiled, x)] == [s.id for s in gs.find_sites(model, x)]
    rewritten = gs.rewrite(model, "after_addition", x)
    assert gs.rewrite_info(torch.compile(rewritten)) is gs.rewrite_info(rewritten)


def test_operators_inside_leaf_modules_are_wrapped():
    model, x = timm.create_model("efficientnet_b0"), torch.randn(2, 3, 32, 32)
    rewritten = gs.rewrite(model, "before_activations", x)
    slots = {p: m for p, m in rewritten.named_modules() if isinstance(m, OperatorSlot)}
    tree_sites = {s.id for s in gs.find_sites(model, x) if s.reached == "module_tree" and s.role != "in_se"}
    assert set(slots) == tree_sites and tree_sites
    op = slots[sorted(tree_sites)[0]].op
    op.var.fill_(1.0)
    gs.set_alpha(rewritten, {op.site_id: 5.0})
    with torch.no_grad():
        assert not torch.equal(model.eval()(x), rewritten(x))


class _InplaceNet(nn.Module):
    """An in-place activation whose input is read again afterwards (sees the activated tensor)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        y = self.conv2(x)
        x2 = x + y
        F.relu(x2, inplace=True)
        return x2.mean((2, 3))  # reads the mutated tensor


def test_inplace_activation_semantics_are_kept():
    model, x = _InplaceNet(), torch.randn(2, 3, 8, 8)
    rewritten = gs.rewrite(model, "full", x)
    _randomise_stats(rewritten)
    _assert_identity(model, rewritten, x)


def test_deepcopy_keeps_the_rewrite_info():
    import copy

    rewritten = gs.rewrite(timm.create_model("resnet10t"), "after_addition", torch.randn(1, 3, 32, 32))
    gs.rewrite_info(rewritten).records["calibration"] = {"samples": 3}
    clone = copy.deepcopy(rewritten)
    assert gs.rewrite_info(clone).records == {"calibration": {"samples": 3}}
    assert gs.rewrite_info(clone).plan.to_json() == gs.rewrite_info(rewritten).plan.to_json()


def test_operators_are_placed_where_their_module_keeps_its_weights():
    """A model rewritten on the GPU gets GPU operators (else its forward fails on mixed devices). Checked
    on the meta device: the capture is made on the CPU, then one stage moves before the plan applies."""
    from graphsparse.graph.capture import capture
    from graphsparse.graph.sites import sites_of_capture
    from graphsparse.planning.plan import make_plan
    from graphsparse.planning.rewrite import apply_plan

    model = timm.create_model("resnet18")
    cap = capture(model, torch.randn(1, 3, 64, 64), copy=True)
    sites = sites_of_capture(cap)
    cap.model.layer1.to("meta")  # its sites follow it, not the model's first weights
    rewritten = apply_plan(cap, make_plan(sites, "after_addition"), sites=sites)
    ops = gs.operators(rewritten)
    devices = {site: op.mean.device.type for site, op in ops.items()}
    assert len(ops) > 2
    assert all(dev == ("meta" if site.startswith("layer1.") else "cpu") for site, dev in devices.items()), devices


# ------------------------------------------------------------------------------------- the fused form


@pytest.fixture(scope="module")
def pair():
    """resnet10t rewritten twice, fused (the default) and unfused, with the same random statistics and α."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t").eval()
    x = torch.randn(2, 3, 32, 32)
    fused, plain = gs.rewrite(model, "full", x), gs.rewrite(model, "full", x, fuse=False)
    _randomise_stats(plain)
    gs.set_alpha(plain, 0.3)
    fused.load_state_dict(plain.state_dict())
    return model, fused, plain, x


def test_rewrite_returns_the_fused_form_unless_asked_not_to(pair):
    """Each MeanSparse before a ReLU applies it (no separate activation node runs); fuse=False keeps them apart.
    The state_dict (names and values) is the same either way."""
    _, fused, plain, _ = pair
    fused_ops, plain_ops = gs.operators(fused), gs.operators(plain)
    assert list(fused_ops) == list(plain_ops)
    assert {op.activation for op in fused_ops.values()} >= {("relu", ())}
    assert all(op.activation is None for op in plain_ops.values())
    relu_nodes = [n for n in fused.graph.nodes if n.op == "call_module" and "act" in str(n.target)]
    assert len(relu_nodes) < len([n for n in plain.graph.nodes if n.op == "call_module" and "act" in str(n.target)])
    assert fused.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), plain.state_dict().values()))


def test_the_fused_default_keeps_outputs_gradients_and_alpha_zero_identity(pair):
    model, fused, plain, x = pair
    fused = copy.deepcopy(fused)
    with torch.no_grad():
        expected = plain(x)
        assert not torch.equal(expected, model(x))
        assert torch.equal(fused(x.clone()), expected)
    for mode in ("exact", "straight_through"):
        grads = []
        for net in (plain, fused):
            leaf = x.clone().requires_grad_()
            with gs.backward_mode(net, mode):
                (grad,) = torch.autograd.grad(net(leaf).square().sum(), leaf)
            grads.append(grad)
        assert torch.equal(grads[0], grads[1]), mode
    gs.set_alpha(fused, 0.0)
    with torch.no_grad():
        assert torch.equal(fused(x.clone()), model(x))


def test_calibrating_the_fused_default_gives_the_unfused_statistics(pair):
    """Calibration hooks read each operator's input before the (possibly in-place) operator runs."""
    _, fused, plain, _ = pair
    fused, plain = copy.deepcopy(fused), copy.deepcopy(plain)
    batches = [(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)) for _ in range(2)]
    gs.calibrate(plain, batches)
    gs.calibrate(fused, batches)
    for (site, a), b in zip(gs.operators(plain).items(), gs.operators(fused).values()):
        assert torch.equal(a.mean, b.mean) and torch.equal(a.var, b.var), site
