"""``torch.distributed`` helpers that calibration and evaluation share: which rank this process is, the device
that collectives run on, and whether any rank failed."""

from __future__ import annotations

import torch

from graphsparse.errors import GraphsparseError

__all__ = ["agree_on_failure", "comm_device", "rank_and_size"]


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


def agree_on_failure(
    error: BaseException | None,
    rank: int,
    world_size: int,
    comm: torch.device,
    *,
    error_type: type[GraphsparseError] = GraphsparseError,
    what: str = "the run",
) -> None:
    """All ranks learn whether any rank failed, so that none is left waiting in a collective.

    Every rank calls it after its local work, with the exception it caught (or None): a failed rank re-raises its
    own error; the others raise ``error_type`` naming the first failed rank (``"{what} failed on rank N"``).

    Args:
        error: this rank's exception, or None when its work succeeded.
        rank, world_size: this process's place in the default process group.
        comm: the device collectives run on (:func:`comm_device`).
        error_type: the error class the ranks that did not fail raise.
        what: the work named in that error.
    """
    flags = torch.zeros(world_size, dtype=torch.int64, device=comm)
    flags[rank] = int(error is not None)
    torch.distributed.all_reduce(flags)
    if error is not None:
        raise error
    failed = flags.nonzero().flatten().tolist()
    if failed:
        raise error_type(
            f"{what} failed on rank {failed[0]}; this rank stopped too. "
            f"Hint: see the error of rank {failed[0]}"
        )
