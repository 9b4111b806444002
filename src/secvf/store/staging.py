"""Work directories in the VM library: staging bundles and the trash of a delete.

A new VM is assembled in ``vms/.creating-<hex>`` (``.cloning-``, ``.importing-``) and
renamed into place; a deleted VM is renamed to ``vms/.deleting-<hex>`` and then
removed. The process doing that work holds an exclusive ``flock`` on the directory
itself for as long as it works in it, so the garbage collector can tell a directory
somebody is using from one a killed process left behind: it removes only those whose
lock it can take, and removes them while it holds that lock.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from pathlib import Path
from typing import Self

from secvf.store import paths

#: What a work directory is for; its name is ``.<purpose>-<32 hex digits>``.
PURPOSES = ("creating", "cloning", "importing", "deleting")


def work_dir_name(purpose: str) -> str:
    """A fresh name for a work directory (it holds no VM name, so any name fits)."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown work directory purpose {purpose!r}")
    return f".{purpose}-{uuid.uuid4().hex}"


def is_work_dir(path: Path) -> bool:
    """True if ``path``'s name is that of a library work directory."""
    purpose, sep, tail = path.name[1:].partition("-")
    return (path.name.startswith(".") and sep == "-" and purpose in PURPOSES
            and len(tail) == 32 and all(c in "0123456789abcdef" for c in tail))


def new_work_dir(purpose: str) -> tuple[Path, int]:
    """Create a private work directory in the library and return it with the open fd
    that holds its lock (close the fd when done).

    A collector may take a directory for a leftover in the instant between its
    ``mkdir`` and its lock; then it is gone by the time the lock is ours (or before we
    could open it), and another one is made.
    """
    while True:
        path = paths.vms_dir() / work_dir_name(purpose)
        path.mkdir(mode=0o700)
        try:
            fd = hold(path)
        except FileNotFoundError:
            continue
        if os.fstat(fd).st_nlink:
            return path, fd
        os.close(fd)


def hold(path: Path) -> int:
    """Open directory ``path`` and take its lock (waiting for a collector that has it);
    return the fd, which holds the lock until it is closed."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def try_hold(path: Path) -> int | None:
    """Take the lock of work directory ``path`` if nobody holds it; the fd, or None if
    a live process holds it (or the directory is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class HeldDir:
    """A private work directory ``<root>/<prefix><hex>`` held with an ``flock`` until it
    is released (it then belongs to whoever renamed it into place) or discarded
    (removed). Leaving a ``with`` block discards it unless it was released."""

    def __init__(self, root: Path, prefix: str) -> None:
        self.path = root / f"{prefix}{uuid.uuid4().hex}"
        self.path.mkdir(mode=0o700)
        self._fd: int | None = hold(self.path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def release(self, new_path: Path) -> None:
        """The directory was renamed to ``new_path`` and is no work directory any more."""
        self.path = new_path
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Remove the directory unless it was released."""
        if self._fd is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._fd)
        self._fd = None


def sweep_unheld(root: Path, prefix: str) -> None:
    """Remove the work directories ``<root>/<prefix>*`` that no live process holds."""
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if not entry.name.startswith(prefix):
            continue
        fd = try_hold(entry)
        if fd is None:
            continue
        try:
            shutil.rmtree(entry, ignore_errors=True)
        finally:
            os.close(fd)


def trash(path: Path, prefix: str) -> bool:
    """Rename ``path`` to a fresh work name beside it and remove it (so no reader sees
    half a directory); False if it did not exist."""
    doomed = path.with_name(f"{prefix}{uuid.uuid4().hex}")
    try:
        path.rename(doomed)
    except FileNotFoundError:
        return False
    shutil.rmtree(doomed, ignore_errors=True)
    return True
