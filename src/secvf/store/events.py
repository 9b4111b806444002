"""Security, lifecycle and exec-audit events as JSON Lines.

Events go to ``$SECVF_HOME/logs/<stream>-YYYY-MM-DD.jsonl`` (one file per stream
and UTC day, so files rotate daily), created 0600 in a 0700 directory. Each line is
one JSON object with at least ``time`` (RFC 3339, UTC), ``severity``, ``event``,
``pid`` and ``uid``. Writers append with ``O_APPEND`` and one ``write()`` per line,
so concurrent processes (supervisors, backends, the CLI) never interleave lines.

Streams: ``security`` (lifecycle, device-tree checks, refusals, hostile-guest
events) and ``exec`` (who ran what in which VM, with exit status and duration).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from secvf.store import paths

LOG_FILE_MODE = 0o600


class Severity(StrEnum):
    """How urgent an event is; CRITICAL means a promise of the product was at risk."""

    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"


def log_path(stream: str = "security", when: datetime | None = None) -> Path:
    """Return the file that holds ``stream``'s events for the UTC day of ``when``."""
    day = (when or datetime.now(UTC)).strftime("%Y-%m-%d")
    return paths.logs_dir() / f"{stream}-{day}.jsonl"


def write_event(
    event: str,
    *,
    severity: Severity = Severity.INFO,
    stream: str = "security",
    vm: str | None = None,
    vm_id: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Append one event and return the record that was written.

    Logging must never take the caller down: an unwritable log is reported on
    stderr and the event is dropped.
    """
    now = datetime.now(UTC)
    record: dict[str, Any] = {
        "time": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "severity": str(severity),
        "event": event,
        "vm": vm,
        "vm_id": vm_id,
        "pid": os.getpid(),
        "uid": os.getuid(),
    }
    record.update(fields)
    line = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
    try:
        fd = os.open(log_path(stream, now), os.O_WRONLY | os.O_APPEND | os.O_CREAT, LOG_FILE_MODE)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as exc:
        os.write(2, f"secvf: cannot write {stream} log: {exc}\n".encode())
    return record


def read_events(stream: str = "security") -> Iterator[dict[str, Any]]:
    """Yield every event of ``stream``, oldest file first; skips lines that are not JSON."""
    for path in sorted(paths.logs_dir().glob(f"{stream}-*.jsonl")):
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue
