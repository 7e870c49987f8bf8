"""Start a test worker script on several torch.distributed ranks (shared by the distributed tests)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


def launch_ranks(
    worker: Path, out: Path, world_size: int, env: Mapping[str, str], hang_limit_s: float
) -> tuple[list[int], str]:
    """Run ``worker out`` once per rank with ``env`` plus RANK/LOCAL_RANK; return the exit codes and the
    combined output. A rank still running after ``hang_limit_s`` is hung (a collective left waiting) and is
    killed: the limit is for hangs, not for speed."""
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(out)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world_size)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=hang_limit_s)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], "\n".join(outputs)
