"""Crash-safe file writes: the one helper every writer in the project uses.

A reader sees either the old file or the complete new one, never a torn write: the data goes to
a temporary file in the target's directory (same file system, so the rename is atomic), is
fsynced, then renamed over the target with ``os.replace``, and the directory is fsynced so the
rename itself survives a power cut. On any failure, the temporary file is removed.

The temporary name is hidden (``.<name>.<random>.tmp``) so a half-finished write never looks
like a result. File modes follow the umask, as for ``open()`` (``mkstemp`` alone would give
0600, which makes a saved model private to its writer).

The model serializer, the app's reports, the zoo's training scripts and the scripts share it
(the kernel package's config cache keeps its own lighter write: it may not import the application).
`json_safe` turns values into what these JSON files hold.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "fsync_path", "json_safe", "write_bytes_atomic", "write_json_atomic", "write_text_atomic"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file, or a directory where the OS allows it (a rename is durable only then)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # e.g. directories cannot be opened on some platforms: best effort
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path`` atomically.

    ``mode`` is ``"w"`` (text) or ``"wb"``. Parent folders are created. If the body raises, the
    target is untouched and the temporary file is removed.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> None:
    """``json.dump(obj)`` (indent 1 unless given) written atomically, with a final newline."""
    dump_kwargs.setdefault("indent", 1)
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, **dump_kwargs)
        f.write("\n")


def json_safe(v: Any) -> Any:
    """`v` as plain JSON values: tensors and numpy values as lists/numbers, tuples as lists, paths
    and other objects (dtypes, devices) as strings, NaN/inf as null (JSON has neither)."""
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if callable(getattr(v, "tolist", None)):  # torch tensors, numpy arrays and scalars
        return json_safe(v.tolist())
    return str(v)
