"""Honest evaluation: base (α = 0), exact gradient and straight-through (BPDA) through real AutoAttack.

The test model is a small CNN trained for a few seconds on the parity (even/odd) of scikit-learn's 8×8
digits, with one MeanSparse on its logits calibrated on the training split. On a two-class problem a
large α sends most near-boundary samples of one class onto the channel means, where the exact gradient is
zero: the exact-gradient attack cannot move them, the straight-through attack can. That is the gradient
masking the MeanSparse review worried about, made large enough to measure on 128 samples.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import graphsparse as gs
from graphsparse.artifact.records import stats_digest
from graphsparse.data import load_dataset, split_indices
from graphsparse.errors import EvaluationError
from graphsparse.ops import MeanSparse, operators
from graphsparse.robust.attacks import attack_key
from graphsparse.robust.evaluate import evaluate
from graphsparse.robust.samples import pick_samples
from graphsparse.robust.tune import SplitWarning

EPS = 0.2
FAST = {"eps": EPS, "n": 128, "steps": 10, "batch_size": 128}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(parity_net) -> nn.Module:
    return parity_net


# --------------------------------------------------------------------------------- exact versus BPDA


def test_clean_flags_and_zero_gradients_come_from_one_forward_per_batch(masked, test_split):
    """The clean predictions are the logits the zero-gradient check computes anyway: one forward per batch
    (a separate clean pass doubled the forwards), with the flags and count an independent pass gives."""
    from graphsparse.robust.attack_cache import AttackCache, measure_variant, samples_digest

    s = pick_samples(test_split, 100, 0)
    forwards = []
    hook = masked.register_forward_pre_hook(lambda m, args: forwards.append(args[0].shape[0]))
    try:
        clean, zero, robust, _ = measure_variant(
            masked, s, "exact", [], samples=samples_digest(s), cache=AttackCache(), eps=EPS, norm="Linf",
            batch_size=32, seed=0, device=torch.device("cpu"), n_classes=2, steps=1,
        )
    finally:
        hook.remove()
    assert forwards == [32, 32, 32, 4] and robust == {}
    with torch.no_grad():
        expected = (masked(s.x).argmax(1) == s.y).numpy()
    x = s.x.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(masked(x), s.y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, [x])
    assert (clean == expected).all()
    assert zero == int((grad.flatten(1).abs().sum(1) == 0).sum()) > 10


def test_exact_gradient_attack_is_weaker_than_bpda_at_large_alpha(masked, test_split):
    report = evaluate(masked, test_split, **FAST)
    exact, bpda, base = report.exact, report.bpda, report.base
    # same forward pass: same clean accuracy
    assert exact.clean == bpda.clean
    # the exact gradient is zero for many samples; straight-through gradients are not
    assert exact.zero_gradient > 10.0
    assert bpda.zero_gradient == 0.0
    # the exact-gradient attack is clearly weaker: the apparent gain is gradient masking
    assert exact.robust["apgd-ce"] >= bpda.robust["apgd-ce"] + 10.0
    assert exact.robust["apgd-ce"] > base.robust["apgd-ce"]
    assert report.gains["apgd-ce"]["exact"] > report.gains["apgd-ce"]["bpda"]
    assert report.gradient_masking
    assert "gradient masking" in report.verdict
    assert any("all-zero input gradient" in w and w.startswith("exact") for w in report.warnings)
    assert not any(w.startswith("bpda") and "zero" in w for w in report.warnings)


def test_exact_and_bpda_agree_at_alpha_zero(masked, test_split):
    gs.set_alpha(masked, 0.0)
    report = evaluate(masked, test_split, **FAST)
    assert report.exact.to_dict() == report.bpda.to_dict() == report.base.to_dict()
    assert report.gains["apgd-ce"] == {"exact": 0.0, "bpda": 0.0}
    assert not report.gradient_masking
    assert "no robustness gain" in report.verdict


def test_base_is_the_model_with_alpha_zero_and_state_is_restored(masked, test_split):
    ops = operators(masked)
    masked.train()  # evaluation must run in eval mode and give the mode back
    rng = torch.get_rng_state()
    report = evaluate(masked, test_split, **FAST)
    assert torch.equal(torch.get_rng_state(), rng), "AutoAttack's reseeding leaked into the global RNG"
    assert masked.training and all(m.training for m in masked.modules())
    assert float(ops["logits"].alpha) == 1.0 and ops["logits"].backward_mode == "exact"

    original = copy.deepcopy(masked).eval()
    gs.set_alpha(original, 0.0)
    alone = evaluate(original, test_split, base_alpha_zero=False, **FAST)
    assert alone.base is None
    assert report.base.to_dict() == alone.exact.to_dict()

    # and the α = 0 model is the trained network without the operator, bit for bit
    x = test_split.tensors[0][:64]
    with torch.no_grad():
        assert torch.equal(original(x), original[:-1](x))


def test_report_is_deterministic_json_and_names_the_samples(masked, test_split, parity_source):
    first = evaluate(masked, test_split, seed=3, **FAST)
    second = evaluate(masked, test_split, seed=3, **FAST)
    assert first.date and first.stats_sha256 == second.stats_sha256 == stats_digest(masked)
    first.date = second.date  # the one field that may differ: the UTC time it finished
    assert first.to_dict() == second.to_dict()
    d = json.loads(json.dumps(first.to_dict()))
    assert set(d) >= {"base", "exact", "bpda", "n", "eps", "norm", "seed", "warnings", "verdict"}
    assert d["exact"]["robust"].keys() == {"apgd-ce"} and d["n"] == 128 and d["norm"] == "Linf"
    assert d["split"] == "test" and d["alphas"] == {"logits": 1.0}
    test_indices = set(split_indices(1797, 0)["test"].tolist())
    assert len(set(d["indices"])) == 128 and set(d["indices"]) <= test_indices


def test_l2_and_a_custom_cascade(masked, test_split):
    gs.set_alpha(masked, 0.0)
    single = evaluate(masked, test_split, attacks=["apgd-ce"], norm="L2", eps=1.0, n=64, steps=5)
    both = evaluate(masked, test_split, attacks=[("apgd-ce", "fab")], norm="L2", eps=1.0, n=64, steps=5)
    assert both.attacks == ["apgd-ce+fab"] and both.norm == "L2"
    # a cascade runs APGD-CE first with the same seed, then FAB on the survivors: never more robust
    assert both.exact.robust["apgd-ce+fab"] <= single.exact.robust["apgd-ce"]


# ---------------------------------------------------------------------------------------- warnings


def test_autoattack_zero_gradient_warning_is_surfaced():
    """A model whose output is constant has zero gradients everywhere; AutoAttack's DLR check says so."""
    torch.manual_seed(0)
    digits = load_dataset("digits", split="test")
    x = digits.tensors[0][:32]
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), MeanSparse(10, site_id="logits")).eval()
    gs.calibrate(model, [x])
    gs.set_alpha(model, 1000.0)  # every logit is inside its band: the output is the vector of means
    with torch.no_grad():
        label = int(model(x[:1]).argmax())
    y = torch.full((32,), label)  # every sample "correct", so AutoAttack attacks all of them
    report = evaluate(model, (x, y), attacks=("apgd-t",), n=32, steps=3, batch_size=32)
    exact_aa = [w for w in report.warnings if w.startswith("exact/apgd-t: AutoAttack:")]
    assert any("zero gradient" in w for w in exact_aa), report.warnings
    assert not any(w.startswith("bpda/") and "zero gradient" in w for w in report.warnings)
    assert report.exact.zero_gradient == 100.0 and report.bpda.zero_gradient == 0.0
    assert any(w.startswith("exact: graphsparse: 32 of 32 samples have an all-zero") for w in report.warnings)


# -------------------------------------------------------------------------------------- bookkeeping


def test_rewritten_model_gets_an_evaluation_record(trained, parity_source, test_split):
    train = load_dataset(parity_source, split="train")
    model = gs.rewrite(trained, "before_activations", train.tensors[0][:2])
    gs.calibrate(model, gs.make_loader(train, 512))
    gs.set_alpha(model, 0.25)
    progress = []
    report = evaluate(model, test_split, n=32, steps=3, progress=lambda *a: progress.append(a))
    assert gs.rewrite_info(model).records["evaluation"] == report.to_dict()
    assert [p[:2] for p in progress] == [(32, 96), (32, 96), (64, 96), (64, 96), (96, 96), (96, 96)]  # one chunk each
    assert set(report.alphas) == set(operators(model)) and set(report.alphas.values()) == {0.25}


def test_sample_pick_is_deterministic_nested_and_follows_subsets(test_split):
    a = pick_samples(test_split, 20, seed=1)
    b = pick_samples(test_split, 40, seed=1)
    assert set(a.indices.tolist()) <= set(b.indices.tolist())
    assert np.array_equal(a.indices, test_split.indices[a.positions])
    sub = torch.utils.data.Subset(test_split, list(range(10, 60)))
    loader = torch.utils.data.DataLoader(sub, batch_size=7)
    c = pick_samples(loader, 5, seed=0)
    assert c.split == "test" and np.array_equal(c.indices, test_split.indices[10 + c.positions])
    assert torch.equal(c.x, test_split.tensors[0][10 + torch.from_numpy(c.positions)])
    batches = [(test_split.tensors[0][i : i + 16], test_split.tensors[1][i : i + 16]) for i in range(0, 64, 16)]
    d = pick_samples(batches, None, seed=0)
    assert d.split is None and d.x.shape[0] == 64


def test_non_test_split_is_flagged(masked, parity_source):
    gs.set_alpha(masked, 0.0)
    report = evaluate(masked, load_dataset(parity_source, split="val"), n=16, steps=2)
    assert any("'val' split" in w for w in report.warnings)


def test_a_base_model_that_keeps_other_operators_is_flagged(masked, test_split):
    from graphsparse.ops import Sparta

    # a SPARTA operator stays in the 'base' (α = 0) variant: the base is not the original model
    mixed = nn.Sequential(masked[:1], Sparta(8, site_id="sparta"), *masked[2:]).eval()
    report = evaluate(mixed, test_split, n=8, steps=1, eps=EPS)
    assert any("1 operators are not MeanSparse (e.g. 'sparta')" in w for w in report.warnings)


def test_samples_used_to_tune_alpha_are_flagged(trained, parity_source):
    train = load_dataset(parity_source, split="train")
    model = gs.rewrite(trained, "before_activations", train.tensors[0][:2])
    gs.calibrate(model, gs.make_loader(train, 512))
    val = load_dataset(parity_source, split="val")
    gs.tune(model, val, alphas=[0.0, 0.25], eps=EPS, steps=2)
    used = set(gs.rewrite_info(model).records["tuning"]["indices"])
    assert used == set(val.indices.tolist())

    def flagged(report) -> list[str]:
        return [w for w in report.warnings if "were used to tune alpha" in w]

    on_val = evaluate(model, val, n=16, steps=2, eps=EPS)
    assert flagged(on_val) and flagged(on_val)[0].startswith("graphsparse: 16 of the 16 evaluated samples")
    assert not flagged(evaluate(model, load_dataset(parity_source, split="test"), n=64, steps=2, eps=EPS))
    # another split seed draws another test split, which overlaps the first seed's val split
    report = evaluate(model, load_dataset(parity_source, split="test", seed=1), n=64, steps=2, eps=EPS)
    overlap = len(set(report.indices) & used)
    assert overlap > 0 and flagged(report)[0].startswith(f"graphsparse: {overlap} of the 64 evaluated samples")


def test_bad_requests_are_refused_with_hints(masked, test_split):
    with pytest.raises(EvaluationError, match="did you mean 'apgd-ce'"):
        evaluate(masked, test_split, attacks=("apgd-cee",), n=8)
    with pytest.raises(EvaluationError, match="at least 4 classes"):
        evaluate(masked, test_split, attacks=("apgd-t",), n=8)
    with pytest.raises(EvaluationError, match="norm"):
        evaluate(masked, test_split, norm="L3", n=8)
    with pytest.raises(EvaluationError, match=r"ε is in \[0, 1\] pixel units. Hint: 8/255 = 0.0314"):
        evaluate(masked, test_split, eps=8, n=8)
    with pytest.raises(EvaluationError, match=r"ε is in \[0, 1\] pixel units. Hint: 8/255 = 0.0314"):
        gs.tune(masked, test_split.tensors, eps=8, n=8)
    with pytest.raises(EvaluationError, match=r"eps = 8 for L2 reaches every image of 64 values"):
        evaluate(masked, test_split, eps=8, norm="L2", n=8)
    with pytest.raises(EvaluationError, match=r"\[0, 1\]"):
        evaluate(masked, (test_split.tensors[0][:8] * 255, test_split.tensors[1][:8]), n=8)
    x, y = test_split.tensors[0][:8], test_split.tensors[1][:8]
    with pytest.raises(EvaluationError, match="labels run from .* but the model gives 2 class logits"):
        evaluate(masked, (x, y + 10), n=8, steps=1)
    with pytest.raises(EvaluationError, match="labels run from .* but the model gives 2 class logits"):
        gs.tune(masked, (x, y + 10), alphas=[0.0, 0.5], steps=1)
    with pytest.raises(EvaluationError, match="attacks must be a list of attack names"):
        evaluate(masked, test_split, attacks=None, n=8)
    with pytest.raises(EvaluationError, match="alphas must be a list of numbers"):
        gs.tune(masked, (x, y), alphas=0.1)
    assert float(operators(masked)["logits"].alpha) == 1.0  # every refusal left alpha alone
    assert attack_key("standard") == "autoattack" and attack_key("APGD-CE + apgd-t") == "apgd-ce+apgd-t"


def test_a_model_that_gives_features_instead_of_logits_is_refused(trained, parity_source, test_split):
    """Labels 0 and 1 fit inside 32 features, so only the data's class count shows the missing head."""
    headless = nn.Sequential(*copy.deepcopy(trained)[:-1], MeanSparse(32, site_id="features")).eval()
    gs.calibrate(headless, load_dataset(parity_source, split="train"))
    match = r"gives 32 outputs per sample \(output shape \(1, 32\)\), but the data has 2 classes"
    with pytest.raises(EvaluationError, match=match):
        evaluate(headless, test_split, n=8, steps=1)
    with pytest.raises(EvaluationError, match=match):
        gs.tune(headless, load_dataset(parity_source, split="val"), alphas=[0.0, 0.5], n=8, steps=1)
    assert test_split.num_classes == 2
    assert load_dataset("digits", split="val").num_classes == 10


# ------------------------------------------------------------------------------------ loaders and dicts


def test_a_loader_is_read_as_given_with_its_collate_fn_and_sampler(test_split):
    x, y = test_split.tensors
    raw = torch.utils.data.TensorDataset((x * 255).round(), y)  # bytes: the collate_fn scales them

    def to_unit(items):
        xs, ys = zip(*items)
        return torch.stack(xs) / 255, torch.stack(ys)

    s = pick_samples(torch.utils.data.DataLoader(raw, batch_size=16, collate_fn=to_unit), 20, seed=0)
    assert s.x.shape[0] == 20 and float(s.x.max()) <= 1.0
    assert torch.allclose(s.x, x[torch.from_numpy(s.positions)], atol=1 / 255)
    evens = torch.utils.data.DataLoader(test_split, batch_size=16, sampler=list(range(0, 100, 2)))
    s = pick_samples(evens, None, seed=0)
    assert s.total == 50 and torch.equal(s.x, x[0:100:2]) and torch.equal(s.y, y[0:100:2])
    assert s.split == "test" and len(s.indices) == 0  # reordered by the sampler: the source indices are unknown
    in_order = pick_samples(torch.utils.data.DataLoader(test_split, batch_size=16), 20, seed=0)
    assert np.array_equal(in_order.indices, test_split.indices[in_order.positions])
    assert torch.equal(in_order.x, pick_samples(test_split, 20, seed=0).x)  # the same pick as the dataset's


def test_an_iterable_is_streamed_keeping_only_the_picked_samples(test_split):
    import weakref

    x, y = test_split.tensors
    alive: list[weakref.ref] = []
    most = []

    def stream():
        for i in range(0, 320, 8):
            most.append(sum(r() is not None for r in alive))
            batch = x[i : i + 8].clone()
            alive.append(weakref.ref(batch))
            yield batch, y[i : i + 8]

    s = pick_samples(stream(), 10, seed=0)
    assert s.x.shape[0] == 10 and s.total == 320
    assert max(most) <= 2, most  # earlier batches were let go, not read whole into memory
    assert torch.equal(s.x, x[torch.from_numpy(s.positions)])
    bigger = pick_samples(iter([(x[i : i + 8], y[i : i + 8]) for i in range(0, 320, 8)]), 40, seed=0)
    assert set(s.positions.tolist()) <= set(bigger.positions.tolist())  # a smaller n picks a subset


class DictSamples(torch.utils.data.Dataset):
    """Samples as dicts, the Hugging Face datasets convention."""

    def __init__(self, x, y, keys=("image", "label")):
        self.x, self.y, self.keys = x, y, keys

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {self.keys[0]: self.x[i], self.keys[1]: self.y[i], "id": i}


def test_dict_samples_and_batches_in_calibrate_tune_and_evaluate(masked, parity_source, test_split):
    from graphsparse.errors import CalibrationError, DataError

    train = load_dataset(parity_source, split="train")
    as_pairs = copy.deepcopy(masked)
    gs.calibrate(as_pairs, train.tensors)
    loader = torch.utils.data.DataLoader(DictSamples(*train.tensors, keys=("pixel_values", "labels")), batch_size=64)
    gs.calibrate(masked, loader)
    assert torch.equal(operators(masked)["logits"].var, operators(as_pairs)["logits"].var)

    gs.set_alpha(masked, 0.0)
    by_pairs = evaluate(masked, test_split, n=16, steps=1, eps=EPS)
    by_dicts = evaluate(masked, DictSamples(*test_split.tensors), n=16, steps=1, eps=EPS)
    assert by_dicts.exact.to_dict() == by_pairs.exact.to_dict()
    val = load_dataset(parity_source, split="val")
    with pytest.warns(SplitWarning):  # a plain dataset: its split cannot be told
        tuned = gs.tune(masked, DictSamples(*val.tensors), alphas=[0.0, 0.5], n=16, steps=1, eps=EPS)
    assert tuned.n == 16

    odd = DictSamples(*test_split.tensors, keys=("img_data", "cls"))
    with pytest.raises(DataError, match=r"sample \d+ is a dict without inputs .* \(keys: 'img_data', 'cls', 'id'\)"):
        evaluate(masked, odd, n=4, steps=1)
    with pytest.raises(CalibrationError, match=r"batch 0 is a dict without inputs .*'img_data'"):
        gs.calibrate(masked, torch.utils.data.DataLoader(odd, batch_size=4))
    named = evaluate(masked, odd, n=16, steps=1, eps=EPS, input_key="img_data", label_key="cls")
    assert named.exact.to_dict() == by_pairs.exact.to_dict()
    with pytest.raises(DataError, match=r"has no key 'label' .*Hint: pass the key that holds the labels"):
        evaluate(masked, odd, n=4, steps=1, input_key="img_data", label_key="label")
