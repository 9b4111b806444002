"""Handing a cdrom medium to QEMU as an open file, not a path.

A jailed QEMU sees only its own files and runs as a uid that may not read yours, so the
supervisor opens the ISO itself (read-only), checks what it opened, and passes the
descriptor over QMP (``add-fd``): QEMU opens ``/dev/fdset/N``, which names that
descriptor. The fd set is removed again when the medium changes.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from qemu.qmp import QMPClient, QMPError

from secvf.store.disks import DiskError

FDSET_PREFIX = "/dev/fdset/"


def open_medium(path: Path) -> int:
    """Open ``path`` read-only; refuse what is not a regular file once opened.

    Raises:
        DiskError: it cannot be opened, or is not a regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise DiskError(f"cannot open the ISO {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DiskError(f"{path} is not a regular file")
    return fd


async def add_medium_fd(qmp: QMPClient, path: Path) -> str:
    """Pass ``path``, opened read-only, to QEMU; return the name QEMU opens it by.

    Raises:
        DiskError: see :func:`open_medium`.
        QMPError: QEMU refused the descriptor.
    """
    fd = open_medium(path)
    try:
        qmp.send_fd_scm(fd)
        reply = await qmp.execute("add-fd", {"opaque": str(path)})
    finally:
        os.close(fd)
    fdset = reply.get("fdset-id") if isinstance(reply, dict) else None
    if not isinstance(fdset, int):
        raise QMPError(f"add-fd answered {reply!r}")
    return f"{FDSET_PREFIX}{fdset}"


async def remove_medium_fd(qmp: QMPClient, name: str | None) -> None:
    """Drop the fd set ``name`` (from :func:`add_medium_fd`); nothing for other names."""
    if name is None or not name.startswith(FDSET_PREFIX):
        return
    with contextlib.suppress(QMPError, ValueError):
        await qmp.execute("remove-fd", {"fdset-id": int(name[len(FDSET_PREFIX):])})


__all__ = ["FDSET_PREFIX", "add_medium_fd", "open_medium", "remove_medium_fd"]
