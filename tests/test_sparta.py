"""SPARTA: shapes, gradients into every sub-net, per-sample kernels, and replacement through rewrite."""

from __future__ import annotations

import types

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import graphsparse
from graphsparse.errors import PlanError
from graphsparse.ops.sparta import (
    SPARTA_TYPES,
    Sparta,
    freeze_except_sparta,
    make_sparta,
    sparta_parameters,
)


@pytest.fixture
def sparta() -> Sparta:
    torch.manual_seed(0)
    return Sparta(8, reduction=2)


@pytest.mark.parametrize("shape", [(1, 8, 7, 5), (3, 8, 9, 11), (1, 8, 1, 1), (3, 8, 2, 3)])
def test_output_has_the_input_shape_and_dtype(sparta, shape):
    x = torch.randn(shape)
    y = sparta(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.isfinite(y).all()


def test_output_is_relu_times_a_gate_in_0_1(sparta):
    x = torch.randn(3, 8, 6, 6)
    gate = sparta.gate(x)
    assert gate.shape == x.shape
    assert ((gate > 0) & (gate < 1)).all()
    torch.testing.assert_close(sparta(x), F.relu(x) * gate)
    assert (sparta(x)[x <= 0] == 0).all()


def test_widths_follow_the_reduction():
    m = Sparta(64, reduction=4)
    assert m.width == 16
    assert m.spatial.conv1.weight.shape == (16, 64, 3, 3)
    assert m.spatial.conv4.weight.shape == (1, 16, 3, 3)
    assert m.dpnet.fc2.out_features == 10
    assert m.channel.weight.shape == (64, 64, 3, 3)
    assert Sparta(3, reduction=8).width == 1
    assert sum(p.numel() for p in Sparta(64, reduction=1).parameters()) == 153_099
    assert sum(p.numel() for p in Sparta(64, reduction=4).parameters()) == 52_155


def test_starts_close_to_relu():
    torch.manual_seed(0)
    m = Sparta(16)
    gate = m.gate(torch.randn(4, 16, 8, 8))
    expected = torch.sigmoid(torch.tensor(3.0)).item()  # default init_logit
    assert (gate - expected).abs().max() < 0.05


def test_gradient_reaches_every_parameter_of_every_sub_net(sparta):
    x = torch.randn(3, 8, 7, 5, requires_grad=True)
    (sparta(x) * torch.randn(3, 8, 7, 5)).sum().backward()
    names = dict(sparta.named_parameters())
    assert {n.split(".")[0] for n in names} == {"spatial", "dpnet", "channel"}
    for name, p in names.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_dynamic_kernels_differ_between_samples(sparta):
    x = torch.randn(3, 8, 6, 6)
    x[1] *= 3.0
    kernels = sparta.kernels(x)
    assert kernels.shape == (3, 10)
    assert not torch.allclose(kernels[0], kernels[1])
    assert not torch.allclose(kernels[0], kernels[2])


def test_grouped_convolution_equals_one_convolution_per_sample(sparta):
    x = torch.randn(3, 8, 7, 5)
    batched = sparta(x)
    for i in range(3):  # each sample is convolved with its own kernel only
        torch.testing.assert_close(batched[i : i + 1], sparta(x[i : i + 1]), rtol=1e-5, atol=1e-6)
    s = sparta.spatial(x)
    k = sparta.kernels(x)
    c = sparta.channel(x).mean(dim=(2, 3), keepdim=True)
    for i in range(3):
        ref = F.conv2d(s[i : i + 1], k[i, :9].reshape(1, 1, 3, 3), k[i, 9:], padding=1)
        expected = F.relu(x[i : i + 1]) * torch.sigmoid(ref * c[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], expected, rtol=1e-5, atol=1e-6)


def test_traces_with_fx(sparta):
    x = torch.randn(2, 8, 5, 5)
    gm = torch.fx.symbolic_trace(sparta)
    assert torch.equal(gm(x), sparta(x))


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="channels"):
        Sparta(0)
    with pytest.raises(ValueError, match="reduction"):
        Sparta(8, reduction=0)
    with pytest.raises(ValueError, match="8 channels"):
        Sparta(8)(torch.randn(1, 4, 3, 3))


def _site(**kw):
    base = dict(id="layer1.1.act2", layout="nchw", channels=8, depth=3)
    return types.SimpleNamespace(**{**base, **kw})


def test_make_sparta_uses_the_site_and_rule_parameters():
    op = make_sparta(_site(), types.SimpleNamespace(params=(("reduction", 2),)))
    assert isinstance(op, Sparta)
    assert (op.channels, op.width, op.site_id, op.depth) == (8, 4, "layer1.1.act2", 3)


@pytest.mark.parametrize(
    "site, params, match",
    [
        (_site(layout="nhwc"), (), "layer1.1.act2.*nhwc"),
        (_site(), (("reduce", 2),), "layer1.1.act2.*'reduce'.*did you mean 'reduction'"),
        (_site(), (("reduction", 0),), "layer1.1.act2.*reduction"),
    ],
)
def test_make_sparta_errors_name_the_site(site, params, match):
    with pytest.raises(PlanError, match=match):
        make_sparta(site, types.SimpleNamespace(params=params))


def test_freeze_except_sparta_counts_trainable_scalars():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), Sparta(8), nn.Conv2d(8, 4, 3))
    n = freeze_except_sparta(model)
    assert n == sum(p.numel() for p in model[1].parameters())
    assert all(p.requires_grad for p in model[1].parameters())
    assert not any(p.requires_grad for m in (model[0], model[2]) for p in m.parameters())
    assert [id(p) for p in sparta_parameters(model)] == [id(p) for p in model[1].parameters()]
    assert freeze_except_sparta(nn.Linear(2, 2)) == 0


def test_rewrite_resnet18_replaces_the_last_relu_of_each_stage():
    torch.manual_seed(0)
    base = timm.create_model("resnet18").eval()
    model = graphsparse.rewrite(base, "sparta_stage_last", torch.randn(1, 3, 64, 64))
    found = {m.site_id: m for m in model.modules() if isinstance(m, SPARTA_TYPES)}
    assert sorted(found) == [f"layer{i}.1.act2" for i in range(1, 5)]
    assert [found[f"layer{i}.1.act2"].channels for i in range(1, 5)] == [64, 128, 256, 512]
    assert all(m.reduction == 4 for m in found.values())  # the rule's sparta: {reduction: 4}

    # every tensor of the base model is still there, unchanged; the new ones all belong to SPARTA
    base_state, state = base.state_dict(), model.state_dict()
    for key, value in base_state.items():
        assert torch.equal(state[key], value), key
    sparta_ids = {id(p) for p in sparta_parameters(model)}
    new = [p for n, p in model.named_parameters() if n not in base_state]
    assert new and all(id(p) in sparta_ids for p in new)
    assert len(sparta_ids) == len(new)

    # with each SPARTA swapped back for a ReLU, the model is the base model again, bit for bit
    x = torch.randn(2, 3, 64, 64)
    for name, m in list(model.named_modules()):
        if isinstance(m, Sparta):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, nn.ReLU())
    with torch.no_grad():
        assert torch.equal(model(x), base(x))


def test_rewritten_resnet18_trains_only_sparta_after_freezing():
    torch.manual_seed(0)
    base = timm.create_model("resnet18", num_classes=10).eval()
    model = graphsparse.rewrite(base, "sparta_stage_last", torch.randn(1, 3, 32, 32))
    n = freeze_except_sparta(model)
    assert n == sum(p.numel() for p in sparta_parameters(model))
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
