"""MeanSparse: the operator's formula, its two backward modes, and the model-wide helpers.

Every semantic check compares against ``reference`` below, an element-by-element numpy loop that shares no
code with the module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.fx
from torch import nn

from graphsparse.errors import PlanError
from graphsparse.ops import MeanSparse, backward_mode, operators, set_alpha, straight_through
from graphsparse.ops.meansparse import _mean_and_threshold

BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of a float tensor, so that -0.0 != +0.0 and NaN == NaN (same payload)."""
    return t.contiguous().view(BITS[t.dtype])


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def band_mask(x: torch.Tensor, mean, var, alpha: float, axis: int) -> np.ndarray:
    """Where ``|x - mu| <= alpha * sigma`` with a non-empty band, one element at a time in x's dtype."""
    xn = x.detach().numpy()
    dt = xn.dtype.type
    inside = np.zeros(xn.shape, dtype=bool)
    axis = axis % xn.ndim
    for idx in np.ndindex(xn.shape):
        c = idx[axis]
        mu = dt(np.float32(mean[c]))
        band = dt(np.float32(alpha) * np.sqrt(np.float32(var[c])))
        inside[idx] = band > 0 and abs(xn[idx] - mu) <= band
    return inside


def reference(x: torch.Tensor, mean, var, alpha: float, axis: int) -> torch.Tensor:
    """MeanSparse one element at a time, arithmetic in x's dtype (float32 or float16)."""
    xn = x.detach().numpy()
    out = xn.copy()
    axis = axis % xn.ndim
    for idx in zip(*np.nonzero(band_mask(x, mean, var, alpha, axis))):
        out[idx] = xn.dtype.type(np.float32(mean[idx[axis]]))
    return torch.from_numpy(out)


def random_op(channels: int, axis: int, alpha: float, seed: int = 0) -> MeanSparse:
    g = torch.Generator().manual_seed(seed)
    op = MeanSparse(channels, axis, alpha)
    op.mean.copy_(torch.randn(channels, generator=g))
    op.var.copy_(torch.rand(channels, generator=g) * 2 + 0.1)
    return op


# --------------------------------------------------------------------------------------------- identity


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("axis", [1, -1])
def test_alpha_zero_is_bit_identity(dtype, axis):
    g = torch.Generator().manual_seed(1)
    channels = 6
    op = MeanSparse(channels, axis, 0.0)
    op.mean.copy_(torch.randn(channels, generator=g))
    op.var.copy_(torch.rand(channels, generator=g) * 3)
    op.mean[0], op.var[0] = 0.0, 0.0  # a channel where the naive |x - mu| <= 0 turns -0.0 into +0.0
    op.var[1] = 0.0
    shape = [3, 5, 4, 2]
    shape[axis] = channels
    x = torch.randn(shape, generator=g).to(dtype)
    special = torch.tensor([-0.0, 0.0, float("nan"), float("inf"), -float("inf")], dtype=dtype)
    flat = x.movedim(axis, -1).reshape(-1, channels)  # a copy; rows run over positions
    flat[: len(special), 0] = special
    flat[: len(special), 1] = special
    flat[5, 2] = op.mean[2].to(dtype)  # exactly on the mean
    x = flat.reshape(x.movedim(axis, -1).shape).movedim(-1, axis)
    assert torch.signbit(x).any() and torch.isnan(x).any()

    y = op(x)
    assert y.dtype == dtype
    assert bit_equal(y, x)
    assert op.mean.dtype == op.var.dtype == op.alpha.dtype == torch.float32  # stats stay float32
    # the formula itself (what torch.compile / export trace) is an identity too, not only the shortcut
    mu, thr, empty = _mean_and_threshold(op.mean, op.var, op.alpha, dtype)
    assert empty and (thr == -1).all()
    shape = [1] * x.dim()
    shape[axis] = -1
    assert bit_equal(torch.where((x - mu.reshape(shape)).abs() <= thr.reshape(shape), mu.reshape(shape), x), x)


def test_empty_bands_short_circuit_to_the_input_until_a_buffer_changes():
    g = torch.Generator().manual_seed(3)
    op = MeanSparse(4, 1, 0.0)
    op.mean.copy_(torch.randn(4, generator=g))
    op.var.fill_(1.0)
    x = torch.randn(2, 4, 3, 3, generator=g)
    assert op(x) is x
    op.alpha.fill_(0.5)  # the cached thresholds follow the buffer's version counter
    y = op(x)
    assert y is not x and (y == op.mean.view(1, -1, 1, 1)).any()
    op.alpha.fill_(0.0)
    op.activation = "relu"
    y = op(x)
    assert y is not x and bit_equal(y, torch.relu(x)) and (x < 0).any()  # not in place
    op.inplace = True
    z = x.clone()
    assert op(z) is z and bit_equal(z, torch.relu(x))
    leaf = x.clone().requires_grad_()
    out = op(leaf)  # in place is not allowed while autograd records
    out.sum().backward()
    assert bit_equal(leaf.grad, (x > 0).float()) and bit_equal(leaf.detach(), x)


def test_fresh_op_passes_everything_through_even_with_alpha():
    x = torch.tensor([[-0.0, 0.0, 1.5, float("nan")]]).T.expand(4, 3).contiguous()
    for alpha in (0.0, 2.0):
        assert bit_equal(MeanSparse(3, -1, alpha)(x), x)


# -------------------------------------------------------------------------------------------- semantics


@pytest.mark.parametrize(
    "shape, axis",
    [((2, 5, 4, 3), 1), ((3, 7, 5), -1), ((2, 4, 3, 5), -1), ((6, 5), 1), ((2, 5, 3), 1)],
    ids=["nchw", "tokens", "nhwc", "nc", "ncl"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(shape, axis, dtype):
    alpha = 0.8
    op = random_op(shape[axis], axis, alpha, seed=2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    x += op.mean.to(dtype).reshape([-1 if i == axis % len(shape) else 1 for i in range(len(shape))])

    y = op(x)
    expected = reference(x, op.mean.numpy(), op.var.numpy(), alpha, axis)
    assert bit_equal(y, expected)
    replaced = y != x
    assert 0 < replaced.sum() < x.numel()  # both branches are exercised


def test_band_edge_is_inclusive():
    op = MeanSparse(1, 1, 0.5)
    op.mean.fill_(1.0)
    op.var.fill_(4.0)  # sigma = 2, band = 1: [0, 2]
    just_above = torch.nextafter(torch.tensor(2.0), torch.tensor(3.0)).item()
    just_below = -(2.0**-23)  # x - mu = -(1 + 2**-23) exactly, the first float32 distance past the edge
    x = torch.tensor([[0.0, 2.0, just_above, just_below, 1.25]]).T.contiguous()
    y = op(x).flatten().tolist()
    assert y == [1.0, 1.0, just_above, just_below, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_idempotent_for_fixed_stats(dtype):
    op = random_op(4, 1, 1.0, seed=4)
    x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(5)).to(dtype)
    y = op(x)
    assert (y != x).any()
    assert bit_equal(op(y), y)


def test_setting_buffers_takes_effect_and_state_dict_roundtrip():
    op = random_op(3, -1, 1.2, seed=6)
    sd = op.state_dict()
    assert list(sd) == ["mean", "var", "alpha"]
    assert sd["alpha"].shape == () and sd["mean"].shape == sd["var"].shape == (3,)

    fresh = MeanSparse(3, -1)
    fresh.load_state_dict(sd)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(7))
    assert bit_equal(fresh(x), reference(x, sd["mean"].numpy(), sd["var"].numpy(), 1.2, -1))


# --------------------------------------------------------------------------------------------- backward


def test_exact_gradient_is_zero_inside_band_one_outside():
    alpha = 0.9
    op = random_op(4, 1, alpha, seed=8)
    x = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(9)) + op.mean.reshape(1, -1, 1)
    x.requires_grad_()
    (grad,) = torch.autograd.grad(op(x).sum(), x)
    inside = torch.from_numpy(band_mask(x, op.mean.numpy(), op.var.numpy(), alpha, 1))
    assert inside.any() and (~inside).any()
    assert torch.equal(grad, (~inside).float())


def test_straight_through_gradient_is_identity_and_forward_is_bit_equal():
    alpha = 0.9
    op = random_op(4, -1, alpha, seed=10)
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(11)).requires_grad_()
    w = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(12))
    y_exact = op(x)
    (g_exact,) = torch.autograd.grad((y_exact * w).sum(), x)

    op.backward_mode = "straight_through"
    y_st = op(x)
    (g_st,) = torch.autograd.grad((y_st * w).sum(), x)
    assert bit_equal(y_st.detach(), y_exact.detach())
    assert torch.equal(g_st, w)
    assert not torch.equal(g_exact, w)  # the band is not empty, so the modes really differ
    (ones,) = torch.autograd.grad(op(x).sum(), x)
    assert torch.equal(ones, torch.ones_like(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_straight_through_half_precision(dtype):
    op = random_op(4, 1, 0.9, seed=13)
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(14)).to(dtype).requires_grad_()
    y = op(x)
    with straight_through(op):
        y_st = op(x)
        (g,) = torch.autograd.grad(y_st.sum(), x)
    assert y_st.dtype == dtype and bit_equal(y_st.detach(), y.detach())
    assert g.dtype == dtype and torch.equal(g, torch.ones_like(x))


# ------------------------------------------------------------------------------------ context managers


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 1),
        MeanSparse(4, 1, site_id="stem.act", depth=0),
        nn.Sequential(nn.ReLU(), MeanSparse(4, 1, site_id="layer1.0.act1", depth=1)),
        MeanSparse(4, 1, site_id="layer1.0.add", depth=2),
    )


def test_backward_mode_context_restores_previous_modes_on_exception():
    model = _model()
    ops = list(operators(model).values())
    ops[1].backward_mode = "straight_through"
    before = [op.backward_mode for op in ops]

    with pytest.raises(RuntimeError, match="boom"), straight_through(model):
        assert all(op.backward_mode == "straight_through" for op in ops)
        raise RuntimeError("boom")
    assert [op.backward_mode for op in ops] == before

    with pytest.raises(KeyError), backward_mode(model, "exact"):
        assert all(op.backward_mode == "exact" for op in ops)
        raise KeyError("x")
    assert [op.backward_mode for op in ops] == before

    with backward_mode(model, "straight_through"):
        pass
    assert [op.backward_mode for op in ops] == before


def test_invalid_backward_mode_is_rejected():
    model = _model()
    with pytest.raises(ValueError, match="exact, straight_through"), backward_mode(model, "bpda"):
        pass
    assert all(op.backward_mode == "exact" for op in operators(model).values())
    with pytest.raises(ValueError, match="straight_through"):
        MeanSparse(2).backward_mode = "identity"


# ----------------------------------------------------------------------------------- operators, alpha


def test_operators_follow_depth_not_registration_order():
    model = nn.Sequential(
        MeanSparse(2, site_id="c", depth=2),
        nn.Sequential(MeanSparse(2, site_id="a", depth=0), MeanSparse(2, site_id="d", depth=3)),
        MeanSparse(2, site_id="b", depth=1),
        MeanSparse(2, site_id="b2", depth=1),  # tie with "b": module order decides
    )
    found = operators(model)
    assert list(found) == ["a", "b", "b2", "c", "d"]
    assert found["a"] is model[1][0]
    assert list(operators(nn.Linear(2, 2))) == []


def test_operators_rejects_duplicate_site_ids():
    model = nn.Sequential(MeanSparse(2, site_id="x"), MeanSparse(2, site_id="x"))
    with pytest.raises(PlanError, match="'x'"):
        operators(model)


def test_set_alpha_float_and_mapping():
    model = _model()
    ops = operators(model)
    set_alpha(model, 0.25)
    assert [op.alpha.item() for op in ops.values()] == [0.25, 0.25, 0.25]

    set_alpha(model, {"layer1.0.add": 1.5, "stem.act": 0.0})
    assert [op.alpha.item() for op in ops.values()] == [0.0, 0.25, 1.5]
    assert all(op.alpha.shape == () and op.alpha.dtype == torch.float32 for op in ops.values())


def test_set_alpha_errors_change_nothing():
    model = _model()
    set_alpha(model, 0.5)
    with pytest.raises(PlanError, match=r"'layer1\.0\.ac1'.*did you mean 'layer1\.0\.act1'"):
        set_alpha(model, {"stem.act": 2.0, "layer1.0.ac1": 1.0})
    with pytest.raises(ValueError, match="stem.act"):
        set_alpha(model, {"layer1.0.add": 2.0, "stem.act": -1.0})
    with pytest.raises(ValueError, match=">= 0"):
        set_alpha(model, -0.1)
    with pytest.raises(ValueError):
        set_alpha(model, float("nan"))
    assert [op.alpha.item() for op in operators(model).values()] == [0.5, 0.5, 0.5]
    with pytest.raises(PlanError, match="has no MeanSparse operator"):
        set_alpha(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), 0.2)  # the base model, not the rewritten one


def test_constructor_and_input_validation():
    with pytest.raises(ValueError, match="alpha"):
        MeanSparse(3, alpha=-1.0)
    with pytest.raises(ValueError, match="channels"):
        MeanSparse(0)
    with pytest.raises(ValueError, match="3 channels"):
        MeanSparse(3, 1)(torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="3 channels"):
        MeanSparse(3, 1)(torch.zeros(2, 1, 5))  # a size-1 axis must not broadcast silently


def test_extra_repr_names_the_settings():
    op = MeanSparse(8, -1, 0.75, site_id="blocks.3.mlp.act", depth=5)
    op.backward_mode = "straight_through"
    text = repr(op)
    for part in ("8", "channel_axis=-1", "alpha=0.75", "straight_through", "blocks.3.mlp.act"):
        assert part in text


# ------------------------------------------------------------------------------------------ capture


def test_fx_symbolic_trace_gives_equal_output():
    model = _model()
    for i, op in enumerate(operators(model).values()):
        op.mean.copy_(torch.linspace(-0.5, 0.5, 4) * i)
        op.var.fill_(0.3)
    set_alpha(model, 1.0)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(15))
    gm = torch.fx.symbolic_trace(model)
    assert bit_equal(gm(x), model(x))
    assert not bit_equal(model(x), nn.Sequential(model[0], model[2][0])(x))  # the ops do something

    # a tracer keeping MeanSparse as a leaf gives call_module nodes that follow later changes
    class LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, MeanSparse) or super().is_leaf_module(m, qualname)

    gm = torch.fx.GraphModule(model, LeafTracer().trace(model))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["0", "1", "2.0", "2.1", "3"]
    set_alpha(gm, 0.0)
    assert bit_equal(gm(x), nn.Sequential(model[0], model[2][0])(x))


def test_torch_export_gives_equal_output():
    op = random_op(4, -1, 0.7, seed=16)
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(17))
    exported = torch.export.export(op, (x,))
    assert bit_equal(exported.module()(x), op(x))
