"""An off-by-default trace of the vring lifecycle, for catching ring bugs in the act.

Enabled with ``--trace-file PATH`` (or ``SECVF_VSOCK_TRACE=PATH``), the backend appends one
line per event to ``PATH``::

    <monotonic ns> <event> key=value ...

Events (``gen`` numbers every :class:`~secvf.vsock.virtqueue.SplitVirtqueue` the backend
builds, so writes to an old ring stand out from writes to its successor):

=================  =============================================================================
``msg``            a vhost-user message arrived: ``req``, ``flags``, ``payload`` (hex), ``fds``
``reply``          its reply (or ack) was sent: ``req``, ``payload``
``start``          a ring was built: ``vq``, ``gen``, ``size``, ``base``, the ``desc``/``avail``/
                   ``used`` guest-physical addresses, and ``avail_idx``/``used_idx`` in memory
``stop``           a ring was stopped: ``vq``, ``gen``, ``why``, ``next_avail``, ``next_used``,
                   and ``avail_idx``/``used_idx`` in memory
``pop``            a chain was taken: ``gen``, ``avail`` (index), ``head``
``unpop``          the last pop was given back: ``gen``, ``avail``
``used``           a used element was written: ``gen``, ``ring`` (used ring GPA), ``idx`` (the
                   used index written), ``head``, ``len``, ``mem_idx`` (``used.idx`` read from
                   memory just before; any value other than ``idx`` means another writer)
``late``           a write to a stopped ring was refused: ``gen``, ``what``
``call``           the call eventfd was signalled: ``vq``
``reset_begin``    connections are being dropped for a driver reset; ``reset_end`` when done
=================  =============================================================================

:func:`check_trace` reads a trace back and lists every write that breaks the lifecycle
rules (a write to a stopped ring, a used index changed by another writer...).

The file is written through a buffer that the event loop flushes after every turn, so a
stalled guest finds the trace complete on disk. Past :data:`TRACE_ROTATE_BYTES` the file is
renamed to ``PATH.1`` (replacing an older one) and a new one is started.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

#: Environment variable that enables the trace when ``--trace-file`` is not given.
TRACE_ENV = "SECVF_VSOCK_TRACE"
#: A trace file is rotated once it grows past this size.
TRACE_ROTATE_BYTES = 64 << 20

TraceValue = int | str


class VringTrace:
    """Writes trace events to a file; a disabled trace (``path=None``) costs one test per event.

    Example::

        trace = VringTrace(Path("/tmp/vsock.trace"))
        trace.event("used", gen=3, idx=245, head=91, len=3776)
        trace.flush()
    """

    def __init__(self, path: Path | None, rotate_bytes: int = TRACE_ROTATE_BYTES) -> None:
        self.path = path
        self.enabled = path is not None
        self._rotate_bytes = rotate_bytes
        self._file: IO[str] | None = None
        self._written = 0
        if path is not None:
            self._open()

    def event(self, name: str, **fields: TraceValue) -> None:
        """Record one event (a no-op when the trace is disabled)."""
        if self._file is None:
            return
        parts = [str(time.monotonic_ns()), name]
        parts += [f"{key}={value}" for key, value in fields.items()]
        line = " ".join(parts) + "\n"
        self._file.write(line)
        self._written += len(line)
        if self._written >= self._rotate_bytes:
            self._rotate()

    def flush(self) -> None:
        """Push buffered events to the file (the event loop calls this after every turn)."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Flush and close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self) -> None:
        assert self.path is not None
        self._file = open(self.path, "a", encoding="ascii", buffering=1 << 16)
        self._written = self._file.tell()

    def _rotate(self) -> None:
        assert self.path is not None and self._file is not None
        self._file.close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._open()


#: The shared disabled trace.
NO_TRACE = VringTrace(None)


def trace_path_from_env() -> Path | None:
    """The trace file named by ``$SECVF_VSOCK_TRACE``, if set and not empty."""
    value = os.environ.get(TRACE_ENV, "")
    return Path(value) if value else None


@dataclass
class TraceCheck:
    """What :func:`check_trace` found: counts, and every broken rule with its trace line."""

    rings: int = 0  # rings started
    stops: int = 0  # rings stopped
    used_writes: int = 0  # used elements written
    violations: list[str] = field(default_factory=list)  # "<rule>: <trace line>"

    @property
    def ok(self) -> bool:
        """Whether no rule was broken."""
        return not self.violations

    def merge(self, other: TraceCheck) -> None:
        """Add ``other``'s counts and violations to this one."""
        self.rings += other.rings
        self.stops += other.stops
        self.used_writes += other.used_writes
        self.violations += other.violations


def check_trace(lines: Iterable[str]) -> TraceCheck:
    """Check a trace against the vring lifecycle rules of the vhost-user spec.

    Rules: a used element is written only to a ring that is started and not yet stopped
    (in particular not after GET_VRING_BASE for its queue was answered, until the queue
    is started again); used indices of one ring are consecutive; ``used.idx`` in memory
    is what the device last wrote (``mem_idx``), and no ``foreign`` or ``late`` event
    occurs. A trace that starts mid-session (a rotated file) is checked from its first
    ``start`` on for each queue.
    """
    result = TraceCheck()
    live: dict[str, str] = {}  # gen -> vq of rings started and not stopped
    queue_of: dict[str, str] = {}  # gen -> vq
    next_idx: dict[str, int] = {}  # gen -> the used index its next write must carry
    stopped_by_base: set[str] = set()  # vqs whose GET_VRING_BASE was answered
    pending_base: str | None = None  # vq of a GET_VRING_BASE not answered yet
    for line in lines:
        words = line.split()
        if len(words) < 2:
            continue
        event, fields = words[1], dict(w.split("=", 1) for w in words[2:] if "=" in w)
        gen = fields.get("gen", "")
        if event == "start":
            result.rings += 1
            live[gen] = queue_of[gen] = fields["vq"]
            stopped_by_base.discard(fields["vq"])
        elif event == "stop":
            result.stops += 1
            live.pop(gen, None)
        elif event == "msg" and fields.get("req") == "GET_VRING_BASE":
            pending_base = str(int.from_bytes(bytes.fromhex(fields["payload"][:8]), "little"))
        elif event == "reply" and fields.get("req") == "11" and pending_base is not None:
            stopped_by_base.add(pending_base)
            pending_base = None
        elif event == "used":
            result.used_writes += 1
            if gen not in queue_of:
                continue  # started before this (rotated) file began
            idx = int(fields["idx"])
            if gen not in live:
                result.violations.append(f"write to a stopped ring: {line.strip()}")
            elif queue_of[gen] in stopped_by_base:
                result.violations.append(f"write after GET_VRING_BASE: {line.strip()}")
            if int(fields["mem_idx"]) != idx:
                result.violations.append(f"used.idx changed by another writer: {line.strip()}")
            if gen in next_idx and next_idx[gen] != idx:
                result.violations.append(f"used index gap: {line.strip()}")
            next_idx[gen] = (idx + 1) & 0xFFFF
        elif event in ("foreign", "late"):
            result.violations.append(f"{event}: {line.strip()}")
    return result


def check_trace_files(paths: Iterable[Path]) -> TraceCheck:
    """:func:`check_trace` over files in order (e.g. ``PATH.1`` then ``PATH``)."""
    result = TraceCheck()
    for path in paths:
        if path.exists():
            with open(path, encoding="ascii", errors="replace") as lines:
                result.merge(check_trace(lines))
    return result
