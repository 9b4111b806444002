"""Advisory file locks (``flock``) that guard a VM against concurrent changes.

Two locks per VM bundle:

* ``.lock`` — held briefly by any command that changes the VM (start, delete,
  rename, clone, edit). A second command fails at once with :class:`LockBusy`.
* ``run.lock`` — held by the VM's supervisor for as long as the VM runs. It is the
  ground truth for "is this VM running": the kernel drops it when the supervisor
  dies, however it dies, so a stale pid file can never make a dead VM look alive.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from secvf.errors import LockBusy


class FileLock:
    """An exclusive, non-blocking ``flock`` on one file; usable as a context manager."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> FileLock:
        """Take the lock or raise :class:`LockBusy` without waiting."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockBusy(f"{self.what} is busy: another secvf command holds it") from None
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_locked(path: Path) -> bool:
    """True if some process holds an exclusive ``flock`` on ``path`` right now."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextmanager
def locked(path: Path, what: str) -> Iterator[FileLock]:
    """Context manager form of :class:`FileLock`."""
    lock = FileLock(path, what).acquire()
    try:
        yield lock
    finally:
        lock.release()
