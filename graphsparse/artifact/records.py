"""Records of what was done to a rewritten model: ``calibration``, ``tuning`` and ``evaluation``.

Records live in ``rewrite_info(model).records`` and are saved in the artifact's ``records`` metadata. Each
one names the statistics it was made with and when:

- ``stats_sha256``: :func:`stats_digest` of the model when the record was made, a SHA-256 over every
  operator's ``mean`` and ``var`` (site id, shape and float32 bytes, in site-id order);
- ``date``: ISO 8601 UTC time (seconds).

A tuning or evaluation record whose ``stats_sha256`` differs from the model's statistics describes other
statistics (the model was calibrated again since): it is **stale**. Stale records are kept, so the history
stays readable, and flagged ``"stale": true`` on every read: when :func:`graphsparse.calibrate` stores its
record, when :func:`graphsparse.load` rebuilds a model (against the loaded tensors), and in
:func:`graphsparse.read_metadata` (against the calibration record's digest). A record made before records
carried a digest counts as stale once the calibration record has one. A flag is removed again when the
statistics come back to the record's (the same data calibrated again gives the same bytes).
"""

from __future__ import annotations

import hashlib
from collections.abc import MutableMapping
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn

from graphsparse.errors import PlanError

__all__ = ["STAMP_KEYS", "mark_stale", "stale_records", "stats_digest", "store_record", "utc_now"]

STAMP_KEYS = ("date", "stats_sha256")
"""The keys :func:`store_record` adds to every record (when the record has none)."""

_CHECKED = ("tuning", "evaluation")  # made on the statistics; the calibration record made them


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (``2026-12-02T06:00:48+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def stats_digest(model: nn.Module) -> str:
    """SHA-256 of every operator's ``mean`` and ``var`` (site id, shape, float32 bytes; sites sorted).

    Operators without statistics (e.g. SPARTA) do not count; a model without any gives the digest of nothing.
    """
    from graphsparse.ops import operators

    h = hashlib.sha256()
    for site, op in sorted(operators(model).items()):
        for name in ("mean", "var"):
            t = getattr(op, name, None)
            if not isinstance(t, torch.Tensor):
                continue
            t = t.detach().to("cpu", torch.float32).contiguous()
            h.update(f"{site}/{name}|{tuple(t.shape)}|".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def mark_stale(records: MutableMapping[str, Any], digest: str | None = None) -> list[str]:
    """Flag the records made with other statistics than ``digest``; return their keys.

    Args:
        records: the records mapping (changed in place: ``"stale": True`` set or removed).
        digest: the model's :func:`stats_digest`, against which the calibration record is checked too;
            default the calibration record's ``stats_sha256``, against which tuning and evaluation are.
            Nothing is flagged when no record carries a digest (an artifact older than digests).
    """
    keys: tuple[str, ...] = _CHECKED
    if digest is None:
        calibration = records.get("calibration")
        digest = calibration.get("stats_sha256") if isinstance(calibration, dict) else None
    else:
        keys = ("calibration",) + _CHECKED
    if not digest or not any(isinstance(r, dict) and r.get("stats_sha256") for r in records.values()):
        return []
    stale = []
    for key in keys:
        record = records.get(key)
        if not isinstance(record, dict):
            continue
        if record.get("stats_sha256") != digest:
            record["stale"] = True
            stale.append(key)
        else:
            record.pop("stale", None)
    return stale


def stale_records(records: MutableMapping[str, Any]) -> list[str]:
    """The keys of the records flagged stale."""
    return [k for k, r in records.items() if isinstance(r, dict) and r.get("stale") is True]


def store_record(model: nn.Module, key: str, record: dict[str, Any]) -> bool:
    """Store a JSON-able record in ``rewrite_info(model).records[key]``; False for a non-rewritten model.

    The record gets ``date`` and ``stats_sha256`` (the model's statistics now) unless it has them. Storing a
    ``calibration`` record flags the tuning and evaluation records made with other statistics as stale.
    """
    from graphsparse.planning.rewrite import rewrite_info

    try:
        info = rewrite_info(model)
    except PlanError:
        return False
    digest = stats_digest(model)
    record = dict(record)
    record.setdefault("date", utc_now())
    record.setdefault("stats_sha256", digest)
    record.pop("stale", None)
    info.records[key] = record
    mark_stale(info.records, digest)
    return True
