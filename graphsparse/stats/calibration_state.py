"""The state of a calibration pass: the per-site accumulators it has folded in so far (:class:`CalibrationState`),
the ``.safetensors`` file that holds them (a checkpoint to resume from), and their exact merge across the ranks of
``torch.distributed``.

The file's tensors are ``{site}/count``, ``{site}/mean`` and ``{site}/m2`` (float64 for the moments); the site
order, batch and sample counts and the data's description are text metadata.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from graphsparse._files import atomic_write
from graphsparse.errors import CalibrationError
from graphsparse.stats.moments import RunningMoments, state_problem

__all__ = ["CalibrationState", "all_merge", "load_state", "save_state"]

_STATE_FORMAT = "graphsparse.calibration_state"
_STATE_VERSION = "1"


@dataclass
class CalibrationState:
    """Everything a calibration pass has accumulated: enough to resume it or merge it with another.

    Attributes:
        moments: site id -> :class:`RunningMoments`, in forward order.
        batches: batches folded in so far.
        samples: samples (entries along the batch axis) folded in so far.
        source: description of the data.
        partial: samples taken from the last batch counted when ``max_samples`` cut it (0: it was taken
            whole); a resumed pass reads the rest of that batch.
    """

    moments: dict[str, RunningMoments] = field(default_factory=OrderedDict)
    batches: int = 0
    samples: int = 0
    source: str = ""
    partial: int = 0

    def copy(self) -> CalibrationState:
        """A deep copy."""
        moments = OrderedDict((k, m.copy()) for k, m in self.moments.items())
        return CalibrationState(moments, self.batches, self.samples, self.source, self.partial)

    def save_state(self, path: str | os.PathLike[str]) -> None:
        """Write the state to a ``.safetensors`` file, atomically (temporary file + ``os.replace``).

        Tensors are ``{site}/count``, ``{site}/mean`` and ``{site}/m2``; the site order, batch and sample
        counts and source are text metadata.
        """
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for site, m in self.moments.items():
            if m.channels is None:
                raise CalibrationError(f"site {site!r} has no channels yet; nothing to save for it")
            for key, t in m.state_dict().items():
                tensors[f"{site}/{key}"] = t.contiguous()
        metadata = {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "sites": json.dumps(list(self.moments)),
            "batches": str(int(self.batches)),
            "samples": str(int(self.samples)),
            "source": str(self.source),
            "partial": str(int(self.partial)),
        }
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load_state(cls, path: str | os.PathLike[str]) -> CalibrationState:
        """Read a file written by :meth:`save_state`; raises :class:`CalibrationError` naming the bad key."""
        from safetensors import safe_open

        where = f"calibration state {str(path)!r}"
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise CalibrationError(
                f"{where} could not be read ({type(e).__name__}: {e}). "
                "Hint: pass a file written by CalibrationState.save_state"
            ) from e
        if metadata.get("format") != _STATE_FORMAT:
            raise CalibrationError(
                f"{where} is not a calibration state (metadata 'format' is {metadata.get('format')!r}). "
                "Hint: pass a file written by CalibrationState.save_state"
            )
        try:
            sites = json.loads(metadata["sites"])
            batches, samples = int(metadata["batches"]), int(metadata["samples"])
            partial = int(metadata.get("partial", "0"))
            if not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
                raise ValueError("'sites' is not a list of strings")
        except (KeyError, ValueError) as e:
            raise CalibrationError(f"{where} has invalid metadata: {e}") from e
        moments: dict[str, RunningMoments] = OrderedDict()
        for site in sites:
            part = {k: tensors[f"{site}/{k}"] for k in ("count", "mean", "m2") if f"{site}/{k}" in tensors}
            problem = state_problem(part, prefix=f"{site}/")
            if problem:
                raise CalibrationError(f"{where}: {problem}. Hint: the file is damaged; calibrate again")
            m = RunningMoments()
            m.load_state_dict(part)
            moments[site] = m
        extra = sorted(set(tensors) - {f"{s}/{k}" for s in sites for k in ("count", "mean", "m2")})
        if extra:
            raise CalibrationError(f"{where} has unexpected key {extra[0]!r}. Hint: the file is damaged")
        return cls(moments, batches, samples, metadata.get("source", ""), partial)


def save_state(state: CalibrationState, path: str | os.PathLike[str]) -> None:
    """Same as ``state.save_state(path)``."""
    state.save_state(path)


def load_state(path: str | os.PathLike[str]) -> CalibrationState:
    """Same as ``CalibrationState.load_state(path)``."""
    return CalibrationState.load_state(path)


def all_merge(state: CalibrationState, world_size: int, comm: torch.device) -> CalibrationState:
    """Gather every rank's accumulators (float64) and merge them in rank order: identical on every rank."""
    sites = list(state.moments)
    ms = [state.moments[s] for s in sites]
    counts = torch.tensor(
        [m.count for m in ms] + [state.batches, state.samples], dtype=torch.int64, device=comm
    )
    flat = torch.cat([torch.cat([m.mean.to(comm), m.m2.to(comm)]) for m in ms])
    all_counts = [torch.empty_like(counts) for _ in range(world_size)]
    all_flat = [torch.empty_like(flat) for _ in range(world_size)]
    torch.distributed.all_gather(all_counts, counts)
    torch.distributed.all_gather(all_flat, flat)
    merged = CalibrationState(
        OrderedDict((s, RunningMoments(m.channels)) for s, m in zip(sites, ms)), 0, 0, state.source
    )
    for c, v in zip(all_counts, all_flat):
        c, v = c.cpu().tolist(), v.cpu()
        offset = 0
        for i, (site, m) in enumerate(zip(sites, ms)):
            part = RunningMoments(m.channels)
            part.count = c[i]
            part.mean = v[offset : offset + m.channels]
            part.m2 = v[offset + m.channels : offset + 2 * m.channels]
            offset += 2 * m.channels
            merged.moments[site].merge(part)
        merged.batches += c[-2]
        merged.samples += c[-1]
    return merged
