"""`graphsparse demo --fast` end to end: the table it prints is parsed and checked against the artifact."""

from __future__ import annotations

import re

import pytest
import torch
from click.testing import CliRunner

import graphsparse as gs
from graphsparse.cli import main
from graphsparse.data import load_dataset
from graphsparse.demo.models import load_demo_model


@pytest.mark.slow
def test_demo_fast_end_to_end(tmp_path):
    res = CliRunner().invoke(main, ["demo", "--fast", "--output-dir", str(tmp_path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = {}
    for line in res.output.splitlines():
        m = re.match(r"[│|]\s*(base \(α = 0\)|rewritten, exact gradient|rewritten, BPDA gradient)\s*[│|]"
                     r"\s*([\d.]+)\s*[│|]\s*([\d.]+)", line)
        if m:
            rows[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    assert set(rows) == {"base (α = 0)", "rewritten, exact gradient", "rewritten, BPDA gradient"}, res.output
    for clean, robust in rows.values():
        assert 0 <= robust <= clean <= 100

    artifact = tmp_path / "demo.after_addition.safetensors"
    assert artifact.is_file() and (tmp_path / "tuning.png").stat().st_size > 1000
    model = gs.load(artifact)
    records = gs.rewrite_info(model).records
    assert {"calibration", "tuning", "evaluation"} <= set(records)
    # tuning saw validation samples only; evaluation test samples only
    assert records["tuning"]["split"] == "val" and records["evaluation"]["split"] == "test"
    # tuned with BPDA too: every α of the curve has its adaptive-attack figure
    assert all(point["robust_bpda"] is not None for point in records["tuning"]["curve"])
    assert not set(records["tuning"]["indices"]) & set(records["evaluation"]["indices"])

    # the base row is the shipped model, measured independently on the same test samples
    test = load_dataset("mnist5k", split="test")
    pos = {int(i): p for p, i in enumerate(test.indices)}
    xs = torch.stack([test[pos[i]][0] for i in records["evaluation"]["indices"]])
    ys = torch.tensor([int(test[pos[i]][1]) for i in records["evaluation"]["indices"]])
    with torch.no_grad():
        clean = 100.0 * float((load_demo_model()(xs).argmax(1) == ys).float().mean())
    assert clean == pytest.approx(rows["base (α = 0)"][0], abs=0.01)
    assert float(next(iter(gs.operators(model).values())).alpha) == pytest.approx(records["tuning"]["chosen_alpha"])


def test_demo_architecture_with_relu_takes_sparta_at_stage_ends():
    from graphsparse.demo.models import DemoPreActResNet

    model = DemoPreActResNet(act="relu", blocks=1)
    x = torch.zeros(1, 1, 28, 28)
    sites = gs.find_sites(model, x)
    stage_last_relus = [s.id for s in sites if s.last_in_stage and s.op == "relu"]
    rewritten = gs.rewrite(model, "sparta_stage_last", x)
    spartas = [p for p, m in rewritten.named_modules() if isinstance(m, gs.Sparta)]
    assert len(spartas) == len(stage_last_relus) == 2  # the last stage ends on a residual addition
    assert not any(isinstance(m, torch.nn.ReLU) for m in load_demo_model().modules())  # shipped model: GELU
