import os
import sys

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


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
