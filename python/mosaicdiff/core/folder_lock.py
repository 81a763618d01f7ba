"""One writer per folder: an exclusive ``flock`` on the folder itself.

Model saves (`mosaicdiff.core.model_folder`) and sharded sampling
(`mosaicdiff.core.sample_shards`) hold it while they write, so a second writer fails at once
instead of deleting or overwriting the first one's files. The lock is taken on the folder's own
file descriptor: no lock file is left behind, and it goes with the process that held it (a kill
releases it). ``flock`` locks belong to an open file description, so two opens in one process
exclude each other too.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["folder_lock"]


@contextlib.contextmanager
def folder_lock(folder: Path, busy_message: str) -> Iterator[bool]:
    """Hold an exclusive flock on `folder` (which must exist) for the body.

    Args:
        folder (`Path`): the folder to lock.
        busy_message (`str`): the message of the error raised when another writer holds it.

    Yields:
        `bool`: True while the lock is held; False where there are no advisory locks (Windows,
        some NFS mounts), where the body runs unlocked.

    Raises:
        BlockingIOError: `busy_message`, at once, when another writer holds the lock.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; writers are not serialised
        yield False
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise BlockingIOError(busy_message) from None
        except OSError:  # a file system without flock (some NFS mounts): work unlocked
            logger.debug("flock unsupported on %s; working without a lock", folder)
            locked = False
        yield locked
    finally:
        os.close(fd)  # releases the lock
