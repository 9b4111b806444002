"""A bound on the logs a malware-analysis guest writes through its serial ports.

A malware-analysis VM's console (ttyS0) and monitor port (ttyS1) are file chardevs QEMU
appends to (:func:`secvf.machine.common.add_serial`): the guest decides how much lands
on the host's disk. The supervisor watches their sizes (a ``stat`` every
:data:`CHECK_INTERVAL_S`) and, once a file passes the VM's ``guest_log_max_bytes``,
switches that chardev to QEMU's ``null`` backend (QMP ``chardev-change``; the serial
device stays, what the guest writes from then on is discarded) and appends
:data:`CUT_NOTE` to the file, so whoever reads it knows it is incomplete. A file can
pass the limit by at most what the guest writes in one interval.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import QMPClient, QMPError

#: Seconds between two looks at the log sizes.
CHECK_INTERVAL_S = 0.25
#: The line appended to a log that was cut (``{limit}`` is its limit in bytes).
CUT_NOTE = "\n[secvf] this log was cut at {limit} bytes: the guest wrote more; the rest " \
           "was discarded\n"
#: What every cut log holds (a reader looks for it).
CUT_MARK = b"[secvf] this log was cut at "


@dataclass(frozen=True)
class GuestLogPort:
    """One file-backed serial port: its chardev id and the file QEMU appends to."""

    chardev: str
    path: Path


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


class GuestLogCap:
    """Cuts each of ``ports`` once this run has written more than ``limit`` bytes to its
    file (module docstring; a file that runs append to counts from its size now)."""

    def __init__(self, ports: list[GuestLogPort], limit: int,
                 on_cut: Callable[[GuestLogPort, int], None]) -> None:
        self.ports, self.limit, self.on_cut = ports, limit, on_cut
        self.cut: set[str] = set()
        self.start = {port.chardev: _size(port.path) or 0 for port in ports}

    async def watch(self, qmp: Callable[[], QMPClient],
                    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Check the sizes until cancelled (or every port is cut)."""
        while len(self.cut) < len(self.ports):
            await sleep(CHECK_INTERVAL_S)
            await self.check(qmp())

    async def check(self, qmp: QMPClient) -> None:
        """Cut every port whose file is past the limit (QEMU errors leave it for the next
        check)."""
        for port in self.ports:
            if port.chardev in self.cut:
                continue
            size = _size(port.path)
            if size is None or size - self.start[port.chardev] <= self.limit:
                continue
            try:
                await qmp.execute("chardev-change", {
                    "id": port.chardev, "backend": {"type": "null", "data": {}}})
            except QMPError:
                continue
            self.cut.add(port.chardev)
            append_cut_note(port.path, self.limit)
            self.on_cut(port, size - self.start[port.chardev])


def append_cut_note(path: Path, limit: int) -> None:
    """Append :data:`CUT_NOTE` to ``path`` (never raises: the cut stands without it)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError:
        return
    try:
        os.write(fd, CUT_NOTE.format(limit=limit).encode())
    except OSError:
        pass
    finally:
        os.close(fd)
