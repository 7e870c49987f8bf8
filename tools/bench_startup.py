"""Start-up cost: ``graphsparse --help``, ``--version`` and ``import graphsparse``, each in a fresh process.

Every command runs in its own subprocess (a process imports a module once, so start-up can only be measured
from outside), interleaved round-robin with two baselines on the same machine: ``python -c pass`` (the
interpreter alone) and ``python -c "import torch"`` (what any command that touches a model pays). Medians
of ``--repeats`` runs, wall time, and the ratio to ``python -c pass`` in the same round.

    python tools/bench_startup.py                 # 7 rounds
    python tools/bench_startup.py --repeats 15
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time


def _commands() -> dict[str, list[str]]:
    py = sys.executable
    cmds = {
        "python -c pass": [py, "-c", "pass"],
        'python -c "import torch"': [py, "-c", "import torch"],
        "import graphsparse": [py, "-c", "import graphsparse"],
        "python -m graphsparse --help": [py, "-m", "graphsparse", "--help"],
        "python -m graphsparse --version": [py, "-m", "graphsparse", "--version"],
        "import graphsparse; gs.rewrite": [py, "-c", "import graphsparse as gs; gs.rewrite"],
    }
    script = shutil.which("graphsparse")
    if script:  # the console script pip installed (what users type)
        cmds["graphsparse --help"] = [script, "--help"]
        cmds["graphsparse --version"] = [script, "--version"]
    return cmds


def _run(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="rounds (each runs every command once)")
    args = parser.parse_args(argv)
    cmds = _commands()
    for cmd in cmds.values():  # warm the file cache (the first import of torch reads ~1 GB)
        _run(cmd)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    names = list(cmds)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order each round
            times[name].append(_run(cmds[name]))
    base = times["python -c pass"]
    print(f"{'command':36} {'median s':>9} {'min s':>7} {'ratio to python -c pass':>24}")
    for name in names:
        ratio = statistics.median(t / b for t, b in zip(times[name], base))
        print(f"{name:36} {statistics.median(times[name]):9.3f} {min(times[name]):7.3f} {ratio:24.1f}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{os.cpu_count()} CPUs, load average {load:.1f}, {args.repeats} rounds, python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
