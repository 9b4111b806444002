"""Reading the guest's serial console output as it arrives.

The serial log is written by the guest, so it is untrusted: lines are bounded,
matching is plain substring/regex work on bytes, and the number of reported
device errors per run is capped. Two things are recognised:

* the ready marker (``SECVF-READY`` on a line of its own) printed by SecVF's init;
* kernel messages saying a virtio device is dead, e.g. ``virtio0: rx:id 117 is not a
  head!`` or ``... virtqueue ... broken``: the host side of that device (vsock,
  virtio-fs) cannot talk to the guest any more, and the operator should know.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from secvf.model.guest import READY_MARKER

MAX_LINE_BYTES = 4096
MAX_DEVICE_ERRORS = 10
_DEVICE_ERROR = re.compile(
    rb"(virtio\d*|vmw_vsock\S*|virtiofs\S*)[^\n]*"
    rb"(is not a head|out of range|virtqueue[^\n]*broken|vring[^\n]*broken)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class SerialEvent:
    """Something the scanner recognised on the console."""

    kind: str  # "ready" or "device_error"
    line: str  # the console line (decoded, bounded)


class SerialScanner:
    """Incremental line scanner: :meth:`feed` bytes, get the recognised events back."""

    def __init__(self) -> None:
        self._partial = b""
        self.ready = False
        self.device_errors = 0

    def feed(self, data: bytes) -> list[SerialEvent]:
        """Scan ``data`` (any chunking); return the events of the lines it completed."""
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-MAX_LINE_BYTES:]
        events = []
        for raw in lines:
            line = raw[-MAX_LINE_BYTES:].rstrip(b"\r")
            if not self.ready and line.strip() == READY_MARKER.encode():
                self.ready = True
                events.append(SerialEvent("ready", READY_MARKER))
            elif _DEVICE_ERROR.search(line) and self.device_errors < MAX_DEVICE_ERRORS:
                self.device_errors += 1
                events.append(SerialEvent("device_error", line.decode("utf-8", "replace")))
        return events
