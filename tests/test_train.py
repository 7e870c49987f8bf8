"""PGD attack and adversarial training: bounds, determinism, checkpoint and resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from graphsparse import load_dataset
from graphsparse.errors import ArtifactError
from graphsparse.ops.sparta import Sparta, freeze_except_sparta, sparta_parameters
from graphsparse.robust.pgd import pgd_attack
from graphsparse.robust.train import TrainProgress, train


def _cnn(seed: int = 0, *, sparta: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        Sparta(8, reduction=2) if sparta else nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


@pytest.fixture(scope="module")
def mnist_slice() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_dataset("mnist5k", split="train").tensors
    return x[:256], y[:256]


FAST = dict(eps=0.3, steps=3, batch_size=64, lr=0.05, seed=1)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------- attack


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_pgd_stays_in_the_eps_ball_and_in_0_1(norm):
    model = _cnn().eval()
    torch.manual_seed(0)
    x = torch.rand(16, 1, 28, 28)
    x[:4] = 0.0
    x[4:8] = 1.0
    y = torch.randint(0, 10, (16,))
    eps = 0.3 if norm == "Linf" else 2.0
    rng = torch.Generator().manual_seed(0)
    x_adv = pgd_attack(model, x, y, eps, eps / 4, 10, norm, rng)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-5)).all()
    assert (size > 0).any()
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)
    assert all(p.grad is None for p in model.parameters())


def test_pgd_is_deterministic_for_a_generator_and_identity_at_eps_0():
    model = _cnn().eval()
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    a = pgd_attack(model, x, y, 0.1, 0.05, 3, "Linf", torch.Generator().manual_seed(5))
    b = pgd_attack(model, x, y, 0.1, 0.05, 3, "Linf", torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(pgd_attack(model, x, y, 0.0, 0.05, 3, "Linf"), x)
    with pytest.raises(ValueError, match="did you mean 'Linf'"):
        pgd_attack(model, x, y, 0.1, 0.05, 3, "linf")


# ------------------------------------------------------------------------------------------- training


def test_one_epoch_trains_records_and_checkpoints(tmp_path, mnist_slice):
    model = _cnn()
    before = _params(model)
    events: list[TrainProgress] = []
    ckpt = tmp_path / "ckpt.safetensors"
    record = train(model, mnist_slice, epochs=1, checkpoint=ckpt, progress=events.append, **FAST)
    assert not model.training
    assert [e.epoch for e in record.epochs] == [1]
    e = record.last
    assert e.samples == 256 and e.eps == pytest.approx(0.3)
    assert 0 <= e.adv_acc <= 1 and 0 <= e.clean_acc <= 1 and e.loss == e.loss  # not NaN
    assert len(events) == 4 and events[-1].end_of_epoch and not events[0].end_of_epoch
    assert events[-1].loss == pytest.approx(e.loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert ckpt.is_file() and not list(tmp_path.glob(".*.tmp"))
    with safe_open(str(ckpt), framework="pt") as f:
        assert f.metadata()["epoch"] == "1"
        assert any(k.startswith("optimizer/") and k.endswith("momentum_buffer") for k in f.keys())


def test_training_is_deterministic_and_resume_matches_an_uninterrupted_run(tmp_path, mnist_slice):
    settings = dict(FAST, epochs=2, eps_warmup_epochs=1, schedule="cosine")
    straight = _cnn()
    full = train(straight, mnist_slice, **settings)

    class Interrupt(Exception):
        pass

    def stop_in_epoch_2(p: TrainProgress) -> None:
        if p.epoch == 2:
            raise Interrupt

    ckpt = tmp_path / "run.safetensors"
    interrupted = _cnn()
    with pytest.raises(Interrupt):
        train(interrupted, mnist_slice, checkpoint=ckpt, progress=stop_in_epoch_2, **settings)
    assert not interrupted.training  # restored in finally

    resumed_model = _cnn(seed=123)  # different init: everything must come from the checkpoint
    resumed = train(resumed_model, mnist_slice, checkpoint=ckpt, resume=True, **settings)
    assert resumed.resumed_from == 1
    assert [e.epoch for e in resumed.epochs] == [1, 2]
    for a, b in zip(full.epochs, resumed.epochs):
        assert (a.loss, a.clean_acc, a.adv_acc, a.lr, a.eps) == (b.loss, b.clean_acc, b.adv_acc, b.lr, b.eps)
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key

    again = _cnn()
    train(again, mnist_slice, **settings)
    for key, value in straight.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key

    # nothing left to do: the record is returned as saved, the model loaded
    done = train(_cnn(seed=7), mnist_slice, checkpoint=ckpt, resume=True, **settings)
    assert [e.epoch for e in done.epochs] == [1, 2]


def test_resume_refuses_a_checkpoint_made_with_other_settings(tmp_path, mnist_slice):
    ckpt = tmp_path / "c.safetensors"
    small = (mnist_slice[0][:64], mnist_slice[1][:64])
    train(_cnn(), small, epochs=1, checkpoint=ckpt, **FAST)
    with pytest.raises(ArtifactError, match=r"eps=0\.3 \(now 0\.1\)"):
        train(_cnn(), small, epochs=1, checkpoint=ckpt, resume=True, **{**FAST, "eps": 0.1})


@pytest.mark.parametrize(
    "field, value",
    [("settings", "[1]"), ("settings", "{"), ("epoch", "one"), ("epochs", '[{"bogus": 1}]'), ("param_groups", "{}")],
)
def test_resume_names_a_damaged_metadata_field(tmp_path, mnist_slice, field, value):
    from safetensors import safe_open
    from safetensors.torch import save_file

    ckpt = tmp_path / "c.safetensors"
    small = (mnist_slice[0][:64], mnist_slice[1][:64])
    train(_cnn(), small, epochs=1, checkpoint=ckpt, **FAST)
    with safe_open(str(ckpt), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, ckpt, metadata={**metadata, field: value})
    with pytest.raises(ArtifactError, match=f"metadata field '{field}' is invalid.*resume=False"):
        train(_cnn(), small, epochs=1, checkpoint=ckpt, resume=True, **FAST)


@pytest.mark.parametrize("explicit", [True, False])
def test_fine_tuning_sparta_changes_only_sparta(mnist_slice, explicit):
    model = _cnn(sparta=True)
    freeze_except_sparta(model)
    before = _params(model)
    small = (mnist_slice[0][:64], mnist_slice[1][:64])
    train(model, small, epochs=1, params=sparta_parameters(model) if explicit else None, **FAST)
    sparta_keys = {k for k in before if k.startswith("2.")}
    for key, value in model.state_dict().items():
        if key not in sparta_keys:  # incl. BatchNorm running statistics of the frozen layers
            assert torch.equal(before[key], value), key
    assert any(not torch.equal(before[k], model.state_dict()[k]) for k in sparta_keys)


def test_invalid_settings_are_rejected(mnist_slice):
    with pytest.raises(ValueError, match="schedule"):
        train(_cnn(), mnist_slice, epochs=1, schedule="cos")
    with pytest.raises(ValueError, match="epochs"):
        train(_cnn(), mnist_slice, epochs=0)
    with pytest.raises(ValueError, match="checkpoint"):
        train(_cnn(), mnist_slice, epochs=1, resume=True)
