"""Cost of ``graphsparse.evaluate`` against one plain AutoAttack run, and its 1 → 2 process speed-up (issue 19).

On the shipped demo model (MNIST-5k test split, L∞ ε of the demo, APGD-CE, ``--n`` samples, ``--steps``
iterations, one batch size), side by side in one process, one thread:

- ``plain``: one ``pyautoattack`` run of the *original* model on the same samples (``version='custom'``,
  APGD-CE, 1 restart, the same steps and seed): what evaluating the model without graphsparse costs;
- ``plain, identity operators``: the same run on the rewritten graph with its operators replaced by identities,
  i.e. the original model's work: its ratio to ``plain`` is the run-to-run noise;
- ``plain, rewritten model`` and ``plain, rewritten, BPDA``: the same run on the rewritten model with its exact
  and its straight-through gradient: what attacking the rewritten model costs;
- ``plain, attack view`` and ``plain, attack view, BPDA``: the same on the view evaluate attacks
  (:func:`graphsparse.planning.fuse_residual.fuse_residual_operators`: each residual addition and its operator
  in one kernel pass, bit-equal): what evaluate's exact and BPDA attacks cost by themselves. With ``plain``
  they make the floor of an evaluation ("its attacks alone"): evaluate's ratio to it is its own overhead;
- ``evaluate (first)``: ``graphsparse.evaluate`` of the rewritten, calibrated model at ``--alpha`` (base,
  exact and BPDA: three attacks, plus the clean and zero-gradient passes), with an empty attack cache;
- ``evaluate (base cached)``: the same with the original model's results already in the cache.

Each is timed ``--rounds`` times, interleaved, after a warm-up of each; each time is divided by that round's
``plain`` (or its attacks alone), and the median of those ratios is reported with their range. Then
``--processes 2`` runs the same evaluation (empty cache) in 1 and in 2 gloo processes started by this script
(``--worker``), ``--rounds`` times interleaved, and reports the median of the slowest rank's ``evaluate`` time
of each and of the speed-ups (the reports are checked equal). The ranks start ``evaluate`` together, after a
barrier: without it, the rank whose set-up (calibration) finished first counted its wait for the other at the
first collective. Other load on the machine moves every figure; compare ratios measured together.

    python tools/bench_eval.py --n 64 --steps 10 --batch-size 32 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def build(alpha: float):
    """``(original, rewritten, eps)``: the demo model and its after_addition rewrite calibrated on MNIST-5k."""
    import graphsparse as gs
    from graphsparse.data import load_dataset, make_loader
    from graphsparse.demo.models import demo_model_info, load_demo_model

    original = load_demo_model().eval()
    eps = float(demo_model_info().get("settings", {}).get("eps", 0.2))
    rewritten = gs.rewrite(load_demo_model().eval(), "after_addition", torch.zeros(1, 1, 28, 28))
    gs.calibrate(rewritten, make_loader(load_dataset("mnist5k", split="train"), 250))
    gs.set_alpha(rewritten, alpha)
    return original, rewritten, eps


def identity_operators(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the rewritten ``model`` with every operator replaced by ``nn.Identity``: the original model's
    work in the rewritten graph, so its ratio to ``plain`` shows this machine's run-to-run noise."""
    import copy

    from graphsparse.ops import MeanSparse

    same = copy.deepcopy(model)
    for name, module in list(same.named_modules()):
        if isinstance(module, MeanSparse):
            parent, _, leaf = name.rpartition(".")
            setattr(same.get_submodule(parent), leaf, torch.nn.Identity())
    return same


def plain_run(model, x, y, eps: float, steps: int, batch_size: int) -> int:
    from pyautoattack import AutoAttack

    from graphsparse.robust.attacks import set_steps

    aa = AutoAttack(model, eps=eps, norm="Linf", version="custom", attacks=["apgd-ce"], seed=0, device="cpu")
    aa.apgd.n_restarts = 1
    set_steps(aa.apgd, steps)
    with torch.random.fork_rng():
        _, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    return int((y_adv == y).sum())


def bpda_run(model, x, y, eps: float, steps: int, batch_size: int) -> int:
    """:func:`plain_run` of ``model`` with straight-through gradients (evaluate's BPDA attack, alone)."""
    import graphsparse as gs

    with gs.straight_through(model):
        return plain_run(model, x, y, eps, steps, batch_size)


def _ratio(times: list[float], bases: list[float]) -> str:
    """The median of per-round ratios, and their range: a round's runs follow one another, so slow drifts of the
    machine's speed cancel in a ratio and not in a ratio of medians."""
    ratios = sorted(t / b for t, b in zip(times, bases))
    return f"{statistics.median(ratios):5.2f}x [{ratios[0]:.2f}-{ratios[-1]:.2f}]"


def _worker(args: argparse.Namespace) -> None:
    import graphsparse as gs
    from graphsparse.data import load_dataset

    rank = int(os.environ.get("RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo")
    try:
        torch.set_num_threads(1)
        _, model, eps = build(args.alpha)
        test = load_dataset("mnist5k", split="test")
        if torch.distributed.is_initialized():  # start together: a rank waiting for another's set-up is not evaluating
            torch.distributed.barrier()
        t = time.perf_counter()
        report = gs.evaluate(model, test, eps=eps, n=args.n, steps=args.steps, batch_size=args.batch_size)
        seconds = time.perf_counter() - t
        d = {k: v for k, v in report.to_dict().items() if k != "date"}
        Path(args.worker, f"rank{rank}.json").write_text(json.dumps({"seconds": seconds, "report": d}))
        if torch.distributed.is_initialized():  # leave together: a rank tearing gloo down early aborted the other
            torch.distributed.barrier()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _processes(args: argparse.Namespace, world_size: int) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as out, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size),
               "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, "--worker", out, "--n", str(args.n), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--alpha", str(args.alpha)]
        procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world_size)]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"a worker failed: exit codes {codes} (ranks 0..{world_size - 1})")
        runs = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world_size)]
    if any(r["report"] != runs[0]["report"] for r in runs):
        raise SystemExit("the ranks' reports differ")
    return max(r["seconds"] for r in runs), runs[0]["report"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32, help="also the chunk size: ranks share chunks")
    ap.add_argument("--alpha", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--processes", type=int, default=2, help="0 skips the multi-process part")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return _worker(args)

    import graphsparse as gs
    from graphsparse.data import load_dataset
    from graphsparse.planning.fuse_residual import fuse_residual_operators
    from graphsparse.robust.attack_cache import AttackCache
    from graphsparse.robust.samples import pick_samples

    torch.set_num_threads(1)
    original, model, eps = build(args.alpha)
    test = load_dataset("mnist5k", split="test")
    s = pick_samples(test, args.n, 0)
    kw = {"eps": eps, "n": args.n, "steps": args.steps, "batch_size": args.batch_size}
    warm = AttackCache()
    same_work = identity_operators(model)
    view = fuse_residual_operators(model)
    modes = {
        "plain": lambda: plain_run(original, s.x, s.y, eps, args.steps, args.batch_size),
        "plain, identity operators": lambda: plain_run(same_work, s.x, s.y, eps, args.steps, args.batch_size),
        "plain, rewritten model": lambda: plain_run(model, s.x, s.y, eps, args.steps, args.batch_size),
        "plain, rewritten, BPDA": lambda: bpda_run(model, s.x, s.y, eps, args.steps, args.batch_size),
        "plain, attack view": lambda: plain_run(view, s.x, s.y, eps, args.steps, args.batch_size),
        "plain, attack view, BPDA": lambda: bpda_run(view, s.x, s.y, eps, args.steps, args.batch_size),
        "evaluate (first)": lambda: gs.evaluate(model, test, cache=AttackCache(), **kw),
        "evaluate (base cached)": lambda: gs.evaluate(model, test, cache=warm, **kw),
    }
    times: dict[str, list[float]] = {k: [] for k in modes}
    for fn in modes.values():  # warm-up; fills the cache of the cached mode
        fn()
    for _ in range(args.rounds):
        for k, fn in modes.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    print(f"demo model, {args.n} MNIST-5k test samples, APGD-CE {args.steps} steps, batch {args.batch_size}, "
          f"alpha {args.alpha:g}, 1 thread; medians of {args.rounds} rounds, ratios taken within each round "
          "[their range]")
    rounds = range(args.rounds)
    plain = times["plain"]
    floors = {  # what evaluate's attacks cost by themselves, per round: plain AutoAttack runs of each variant
        "evaluate (first)": [plain[r] + times["plain, attack view"][r] + times["plain, attack view, BPDA"][r]
                             for r in rounds],
        "evaluate (base cached)": [times["plain, attack view"][r] + times["plain, attack view, BPDA"][r]
                                   for r in rounds],
    }
    for k, ts in times.items():
        line = f"  {k:26s} {statistics.median(ts):7.2f} s   {_ratio(ts, plain)} plain"
        if k in floors:
            line += f"   {_ratio(ts, floors[k])} its attacks alone"
        print(line)
    if args.processes > 1:
        ones, manys, same = [], [], True
        for _ in rounds:  # interleaved, as above
            one, r1 = _processes(args, 1)
            many, rn = _processes(args, args.processes)
            ones.append(one)
            manys.append(many)
            same = same and r1 == rn
        print(f"  evaluate, 1 process        {statistics.median(ones):7.2f} s")
        print(f"  evaluate, {args.processes} processes      {statistics.median(manys):7.2f} s   speed-up "
              f"{_ratio(ones, manys)} (reports {'equal' if same else 'DIFFERENT'}; slowest rank, from a barrier)")


if __name__ == "__main__":
    main()
