import os
import sys

import pytest
import torch

# one thread per xdist worker: 2 workers x 2 threads on 2 cores oversubscribe badly
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


class Launches(list):
    """Kinds of kernel launches (``forward``, ``forward_inplace``, ``moments``, ...) in order, and in
    ``backends`` which kernel ran each: ``"compiled"`` (torch.compile), ``"cpp"`` (the C++ CPU kernel) or
    ``"triton"`` (the CUDA kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.backends: list[str] = []

    def record(self, kind: str, backend: str) -> None:
        self.append(kind)
        self.backends.append(backend)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The kernel launches made during a test (:class:`Launches`), with the kernels on and allowed on inputs
    of any size, so that a silent fall back to the plain path fails a test."""
    from graphsparse.ops import cpu_kernel, fast, triton_kernel

    calls = Launches()
    run = fast.run_kernel

    def spy_compiled(fn, key, *args):
        calls.record(key[0], "compiled")
        return run(fn, key, *args)

    def spy(module, backend, name="launch"):
        launch = getattr(module, name)

        def spied(kind, *args):
            calls.record(kind, backend)
            return launch(kind, *args)

        monkeypatch.setattr(module, name, spied)

    monkeypatch.setattr(fast, "run_kernel", spy_compiled)
    spy(cpu_kernel, "cpp")
    spy(cpu_kernel, "cpp", "launch_autograd")  # under autograd: the same kernel, the backward in C++ too
    spy(cpu_kernel, "cpp_add", "launch_add")  # a residual sum and its operator (graphsparse.planning.fuse_residual)
    spy(triton_kernel, "triton")
    monkeypatch.setattr(fast, "MIN_NUMEL", 1)
    with fast.enabled(True):
        yield calls


@pytest.fixture(scope="session")
def robustbench_archs():
    """RobustBench's architecture modules (skips when robustbench is not installed)."""
    try:
        import pyautoattack

        sys.modules.setdefault("autoattack", pyautoattack)
        from robustbench.model_zoo.architectures import dm_wide_resnet, robustarch_wide_resnet
    except ImportError as exc:  # pragma: no cover - CI installs it
        pytest.skip(f"robustbench not installed: {exc}")
    return dm_wide_resnet, robustarch_wide_resnet


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and far faster when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def parity_source(tmp_path_factory) -> str:
    """scikit-learn digits with even/odd labels, as a data file (so that splits carry bookkeeping)."""
    import numpy as np

    from graphsparse.data import load_dataset

    all_ = load_dataset("digits", split="all")
    x, y = all_.tensors
    order = np.argsort(all_.indices)
    path = tmp_path_factory.mktemp("data") / "parity.npz"
    np.savez(path, x=x[order].numpy(), y=(y[order] % 2).numpy())
    return str(path)


@pytest.fixture(scope="module")
def parity_net(parity_source) -> torch.nn.Module:
    """A small CNN trained for a few seconds on the parity of the digits' train split (eval mode)."""
    import torch.nn as nn
    import torch.nn.functional as F

    from graphsparse.data import load_dataset

    x, y = load_dataset(parity_source, split="train").tensors
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 16, 32),
        nn.ReLU(),
        nn.Linear(32, 2),
    )
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(8):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            b = perm[i : i + 64]
            loss = F.cross_entropy(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@pytest.fixture()
def masked(parity_net, parity_source) -> torch.nn.Module:
    """The parity net with a calibrated MeanSparse on its logits, α = 1: on two classes a large α sends many
    near-boundary samples onto the channel means, where the exact gradient is zero (gradient masking)."""
    import copy

    import graphsparse as gs
    from graphsparse.data import load_dataset
    from graphsparse.ops import MeanSparse

    model = torch.nn.Sequential(*copy.deepcopy(parity_net), MeanSparse(2, site_id="logits")).eval()
    gs.calibrate(model, [load_dataset(parity_source, split="train").tensors])
    gs.set_alpha(model, 1.0)
    return model


@pytest.fixture()
def test_split(parity_source):
    """The parity data's test split."""
    from graphsparse.data import load_dataset

    return load_dataset(parity_source, split="test")


# --- hypothesis profiles (property tests: tests/test_properties.py) -----------------------------------
# `ci` (the default): a fixed example budget and a derandomised seed, so CI runs are reproducible and
# the property suite stays within ~3 minutes on 2 cores. `thorough` for local runs:
#     pytest tests/test_properties.py --hypothesis-profile=thorough
# Each property scales the profile's max_examples by its own cost factor.
from hypothesis import HealthCheck, settings  # noqa: E402

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
settings.register_profile(
    "ci",
    max_examples=50,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=_SLOW_OK,
)
settings.register_profile(
    "thorough",
    max_examples=400,
    deadline=None,
    print_blob=True,
    suppress_health_check=_SLOW_OK,
)
settings.load_profile("ci")
