"""Commands under ``torchrun``: join the process group it describes; only rank 0 writes and prints."""

from __future__ import annotations

import os

import torch


def join_torchrun() -> int:
    """Join the default process group when ``torchrun`` started this process (``WORLD_SIZE`` > 1): NCCL when
    CUDA is available (on GPU ``LOCAL_RANK``), gloo otherwise. Returns the rank (0 without torchrun)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return 0
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank()
