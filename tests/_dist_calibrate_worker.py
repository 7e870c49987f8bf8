"""One rank of the distributed calibration test (started twice by tests/test_calibrate.py).

Reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT from the environment (as torchrun sets them),
calibrates its shard of the digits train split with gloo and writes, under the directory given as the
only argument: ``state{rank}.safetensors`` (merged accumulators), ``ops{rank}.safetensors`` (the float32
operator buffers) and ``record{rank}.json``. With ``GS_NAN_RANK=r`` rank r gets a NaN in its second batch;
a rank whose calibration fails writes the message to ``error{rank}.txt`` and exits with status 3. The record
counts the kernels the process compiled (``compile_misses``): the test compiles them first, in its own
process, so that the ranks read them from the shared on-disk caches instead of compiling them side by side.
``GS_BACKEND=nccl`` calibrates on the GPU ``LOCAL_RANK`` with NCCL instead (tests/test_cuda.py).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from graphsparse.data import load_dataset, make_loader
from graphsparse.errors import CalibrationError
from graphsparse.ops import MeanSparse, operators
from graphsparse.stats.calibrate import calibrate

BATCH_SIZE = 64


class Tokens(nn.Module):
    """(B, C, H, W) -> (B, H*W, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


def build_model() -> nn.Module:
    """A small conv net with NCHW operators and one (B, L, C) operator; same weights in every process."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        MeanSparse(8, site_id="conv1.act", depth=0),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, stride=2, padding=1),
        MeanSparse(6, site_id="conv2.act", depth=1),
        nn.ReLU(),
        Tokens(),
        nn.Linear(6, 5),
        MeanSparse(5, channel_axis=-1, site_id="mlp.act", depth=2),
        nn.GELU(),
    )


def _compile_misses() -> int:
    """Kernels this process had to compile (inductor's FX graph cache misses; 0 when it had them all)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - dynamo is part of every supported torch
        return 0
    return int(counters["inductor"].get("fxgraph_cache_miss", 0))


def main(out: Path) -> None:
    from safetensors.torch import save_file

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = os.environ.get("GS_BACKEND", "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if backend == "nccl" else None
    if device is not None:
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = build_model().to(device or "cpu")
        dataset = load_dataset("digits", split="train", seed=0)
        loader = make_loader(dataset, BATCH_SIZE, rank=rank, world_size=world_size)
        data = list(loader)
        if os.environ.get("GS_NAN_RANK") == str(rank):
            data[1][0][0, 0, 0, 0] = float("nan")
        try:
            record = calibrate(model, data, device=device)
        except CalibrationError as e:
            (out / f"error{rank}.txt").write_text(str(e))
            sys.exit(3)
        record.state.save_state(out / f"state{rank}.safetensors")
        buffers = {
            f"{s}/{k}": getattr(op, k).cpu().clone() for s, op in operators(model).items() for k in ("mean", "var")
        }
        save_file(buffers, str(out / f"ops{rank}.safetensors"))
        local = len(loader.dataset)
        misses = _compile_misses()
        (out / f"record{rank}.json").write_text(
            json.dumps({**record.to_dict(), "local_samples": local, "compile_misses": misses})
        )
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
