"""``torch.distributed`` helpers that calibration and evaluation share: which rank this process is, and the device
that collectives run on."""

from __future__ import annotations

import torch

from graphsparse.errors import GraphsparseError

__all__ = ["comm_device", "rank_and_size"]


def rank_and_size(
    distributed: bool | None = None, *, error: type[GraphsparseError] = GraphsparseError, caller: str = "graphsparse"
) -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, or ``(0, 1)`` when not distributed.

    Args:
        distributed: ``None`` follows the process group (distributed when one is initialised); ``True`` requires
            one (``error`` is raised without it); ``False`` ignores it.
        error: the error class raised when ``distributed=True`` finds no process group.
        caller: the function named in that error's hint.
    """
    available = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and not available:
        raise error(
            "distributed=True but torch.distributed is not initialised. Hint: launch with torchrun and call "
            f"torch.distributed.init_process_group() before {caller}"
        )
    if distributed is False or not available:
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def comm_device(device: torch.device) -> torch.device:
    """Where tensors for collectives must live: a CUDA device under NCCL, the CPU under gloo."""
    if torch.distributed.get_backend() == "nccl":
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
