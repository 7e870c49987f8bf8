"""Atomic file writes (nothing is ever half-written), reading back the JSON files graphsparse writes, and a lock
for files that several processes update."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from graphsparse.errors import GraphsparseError

__all__ = ["atomic_write", "file_lock", "read_json_file"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], data: bytes | str | Callable[[str], None]) -> Path:
    """Write ``data`` (bytes, text, or a ``write(tmp_path)`` callable) to a temp file beside ``path``, fsync
    it, then rename it over ``path``. An interrupted write leaves any previous file intact."""
    path = Path(path)
    if path.is_dir():
        raise GraphsparseError(f"{path} is a directory; give a file name to write, e.g. {path / 'model.safetensors'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if callable(data):
            data(tmp)
        else:
            Path(tmp).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json_file(
    path: Path, fmt: str, *, error: type[GraphsparseError], what: str, unreadable_hint: str, foreign: str
) -> dict[str, Any]:
    """The JSON object in ``path`` whose ``format`` entry is ``fmt``.

    Raises:
        error: "{what} cannot be read (cause). Hint: {unreadable_hint}" when the file cannot be read or parsed;
            ``foreign`` when it holds something else than a ``fmt`` object.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise error(f"{what} cannot be read ({e}). Hint: {unreadable_hint}") from e
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise error(foreign)
    return data


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``<path>.lock`` (created beside ``path`` and left there) for the block:
    processes that update ``path`` by read, merge, :func:`atomic_write` take turns. The lock is on a file of
    its own because an atomic write replaces ``path`` itself. Without ``fcntl`` (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on the platforms CI runs
        yield
        return
    lock = Path(path).with_name(Path(path).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
