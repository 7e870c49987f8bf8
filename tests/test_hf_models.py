"""Hugging Face ``transformers`` vision classifiers: every activation that runs is a site, rewriting is exact.

Small random-init configs (graphsparse.testing.architectures.huggingface_classifiers), one per family. The
ground truth does not use graphsparse's registry: the aten activation ops the eager model dispatches
(counted per kind by a TorchDispatchMode) and the forward hooks of modules defined in
``transformers.activations`` or ``torch.nn.modules.activation``.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")

from graphsparse.artifact.io import load, save  # noqa: E402
from graphsparse.errors import CaptureError  # noqa: E402
from graphsparse.graph.capture import capture  # noqa: E402
from graphsparse.graph.sites import sites_of_capture  # noqa: E402
from graphsparse.ops import set_alpha  # noqa: E402
from graphsparse.planning.rewrite import rewrite  # noqa: E402
from graphsparse.testing.architectures import huggingface_classifiers  # noqa: E402

FAMILIES = huggingface_classifiers()
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats a loaded machine's contention

# aten op -> site op; sigmoid/tanh are left out: in these families they are gates or position-bias maths
_ATEN_KINDS = {
    "relu": "relu", "relu_": "relu", "gelu": "gelu", "gelu_": "gelu", "silu": "silu", "silu_": "silu",
    "hardswish": "hardswish", "hardswish_": "hardswish", "hardtanh": "relu6", "hardtanh_": "relu6",
    "elu": "elu", "leaky_relu": "leaky_relu", "mish": "mish",
}
_ACTIVATION_MODULES = ("transformers.activations", "torch.nn.modules.activation")
_GATES = ("Sigmoid", "Tanh", "Hardsigmoid")


class _CountActivations(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.kinds: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = _ATEN_KINDS.get(func.overloadpacket.__name__)
        if kind is not None:
            self.kinds[kind] += 1
        return func(*args, **(kwargs or {}))


def _ran(model: nn.Module, x: torch.Tensor) -> tuple[Counter[str], set[str]]:
    ran: set[str] = set()
    handles = [
        m.register_forward_hook(lambda *_, p=p: ran.add(p))
        for p, m in model.named_modules()
        if type(m).__module__ in _ACTIVATION_MODULES and type(m).__name__ not in _GATES
    ]
    try:
        with torch.no_grad(), _CountActivations() as counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return counter.kinds, ran


def _build(family: str) -> tuple[nn.Module, torch.Tensor]:
    build, shape = FAMILIES[family]
    torch.manual_seed(0)
    return build(), torch.randn(*shape)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_activation_that_runs_is_a_site(family):
    model, x = _build(family)
    kinds, modules = _ran(model, x)
    assert sum(kinds.values()) > 0
    cap = capture(model, x)
    assert cap.max_abs_diff == 0.0
    sites = sites_of_capture(cap)
    assert Counter(s.op for s in sites if s.op != "add") == kinds
    assert modules <= {s.module for s in sites}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["vit", "swinv2", "mobilevit", "convnext", "resnet"])
def test_rewrite_with_alpha_zero_is_bit_identical_and_round_trips(family, tmp_path):
    model, x = _build(family)
    rewritten = rewrite(model, "full", x)
    set_alpha(rewritten, 0.0)
    with torch.no_grad():
        expected = model(x).logits
        assert torch.equal(rewritten(x).logits, expected)
    save(rewritten, tmp_path / "m.safetensors")
    torch.manual_seed(1)  # other weights: the artifact's must be the ones loaded
    loaded = load(tmp_path / "m.safetensors")  # rebuilt from the transformers recipe (class + config)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected)
    with_base = load(tmp_path / "m.safetensors", base=FAMILIES[family][0]())
    with torch.no_grad():
        assert torch.equal(with_base(x).logits, expected)


def test_capture_failure_hint_does_not_send_a_transformers_user_to_timm():
    class Opaque(nn.Module):  # traces nowhere and holds no activation
        def forward(self, x):
            return x * float(x.sum())

    with pytest.raises(CaptureError) as err:
        capture(Opaque(), torch.randn(1, 3, 8, 8))
    assert "timm" not in str(err.value)


def test_tune_and_evaluate_read_the_logits_of_a_model_output():
    """An HF classifier returns an ImageClassifierOutput; tune and evaluate attack and score its logits (they
    refused it as a model without a classifier head), and leave no hook on the model."""
    import graphsparse as gs

    build, shape = FAMILIES["vit"]
    model = build().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, *shape[1:], generator=g)
    with torch.no_grad():
        y = model(x).logits.argmax(1)
    y[::3] = (y[::3] + 1) % model.config.num_labels  # a third wrong: clean accuracy is 16 of 24
    expected_clean = 100.0 * float((model(x).logits.argmax(1) == y).float().mean())
    rewritten = rewrite(model, "before_activations", x[:1])
    gs.calibrate(rewritten, (x, y))
    hooks = dict(rewritten._forward_hooks)
    res = gs.tune(rewritten, (x, y), alphas=[0.0, 0.1], eps=1 / 255, steps=1, batch_size=8)
    assert [p.alpha for p in res.curve] == [0.0, 0.1]
    gs.set_alpha(rewritten, 0.0)
    report = gs.evaluate(rewritten, (x, y), attacks=["apgd-ce"], eps=1 / 255, steps=1, batch_size=8)
    assert report.exact.clean == pytest.approx(expected_clean)
    assert dict(rewritten._forward_hooks) == hooks
