"""Resumable evaluation: the per-sample results of every finished attack chunk, saved as they finish.

:func:`graphsparse.evaluate` with ``state=PATH`` writes, after every chunk of every attack
(:mod:`graphsparse.attack_cache`), the chunk's per-sample outcomes to ``PATH`` (JSON, atomically: a killed
process leaves the previous state). Run again with the same arguments, it reads them instead of attacking
those chunks again; since a chunk's outcome depends on nothing outside it, the report equals that of an
uninterrupted run. The state names the arguments it was made with (digest of the model with its α and
statistics, digest of the samples, attacks, ε, norm, seed, steps, batch size, device type): other arguments
are refused. The file is removed when the evaluation finishes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from graphsparse._files import atomic_write, read_json_file
from graphsparse.errors import EvaluationError
from graphsparse.robust.per_sample import pack_bits, unpack_bits

__all__ = ["EvalState"]

_FORMAT = "graphsparse-eval-state"


class EvalState:
    """The chunks done so far of one evaluation, at ``path``.

    Args:
        path: the state file (created on the first finished chunk).
        args: the arguments of the evaluation (JSON types); an existing state made with others is refused.

    Raises:
        EvaluationError: the file exists but is no state, or was made with other arguments.
    """

    def __init__(self, path: str | os.PathLike[str], args: dict[str, Any]) -> None:
        self.path = Path(path)
        self.args = json.loads(json.dumps(args, sort_keys=True, default=str))
        self.jobs: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return
        data = read_json_file(
            self.path, _FORMAT, error=EvaluationError,
            what=f"evaluation state {self.path}", unreadable_hint="delete it to start over",
            foreign=f"{self.path} is not a graphsparse evaluation state. Hint: give another --state path",
        )
        old = data.get("args", {})
        if old != self.args:
            diff = sorted(k for k in set(old) | set(self.args) if old.get(k) != self.args.get(k))
            raise EvaluationError(
                f"evaluation state {self.path} was made with other arguments ({', '.join(diff)} differ), so its "
                "results are not this evaluation's. Hint: rerun with the arguments it was made with, delete it "
                "to start over, or give another --state path"
            )
        self.jobs = dict(data.get("jobs", {}))

    def done(self, job: str) -> dict[int, tuple[np.ndarray, list[str]]]:
        """Chunk index -> ``(robust flags, messages)`` of the finished chunks of attack run ``job``."""
        return {
            int(c): (unpack_bits(e["robust"], int(e["n"])), list(e["messages"]))
            for c, e in self.jobs.get(job, {}).items()
        }

    def put(self, job: str, chunk: int, robust: np.ndarray, messages: list[str]) -> None:
        """Record a finished chunk and write the state (atomically)."""
        self.jobs.setdefault(job, {})[str(chunk)] = {
            "n": int(len(robust)),
            "robust": pack_bits(robust),
            "messages": list(messages),
        }
        atomic_write(self.path, json.dumps({"format": _FORMAT, "args": self.args, "jobs": self.jobs}) + "\n")

    def finish(self) -> None:
        """The evaluation finished: remove the state file."""
        self.path.unlink(missing_ok=True)
