"""Reading the event log: queries, following, and verifying the hash chain.

The one place that reads :mod:`secvf.store.eventlog`'s files for people and programs:
``secvf logs``, the MCP server's log tools and the TUI's log view all come here
through :mod:`secvf.api`.

- :func:`query` returns a stream's records that pass a :class:`LogFilter`, oldest
  first (with ``limit``: the newest ``limit`` of them).
- :func:`follow` yields records as writers append them, across daily files.
- :func:`verify` walks each stream's chain and reports every removed, edited,
  reordered, duplicated or spliced line, and every line that is corrupt, torn or not
  chained, with its file and line number.

Times given as text go through :func:`parse_time`: ``30m``, ``2h``, ``7d`` (before now)
or ISO 8601 (local time unless it names a zone).
"""

from __future__ import annotations

import bisect
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from secvf.errors import ConfigError, SecVFError
from secvf.store.eventlog import (
    GENESIS_HASH,
    EventLog,
    LineKind,
    LogFile,
    ParsedLine,
    Severity,
    parse_line,
)

#: The streams SecVF writes (``secvf.api.LOG_STREAMS`` repeats it; a test keeps them equal).
STREAMS = ("security", "exec", "mcp")

#: Severities, least urgent first.
SEVERITIES = tuple(str(s) for s in Severity)

#: How often :func:`follow` looks for new lines (seconds).
FOLLOW_POLL_S = 0.5

#: Units of a relative time (``2h``: two hours before now).
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)

_TIME_HELP = ("use a duration before now such as 30m, 2h or 7d (units s, m, h, d, w), or "
              "an ISO 8601 time such as 2025-06-01T14:00 (local time) or 2025-06-01T12:00Z")


class LogQueryError(SecVFError):
    """A log query that cannot run: an unknown stream or severity, a time that does not
    parse, or a time range that ends before it starts."""


# ---- parsing what a user asks for -----------------------------------------------------


def check_stream(stream: str) -> str:
    """``stream`` if SecVF writes it.

    Raises:
        LogQueryError: it is not one of :data:`STREAMS`.
    """
    if stream not in STREAMS:
        raise LogQueryError(f"no log stream named {stream!r}; streams: {', '.join(STREAMS)}")
    return stream


def parse_severity(text: str) -> Severity:
    """The severity ``text`` names, any case, with or without a trailing ``+``
    (``warning+``: WARNING and above; a severity filter is always a minimum).

    Raises:
        LogQueryError: it names none.
    """
    name = text.strip().rstrip("+").upper()
    if name not in SEVERITIES:
        raise LogQueryError(f"no severity {text!r}; use one of "
                            f"{', '.join(s.lower() for s in SEVERITIES)} (a minimum: "
                            "warning means warning and above)")
    return Severity(name)


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """The UTC time ``text`` means: ``2h`` (that long before ``now``) or ISO 8601.

    An ISO time without a zone is local time; a date alone is its local midnight.

    Raises:
        LogQueryError: ``text`` is neither, or is a negative or huge duration.
    """
    match = _RELATIVE.match(text)
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2).lower()]
        try:
            return (now or datetime.now(UTC)).astimezone(UTC) - timedelta(seconds=seconds)
        except OverflowError:
            raise LogQueryError(f"{text!r} is too far back; {_TIME_HELP}") from None
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise LogQueryError(f"{text!r} is not a time; {_TIME_HELP}") from None
    return as_utc(when)


def as_utc(when: datetime) -> datetime:
    """``when`` in UTC; a naive ``when`` is local time."""
    return when.astimezone(UTC)


def record_time(record: dict[str, Any]) -> datetime | None:
    """The record's ``time`` (None if it has none that parses)."""
    value = record.get("time")
    if not isinstance(value, str):
        return None
    try:
        return as_utc(datetime.fromisoformat(value))
    except ValueError:
        return None


@dataclass(frozen=True)
class LogFilter:
    """Which records a query keeps; None keeps everything for that criterion."""

    since: datetime | None = None  # at or after (aware, UTC)
    until: datetime | None = None  # at or before (aware, UTC)
    severity: Severity | None = None  # at least this urgent
    vm: str | None = None  # the VM's name or id
    event: str | None = None  # the event's name

    @classmethod
    def make(cls, *, since: datetime | None = None, until: datetime | None = None,
             severity: str | None = None, vm: str | None = None,
             event: str | None = None) -> LogFilter:
        """A filter from the API's arguments (naive times are local).

        Raises:
            LogQueryError: an unknown severity, or ``since`` after ``until``.
        """
        start = as_utc(since) if since else None
        end = as_utc(until) if until else None
        if start and end and start > end:
            stamp = "%Y-%m-%d %H:%M:%S UTC"
            raise LogQueryError(f"the time range ends before it starts: since "
                                f"{start:{stamp}} is after until {end:{stamp}}")
        return cls(start, end, parse_severity(severity) if severity else None, vm, event)

    def matches(self, record: dict[str, Any]) -> bool:
        """Whether ``record`` passes every criterion (a record without a usable time
        fails a time criterion, one with an unknown severity a severity one)."""
        if self.event is not None and record.get("event") != self.event:
            return False
        if self.vm is not None and self.vm not in (record.get("vm"), record.get("vm_id")):
            return False
        if self.severity is not None:
            sev = record.get("severity")
            if sev not in SEVERITIES or SEVERITIES.index(sev) < SEVERITIES.index(self.severity):
                return False
        if self.since is not None or self.until is not None:
            when = record_time(record)
            if when is None or (self.since and when < self.since) or (
                    self.until and when > self.until):
                return False
        return True

    def may_hold(self, file: LogFile) -> bool:
        """Whether ``file`` (one UTC day) can hold a record within the time range."""
        return not ((self.since and file.day < self.since.date())
                    or (self.until and file.day > self.until.date()))


# ---- querying and following -----------------------------------------------------------


def complete_lines(path: Path, offset: int, end: int | None = None) -> tuple[list[bytes], int]:
    """The complete lines (without newlines) of ``path`` from byte ``offset`` (up to
    ``end``), and the offset after the last of them; ([], offset) if it is gone."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read() if end is None else fh.read(max(0, end - offset))
    except FileNotFoundError:
        return [], offset
    cut = data.rfind(b"\n") + 1
    return data[:cut].split(b"\n")[:-1], offset + cut


def _records(lines: Iterable[bytes], filt: LogFilter) -> Iterator[dict[str, Any]]:
    for raw in lines:
        record = parse_line(raw).record
        if record is not None and filt.matches(record):
            yield record


def query(log: EventLog, stream: str, filt: LogFilter, *,
          limit: int | None = None) -> list[dict[str, Any]]:
    """``stream``'s records that pass ``filt``, oldest first; with ``limit``, only the
    newest ``limit`` of them. Lines that are not JSON objects are skipped (``verify``
    reports them).

    Raises:
        LogQueryError: an unknown stream, or a ``limit`` below 1.
    """
    check_stream(stream)
    if limit is not None and limit < 1:
        raise LogQueryError(f"limit must be 1 or more, not {limit}")
    kept: deque[dict[str, Any]] = deque(maxlen=limit)
    for file in log.files(stream):
        if filt.may_hold(file):
            kept.extend(_records(complete_lines(file.path, 0)[0], filt))
    return list(kept)


def follow(log: EventLog, stream: str, filt: LogFilter, *, backlog: int | None = 0,
           poll_s: float = FOLLOW_POLL_S,
           sleep: Callable[[float], None] = time.sleep) -> Iterator[dict[str, Any]]:
    """Yield ``stream``'s records that pass ``filt`` as they are written, for ever.

    First the newest ``backlog`` records already written (None: all of them, 0: none),
    then each new one; a new day's file is picked up once the current one is read.
    Between looks it calls ``sleep(poll_s)``. Only complete lines are read, so a line
    being written is yielded once it is whole.

    Raises:
        LogQueryError: an unknown stream, or a negative ``backlog``.
    """
    check_stream(stream)
    if backlog is not None and backlog < 0:
        raise LogQueryError(f"backlog must be 0 or more, not {backlog}")
    files = log.files(stream)
    current: Path | None = files[-1].path if files else None
    offset = 0
    recent: deque[dict[str, Any]] = deque(maxlen=backlog)
    for file in files:
        lines, end = complete_lines(file.path, 0)
        if backlog != 0 and filt.may_hold(file):
            recent.extend(_records(lines, filt))
        offset = end
    yield from recent
    while True:
        if current is not None:
            lines, offset = complete_lines(current, offset)
            yield from _records(lines, filt)
            if lines:
                continue
        newer = [f.path for f in log.files(stream) if current is None or f.path > current]
        if newer:
            current, offset = newer[0], 0
            continue
        sleep(poll_s)


# ---- verifying the chain --------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One thing :func:`verify` found wrong, at ``file``:``line`` (1-based; 0: the file)."""

    stream: str
    kind: str  # removed, edited, reordered, duplicate, spliced, corrupt, torn, unchained
    file: str
    line: int
    message: str

    def as_dict(self) -> dict[str, Any]:
        """The finding as JSON."""
        return {"stream": self.stream, "kind": self.kind, "file": self.file,
                "line": self.line, "message": self.message}


@dataclass(frozen=True)
class _Entry:
    file: str
    line: int
    parsed: ParsedLine

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def verify(log: EventLog, streams: Iterable[str] | None = None) -> dict[str, Any]:
    """Check the chain of each stream (every stream with files: None).

    Returns ``{"ok", "directory", "streams": [{stream, files, lines, first_seq,
    last_seq, findings}], "findings": [Finding.as_dict()], "retention": {retention_days,
    max_total_bytes} or {error}}``; ``ok`` is False when anything was found (an invalid
    retention policy is not a finding: it is in ``retention``). The start of a stream
    may be missing only where a ``log_rotated`` event records the removal of the file
    that ended there.

    Raises:
        LogQueryError: an unknown stream is named.
    """
    names = sorted({f.stream for f in log.files()}) if streams is None else [
        check_stream(s) for s in streams]
    rotated = _rotated_ends(log)
    summaries, findings = [], []
    for stream in names:
        entries, found, file_count = _read_chain(log, stream)
        found += _check_chain(stream, entries, rotated.get(stream, set()))
        found.sort(key=lambda f: (f.file, f.line))
        seqs = [e.parsed.seq for e in entries]
        summaries.append({"stream": stream, "files": file_count, "lines": len(entries),
                          "first_seq": min(seqs, default=None),
                          "last_seq": max(seqs, default=None), "findings": len(found)})
        findings += found
    try:
        policy = log.policy()
        retention: dict[str, Any] = {"retention_days": policy.retention_days,
                                     "max_total_bytes": policy.max_total_bytes}
    except ConfigError as exc:
        retention = {"error": str(exc)}
    return {"ok": not findings, "directory": str(log.directory), "streams": summaries,
            "findings": [f.as_dict() for f in findings], "retention": retention}


def _rotated_ends(log: EventLog) -> dict[str, set[tuple[int, str]]]:
    """Per stream, the (last_seq, last_hash) of every file ``log_rotated`` says it removed."""
    ends: dict[str, set[tuple[int, str]]] = {}
    for record in log.read("security"):
        if record.get("event") != "log_rotated" or not isinstance(record.get("removed"), list):
            continue
        for item in record["removed"]:
            if (isinstance(item, dict) and isinstance(item.get("last_seq"), int)
                    and isinstance(item.get("last_hash"), str)):
                ends.setdefault(str(item.get("stream")), set()).add(
                    (item["last_seq"], item["last_hash"]))
    return ends


def _read_chain(log: EventLog, stream: str) -> tuple[list[_Entry], list[Finding], int]:
    """Every chained line of ``stream`` in file order, and findings for the other lines.

    The files' sizes are taken under the stream's lock, so a line being appended while
    this reads is not mistaken for a torn one.
    """
    with log.locked(stream):
        files = log.files(stream)
    entries: list[_Entry] = []
    findings: list[Finding] = []
    for file in files:
        try:
            data = file.path.read_bytes()[:file.size]
        except FileNotFoundError:
            continue  # removed by retention meanwhile
        lines = data.split(b"\n")
        if lines[-1]:
            findings.append(Finding(stream, "torn", file.path.name, len(lines),
                                    "the file ends in a line without a newline (a write "
                                    "was cut short, or the file was cut)"))
        for number, raw in enumerate(lines[:-1], 1):
            parsed = parse_line(raw)
            if parsed.kind is LineKind.CHAINED:
                entries.append(_Entry(file.path.name, number, parsed))
            elif parsed.kind is LineKind.UNCHAINED:
                findings.append(Finding(stream, "unchained", file.path.name, number,
                                        "a line without seq/prev/hash: written before the "
                                        "log was chained, or inserted"))
            else:
                findings.append(Finding(stream, "corrupt", file.path.name, number,
                                        "not a JSON object (a torn write, or edited)"))
    return entries, findings, len(files)


def _check_chain(stream: str, entries: list[_Entry],
                 rotated: set[tuple[int, str]]) -> list[Finding]:
    """What is wrong with ``stream``'s chain ``entries`` (in file order)."""
    by_seq: dict[int, _Entry] = {}
    for entry in entries:
        by_seq.setdefault(entry.parsed.seq, entry)
    present = sorted(by_seq)
    found: list[Finding] = []

    def report(entry: _Entry, kind: str, message: str) -> None:
        found.append(Finding(stream, kind, entry.file, entry.line, message))

    highest = 0
    previous: _Entry | None = None  # the chained line before this one, in file order
    for entry in entries:
        line = entry.parsed
        if not line.intact:
            report(entry, "edited", f"seq {line.seq}: the line's content does not match "
                                    "its hash")
        if by_seq[line.seq] is not entry:
            report(entry, "duplicate", f"seq {line.seq} appears again (first at "
                                       f"{by_seq[line.seq].where})")
            previous = entry
            continue
        if line.seq < highest:
            report(entry, "reordered", f"seq {line.seq} comes after seq {highest}")
        highest = max(highest, line.seq)
        before = previous if previous is not None and previous.parsed.seq == line.seq - 1 \
            else by_seq.get(line.seq - 1)
        if line.seq == 1:
            if line.prev != GENESIS_HASH:
                report(entry, "spliced", "seq 1 does not start a chain (its prev is not the "
                                         "genesis hash)")
        elif before is None:
            _report_gap(entry, present, rotated, report)
        elif before.parsed.hash != line.prev:
            if before is previous and before.file != entry.file:
                report(entry, "spliced", f"the file does not continue the previous one: its "
                                         f"first line does not chain to {before.where} (a "
                                         "file replaced, or from another log)")
            else:
                report(before, "edited", f"seq {before.parsed.seq} was changed: the next "
                                         f"line ({entry.where}) chains to another hash")
        previous = entry
    return found


def _report_gap(entry: _Entry, present: list[int], rotated: set[tuple[int, str]],
                report: Callable[[_Entry, str, str], None]) -> None:
    """Report the lines missing just before ``entry`` (whose predecessor is absent)."""
    seq = entry.parsed.seq
    index = bisect.bisect_left(present, seq)
    if index == 0:  # the start of what is left
        if (seq - 1, entry.parsed.prev) not in rotated:
            report(entry, "removed", f"seq 1 to {seq - 1} (the start of the stream) are "
                                     "missing, and no log_rotated event records removing "
                                     "them")
        return
    first_missing = present[index - 1] + 1
    count = seq - first_missing
    report(entry, "removed", f"{count} line{'s' if count > 1 else ''} missing before this "
                             f"one (seq {first_missing}" +
                             (f" to {seq - 1})" if count > 1 else ")"))
