"""Tuning α: validation split only, clean-drop bound, records and files.

The model is a small CNN trained for a few seconds on the parity of scikit-learn's 8×8 digits, rewritten
with the ``before_activations`` rule (three MeanSparse sites in two stages) and calibrated on the
training split.
"""

from __future__ import annotations

import csv
import json
import os
import re

import pytest
import torch
from torch import nn

import graphsparse as gs
from graphsparse.data import load_dataset, split_indices
from graphsparse.errors import CalibrationError, DataError, EvaluationError, PlanError
from graphsparse.ops import MeanSparse, operators
from graphsparse.robust.tune import DEFAULT_ALPHAS, SplitWarning, TunePoint, TuneResult, select_alpha, site_stages, tune

N_DIGITS = 1797
FAST = {"eps": 0.1, "n": 64, "steps": 5, "batch_size": 64}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(parity_net) -> nn.Module:
    return parity_net


@pytest.fixture()
def model(trained, parity_source) -> nn.Module:
    """A fresh rewritten (``deepcopy`` of a GraphModule drops its rewrite info) and calibrated model."""
    train = load_dataset(parity_source, split="train")
    model = gs.rewrite(trained, "before_activations", train.tensors[0][:2])
    gs.calibrate(model, gs.make_loader(train, 512))
    return model


@pytest.fixture()
def val(parity_source):
    return load_dataset(parity_source, split="val")


def alphas_of(model: nn.Module) -> dict[str, float]:
    return {site: float(op.alpha) for site, op in operators(model).items()}


# ------------------------------------------------------------------------------------------- splits


def test_tuning_refuses_test_data_in_any_wrapping(model, parity_source):
    test = load_dataset(parity_source, split="test")
    before = alphas_of(model)
    for data in (
        test,
        torch.utils.data.Subset(test, list(range(50))),
        torch.utils.data.DataLoader(test, batch_size=16),
        torch.utils.data.DataLoader(torch.utils.data.Subset(test, [1, 2, 3]), batch_size=2),
    ):
        with pytest.raises(DataError, match="refusing to tune on the 'test' split"):
            tune(model, data, alphas=[0.0, 0.1], **FAST)
    every = load_dataset(parity_source, split="all")
    with pytest.raises(DataError, match=r"refusing to tune on the 'all' split \(it holds the test samples\): choosing"):
        tune(model, torch.utils.data.Subset(every, list(range(50))), alphas=[0.0, 0.1], **FAST)
    assert alphas_of(model) == before
    assert "tuning" not in gs.rewrite_info(model).records


def test_data_whose_split_cannot_be_told_gives_a_visible_warning(model, val, parity_source):
    with pytest.warns(SplitWarning, match="no split bookkeeping, so tuning cannot tell whether it is test data"):
        result = tune(model, val.tensors, alphas=[0.0, 0.2], **FAST)
    assert result.split is None and any("no split bookkeeping" in w for w in result.warnings)
    with pytest.warns(SplitWarning, match="tuned on the 'train' split"):
        tune(model, load_dataset(parity_source, split="train"), alphas=[0.0, 0.2], **FAST)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", SplitWarning)
        tune(model, val, alphas=[0.0, 0.2], **FAST)  # the validation split: no warning


def test_tuning_reads_only_validation_indices_and_records_them(model, val):
    result = tune(model, val, alphas=[0.0, 0.2], **FAST)
    splits = split_indices(N_DIGITS, 0)
    used = set(result.indices)
    assert result.split == "val" and len(used) == result.n == 64
    assert used <= set(splits["val"].tolist())
    assert used.isdisjoint(splits["test"].tolist())
    record = gs.rewrite_info(model).records["tuning"]
    assert record == result.to_dict() and record["split"] == "val"
    assert json.loads(json.dumps(record)) == record


# ---------------------------------------------------------------------------------------- selection


def test_selection_respects_the_clean_drop_bound():
    curve = [
        TunePoint(0.0, clean=95.0, robust=40.0),
        TunePoint(0.1, clean=94.8, robust=44.0),  # drop 0.2: allowed
        TunePoint(0.2, clean=94.5, robust=47.0),  # drop 0.5: allowed (the bound is inclusive)
        TunePoint(0.3, clean=93.0, robust=60.0),  # highest robust, but drops 2 points
    ]
    assert select_alpha(curve, max_clean_drop=0.5).alpha == 0.2
    assert select_alpha(curve, max_clean_drop=0.49).alpha == 0.1
    assert select_alpha(curve, max_clean_drop=2.0).alpha == 0.3
    assert select_alpha(curve, max_clean_drop=0.0).alpha == 0.0
    # with BPDA measured the worse number decides: the masked gain at 0.2 does not count
    with_bpda = [
        TunePoint(0.0, 95.0, 40.0, 40.0),
        TunePoint(0.1, 95.0, 44.0, 43.0),
        TunePoint(0.2, 95.0, 50.0, 38.0),
    ]
    assert select_alpha(with_bpda, max_clean_drop=0.5).alpha == 0.1
    # ties: higher clean, then smaller alpha
    ties = [TunePoint(0.0, 95.0, 40.0), TunePoint(0.1, 95.0, 45.0), TunePoint(0.2, 95.0, 45.0)]
    assert select_alpha(ties).alpha == 0.1
    # a non-zero α wins only with a robust gain: one more sample classified clean is no reason to move
    no_gain = [TunePoint(0.0, 95.0, 40.0), TunePoint(0.2, 95.8, 40.0), TunePoint(0.4, 96.0, 40.0)]
    assert select_alpha(no_gain).alpha == 0.0
    assert select_alpha(no_gain, reference_alpha=0.2).alpha == 0.2  # a stage keeps its α unless another gains
    gain = no_gain + [TunePoint(0.3, 94.9, 40.8)]
    assert select_alpha(gain).alpha == 0.3
    with pytest.raises(EvaluationError, match="alpha = 0"):
        select_alpha(curve[1:])


def test_sweep_chooses_within_the_bound_and_sets_alpha(model, val):
    alphas = [0.0, 0.25, 0.5, 1.0, 2.0]
    result = tune(model, val, alphas=alphas, bpda=True, max_clean_drop=0.5, **FAST)
    assert [p.alpha for p in result.curve] == alphas
    base = result.curve[0]
    assert base.robust == base.robust_bpda  # α = 0: the two gradients are the same
    assert result.curve[-1].clean < base.clean - 0.5, "α = 2 should break the bound (test premise)"
    chosen = result.chosen
    assert base.clean - chosen.clean <= 0.5
    feasible = [p for p in result.curve if base.clean - p.clean <= 0.5]
    assert chosen.score == max(p.score for p in feasible)
    assert result.criterion == "min(robust, robust_bpda)"
    assert set(alphas_of(model).values()) == {result.chosen_alpha}
    assert result.site_alphas == alphas_of(model)


def test_statistics_are_not_recomputed(model, val):
    stats = {site: (op.mean.clone(), op.var.clone()) for site, op in operators(model).items()}
    tune(model, val, alphas=[0.0, 0.5], **FAST)
    for site, op in operators(model).items():
        assert torch.equal(op.mean, stats[site][0]) and torch.equal(op.var, stats[site][1])


def test_per_stage_search_uses_the_plan_stages(model, val):
    stages, known = site_stages(model)
    assert known and stages == {"1": 0, "3": 1, "6": 1}
    seen = []
    result = tune(model, val, alphas=[0.0, 0.5], per_stage=True, progress=lambda *a: seen.append(a), **FAST)
    assert sorted(result.stage_alphas) == [0, 1]
    assert {p.stage for p in result.stage_curve} == {0, 1} and len(result.stage_curve) == 4
    a = alphas_of(model)
    assert a["3"] == a["6"] == result.stage_alphas[1] and a["1"] == result.stage_alphas[0]
    assert result.site_alphas == a
    baseline = result.baseline_clean
    assert all(baseline - p.clean <= 0.5 for p in result.stage_curve if p.alpha == result.stage_alphas[p.stage])
    assert seen[-1][0] == seen[-1][1] == (2 + 4) * 64  # samples attacked: 6 α configurations of 64


def test_progress_counts_samples_chunk_by_chunk_with_the_robust_so_far(model, val):
    seen = []
    tune(model, val, alphas=[0.0, 0.5], bpda=True, progress=lambda *a: seen.append(a), **dict(FAST, batch_size=32))
    total = 2 * 2 * 64  # α values × (exact, BPDA) × samples
    assert {s[1] for s in seen} == {total} and seen[-1][:2] == (total, total)
    assert [s[0] for s in seen] == sorted(s[0] for s in seen)
    # α = 0.5 with the exact gradient, mid-way: its first chunk of 32 samples, with the robust count so far
    mid = [s for s in seen if s[0] == 2 * 64 + 32]
    assert mid and re.fullmatch(r"alpha=0\.5 exact: \d+ of 32 robust", mid[0][2])
    assert (2 * 64, total, "alpha=0") in seen and re.fullmatch(r"alpha=0\.5 bpda: \d+ of 64 robust", seen[-2][2])


# ------------------------------------------------------------------------------------------- files


def test_result_files_are_written_atomically_and_read_back(model, val, tmp_path):
    result = tune(model, val, alphas=[0.0, 0.3], bpda=True, **FAST)
    csv_path = result.to_csv(tmp_path / "curve.csv")
    json_path = result.to_json(tmp_path / "curve.json")
    rows = list(csv.DictReader(csv_path.open()))
    assert list(rows[0]) == ["alpha", "clean", "robust", "robust_bpda"]
    assert [float(r["alpha"]) for r in rows] == [0.0, 0.3]
    assert [float(r["robust"]) for r in rows] == [p.robust for p in result.curve]
    again = TuneResult.from_dict(json.loads(json_path.read_text()))
    assert again == result
    assert sorted(os.listdir(tmp_path)) == ["curve.csv", "curve.json"]  # no temporary files left


def test_default_sweep_is_zero_to_half_in_twentieths():
    assert DEFAULT_ALPHAS == (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)


# ------------------------------------------------------------------------------------------ errors


def test_models_without_operators_or_statistics_are_refused(val):
    with pytest.raises(PlanError, match="no MeanSparse"):
        tune(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), val, **FAST)
    fresh = nn.Sequential(nn.Flatten(), nn.Linear(64, 2), MeanSparse(2, site_id="logits"))
    with pytest.raises(CalibrationError, match="calibrate"):
        tune(fresh, val, **FAST)


def test_alpha_is_restored_when_tuning_fails(model, val):
    gs.set_alpha(model, 0.15)
    before = alphas_of(model)
    with pytest.raises(EvaluationError, match="at least 4 classes"):
        tune(model, val, alphas=[0.0, 0.5], attack="apgd-t", **FAST)
    assert alphas_of(model) == before

    def stop(done, total, label):
        if done == 2 * 64:  # after α = 0.5 was set and measured (64 samples each)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune(model, val, alphas=[0.0, 0.5, 1.0], progress=stop, **FAST)
    assert alphas_of(model) == before
    assert "tuning" not in gs.rewrite_info(model).records


def test_records_made_with_other_statistics_are_flagged_stale_on_every_read(model, trained, val, parity_source,
                                                                            tmp_path):
    from graphsparse.artifact.records import stats_digest

    tune(model, val, alphas=[0.0, 0.5], **FAST)
    gs.evaluate(model, load_dataset(parity_source, split="test"), n=16, steps=1, eps=0.1)
    records = gs.rewrite_info(model).records
    digest = stats_digest(model)
    for key in ("calibration", "tuning", "evaluation"):
        assert records[key]["stats_sha256"] == digest and records[key]["date"].endswith("+00:00"), key
        assert "stale" not in records[key]

    gs.calibrate(model, val)  # other data: other statistics; tuning and evaluation describe the old ones
    records = gs.rewrite_info(model).records
    assert records["tuning"]["stale"] is True and records["evaluation"]["stale"] is True
    assert "stale" not in records["calibration"] and records["calibration"]["stats_sha256"] != digest
    path = gs.save(model, tmp_path / "a.safetensors")
    assert json.loads(gs.read_metadata(path)["records"])["tuning"]["stale"] is True
    loaded = gs.load(path, base=trained)
    assert gs.rewrite_info(loaded).records["evaluation"]["stale"] is True

    gs.calibrate(model, gs.make_loader(load_dataset(parity_source, split="train"), 512))  # the first data again
    records = gs.rewrite_info(model).records
    assert records["calibration"]["stats_sha256"] == digest and not any("stale" in r for r in records.values())


def test_load_checks_the_records_against_the_statistics_it_loads(model, trained, val, tmp_path):
    """Statistics changed without a calibration (by hand): load flags the calibration record itself."""
    from graphsparse.artifact.records import stats_digest

    tune(model, val, alphas=[0.0, 0.5], **FAST)
    path = gs.save(model, tmp_path / "a.safetensors")
    assert not any("stale" in r for r in gs.rewrite_info(gs.load(path, base=trained)).records.values())
    with torch.no_grad():
        for op in operators(model).values():
            op.var.mul_(2)
    records = gs.rewrite_info(gs.load(gs.save(model, path), base=trained)).records
    assert records["calibration"]["stale"] is True and records["tuning"]["stale"] is True
    assert records["tuning"]["stats_sha256"] != stats_digest(model)
