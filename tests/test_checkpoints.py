"""Checkpoints saved the way researchers save them load through load_model and through the CLI (DESIGN §5).

Each file is written here with the libraries' own objects (optimizers, schedulers, timm's EMA, torch.compile,
DataParallel, argparse, numpy), not with graphsparse, and its weights must give the original model's output.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from graphsparse.cli import main
from graphsparse.errors import ModelSourceError
from graphsparse.sources.load import load_model

ARCH = "timm:test_resnet"
SHAPE = (2, 3, 32, 32)


def reference() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False).eval()


def other_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict with the same keys and different values (an EMA copy that differs from the model)."""
    return {k: (v * 0.5 if v.is_floating_point() else v) for k, v in model.state_dict().items()}


def output(model: nn.Module) -> torch.Tensor:
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x)


def training_state(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Real optimizer and scheduler state dicts after one step (momentum buffers, step counts)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    return opt.state_dict(), sched.state_dict()


@dataclass
class Case:
    """A checkpoint shape: ``make(model)`` returns what torch.save writes; ``options`` are load_model's."""

    name: str
    make: Callable[[nn.Module], Any]
    options: dict[str, Any] = field(default_factory=lambda: {"arch": ARCH})
    legacy: bool = False
    expect: str = "model"  # whose output the loaded model gives: the model's, or its EMA copy's ("ema")


def research(model: nn.Module) -> dict[str, Any]:
    opt, sched = training_state(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return {
        "epoch": 41,
        "model": state,
        "optimizer": opt,
        "scheduler": sched,
        "args": argparse.Namespace(lr=0.1, arch="resnet", epochs=100, eps=8 / 255, seed=0),
        "best_acc": np.float64(93.125),
        "rng": np.random.get_state(),
        "np_arr": np.arange(3),
        "torch_rng": torch.get_rng_state(),
    }


def research_torch_only(model: nn.Module) -> dict[str, Any]:
    opt, sched = training_state(model)
    return {"epoch": 41, "model": model.state_dict(), "optimizer": opt, "scheduler": sched, "best_acc": 93.125}


def lightning(model: nn.Module) -> dict[str, Any]:
    opt, sched = training_state(model)
    return {
        "epoch": 9,
        "global_step": 1000,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 10, "completed": 9}}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val_acc', 'mode': 'max'}": {
                "monitor": "val_acc",
                "best_model_score": torch.tensor(0.93),
                "best_model_path": "/runs/epoch=9.ckpt",
                "best_k_models": {"/runs/epoch=9.ckpt": torch.tensor(0.93)},
            }
        },
        "optimizer_states": [opt],
        "lr_schedulers": [sched],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 0.1, "arch": "test_resnet", "num_classes": 1000},
    }


def timm_train_py(model: nn.Module) -> dict[str, Any]:
    """What timm's train.py CheckpointSaver writes with --model-ema (ModelEmaV3 state under state_dict_ema)."""
    opt, _ = training_state(model)
    ema = timm.utils.ModelEmaV3(model, decay=0.5)
    ema.module.load_state_dict(other_weights(model))
    return {
        "epoch": 3,
        "arch": "test_resnet",
        "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": opt,
        "version": 2,
        "metric": 71.5,
        "state_dict_ema": ema.state_dict(),  # keys 'module.…'
    }


def ema_entry(model: nn.Module) -> dict[str, Any]:
    return {"model": model.state_dict(), "model_ema": other_weights(model), "epoch": 1}


CASES = [
    Case("plain_state_dict", lambda m: m.state_dict()),
    Case("state_dict_and_epoch", lambda m: {"state_dict": m.state_dict(), "epoch": 12}),
    Case("research_torch_only", research_torch_only),
    Case("research_numpy_argparse", research),
    Case("lightning", lightning),
    Case("lightning_explicit_prefix", lightning, {"arch": ARCH, "strip_prefix": "model."}),
    Case("ddp_module", lambda m: {"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}}),
    Case("data_parallel", lambda m: nn.DataParallel(m).state_dict()),
    Case("torch_compile", lambda m: torch.compile(m).state_dict()),
    Case("ddp_of_compiled", lambda m: {f"module.{k}": v for k, v in torch.compile(m).state_dict().items()}),
    Case("lightning_of_ddp", lambda m: {"state_dict": {f"model.module.{k}": v for k, v in m.state_dict().items()}}),
    Case("timm_train_py_ema_default", timm_train_py),
    Case("timm_train_py_ema_chosen", timm_train_py, {"arch": ARCH, "checkpoint_key": "state_dict_ema"}, expect="ema"),
    Case("ema_entry_default", ema_entry),
    Case("ema_entry_chosen", ema_entry, {"arch": ARCH, "checkpoint_key": "model_ema"}, expect="ema"),
    Case("legacy_state_dict", lambda m: {"state_dict": m.state_dict(), "epoch": 2}, legacy=True),
    Case("legacy_research", research, legacy=True),
    Case("whole_timm_module", lambda m: m, {}),
    Case("whole_timm_module_legacy", lambda m: m, {}, legacy=True),
]


def cli_options(options: dict[str, Any]) -> list[str]:
    args = []
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_checkpoint_loads_through_the_api_and_the_cli(case, tmp_path):
    original = reference()
    saved = case.make(original)
    path = tmp_path / f"{case.name}.pt"
    torch.save(saved, path, _use_new_zipfile_serialization=not case.legacy)
    want = output(original)
    if case.expect == "ema":
        ema = reference()
        ema.load_state_dict(other_weights(original))
        want = output(ema)
        assert not torch.allclose(want, output(original))  # the two entries really differ

    model, _ = load_model(path, **case.options)
    assert torch.equal(output(model), want)

    result = CliRunner().invoke(
        main, ["inspect", str(path), *cli_options(case.options), "--input-shape", "1,3,32,32", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == arch_sites()  # the architecture's own sites


@functools.cache
def arch_sites() -> list[dict[str, Any]]:
    result = CliRunner().invoke(main, ["inspect", ARCH, "--input-shape", "1,3,32,32", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_whole_torch_and_torchvision_modules_load(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    modules = {
        "seq.pt": nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)),
        "squeezenet.pth": torchvision.models.squeezenet1_1(num_classes=5),
    }
    modules["seq.pt"](torch.zeros(SHAPE))  # materialise the lazy layer
    kinds = {"seq.pt": "file", "squeezenet.pth": "torchvision"}  # a torchvision builder rebuilds the second
    for name, module in modules.items():
        torch.save(module.eval(), tmp_path / name)
        model, recipe = load_model(tmp_path / name)
        assert type(model) is type(module) and recipe.kind == kinds[name]
        assert torch.equal(output(model), output(module))
        result = CliRunner().invoke(main, ["inspect", str(tmp_path / name), "--input-shape", "1,3,32,32", "--json"])
        assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_whole_robustbench_module_loads_in_a_fresh_process(tmp_path):
    if importlib.util.find_spec("robustbench") is None:  # pragma: no cover - CI installs it
        pytest.skip("robustbench not installed")
    script = f"""
import torch
from graphsparse.sources.load import load_model
spec = "robustbench.model_zoo.architectures.dm_wide_resnet:DMWideResNet"
model, _ = load_model(spec, depth=10, width=1)
torch.save(model, {str(tmp_path / "dm.pt")!r})
torch.save(model, {str(tmp_path / "dm_legacy.pt")!r}, _use_new_zipfile_serialization=False)
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    for name in ("dm.pt", "dm_legacy.pt"):
        script = f"""
from graphsparse.sources.load import load_model
model, recipe = load_model({str(tmp_path / name)!r})
print(type(model).__name__, recipe.kind)
"""
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.split() == ["DMWideResNet", "file"]


# ------------------------------------------------------------------------------------------ refusals


def invoke(*args: str):
    return CliRunner().invoke(main, ["inspect", *args, "--input-shape", "1,3,32,32", "--json"])


def test_a_prefix_not_every_key_shares_is_named_and_the_named_flag_works(tmp_path):
    original = reference()
    state = {f"model.{k}": v for k, v in original.state_dict().items()}
    state["criterion.weight"] = torch.ones(1000)  # a LightningModule's loss weights beside its model
    torch.save({"state_dict": state}, tmp_path / "lit.ckpt")
    refused = invoke(str(tmp_path / "lit.ckpt"), "--arch", ARCH)
    assert refused.exit_code == 1
    assert "pass --strip-prefix model." in refused.output
    followed = invoke(str(tmp_path / "lit.ckpt"), "--arch", ARCH, "--strip-prefix", "model.")
    assert followed.exit_code == 0, followed.output
    model, _ = load_model(tmp_path / "lit.ckpt", arch=ARCH, strip_prefix="model.")
    assert torch.equal(output(model), output(original))
    with pytest.raises(ModelSourceError, match="no key .* starts with 'net.'.*'model.'"):
        load_model(tmp_path / "lit.ckpt", arch=ARCH, strip_prefix="net.")


def test_a_shared_prefix_that_does_not_fit_is_reported_after_stripping(tmp_path):
    torch.save({f"model.{k}": v for k, v in reference().state_dict().items()}, tmp_path / "w.pt")
    with pytest.raises(ModelSourceError) as info:
        load_model(tmp_path / "w.pt", arch=ARCH, num_classes=10)
    message = str(info.value)  # the classifier's shape, not 90 missing and 90 unexpected keys
    assert "fc.weight (1000, 96) vs (10, 96)" in message and "missing" not in message
    assert "without the prefix 'model.'" in message and "--num-classes 1000" in message


def test_a_checkpoint_whose_weights_sit_under_an_unknown_key_names_the_flag(tmp_path):
    original = reference()
    torch.save({"weights": original.state_dict(), "step": 3}, tmp_path / "odd.pt")
    refused = invoke(str(tmp_path / "odd.pt"), "--arch", ARCH)
    assert refused.exit_code == 1 and "--checkpoint-key weights" in refused.output
    assert invoke(str(tmp_path / "odd.pt"), "--arch", ARCH, "--checkpoint-key", "weights").exit_code == 0
    with pytest.raises(ModelSourceError, match="no entry 'weigths'.*did you mean 'weights'"):
        load_model(tmp_path / "odd.pt", arch=ARCH, checkpoint_key="weigths")


def test_a_wrong_class_count_names_the_flag_and_the_flag_works(tmp_path):
    torch.manual_seed(0)
    original = timm.create_model("test_resnet", num_classes=10).eval()
    torch.save(original.state_dict(), tmp_path / "ten.pt")
    refused = invoke(str(tmp_path / "ten.pt"), "--arch", ARCH)
    assert refused.exit_code == 1 and "pass --num-classes 10" in refused.output
    assert invoke(str(tmp_path / "ten.pt"), "--arch", ARCH, "--num-classes", "10").exit_code == 0


def test_a_directory_names_the_model_files_inside(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    refused = invoke(str(run))
    assert refused.exit_code == 1 and "is a directory and holds no model file" in refused.output
    torch.save(reference().state_dict(), run / "best.pth")
    (run / "log.txt").write_text("epoch 1")
    refused = invoke(str(run), "--arch", ARCH)
    assert refused.exit_code == 1 and f"e.g. {run / 'best.pth'}" in refused.output
    assert invoke(str(run / "best.pth"), "--arch", ARCH).exit_code == 0


def test_files_are_read_by_content_not_by_suffix(tmp_path):
    original = reference()
    save_file(original.state_dict(), str(tmp_path / "renamed.pt"))  # a .safetensors file renamed .pt
    torch.save({"state_dict": original.state_dict()}, tmp_path / "checkpoint.pth.tar")  # ImageNet example style
    for name in ("renamed.pt", "checkpoint.pth.tar"):
        model, _ = load_model(tmp_path / name, arch=ARCH)
        assert torch.equal(output(model), output(original)), name
        assert invoke(str(tmp_path / name), "--arch", ARCH).exit_code == 0
    # the other way round, torch.load itself would read the file as safetensors: the message says to rename it
    torch.save(original.state_dict(), tmp_path / "pickle.safetensors")
    refused = invoke(str(tmp_path / "pickle.safetensors"), "--arch", ARCH)
    assert refused.exit_code == 1 and "holds a torch.save checkpoint" in refused.output
    assert "rename it to pickle.pt" in refused.output
    (tmp_path / "pickle.safetensors").rename(tmp_path / "pickle.pt")
    assert invoke(str(tmp_path / "pickle.pt"), "--arch", ARCH).exit_code == 0
    Path(tmp_path / "notes.tar").write_bytes(b"just some text, not weights")
    with pytest.raises(ModelSourceError, match="neither a torch.save checkpoint nor a safetensors file"):
        load_model(tmp_path / "notes.tar", arch=ARCH)
    Path(tmp_path / "broken.safetensors").write_bytes(b"just some text, not weights")  # not told to rename it
    with pytest.raises(ModelSourceError, match="not a readable safetensors file.*corrupt"):
        load_model(tmp_path / "broken.safetensors", arch=ARCH)
