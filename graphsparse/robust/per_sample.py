"""Per-sample outcomes of an evaluation, stored compactly, and the figures only they can give.

An aggregate robust accuracy hides *which* samples an attack broke. Two attacks with 50% each may break
the same half or complementary halves; the honest robust accuracy of a model attacked both ways is the share
of samples that **neither** broke (the per-sample worst case), which can be far below the smaller of the two
aggregate numbers. Samples the exact-gradient attack failed on but BPDA broke are gradient masking, sample by
sample.

Storage: one bit per sample, ``numpy.packbits`` (big-endian bit order within a byte) encoded as base64;
bit ``i`` belongs to position ``i`` of the report's ``indices`` (the source indices of the samples).
10,000 samples take 1,668 characters per row.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphsparse.errors import GraphsparseError

__all__ = ["ENCODING", "PerSample", "masked_samples", "pack_bits", "unpack_bits", "worst_case"]

ENCODING = "packbits-base64"
"""The name of the encoding of per-sample rows, stored beside them."""


def pack_bits(flags: Sequence[bool] | np.ndarray) -> str:
    """``flags`` as base64 text of ``numpy.packbits`` (8 samples a byte)."""
    bits = np.asarray(flags, dtype=bool).reshape(-1)
    return base64.b64encode(np.packbits(bits).tobytes()).decode("ascii")


def unpack_bits(text: str, n: int) -> np.ndarray:
    """The ``n`` flags packed in ``text`` by :func:`pack_bits`.

    Raises:
        GraphsparseError: ``text`` is not base64, or holds fewer than ``n`` bits.
    """
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as e:
        raise GraphsparseError(
            f"per-sample row {text[:20]!r}... is not base64 ({e}). Hint: re-run the evaluation"
        ) from e
    if len(raw) * 8 < n:
        raise GraphsparseError(
            f"per-sample row holds {len(raw) * 8} bits, the record has {n} samples. Hint: re-run the evaluation"
        )
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[:n].astype(bool)


def worst_case(*robust: np.ndarray) -> np.ndarray:
    """Per sample: robust under every attack given (a sample one of them broke is not robust)."""
    out = np.ones_like(np.asarray(robust[0], dtype=bool))
    for r in robust:
        out &= np.asarray(r, dtype=bool)
    return out


def masked_samples(exact: np.ndarray, bpda: np.ndarray, indices: Sequence[int]) -> list[int]:
    """Source indices of the samples the exact-gradient attack failed on (robust) but BPDA broke."""
    hit = np.asarray(exact, dtype=bool) & ~np.asarray(bpda, dtype=bool)
    return [int(indices[i]) for i in np.flatnonzero(hit)]


@dataclass
class PerSample:
    """Per-sample flags of one evaluation, position ``i`` = the ``i``-th evaluated sample.

    Attributes:
        clean: variant -> correct on the clean input.
        robust: variant -> attack key -> still correct after the attack (False when clean is wrong).
    """

    clean: dict[str, np.ndarray] = field(default_factory=dict)
    robust: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON types: ``{"encoding", "clean": {variant: text}, "robust": {variant: {attack: text}}}``."""
        return {
            "encoding": ENCODING,
            "clean": {v: pack_bits(f) for v, f in self.clean.items()},
            "robust": {v: {a: pack_bits(f) for a, f in rows.items()} for v, rows in self.robust.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], n: int) -> PerSample:
        """Inverse of :meth:`to_dict` for ``n`` samples.

        Raises:
            GraphsparseError: another encoding, or rows that are not :func:`pack_bits` text.
        """
        if d.get("encoding") != ENCODING:
            raise GraphsparseError(
                f"per-sample records in encoding {d.get('encoding')!r}, this version reads {ENCODING!r}. "
                "Hint: re-run the evaluation"
            )
        return cls(
            clean={v: unpack_bits(t, n) for v, t in d.get("clean", {}).items()},
            robust={v: {a: unpack_bits(t, n) for a, t in rows.items()} for v, rows in d.get("robust", {}).items()},
        )

    def worst_case(self, attack: str) -> np.ndarray:
        """Robust under ``attack`` with both the exact and the BPDA gradient, per sample."""
        return worst_case(self.robust["exact"][attack], self.robust["bpda"][attack])

    def masked(self, attack: str, indices: Sequence[int]) -> list[int]:
        """Source indices where the exact-gradient ``attack`` failed but BPDA succeeded."""
        return masked_samples(self.robust["exact"][attack], self.robust["bpda"][attack], indices)


def lead_sentence(worst: Mapping[str, float], masked: Mapping[str, Sequence[int]], n: int) -> str:
    """The sentence a report leads with: the per-sample worst case per attack and the masked samples."""
    parts = []
    for attack, pct in worst.items():
        hidden = list(masked.get(attack, ()))
        shown = ", ".join(str(i) for i in hidden[:10]) + (", ..." if len(hidden) > 10 else "")
        tail = f"; {len(hidden)} samples broken by BPDA only (gradient masking): {shown}" if hidden else ""
        parts.append(f"{attack}: worst case per sample over exact and BPDA {pct:.2f}% robust of {n}{tail}.")
    return " ".join(parts)
