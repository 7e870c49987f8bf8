"""Evaluation at scale: per-sample records, the original model's results cached, resumable runs.

The model is the parity CNN of ``conftest`` with a calibrated MeanSparse on its logits (as in
test_evaluate). Where a test needs to know exactly which sample an attack breaks, the attack is a stub put in
place of ``run_attack`` that breaks samples chosen by their position; elsewhere the real AutoAttack runs and
the stub only counts (or interrupts) its calls.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from _ranks import launch_ranks  # tests/ is on sys.path (pytest prepends it)
from torch import nn

import graphsparse as gs
from graphsparse.data import load_dataset
from graphsparse.errors import EvaluationError
from graphsparse.ops import operators
from graphsparse.robust import attack_cache
from graphsparse.robust.evaluate import evaluate
from graphsparse.robust.per_sample import PerSample, pack_bits, unpack_bits
from graphsparse.robust.samples import pick_samples

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"eps": 0.2, "n": 16, "steps": 2, "batch_size": 8}


def _variant_of(model: nn.Module) -> str:
    op = operators(model)["logits"]
    if float(op.alpha) == 0.0:
        return "base"
    return "bpda" if op.backward_mode != "exact" else "exact"


class Calls:
    """A stand-in for ``run_attack``: counts its calls, may break chosen positions or interrupt a call."""

    def __init__(self, monkeypatch, breaks=None, interrupt_at=None) -> None:
        self.real = attack_cache.run_attack
        self.breaks = breaks  # variant -> set of positions (in the picked samples' source order) it breaks
        self.interrupt_at = interrupt_at
        self.count = 0
        monkeypatch.setattr(attack_cache, "run_attack", self)

    def __call__(self, model, s, attack, **kw):
        self.count += 1
        if self.count == self.interrupt_at:
            raise KeyboardInterrupt
        if self.breaks is None:
            return self.real(model, s, attack, **kw)
        broken = self.breaks[_variant_of(model)]
        return torch.tensor([int(p) not in broken for p in s.positions]), []


# ----------------------------------------------------------------------------------- per-sample records


def test_bits_round_trip_compactly():
    flags = np.array([True, False, True, True, False, False, False, True, True])
    text = pack_bits(flags)
    assert len(text) == 4  # 9 bits -> 2 bytes -> 4 base64 characters
    assert unpack_bits(text, 9).tolist() == flags.tolist()
    with pytest.raises(gs.GraphsparseError, match="holds 16 bits"):
        unpack_bits(text, 17)


def test_worst_case_is_per_sample_and_below_both_aggregates(masked, test_split, monkeypatch):
    picked = pick_samples(test_split, 8, 0)
    pos = [int(p) for p in picked.positions]
    # exact breaks the last four samples, BPDA the first two and the last two: each leaves 4 of 8 (50%),
    # but only samples 2 and 3 survive both: 25%. Samples 0 and 1 resist exact and fall to BPDA.
    Calls(monkeypatch, breaks={"base": set(pos), "exact": set(pos[4:]), "bpda": set(pos[:2] + pos[6:])})
    report = evaluate(masked, test_split, eps=0.2, n=8, batch_size=4)
    assert report.exact.robust["apgd-ce"] == 50.0 and report.bpda.robust["apgd-ce"] == 50.0
    assert report.worst_case == {"apgd-ce": 25.0}
    assert report.honest("apgd-ce") == 25.0
    assert report.masked_samples == {"apgd-ce": [int(i) for i in picked.indices[:2]]}
    assert report.verdict.startswith("apgd-ce: worst case per sample over exact and BPDA 25.00% robust of 8")
    assert report.gradient_masking

    d = json.loads(json.dumps(report.to_dict()))
    flags = PerSample.from_dict(d["per_sample"], 8)
    assert flags.robust["exact"]["apgd-ce"].tolist() == [True] * 4 + [False] * 4
    assert flags.robust["bpda"]["apgd-ce"].tolist() == [False, False, True, True, True, True, False, False]
    assert flags.robust["base"]["apgd-ce"].tolist() == [False] * 8
    assert all(len(row) == 4 for row in d["per_sample"]["clean"].values())  # 8 samples: one byte of base64
    assert d["indices"] == [int(i) for i in picked.indices]


@pytest.mark.slow
def test_eval_cli_leads_with_the_worst_case_and_caches_beside_the_artifact(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from graphsparse.cli import main

    def run(*args: str):
        return CliRunner().invoke(main, list(args), catch_exceptions=False)

    art = tmp_path / "demo.safetensors"
    res = run("rewrite", "graphsparse.demo.models:DemoPreActResNet", "--rule", "after_addition", "--input-shape",
              "1,1,8,8", "--data", "digits", "-o", str(art))
    assert res.exit_code == 0, res.output
    model = gs.load(art)
    gs.set_alpha(model, 0.5)
    gs.save(model, art)
    calls = Calls(monkeypatch)
    cmd = ["eval", str(art), "--data", "digits", "--n", "8", "--steps", "1", "--eps", "0.1", "--batch-size", "4"]
    res = run(*cmd)
    assert res.exit_code == 0, res.output
    assert calls.count == 6  # 2 chunks of 4, three variants
    assert "worst of exact/BPDA per sample" in res.output.split("base (α = 0)")[0]  # the first row
    assert (tmp_path / "demo.safetensors.attack-cache.json").exists()
    assert not (tmp_path / "demo.safetensors.eval-state.json").exists()  # removed once finished
    res = run(*cmd, "--json")
    assert res.exit_code == 0, res.output
    assert calls.count == 6 + 4  # the base model's 2 chunks come from the cache
    res = run(*cmd, "--no-cache")
    assert res.exit_code == 0, res.output
    assert calls.count == 10 + 6
    record = gs.rewrite_info(gs.load(art)).records["evaluation"]
    flags = PerSample.from_dict(record["per_sample"], record["n"])
    worst = flags.worst_case("apgd-ce")
    assert record["worst_case"]["apgd-ce"] == pytest.approx(100 * worst.mean())
    assert record["worst_case"]["apgd-ce"] <= min(record[v]["robust"]["apgd-ce"] for v in ("exact", "bpda"))


def test_progress_counts_samples_chunk_by_chunk_with_the_robust_so_far(masked, test_split, monkeypatch):
    picked = pick_samples(test_split, 16, 0)
    pos = [int(p) for p in picked.positions]
    Calls(monkeypatch, breaks={"base": set(pos[:3]), "exact": set(pos[8:]), "bpda": set(pos)})
    seen = []
    evaluate(masked, test_split, eps=0.2, n=16, batch_size=8, progress=lambda *a: seen.append(a))
    assert [s[:2] for s in seen] == [
        (8, 48), (16, 48), (16, 48),  # base: chunk 0, chunk 1, done
        (24, 48), (32, 48), (32, 48),  # exact
        (40, 48), (48, 48), (48, 48),  # BPDA
    ]
    assert [s[2] for s in seen[:4]] == [
        "base: apgd-ce: 5 of 8 robust", "base: apgd-ce: 13 of 16 robust", "base: apgd-ce: 13 of 16 robust",
        "exact: apgd-ce: 8 of 8 robust",
    ]


# ------------------------------------------------------------------------------------------------ cache


def test_the_original_models_results_are_cached_and_invalidated(masked, test_split, tmp_path, monkeypatch):
    path = tmp_path / "cache.json"
    calls = Calls(monkeypatch)
    first = evaluate(masked, test_split, cache=path, **SMALL)
    assert calls.count == 6  # base, exact, BPDA: 2 chunks of 8 each
    second = evaluate(masked, test_split, cache=path, **SMALL)
    assert calls.count == 6 + 4  # the base model is read from the cache
    assert second.per_sample.to_dict() == first.per_sample.to_dict()
    assert second.to_dict()["base"] == first.to_dict()["base"]

    for change in ({"eps": 0.1}, {"n": 24}, {"attacks": ["fab"]}, {"seed": 1}, {"steps": 3}):
        before = calls.count
        evaluate(masked, test_split, cache=path, **dict(SMALL, **change))
        chunks = 3 if change.get("n") == 24 else 2
        assert calls.count - before == 3 * chunks, change
    other = copy.deepcopy(masked)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)  # another original model
    before = calls.count
    evaluate(other, test_split, cache=path, **SMALL)
    assert calls.count - before == 6
    # new statistics (calibrated again) leave the original model as it was: still cached
    ops = operators(masked)
    with torch.no_grad():
        ops["logits"].mean.add_(0.5)
    before = calls.count
    evaluate(masked, test_split, cache=path, **SMALL)
    assert calls.count - before == 4


def test_alpha_zero_is_attacked_once_and_tuning_shares_the_cache(masked, parity_source, tmp_path, monkeypatch):
    val = load_dataset(parity_source, split="val")
    calls = Calls(monkeypatch)
    path = tmp_path / "cache.json"
    gs.tune(masked, val, alphas=[0.0, 0.5], bpda=True, attack_cache=path, **SMALL)
    assert calls.count == 2 + 2 * 2  # α = 0 once (exact and BPDA are the same model there), α = 0.5 twice
    gs.tune(masked, val, alphas=[0.0, 0.5], bpda=True, attack_cache=path, **SMALL)
    assert calls.count == 6 + 4
    gs.set_alpha(masked, 0.0)
    before = calls.count
    evaluate(masked, val, cache=path, **SMALL)  # the original model on the same samples: nothing to attack
    assert calls.count == before


def test_a_damaged_cache_is_refused_with_a_hint(masked, test_split, tmp_path):
    path = tmp_path / "cache.json"
    path.write_text("{not json")
    with pytest.raises(EvaluationError, match="cannot be read.*delete it"):
        evaluate(masked, test_split, cache=path, **SMALL)
    path.write_text(json.dumps({"something": "else"}))
    with pytest.raises(EvaluationError, match="not a graphsparse attack cache"):
        evaluate(masked, test_split, cache=path, **SMALL)


def test_caches_opened_on_one_file_keep_each_others_entries(tmp_path):
    path = tmp_path / "cache.json"
    first, second = attack_cache.AttackCache(path), attack_cache.AttackCache(path)  # opened before any write
    first.put_attack("a", np.array([True, False]), [])
    second.put_clean("b", np.array([False, True, True]), 2)
    reread = attack_cache.AttackCache(path)
    assert reread.get_attack("a", 2)[0].tolist() == [True, False]
    assert reread.get_clean("b", 3)[0].tolist() == [False, True, True] and reread.get_clean("b", 3)[1] == 2
    assert first.get_clean("b", 3)[1] == 2  # a miss reads what another process wrote since
    assert first.get_attack("c", 2) is None


def _put_many(path, worker: int, count: int) -> None:
    cache = attack_cache.AttackCache(path)
    for i in range(count):
        cache.put_attack(f"{worker}-{i}", np.array([i % 2 == 0]), [])


def test_processes_writing_one_cache_at_once_lose_nothing(tmp_path):
    """Writers take the lock, read, merge and write: every entry of every process is in the file at the end."""
    import multiprocessing

    path = tmp_path / "cache.json"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_put_many, args=(path, w, 25)) for w in range(3)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
    assert [p.exitcode for p in workers] == [0, 0, 0]
    entries = json.loads(path.read_text())["entries"]
    assert sorted(entries) == sorted(f"{w}-{i}" for w in range(3) for i in range(25))


# ----------------------------------------------------------------------------------------------- resume


def test_an_interrupted_evaluation_resumes_to_the_uninterrupted_report(masked, test_split, tmp_path, monkeypatch):
    settings = dict(SMALL, n=32)  # 4 chunks of 8 per variant: 12 attack calls
    whole = evaluate(masked, test_split, **settings)
    state = tmp_path / "state.json"
    calls = Calls(monkeypatch, interrupt_at=6)  # base: 4 chunks, exact: chunk 0 done, chunk 1 interrupted
    with pytest.raises(KeyboardInterrupt):
        evaluate(masked, test_split, state=state, **settings)
    assert state.exists()
    with pytest.raises(EvaluationError, match=r"other arguments \(eps differ\).*delete it"):
        evaluate(masked, test_split, state=state, **dict(settings, eps=0.1))
    calls.count, calls.interrupt_at = 0, None
    resumed = evaluate(masked, test_split, state=state, **settings)
    assert calls.count == 12 - 5
    assert not state.exists()
    a, b = whole.to_dict(), resumed.to_dict()
    a.pop("date"), b.pop("date")
    assert a == b
    exact = whole.per_sample.robust["exact"]["apgd-ce"]
    assert exact.tolist() == resumed.per_sample.robust["exact"]["apgd-ce"].tolist()


def test_autoattack_runs_no_forward_of_a_clean_chunk_that_evaluate_has_already_run(masked, test_split):
    """AutoAttack's checks of the forward pass (5 forwards for a randomised defence, 1 for a dynamic one) run on
    the first chunk of base and exact (bpda has exact's forward pass); its clean pass and output-range check of
    every chunk read evaluate's clean logits. Counted: forwards of a whole clean chunk other than evaluate's clean
    pass (which takes the input gradient) and the attack's own (APGD starts with one)."""
    import sys

    picked = pick_samples(test_split, 24, 0)
    chunks = [picked.x[a : a + 8] for a in range(0, 24, 8)]
    seen: list[tuple[str, int]] = []

    def count(module, args):
        x = args[0]
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_filename.endswith("autopgd_base.py"):
                return  # the attack's own forward
            frame = frame.f_back
        if not x.requires_grad:  # not evaluate's clean pass, which takes the gradient
            for c, chunk in enumerate(chunks):
                if x.shape == chunk.shape and torch.equal(x, chunk):
                    seen.append((_variant_of(module), c))

    hook = masked.register_forward_pre_hook(count)
    try:
        evaluate(masked, test_split, **dict(SMALL, n=24))  # 3 chunks of 8, three variants
    finally:
        hook.remove()
    assert sorted(seen) == [("base", 0)] * 6 + [("exact", 0)] * 6


def test_clean_logits_handed_to_autoattack_change_no_outcome(masked, test_split, monkeypatch):
    """The same evaluation with AutoAttack running every clean forward itself (and the re-check forwarding
    every sample): the same report, per-sample records and messages included."""
    from graphsparse.robust import attacks

    served = evaluate(masked, test_split, **dict(SMALL, n=24))
    calls = []

    class Unserved:
        def __init__(self, model, x, logits, device):
            self.model = model

        def __call__(self, x):
            calls.append(1)
            return self.model(x)

    monkeypatch.setattr(attacks, "_CleanLogits", Unserved)
    monkeypatch.setattr(attacks, "forward_batches", lambda model, x, batch_size, device: _all_forwarded(model, x))
    unserved = evaluate(masked, test_split, **dict(SMALL, n=24))
    assert calls  # the stand-in ran
    a, b = served.to_dict(), unserved.to_dict()
    a.pop("date"), b.pop("date")
    assert a == b


def _all_forwarded(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


class _Noisy(nn.Module):
    """A randomised defence: noise on the logits at every forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * torch.randn_like(x)


class _Dynamic(nn.Module):
    """A dynamic defence: the forward pass computes a gradient (of its input's norm) and steps along it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            z = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(z.norm(), [z])
        return x + 1e-3 * g


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        (_Noisy(), "randomized defense"),
        (_Dynamic(), "dynamic defense"),
        (nn.Softmax(dim=1), "probability distribution"),
    ],
)
def test_autoattacks_model_checks_still_speak(masked, test_split, tail, expected):
    """The checks AutoAttack runs on the model (randomised, dynamic, probabilities instead of logits) still
    reach the report, for base and exact, with clean logits handed to AutoAttack."""
    model = nn.Sequential(*copy.deepcopy(masked), tail).eval()
    report = evaluate(model, test_split, **dict(SMALL, n=16))
    for v in ("base", "exact"):
        said = [w for w in report.warnings if w.startswith(f"{v}/apgd-ce: AutoAttack:")]
        assert any(expected in w for w in said), report.warnings


def test_a_chunks_outcome_does_not_depend_on_the_other_chunks(masked, test_split):
    """What makes resuming (and sharding) exact: the samples of one chunk, attacked alone, fare the same."""
    whole = evaluate(masked, test_split, **dict(SMALL, n=32))
    picked = pick_samples(test_split, 32, 0)
    x, y = picked.x[8:16], picked.y[8:16]
    alone = evaluate(masked, (x, y), eps=0.2, steps=2, batch_size=8)
    for v in ("base", "exact", "bpda"):
        assert alone.per_sample.robust[v]["apgd-ce"].tolist() == whole.per_sample.robust[v]["apgd-ce"][8:16].tolist()


# ------------------------------------------------------------------------------------------ distributed


HANG_LIMIT_S = 600
"""A rank that runs this long is hung (a collective left waiting); the limit is for that, not for speed."""


def _run_workers(out, world_size: int = 2) -> tuple[list[int], str]:
    """Start tests/_dist_eval_worker.py on ``world_size`` gloo ranks (as test_calibrate does, with a file
    rendezvous instead of a port)."""
    import os
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
        "WORLD_SIZE": str(world_size),
        "OMP_NUM_THREADS": "1",
    }
    return launch_ranks(repo / "tests" / "_dist_eval_worker.py", out, world_size, env, HANG_LIMIT_S)


@pytest.mark.slow
def test_two_gloo_processes_give_the_one_process_report(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import _dist_eval_worker as worker

    codes, output = _run_workers(tmp_path)
    assert codes == [0, 0], output
    reports = [json.loads((tmp_path / f"report{r}.json").read_text()) for r in range(2)]
    tunes = [json.loads((tmp_path / f"tune{r}.json").read_text()) for r in range(2)]
    assert reports[0] == reports[1] and tunes[0] == tunes[1]  # every rank holds the whole report
    attacked = [json.loads((tmp_path / f"attacked{r}.json").read_text()) for r in range(2)]
    assert [len(a) for a in attacked] == [3 * 3, 3 * 2]  # 5 chunks of 8: rank 0 has 0, 2, 4; rank 1 has 1, 3
    for variant in range(3):  # base, exact, BPDA in turn: the ranks' chunks are disjoint and cover the samples
        mine, theirs = attacked[0][3 * variant : 3 * variant + 3], attacked[1][2 * variant : 2 * variant + 2]
        positions = [p for chunk in mine + theirs for p in chunk]
        assert sorted(positions) == sorted(set(positions)) and len(positions) == 40

    model = worker.build_model()
    single = gs.evaluate(model, load_dataset("digits", split="test"), **worker.EVAL)
    assert reports[0] == worker.without_date(single.to_dict())  # per-sample records included
    robust = single.per_sample.robust["exact"]["apgd-ce"]
    assert 0 < robust.sum() < len(robust)  # some samples fall, some hold: the comparison has content
    tuned = gs.tune(model, load_dataset("digits", split="val"), **worker.TUNE)
    assert tunes[0] == worker.without_date(tuned.to_dict())


@pytest.mark.slow
def test_graphsparse_eval_under_torchrun_prints_and_writes_once_the_one_process_report(tmp_path):
    import os
    import subprocess
    import sys

    from click.testing import CliRunner

    from graphsparse.cli import main

    art = tmp_path / "demo.safetensors"
    res = CliRunner().invoke(main, ["rewrite", "graphsparse.demo.models:DemoPreActResNet", "--rule", "after_addition",
                                    "--input-shape", "1,1,8,8", "--data", "digits", "-o", str(art)])
    assert res.exit_code == 0, res.output
    args = ["eval", str(art), "--data", "digits", "--n", "16", "--steps", "2", "--eps", "0.1", "--batch-size", "8",
            "--json", "--no-cache"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "--",
         "graphsparse", *args],
        env=env, capture_output=True, text=True, timeout=HANG_LIMIT_S, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    two = json.loads(run.stdout)  # one report: rank 1 prints nothing
    assert run.stderr.count("wrote the evaluation record") == 1
    assert [p.name for p in tmp_path.iterdir() if "eval-state" in p.name] == []
    record = gs.rewrite_info(gs.load(art)).records["evaluation"]
    assert record["per_sample"] == two["per_sample"]
    one = json.loads(CliRunner().invoke(main, args, catch_exceptions=False).stdout)
    for report in (one, two):
        report.pop("date")
    assert one == two


def test_commands_leave_the_process_group_they_joined_only_after_succeeding(tmp_path, monkeypatch):
    """A command that joined torchrun's group destroys it when it returns (gloo's threads left to the interpreter's
    shutdown abort a rank at exit); after an error, and for a group the user made, the group is left alone."""
    import torch.distributed as dist

    from graphsparse.cli import _dist

    def group(name: str) -> None:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.FileStore(str(tmp_path / name), 1))

    @_dist.leaves_torchrun
    def command(fail: bool) -> str:
        if fail:
            raise RuntimeError("boom")
        return "done"

    try:
        group("user")
        assert command(False) == "done" and dist.is_initialized()  # not ours: left alone
        dist.destroy_process_group()
        group("ours")
        monkeypatch.setattr(_dist, "_joined", True)
        with pytest.raises(RuntimeError, match="boom"):
            command(True)
        assert dist.is_initialized()  # after an error: no barrier the other ranks may never reach
        assert command(False) == "done" and not dist.is_initialized() and not _dist._joined
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
