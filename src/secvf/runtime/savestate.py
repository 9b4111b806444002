"""Saving and loading a guest's state over QMP (snapshots, sandbox templates).

A guest's RAM is a shared file on a memory filesystem (see
:func:`secvf.machine.common.base_plan`). With the migration capability
``x-ignore-shared`` QEMU leaves shared RAM out of a migration stream, so saving is a
migration of the *device* state alone to a file descriptor SecVF opened and passed
over the QMP socket (``getfd`` + ``migrate fd:``: QEMU runs under ``-sandbox
spawn=deny``, so no ``exec:`` URI), plus a sparse copy of the RAM file while the
guest is paused. Loading is the reverse into a QEMU started with ``-incoming
defer`` whose RAM file is a copy of the saved one.

The disk is not part of the stream: a snapshot takes an internal qcow2 snapshot of
the disk while the guest is paused (:func:`snapshot_disk`), a template freezes the
disk it was saved with.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from qemu.qmp import QMPClient, QMPError

from secvf.errors import SnapshotError

#: The name the state file's descriptor gets in QEMU (``getfd``).
STATE_FD_NAME = "secvf-state"
#: The name a memory dump file's descriptor gets in QEMU.
DUMP_FD_NAME = "secvf-dump"
#: How often a save or load polls ``query-migrate``.
MIGRATE_POLL_S = 0.005
#: A save or load that takes longer than this is given up.
MIGRATE_TIMEOUT_S = 120.0
#: QEMU's default bandwidth cap (32 MiB/s) would throttle what the stream holds.
MAX_BANDWIDTH = 1 << 40
#: The block backend of every VM's system disk (``-drive id=disk0``).
DISK_BACKEND = "disk0"


async def prepare_migration(qmp: QMPClient) -> None:
    """Leave shared RAM out of migration streams and lift the bandwidth cap (on every
    QEMU SecVF starts: a save needs it on the source, a load on the destination).

    Raises:
        QMPError: QEMU refused.
    """
    await qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "x-ignore-shared", "state": True}]})
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})


async def save_device_state(qmp: QMPClient, path: Path) -> int:
    """Migrate the paused guest's device state to new file ``path``; return its size.

    QEMU's block devices are inactive afterwards; ``cont`` re-activates them.

    Raises:
        SnapshotError: the file cannot be created or the migration failed (``path`` is
            removed then).
    """
    with _new_file(path, "save the guest state") as fd:
        await _pass_fd(qmp, fd)
        await qmp.execute("migrate", {"uri": f"fd:{STATE_FD_NAME}"})
        await _wait_migration(qmp, "saving the guest state")
        os.fsync(fd)
        return os.fstat(fd).st_size


@contextlib.contextmanager
def _new_file(path: Path, what: str) -> Iterator[int]:
    """New file ``path`` (0600) for QEMU to write; removed if the body fails.

    Raises:
        SnapshotError: it cannot be created, or QEMU failed (``could not {what}``).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SnapshotError(f"cannot create {path}: {exc.strerror}") from exc
    try:
        yield fd
    except QMPError as exc:
        with contextlib.suppress(OSError):
            path.unlink()
        raise SnapshotError(f"QEMU could not {what}: {exc}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    finally:
        os.close(fd)


async def dump_guest_memory(qmp: QMPClient, path: Path) -> int:
    """Write the guest's memory to new file ``path`` (0600) as an ELF core, the format
    Volatility and ``crash`` read; return its size. QEMU pauses the guest while it
    writes and resumes it afterwards.

    Raises:
        SnapshotError: the file cannot be created or QEMU failed (``path`` is removed).
    """
    with _new_file(path, "dump the guest's memory") as fd:
        await _pass_fd(qmp, fd, DUMP_FD_NAME)
        await qmp.execute("dump-guest-memory", {
            "paging": False, "protocol": f"fd:{DUMP_FD_NAME}", "detach": False,
            "format": "elf"})
        os.fsync(fd)
        return os.fstat(fd).st_size


async def load_device_state(qmp: QMPClient, path: Path) -> None:
    """Load the device state in ``path`` into a QEMU started with ``-incoming defer``
    (its RAM file already holds the saved RAM); the guest stays paused.

    Raises:
        SnapshotError: the file cannot be opened or QEMU failed to load it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SnapshotError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        await _pass_fd(qmp, fd)
        await qmp.execute("migrate-incoming", {"uri": f"fd:{STATE_FD_NAME}"})
        await _wait_migration(qmp, f"loading the guest state {path}")
    except QMPError as exc:
        raise SnapshotError(f"QEMU could not load the guest state {path}: {exc}") from exc
    finally:
        os.close(fd)


async def snapshot_disk(qmp: QMPClient, tag: str) -> None:
    """Take internal snapshot ``tag`` of the (paused) guest's system disk.

    Raises:
        SnapshotError: QEMU could not (e.g. the disk's filesystem is full).
    """
    await _disk_snapshot_command(qmp, "blockdev-snapshot-internal-sync", tag,
                                 "snapshot the disk")


async def delete_disk_snapshot(qmp: QMPClient, tag: str) -> None:
    """Delete internal snapshot ``tag`` of the running guest's system disk.

    Raises:
        SnapshotError: QEMU could not.
    """
    await _disk_snapshot_command(qmp, "blockdev-snapshot-delete-internal-sync", tag,
                                 f"delete disk snapshot {tag}")


async def _disk_snapshot_command(qmp: QMPClient, command: str, tag: str, what: str) -> None:
    try:
        await qmp.execute(command, {"device": DISK_BACKEND, "name": tag})
    except QMPError as exc:
        raise SnapshotError(f"QEMU could not {what}: {exc}") from exc


async def _pass_fd(qmp: QMPClient, fd: int, name: str = STATE_FD_NAME) -> None:
    with contextlib.suppress(QMPError):  # a leftover of a failed save or load
        await qmp.execute("closefd", {"fdname": name})
    qmp.send_fd_scm(fd)
    await qmp.execute("getfd", {"fdname": name})


async def _wait_migration(qmp: QMPClient, what: str) -> None:
    deadline = time.monotonic() + MIGRATE_TIMEOUT_S
    while True:
        info = await qmp.execute("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            detail = info.get("error-desc", status) if isinstance(info, dict) else status
            raise SnapshotError(f"{what} failed: {detail}")
        if time.monotonic() > deadline:
            with contextlib.suppress(QMPError):
                await qmp.execute("migrate_cancel")
            raise SnapshotError(f"{what} did not finish within {MIGRATE_TIMEOUT_S:.0f} s")
        await asyncio.sleep(MIGRATE_POLL_S)
