"""One JSON Lines event log in one directory (standard library only).

Events go to ``<directory>/<stream>-YYYY-MM-DD.jsonl`` (one file per stream and UTC
day, so files rotate daily), created 0600. Each line is one JSON object with at
least ``time`` (RFC 3339, UTC), ``severity``, ``event``, ``vm``, ``vm_id``, ``pid``
and ``uid``. Writers append with ``O_APPEND`` and one ``write()`` per line, so
concurrent processes (supervisors, backends, the CLI) never interleave lines.

This module imports nothing outside the standard library, so the stdlib-only
vsock backend writes its events with it; :mod:`secvf.store.events` is the same log
at SecVF's default place for everything else.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

LOG_FILE_MODE = 0o600


class Severity(StrEnum):
    """How urgent an event is; CRITICAL means a promise of the product was at risk."""

    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"


class EventLog:
    """The event streams kept in ``directory`` (which must exist, mode 0700)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __repr__(self) -> str:
        return f"EventLog({str(self.directory)!r})"

    def path(self, stream: str = "security", when: datetime | None = None) -> Path:
        """The file that holds ``stream``'s events for the UTC day of ``when``."""
        day = (when or datetime.now(UTC)).strftime("%Y-%m-%d")
        return self.directory / f"{stream}-{day}.jsonl"

    def write(
        self,
        event: str,
        *,
        severity: Severity = Severity.INFO,
        stream: str = "security",
        vm: str | None = None,
        vm_id: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Append one event and return the record.

        Never raises for an unwritable log: the failure is reported on stderr and
        the event is dropped (logging must not take a supervisor or backend down).
        """
        record = make_record(event, severity=severity, vm=vm, vm_id=vm_id, **fields)
        line = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
        try:
            fd = os.open(self.path(stream), os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                         LOG_FILE_MODE)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as exc:
            report_unwritable(stream, exc)
        return record

    def read(self, stream: str = "security") -> Iterator[dict[str, Any]]:
        """Yield every event of ``stream``, oldest file first; skips lines that are not JSON."""
        for path in sorted(self.directory.glob(f"{stream}-*.jsonl")):
            with path.open(encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        continue


def make_record(
    event: str,
    *,
    severity: Severity = Severity.INFO,
    vm: str | None = None,
    vm_id: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """The JSON object one event line holds (``fields`` after the fixed keys)."""
    record: dict[str, Any] = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "severity": str(severity),
        "event": event,
        "vm": vm,
        "vm_id": vm_id,
        "pid": os.getpid(),
        "uid": os.getuid(),
    }
    record.update(fields)
    return record


def report_unwritable(stream: str, exc: Exception) -> None:
    """Say on stderr that an event of ``stream`` was dropped, and why."""
    os.write(2, f"secvf: cannot write {stream} log: {exc}\n".encode())
