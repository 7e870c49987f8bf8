"""Calibration: exact streaming statistics of every operator's input, resumable and distributed.

The reference statistics are computed here by brute force (capture every operator input with our own
hooks, ``torch.cat``, ``.double().mean()`` / ``.var(unbiased=False)``), sharing no code with
``RunningMoments``.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from _ranks import launch_ranks  # tests/ is on sys.path (pytest prepends it)
from torch import nn

import graphsparse
from graphsparse.data import load_dataset, make_loader
from graphsparse.errors import CalibrationError
from graphsparse.ops import MeanSparse, operators
from graphsparse.stats.calibrate import CalibrationRecord, calibrate
from graphsparse.stats.calibration_state import CalibrationState, load_state, save_state
from graphsparse.stats.moments import RunningMoments

WORKER = Path(__file__).with_name("_dist_calibrate_worker.py")
REPO = Path(graphsparse.__file__).resolve().parents[1]
RTOL = 1e-10


def _load_worker():
    spec = importlib.util.spec_from_file_location("_dist_calibrate_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()


# ------------------------------------------------------------------------------------------ helpers


class Tokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


def conv_model() -> nn.Module:
    """NCHW operators on conv features (axis 1), with a BatchNorm so that eval mode matters."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        MeanSparse(6, site_id="stem.act", depth=0),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, stride=2),
        MeanSparse(4, site_id="layer1.act", depth=1),
        nn.ReLU(),
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    return model


def token_model() -> nn.Module:
    """(B, L, C) operators with channel_axis=-1."""
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(3, 5, 2, stride=2),
        Tokens(),
        MeanSparse(5, channel_axis=-1, site_id="embed", depth=0),
        nn.Linear(5, 7),
        MeanSparse(7, channel_axis=-1, site_id="mlp.act", depth=1),
        nn.GELU(),
    )


def images(n: int = 23, seed: int = 0, shape=(3, 8, 8)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g) * 3.0 + 1.0  # nonzero mean: a naive formula would drift


def batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(x.split(size))


def brute_force(model: nn.Module, data) -> dict[str, tuple[int, torch.Tensor, torch.Tensor]]:
    """count, float64 mean and population variance of every operator's input over ``data``.

    ``data`` is one tensor or a list of batches. The model runs on the same batches as calibration: float32
    convolutions may round differently for another batch size, and that is not what is tested here.
    """
    ops = operators(model)
    inputs: dict[str, list[torch.Tensor]] = {site: [] for site in ops}
    handles = [
        op.register_forward_pre_hook(lambda m, args, site=site: inputs[site].append(args[0].clone()))
        for site, op in ops.items()
    ]
    saved_alpha = {site: float(op.alpha) for site, op in ops.items()}
    was_training = model.training
    try:
        for op in ops.values():
            op.alpha.fill_(0.0)
        model.eval()
        with torch.no_grad():
            for x in [data] if isinstance(data, torch.Tensor) else data:
                model(x)
    finally:
        for h in handles:
            h.remove()
        for site, op in ops.items():
            op.alpha.fill_(saved_alpha[site])
        model.train(was_training)
    result = {}
    for site, op in ops.items():
        axis = op.channel_axis % inputs[site][0].dim()
        t = torch.cat(inputs[site]).double()
        dims = [d for d in range(t.dim()) if d != axis]
        result[site] = (t.numel() // t.shape[axis], t.mean(dim=dims), t.var(dim=dims, unbiased=False))
    return result


def assert_close64(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.float64
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * scale)


def assert_matches(state: CalibrationState, expected: dict) -> None:
    assert list(state.moments) == list(expected)
    for site, (count, mean, var) in expected.items():
        m = state.moments[site]
        assert m.count == count, site
        assert_close64(m.mean, mean)
        assert_close64(m.variance, var)


# ------------------------------------------------------------------------------------ RunningMoments


@pytest.mark.parametrize("size", [1, 7, 1000])
@pytest.mark.parametrize("layout", ["nchw", "tokens"])
def test_running_moments_equal_brute_force_for_any_split(size, layout):
    x = images(19).double() if layout == "nchw" else images(19).flatten(2).transpose(1, 2).double()
    axis = 1 if layout == "nchw" else -1
    dims = [0, 2, 3] if layout == "nchw" else [0, 1]
    m = RunningMoments()
    for part in x[torch.randperm(len(x))].split(size):
        m.update(part.float(), axis)
    assert m.count == x.numel() // x.shape[axis]
    assert_close64(m.mean, x.float().double().mean(dim=dims))
    assert_close64(m.variance, x.float().double().var(dim=dims, unbiased=False))


def test_running_moments_merge_and_state_dict_round_trip():
    x = images(12)
    whole, left, right = RunningMoments(3), RunningMoments(3), RunningMoments(3)
    whole.update(x)
    left.update(x[:5])
    right.update(x[5:])
    merged = left.copy().merge(right)
    assert merged.count == whole.count and left.count == 5 * 64  # merge does not change its argument
    assert_close64(merged.mean, whole.mean)
    assert_close64(merged.m2, whole.m2)
    restored = RunningMoments()
    restored.load_state_dict(merged.state_dict())
    assert restored.count == merged.count and torch.equal(restored.mean, merged.mean)
    assert torch.equal(restored.m2, merged.m2)
    assert RunningMoments(3).merge(RunningMoments(3)).count == 0


def test_running_moments_reject_bad_input():
    m = RunningMoments(4)
    with pytest.raises(ValueError, match="4 channels"):
        m.update(torch.zeros(2, 3, 5), 1)
    with pytest.raises(ValueError, match="out of range"):
        m.update(torch.zeros(2, 4), 2)
    with pytest.raises(ValueError, match="no data"):
        _ = m.variance
    with pytest.raises(ValueError, match="m2"):
        m.load_state_dict({"count": torch.tensor([1]), "mean": torch.zeros(2, dtype=torch.float64)})


def test_running_moments_chunk_large_batches(monkeypatch):
    monkeypatch.setattr(graphsparse.moments, "CHUNK_ELEMENTS", 100)
    x = images(9)
    m = RunningMoments().update(x, 1)
    assert m.count == 9 * 64
    assert_close64(m.mean, x.double().mean(dim=(0, 2, 3)))
    assert_close64(m.variance, x.double().var(dim=(0, 2, 3), unbiased=False))


# ---------------------------------------------------------------------------------------- calibrate


@pytest.mark.parametrize("size", [1, 7, 23])
@pytest.mark.parametrize("make", [conv_model, token_model], ids=["nchw", "tokens"])
def test_calibrate_equals_brute_force(make, size):
    model, x = make(), images(23)
    shuffled = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(size))]
    expected = brute_force(model, batches(shuffled, size))
    record = calibrate(model, batches(shuffled, size))
    assert record.samples == 23 and record.batches == -(-23 // size) and record.world_size == 1
    assert_matches(record.state, expected)
    for site, op in operators(model).items():  # the buffers are the float32 rounding of the float64 results
        m = record.state.moments[site]
        assert op.mean.dtype == torch.float32 and torch.equal(op.mean, m.mean.float())
        assert torch.equal(op.var, m.variance.float())


def test_calibrate_accepts_pairs_and_dataloaders():
    model = conv_model()
    x = images(20)
    y = torch.arange(20)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6)
    seen = []
    record = calibrate(model, loader, progress=lambda done, total: seen.append((done, total)))
    assert_matches(record.state, brute_force(model, batches(x, 6)))
    assert seen[0] == (0, 20) and seen[-1] == (20, 20) and len(seen) == 5
    pairs = calibrate(conv_model(), list(zip(x.split(6), y.split(6))))
    assert_matches(pairs.state, brute_force(model, batches(x, 6)))


def test_statistics_are_those_of_the_base_model_and_alpha_is_restored():
    torch.manual_seed(3)
    model = nn.Sequential(
        MeanSparse(3, site_id="first", depth=0),
        nn.Conv2d(3, 4, 1),
        MeanSparse(4, site_id="second", depth=1),
        nn.Dropout(0.5),
    )
    ops = operators(model)
    with torch.no_grad():
        ops["first"].mean.fill_(2.0)
        ops["first"].var.fill_(1.0)
        ops["first"].alpha.fill_(1.5)  # replaces most of the inputs (uniform in [1, 4]) by 2.0
        ops["second"].alpha.fill_(0.25)
    x = images(16)
    base = copy.deepcopy(model)
    for op in operators(base).values():
        op.alpha.fill_(0.0)
    with torch.no_grad():  # the first op at alpha 1.5 does change the second op's input
        assert not torch.equal(model[1](model[0](x)), base[1](x))
    expected = brute_force(base, batches(x, 5))
    model.train()
    model[1].eval()  # a mixed mode is restored module by module
    calibrate(model, batches(x, 5))
    record = calibrate(model, batches(x, 5))  # calibrating again gives the same base-model statistics
    assert_matches(record.state, expected)
    assert float(ops["first"].alpha) == 1.5 and float(ops["second"].alpha) == 0.25
    assert model.training and not model[1].training and model[3].training


def test_calibrating_twice_replaces():
    model = conv_model()
    calibrate(model, batches(images(10, seed=5), 4))
    record = calibrate(model, batches(images(10, seed=6), 4))
    fresh = conv_model()
    calibrate(fresh, batches(images(10, seed=6), 4))
    assert record.samples == 10 and record.resumed_batches == 0
    for a, b in zip(operators(model).values(), operators(fresh).values()):
        assert torch.equal(a.mean, b.mean) and torch.equal(a.var, b.var)


def test_limits_cut_the_pass():
    model, x = conv_model(), images(23)
    record = calibrate(model, batches(x, 7), max_samples=10)
    assert record.samples == 10 and record.batches == 2
    assert_matches(record.state, brute_force(model, [x[:7], x[7:10]]))
    record = calibrate(model, batches(x, 7), max_batches=2)
    assert record.samples == 14 and record.batches == 2
    assert_matches(record.state, brute_force(model, batches(x[:14], 7)))


def test_nan_in_the_data_names_the_first_site_and_the_batch():
    model, x = conv_model(), images(12)
    x[9, 0, 3, 3] = float("nan")
    ops = operators(model)
    ops["layer1.act"].alpha.fill_(0.5)
    before = {s: op.mean.clone() for s, op in ops.items()}
    model.train()
    with pytest.raises(CalibrationError, match=r"site 'stem\.act' in batch 2"):
        calibrate(model, batches(x, 4))
    assert model.training and float(ops["layer1.act"].alpha) == 0.5  # restored after the failure
    assert all(torch.equal(op.mean, before[s]) for s, op in ops.items())  # nothing half-written
    assert not any(op._forward_pre_hooks for op in ops.values())


def test_inf_produced_inside_the_model_names_the_site_it_reaches():
    class Reciprocal(nn.Module):
        def forward(self, x):
            return 1.0 / x

    model = nn.Sequential(
        MeanSparse(3, site_id="a", depth=0), Reciprocal(), MeanSparse(3, site_id="b", depth=1)
    )
    data = [images(2, seed=1), torch.zeros(2, 3, 8, 8)]
    with pytest.raises(CalibrationError, match=r"site 'b' in batch 1"):
        calibrate(model, data)


def test_empty_data_and_missing_operators_are_errors():
    with pytest.raises(CalibrationError, match="no data"):
        calibrate(conv_model(), [])
    with pytest.raises(CalibrationError, match="rewrite"):
        calibrate(nn.Sequential(nn.Conv2d(3, 3, 1)), [images(2)])
    with pytest.raises(CalibrationError, match="not a tensor"):
        calibrate(conv_model(), ["not a tensor"])

    class Unreached(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = MeanSparse(3, site_id="used", depth=0)
            self.spare = MeanSparse(3, site_id="spare", depth=1)

        def forward(self, x):
            return self.used(x)

    unreached = Unreached()
    with pytest.raises(CalibrationError, match="'spare' received no data"):
        calibrate(unreached, [images(2)])


def test_channel_mismatch_names_the_site():
    model = nn.Sequential(nn.Conv2d(3, 5, 1), MeanSparse(4, site_id="bad.site"))
    with pytest.raises(CalibrationError, match=r"'bad\.site' has 4 channels"):
        calibrate(model, [images(2)])


def test_distributed_true_without_a_process_group_is_an_error():
    with pytest.raises(CalibrationError, match="init_process_group"):
        calibrate(conv_model(), [images(2)], distributed=True)


# ---------------------------------------------------------------------------------------------- resume


def test_resume_equals_an_uninterrupted_pass(tmp_path):
    x = images(23)
    whole = conv_model()
    full = calibrate(whole, batches(x, 4))

    part = conv_model()
    first = calibrate(part, batches(x, 4), max_batches=3)
    assert first.batches == 3 and first.samples == 12
    path = tmp_path / "state.safetensors"
    save_state(first.state, path)
    state = load_state(path)
    assert state.batches == 3 and state.samples == 12
    rest = calibrate(part, batches(x, 4), resume=state)  # data restarts; the first 3 batches are skipped
    assert rest.batches == full.batches and rest.samples == 23 and rest.resumed_batches == 3
    assert_matches(rest.state, brute_force(whole, batches(x, 4)))
    for a, b in zip(operators(part).values(), operators(whole).values()):
        assert torch.equal(a.mean, b.mean) and torch.equal(a.var, b.var)
    # the remaining batches alone, with nothing to skip, give the same result as well
    again = calibrate(conv_model(), batches(x, 4)[3:], resume=state, skip_batches=0)
    assert_matches(again.state, brute_force(whole, batches(x, 4)))
    assert state.batches == 3  # resuming does not change the state it starts from


def test_datasets_pairs_and_tensors_are_taken_as_tune_and_evaluate_take_them():
    x, y = images(40), torch.arange(40)
    expected = brute_force(conv_model(), batches(x, 256))
    for data in (torch.utils.data.TensorDataset(x, y), (x, y), x):
        assert_matches(calibrate(conv_model(), data).state, expected)
    half = conv_model().half()  # float32 data for a half-precision model is cast to its dtype
    assert calibrate(half, x).samples == 40


def test_a_rewritten_model_keeps_its_calibration_record(tmp_path):
    import graphsparse as gs

    model = gs.rewrite(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), "full", torch.rand(1, 1, 8, 8))
    record = calibrate(model, make_loader(load_dataset("digits", split="train"), 256), max_samples=100)
    assert gs.rewrite_info(model).records["calibration"] == record.to_dict()
    loaded = gs.load(gs.save(model, tmp_path / "a.safetensors"), base=nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))
    assert gs.rewrite_info(loaded).records["calibration"] == record.to_dict()


def test_resume_after_max_samples_reads_the_rest_of_the_cut_batch(tmp_path):
    x = images(23)
    whole = conv_model()
    full = calibrate(whole, batches(x, 4))
    part = conv_model()
    first = calibrate(part, batches(x, 4), max_samples=10)  # 4 + 4 + 2 of the third batch
    assert (first.batches, first.samples, first.state.partial) == (3, 10, 2)
    path = tmp_path / "state.safetensors"
    save_state(first.state, path)
    assert load_state(path).partial == 2
    rest = calibrate(part, batches(x, 4), resume=load_state(path))
    assert (rest.batches, rest.samples, rest.state.partial) == (full.batches, 23, 0)
    assert_matches(rest.state, brute_force(whole, batches(x, 4)))


def test_checkpoint_survives_an_interruption(tmp_path):
    x = images(23)
    path = tmp_path / "calib.safetensors"

    def interrupted():
        for i, b in enumerate(batches(x, 3)):
            if i == 5:
                raise RuntimeError("killed")
            yield b

    model = conv_model()
    with pytest.raises(RuntimeError, match="killed"):
        calibrate(model, interrupted(), checkpoint=path, checkpoint_every=2)
    state = CalibrationState.load_state(path)
    assert state.batches == 5 and state.samples == 15  # saved at the interruption, not only every 2 batches
    assert [p.name for p in tmp_path.iterdir()] == ["calib.safetensors"]  # no temporary file left
    record = calibrate(model, batches(x, 3), resume=state, checkpoint=path)
    assert_matches(record.state, brute_force(model, batches(x, 3)))
    assert load_state(path).batches == 8  # saved again at the end of the pass


class StopAt(torch.utils.data.Dataset):
    """Samples of ``x``; reading sample ``stop`` raises KeyboardInterrupt (Ctrl-C while loading data)."""

    def __init__(self, x: torch.Tensor, stop: int | None) -> None:
        self.x, self.stop = x, stop

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.stop:
            raise KeyboardInterrupt
        return self.x[i]


@pytest.mark.parametrize("where", ["data", "forward"])
def test_an_interrupted_pass_resumes_to_bit_equal_statistics(tmp_path, where):
    """Ctrl-C while a batch loads, or in the middle of its forward pass (one site has seen it, the next not):
    the checkpoint holds the state after the last whole batch, and resuming gives the uninterrupted numbers."""
    x = images(37)
    whole = conv_model()
    calibrate(whole, torch.utils.data.DataLoader(StopAt(x, None), batch_size=4))

    model, path = conv_model(), tmp_path / "calib.safetensors"
    handle = None
    if where == "forward":
        calls = []

        def stop(module, args):
            calls.append(1)
            if len(calls) == 6:  # the 6th batch reached the second site after the first folded it in
                raise KeyboardInterrupt

        handle = operators(model)["layer1.act"].register_forward_pre_hook(stop)
    stop_at = 22 if where == "data" else None  # in the 6th batch
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, torch.utils.data.DataLoader(StopAt(x, stop_at), batch_size=4), checkpoint=path)
    if handle is not None:
        handle.remove()
    state = load_state(path)
    assert (state.batches, state.samples) == (5, 20)
    assert {m.count for m in state.moments.values()} == {20 * 64, 20 * 9}  # every site saw 5 whole batches
    calibrate(model, torch.utils.data.DataLoader(StopAt(x, None), batch_size=4), resume=state)
    for site, op in operators(model).items():
        ref = operators(whole)[site]
        assert torch.equal(op.mean, ref.mean) and torch.equal(op.var, ref.var), site


def test_a_state_resumes_only_its_data_and_batch_size(tmp_path):
    x = images(20)
    state = calibrate(conv_model(), torch.utils.data.DataLoader(x, batch_size=4), max_batches=2).state
    with pytest.raises(CalibrationError, match="8 samples in 2 batches, which batches of 5 cannot give"):
        calibrate(conv_model(), torch.utils.data.DataLoader(x, batch_size=5), resume=state)
    digits = calibrate(nn.Sequential(nn.Conv2d(1, 2, 3), MeanSparse(2, site_id="a")),
                       make_loader(load_dataset("digits", split="train"), 32), max_batches=1).state
    with pytest.raises(CalibrationError, match=r"made on 'digits:train \(seed 0\)', not on 'digits:val"):
        calibrate(nn.Sequential(nn.Conv2d(1, 2, 3), MeanSparse(2, site_id="a")),
                  make_loader(load_dataset("digits", split="val"), 32), resume=digits)


def test_state_file_errors_name_the_problem(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(CalibrationError, match="not a calibration state"):
        load_state(other)
    state = calibrate(conv_model(), [images(4)]).state
    path = tmp_path / "state.safetensors"
    state.save_state(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    del tensors["layer1.act/m2"]
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CalibrationError, match=r"'layer1\.act/m2' is missing"):
        load_state(path)
    with pytest.raises(CalibrationError, match="could not be read"):
        load_state(tmp_path / "missing.safetensors")
    with pytest.raises(CalibrationError, match="unknown site 'layer1.act'"):
        calibrate(nn.Sequential(MeanSparse(3, site_id="stem.act")), [images(2)], resume=state)


def test_record_is_json_and_names_the_data():
    dataset = load_dataset("digits", split="val", seed=3)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), MeanSparse(2, site_id="a"))
    record = calibrate(model, make_loader(dataset, 32))
    d = json.loads(json.dumps(record.to_dict()))
    assert d["source"] == "digits:val (seed 3)" and d["samples"] == len(dataset)
    assert d["torch_version"] == torch.__version__ and d["graphsparse_version"] == graphsparse.__version__
    assert d["sites"] == ["a"] and "state" not in d and d["date"][:2] == "20"
    assert CalibrationRecord.from_dict(d) == record
    assert calibrate(model, make_loader(dataset, 32), source="my data").source == "my data"


# ------------------------------------------------------------------------------------------ distributed


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HANG_LIMIT_S = 900
"""A rank that runs this long is hung (a collective left waiting); the limit is for that, not for speed."""


def _warm_compile_caches(world_size: int) -> None:
    """Compile, in this process, the kernels the ranks will run (the same model, batch shapes and dtypes), so
    that each rank loads them from inductor's on-disk cache (the ranks inherit this process's environment,
    so they read the same caches). Cold, every rank compiled them side by side: 40 s for the first batch of
    one process alone, and a distributed test took 113 s under load."""
    model = worker.build_model()
    dataset = load_dataset("digits", split="train", seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run: the thread count is part of a CPU kernel's cache key
    try:
        for rank in range(world_size):
            calibrate(model, make_loader(dataset, worker.BATCH_SIZE, rank=rank, world_size=world_size))
    finally:
        torch.set_num_threads(threads)


def _run_workers(out: Path, world_size: int = 2, **env: str) -> tuple[list[int], str]:
    """Start the distributed worker (gloo unless ``GS_BACKEND`` says otherwise) on ``world_size`` ranks;
    return the exit codes and the combined output."""
    if env.get("GS_BACKEND", "gloo") == "gloo":
        _warm_compile_caches(world_size)
    env_base = {
        **os.environ,  # and so the same compile caches (TORCHINDUCTOR_CACHE_DIR, TORCH_EXTENSIONS_DIR)
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(world_size),
        "OMP_NUM_THREADS": "1",
        **env,
    }
    return launch_ranks(WORKER, out, world_size, env_base, HANG_LIMIT_S)


def test_two_gloo_processes_equal_one_process(tmp_path):
    from safetensors.torch import load_file

    codes, output = _run_workers(tmp_path)
    assert codes == [0, 0], output

    model = worker.build_model()
    dataset = load_dataset("digits", split="train", seed=0)
    loaders = [make_loader(dataset, worker.BATCH_SIZE, rank=r, world_size=2) for r in range(2)]
    single = calibrate(model, itertools.chain(*loaders))
    records = [json.loads((tmp_path / f"record{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert [r["compile_misses"] for r in records] == [0, 0]  # the ranks compiled nothing: the parent had
    assert [r["samples"] for r in records] == [len(dataset)] * 2
    assert sum(r["local_samples"] for r in records) == len(dataset)
    assert records[0]["batches"] == records[1]["batches"] == 20  # 10 + 10 batches of at most 64

    states = [load_state(tmp_path / f"state{r}.safetensors") for r in range(2)]
    for site, m in single.state.moments.items():
        d0, d1 = states[0].moments[site], states[1].moments[site]
        assert d0.count == d1.count == m.count
        assert torch.equal(d0.mean, d1.mean) and torch.equal(d0.m2, d1.m2)  # identical on every rank
        assert_close64(d0.mean, m.mean)
        assert_close64(d0.m2, m.m2)
    buffers = [load_file(str(tmp_path / f"ops{r}.safetensors")) for r in range(2)]
    assert buffers[0].keys() == buffers[1].keys()
    assert all(torch.equal(buffers[0][k], buffers[1][k]) for k in buffers[0])


def test_a_failure_on_one_rank_stops_every_rank(tmp_path):
    codes, output = _run_workers(tmp_path, GS_NAN_RANK="1")
    assert codes == [3, 3], output
    assert "site 'conv1.act' in batch 1" in (tmp_path / "error1.txt").read_text()
    assert "failed on rank 1" in (tmp_path / "error0.txt").read_text()


def test_agree_on_failure_names_the_failed_rank_with_the_callers_error(monkeypatch):
    """distributed.agree_on_failure (shared, from calibrate): a rank that did not fail raises the caller's error type
    naming the first failed rank; a failed rank re-raises its own error. The other ranks' flags come from a stand-in
    all_reduce (ranks 2 and 3 failed)."""
    from graphsparse.distributed import agree_on_failure
    from graphsparse.errors import DataError

    def others_failed(flags):
        flags[2] = flags[3] = 1

    monkeypatch.setattr(torch.distributed, "all_reduce", others_failed)
    cpu = torch.device("cpu")
    with pytest.raises(CalibrationError, match=r"^calibration failed on rank 2; this rank stopped too\. Hint: see"):
        agree_on_failure(None, 0, 4, cpu, error_type=CalibrationError, what="calibration")
    with pytest.raises(DataError, match=r"^reading failed on rank 2;"):
        agree_on_failure(None, 1, 4, cpu, error_type=DataError, what="reading")
    own = ValueError("mine")
    with pytest.raises(ValueError) as caught:
        agree_on_failure(own, 3, 4, cpu)
    assert caught.value is own
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda flags: None)
    agree_on_failure(None, 0, 4, cpu)  # nobody failed: returns
