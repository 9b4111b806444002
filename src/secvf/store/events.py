"""Security, lifecycle and exec-audit events as JSON Lines.

Events go to ``$SECVF_HOME/logs/<stream>-YYYY-MM-DD.jsonl``, 0600 in a 0700
directory; the file format, the hash chain, the append rules and retention
(``$SECVF_HOME/config/logs.json``) are :mod:`secvf.store.eventlog`'s; queries and
verification are :mod:`secvf.store.logquery`'s. Every event name is in
``docs/events.md`` (a test keeps it complete).

Streams: ``security`` (lifecycle, device-tree checks, refusals, hostile-guest
events, log rotation), ``exec`` (who ran what in which VM, with exit status and
duration) and ``mcp`` (the MCP server's audit of every call).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from secvf.errors import SecVFError
from secvf.store import paths
from secvf.store.eventlog import (
    LOG_FILE_MODE,
    EventLog,
    Severity,
    make_record,
    report_unwritable,
)

__all__ = ["LOG_FILE_MODE", "Severity", "default_log", "log_path", "read_events", "write_event"]


def default_log() -> EventLog:
    """The event log under ``$SECVF_HOME/logs`` (created 0700 on first use).

    Raises:
        ConfigError: ``$SECVF_HOME`` cannot be used.
    """
    return EventLog(paths.logs_dir())


def log_path(stream: str = "security", when: datetime | None = None) -> Path:
    """Return the file that holds ``stream``'s events for the UTC day of ``when``."""
    return default_log().path(stream, when)


def write_event(
    event: str,
    *,
    severity: Severity = Severity.INFO,
    stream: str = "security",
    vm: str | None = None,
    vm_id: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Append one event to the default log and return the record.

    Never raises: when the log cannot be used (an unwritable file, or a
    ``$SECVF_HOME`` that cannot be created) the failure is reported on stderr and
    the event is dropped.
    """
    try:
        log = default_log()
    except SecVFError as exc:
        report_unwritable(stream, exc)
        return make_record(event, severity=severity, vm=vm, vm_id=vm_id, **fields)
    return log.write(event, severity=severity, stream=stream, vm=vm, vm_id=vm_id, **fields)


def read_events(stream: str = "security") -> Iterator[dict[str, Any]]:
    """Yield every event of ``stream`` in the default log, oldest file first."""
    return default_log().read(stream)
