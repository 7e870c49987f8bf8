"""Attacks run in fixed chunks, resumable, and the original model's results kept across runs.

Every attack of :func:`graphsparse.evaluate` and :func:`graphsparse.tune` runs on fixed *chunks* of the
evaluated samples: chunk ``c`` holds positions ``[c·batch_size, (c+1)·batch_size)`` of the picked samples
(in source order), and each chunk is one AutoAttack ``run_standard_evaluation`` with the same ``seed``
(AutoAttack reseeds torch's generator at every attack call). So what happens to a sample depends only on
its chunk, the seed and the attack settings, never on which chunks ran before, in this process or
another: a run resumed from its state (:mod:`graphsparse.eval_state`) gives the same per-sample outcomes
as an uninterrupted one (on the same device type; GPU kernels may be non-deterministic run to run). A
cascade (``autoattack``, ``apgd-ce+apgd-t``) runs its stages on the robust samples of each chunk.

:class:`AttackCache` keeps the per-sample results of the *original* model (every MeanSparse α = 0: the base
variant, and the exact/BPDA variants of a model at α = 0, which are the same function with the same
gradient) under a key of everything they depend on: a digest of the model's weights without its MeanSparse
operators (:func:`model_digest`), a digest of the samples' pixels and labels, the attack, ε, norm, seed,
steps, batch size, device type, the pyautoattack version and :data:`SCHEME`. A second ``graphsparse eval``
of the same model, or tuning's α = 0 point on the same samples, reads them instead of attacking again.
The cache file is JSON, rewritten atomically. Several processes may share it (a sweep of ``graphsparse eval``
jobs): each write takes a lock (``<file>.lock``, beside it) and merges the entries on disk, so no process drops
another's, and a lookup that misses reads the file again when another process has changed it since.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graphsparse._files import atomic_write, file_lock, read_json_file
from graphsparse.distributed import comm_device, rank_and_size
from graphsparse.errors import EvaluationError
from graphsparse.ops import MeanSparse, operators
from graphsparse.planning.fuse_residual import fuse_residual_operators
from graphsparse.robust.attacks import attack_key, clean_and_zero_gradient, run_attack
from graphsparse.robust.per_sample import pack_bits, unpack_bits
from graphsparse.robust.samples import Samples

__all__ = ["SCHEME", "AttackCache", "attack_chunks", "job_key", "model_digest", "samples_digest"]

SCHEME = 1
"""Version of the chunking scheme; part of every key, so a change of scheme never reads old results."""

_FORMAT = "graphsparse-attack-cache"


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def is_identity(model: nn.Module) -> bool:
    """Every MeanSparse of ``model`` has α = 0: the model is its original (base) model."""
    return all(float(op.alpha) == 0.0 for op in operators(model, types=(MeanSparse,)).values())


def model_digest(model: nn.Module, *, without_meansparse: bool) -> str:
    """SHA-256 over the class name and every state-dict tensor (name, dtype, shape, bytes) of ``model``.

    With ``without_meansparse`` the tensors of MeanSparse operators (α, statistics) are left out: at α = 0
    they are exact identities, so the digest names the original model whatever the statistics.
    """
    skip = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, MeanSparse) and name)
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in sorted(model.state_dict().items()):
        if not isinstance(t, torch.Tensor) or (without_meansparse and name.startswith(skip)):
            continue
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def samples_digest(s: Samples) -> str:
    """SHA-256 of the samples' inputs (float32) and labels (int64), in order."""
    h = hashlib.sha256()
    h.update(f"{tuple(s.x.shape)}|".encode())
    h.update(_tensor_bytes(s.x.float()))
    h.update(_tensor_bytes(s.y.long()))
    return h.hexdigest()


def _aa_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pyautoattack")
    except PackageNotFoundError:  # pragma: no cover - evaluate() refuses to run without it
        return "unknown"


def job_key(model: str, samples: str, attack: str, **settings: Any) -> str:
    """The key of one attack run: model and samples digests, attack key and settings, scheme, AutoAttack version."""
    parts = {"model": model, "samples": samples, "attack": attack, "scheme": SCHEME, "aa": _aa_version()}
    parts.update(settings)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class AttackCache:
    """Per-sample results of the original model, in a JSON file (or in memory when ``path`` is None).

    Entries: key -> ``{"n", "robust": packed bits, "messages"}`` for attacks, and key -> ``{"n", "clean",
    "zero"}`` for clean passes. Unknown or damaged files are refused with a hint, never overwritten silently.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        self._seen: tuple[int, int] | None = None  # (mtime, size) of the file when this object last read it
        if self.path is not None and self.path.exists():
            self.entries = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        assert self.path is not None
        seen = self.path.stat()  # before reading: a file replaced meanwhile is then read again next time
        data = read_json_file(
            self.path, _FORMAT, error=EvaluationError,
            what=f"attack cache {self.path}", unreadable_hint="delete it; it only saves time",
            foreign=f"{self.path} is not a graphsparse attack cache. Hint: give another --cache path, or delete it",
        )
        self._seen = (seen.st_mtime_ns, seen.st_size)
        return dict(data.get("entries", {}))

    def _entry(self, key: str) -> dict[str, Any] | None:
        """The entry under ``key``; on a miss, after reading what other processes wrote since the last read."""
        e = self.entries.get(key)
        if e is None and self.path is not None:
            try:
                now = self.path.stat()
            except FileNotFoundError:
                return None
            if (now.st_mtime_ns, now.st_size) != self._seen:
                self.entries = {**self._read(), **self.entries}
                e = self.entries.get(key)
        return e

    def get_attack(self, key: str, n: int) -> tuple[np.ndarray, list[str]] | None:
        """``(robust flags, messages)`` stored under ``key``, or None."""
        e = self._entry(key)
        if e is None or e.get("n") != n or "robust" not in e:
            return None
        return unpack_bits(e["robust"], n), list(e.get("messages", []))

    def put_attack(self, key: str, robust: np.ndarray, messages: list[str]) -> None:
        self.entries[key] = {"n": int(len(robust)), "robust": pack_bits(robust), "messages": list(messages)}
        self._write()

    def get_clean(self, key: str, n: int) -> tuple[np.ndarray, int] | None:
        """``(clean-correct flags, zero-gradient count)`` stored under ``key``, or None."""
        e = self._entry(key)
        if e is None or e.get("n") != n or "clean" not in e:
            return None
        return unpack_bits(e["clean"], n), int(e["zero"])

    def put_clean(self, key: str, clean: np.ndarray, zero: int) -> None:
        self.entries[key] = {"n": int(len(clean)), "clean": pack_bits(clean), "zero": int(zero)}
        self._write()

    def _write(self) -> None:
        if self.path is None or rank_and_size()[0] != 0:  # every rank holds the entries; one writes
            return
        with file_lock(self.path):  # read, merge, write: what other processes wrote meanwhile is kept
            if self.path.exists():
                self.entries = {**self._read(), **self.entries}
            atomic_write(self.path, json.dumps({"format": _FORMAT, "entries": self.entries}, sort_keys=True) + "\n")
            now = self.path.stat()
            self._seen = (now.st_mtime_ns, now.st_size)


def _chunk(s: Samples, a: int, b: int) -> Samples:
    indices = s.indices[a:b] if len(s.indices) == len(s.positions) else s.indices
    return Samples(s.x[a:b], s.y[a:b], s.positions[a:b], indices, s.split, s.source, s.total, s.num_classes)


def attack_chunks(
    model: nn.Module,
    s: Samples,
    attack: Any,
    *,
    eps: float,
    norm: str,
    batch_size: int,
    seed: int,
    device: torch.device,
    n_classes: int,
    steps: int | None,
    done: dict[int, tuple[np.ndarray, list[str]]] | None = None,
    on_chunk: Callable[[int, np.ndarray, list[str]], None] | None = None,
    after: Callable[[int, int], None] | None = None,
    clean: torch.Tensor | None = None,
    model_checks: bool = True,
) -> tuple[np.ndarray, list[str]]:
    """Run ``attack`` on ``model`` as it is now, chunk by chunk (see the module docstring).

    Args:
        clean: the logits of ``s`` from the clean pass (CPU), or None (see :func:`run_attack`).
        model_checks: run AutoAttack's randomised and dynamic defence checks on the first chunk (they look at
            the forward pass only: once per model and attack, not per chunk).
        done: chunk index -> ``(robust flags, messages)`` already known (from a saved state): not run again.
        on_chunk: called as ``on_chunk(index, robust, messages)`` after each chunk that ran.
        after: called as ``after(samples, robust)`` after each of this rank's chunks, with the counts of its
            chunks so far (for progress).

    Returns:
        ``(robust, messages)``: per sample, still classified correctly after the attack; the warnings.
    """
    attack_key(attack)  # refuse a bad name before anything runs
    rank, world_size = rank_and_size()
    n = int(s.x.shape[0])
    robust = np.zeros(n, dtype=bool)
    per_chunk: dict[int, list[str]] = {}
    seen = 0
    for c, a in enumerate(range(0, n, batch_size)):
        b = min(a + batch_size, n)
        if c % world_size != rank:
            continue  # another rank's chunk
        if done is not None and c in done and len(done[c][0]) == b - a:
            flags, msgs = done[c]
        else:
            mask, msgs = run_attack(
                model, _chunk(s, a, b), attack, eps=eps, norm=norm, batch_size=batch_size, seed=seed,
                device=device, n_classes=n_classes, steps=steps, model_checks=model_checks and c == 0,
                clean=None if clean is None else clean[a:b],
            )
            flags = mask.numpy().astype(bool)
            if on_chunk is not None:
                on_chunk(c, flags, msgs)
        robust[a:b] = flags
        per_chunk[c] = list(msgs)
        seen += b - a
        if after is not None:
            after(seen, int(robust.sum()))
    if world_size > 1:
        robust, per_chunk = _gather(robust, per_chunk, world_size)
    return robust, [m for c in sorted(per_chunk) for m in per_chunk[c]]


def _gather(
    robust: np.ndarray, per_chunk: dict[int, list[str]], world_size: int
) -> tuple[np.ndarray, dict[int, list[str]]]:
    """Every rank's chunks, on every rank: each chunk was attacked by one rank, so a sum of the flags is exact."""
    import torch.distributed as dist

    flags = torch.from_numpy(robust.astype(np.int64)).to(comm_device(torch.device("cpu")))
    dist.all_reduce(flags)
    parts: list[Any] = [None] * world_size
    dist.all_gather_object(parts, per_chunk)
    merged = {int(c): list(m) for part in parts for c, m in part.items()}
    return flags.cpu().numpy().astype(bool), merged


def measure_variant(
    model: nn.Module,
    s: Samples,
    label: str,
    entries: list[Any],
    *,
    samples: str,
    cache: AttackCache,
    state: Any = None,
    eps: float,
    norm: str,
    batch_size: int,
    seed: int,
    device: torch.device,
    n_classes: int,
    steps: int | None,
    progress: Callable[[str, int, int, bool], None] | None = None,
) -> tuple[np.ndarray, int, dict[str, np.ndarray], dict[str, list[str]]]:
    """Clean flags, zero-gradient count and per-attack robust flags of ``model`` as it is now.

    ``label`` names the variant (``base``, ``exact``, ``bpda``); a model whose α are all 0 is the original
    model whatever the label, and its results are read from and written to ``cache``. Other runs save
    each finished chunk to ``state`` (an :class:`graphsparse.robust.eval_state.EvalState`) and resume from it.

    Args:
        samples: :func:`samples_digest` of ``s`` (computed once by the caller).
        progress: called as ``progress("label: attack", samples, robust, finished)`` after each chunk of this
            rank (counts of its chunks of the attack so far, ``finished`` False) and once when the attack is
            done (all samples, ``finished`` True).

    Returns:
        ``(clean, zero, robust, messages)``: messages per attack key, as AutoAttack gave them.
    """
    n = int(s.x.shape[0])
    identity = is_identity(model)
    tag = "identity" if identity else label
    digest = model_digest(model, without_meansparse=identity)
    model = fuse_residual_operators(model)  # the same outputs and gradients, bit for bit; fewer memory passes
    clean_key = job_key(digest, samples, "clean", variant=tag, batch_size=batch_size, device=device.type)
    hit = cache.get_clean(clean_key, n) if identity else None
    logits = None  # the clean logits, when this call computed them: AutoAttack's clean passes read them
    if hit is not None:
        clean, zero = hit
    else:
        correct, zero, logits = clean_and_zero_gradient(model, s, batch_size, device)
        clean = correct.numpy().astype(bool)
        if identity:
            cache.put_clean(clean_key, clean, zero)
    robust: dict[str, np.ndarray] = {}
    messages: dict[str, list[str]] = {}
    settings = {"eps": eps, "norm": norm, "seed": seed, "steps": steps, "batch_size": batch_size}
    for entry in entries:
        key = attack_key(entry)
        job = job_key(digest, samples, key, variant=tag, device=device.type, **settings)
        found = cache.get_attack(job, n) if identity else None
        if found is None:
            done = state.done(job) if state is not None else None
            keep = None if state is None else (lambda c, f, m, job=job: state.put(job, c, f, m))
            tick = None if progress is None else (lambda k, r, key=key: progress(f"{label}: {key}", k, r, False))
            found = attack_chunks(
                model, s, entry, device=device, n_classes=n_classes, done=done, on_chunk=keep, after=tick,
                clean=logits, model_checks=label != "bpda", **settings,  # bpda's forward pass is exact's
            )
            if identity:
                cache.put_attack(job, *found)
        robust[key], messages[key] = found
        if progress is not None:
            progress(f"{label}: {key}", n, int(found[0].sum()), True)
    return clean, zero, robust, messages
