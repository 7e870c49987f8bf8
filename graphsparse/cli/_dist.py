"""Commands under ``torchrun``: join the process group it describes; only rank 0 writes and prints."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch

_joined = False  # whether join_torchrun made the process group (leave_torchrun then destroys it)


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
        global _joined
        _joined = True
    return dist.get_rank()


def leave_torchrun() -> None:
    """Leave the process group :func:`join_torchrun` made: a barrier, then ``destroy_process_group``.

    Without it gloo's threads outlive the interpreter's shutdown, and a rank can abort at exit ("terminate called
    without an active exception", SIGABRT: pytorch/pytorch#190489), which torchrun reports as a failed worker once
    the work is done. The barrier keeps a rank from closing its connections while another still reads from them.
    Only after a command succeeded: after an error the other ranks may never reach the barrier."""
    import torch.distributed as dist

    global _joined
    if _joined and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _joined = False


def leaves_torchrun(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a command that calls :func:`join_torchrun` (innermost, under click's decorators): when it returns,
    :func:`leave_torchrun`."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        result = command(*args, **kwargs)
        leave_torchrun()
        return result

    return run
