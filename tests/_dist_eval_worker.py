"""One rank of the distributed evaluation test (started twice by tests/test_eval_scale.py).

Reads RANK and WORLD_SIZE from the environment (as torchrun sets them), joins a gloo group through a file
rendezvous in the output directory (the only argument), evaluates and tunes the model of :func:`build_model`
on the digits data, each rank attacking its share of the chunks, and writes there ``report{rank}.json`` and
``tune{rank}.json`` (without their dates) and ``attacked{rank}.json``: the sample positions of every chunk
the rank's evaluation attacked.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import graphsparse as gs
from graphsparse.data import load_dataset
from graphsparse.ops import MeanSparse
from graphsparse.robust import attack_cache

EVAL = {"eps": 0.1, "n": 40, "steps": 2, "batch_size": 8, "attacks": ["apgd-ce"]}
TUNE = {"eps": 0.1, "n": 24, "steps": 2, "batch_size": 8, "alphas": [0.0, 0.5], "bpda": True}


def build_model() -> nn.Module:
    """A small CNN trained briefly on the digits train split, with one MeanSparse whose statistics are set
    from the training data by a hook (no kernel to compile), α = 0.5; the same weights in every process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float sums in every process
    try:
        torch.manual_seed(0)
        body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1))
        head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 10))
        x, y = load_dataset("digits", split="train").tensors
        opt = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=1e-2)
        for _ in range(60):
            opt.zero_grad()
            F.cross_entropy(head(body(x)), y).backward()
            opt.step()
        op = MeanSparse(16, site_id="conv2")
        with torch.no_grad():
            h = body(x)
            op.mean.copy_(h.mean((0, 2, 3)).reshape(op.mean.shape))
            op.var.copy_(h.var((0, 2, 3)).reshape(op.var.shape))
        model = nn.Sequential(*body, op, *head).eval()
        gs.set_alpha(model, 0.5)
        return model
    finally:
        torch.set_num_threads(threads)


def without_date(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "date"}


def main(out: Path) -> None:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # a file rendezvous: no port to pick, so no clash with another test's ranks starting at the same time
    store = f"file://{(out / 'rendezvous').resolve()}"
    torch.distributed.init_process_group("gloo", init_method=store, rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        attacked: list[list[int]] = []  # the positions of every chunk this rank attacked
        run = attack_cache.run_attack

        def spy(model, s, attack, **kw):
            attacked.append([int(p) for p in s.positions])
            return run(model, s, attack, **kw)

        attack_cache.run_attack = spy
        model = build_model()
        report = gs.evaluate(model, load_dataset("digits", split="test"), **EVAL)
        (out / f"report{rank}.json").write_text(json.dumps(without_date(report.to_dict())))
        (out / f"attacked{rank}.json").write_text(json.dumps(attacked))
        result = gs.tune(model, load_dataset("digits", split="val"), **TUNE)
        (out / f"tune{rank}.json").write_text(json.dumps(without_date(result.to_dict())))
        torch.distributed.barrier()  # leave together: a rank tearing gloo down while the other still ran aborted
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
