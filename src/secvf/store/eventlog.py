"""One JSON Lines event log in one directory (standard library only).

Events go to ``<directory>/<stream>-YYYY-MM-DD.jsonl`` (one file per stream and UTC
day, so files rotate daily), created 0600. Each line is one JSON object with at
least ``time`` (RFC 3339, UTC), ``severity``, ``event``, ``vm``, ``vm_id``, ``pid``
and ``uid``, then the event's own fields, then the chain fields.

**The hash chain** (docs/logs.md). Every line ends with three fields::

    ..., "seq": 42, "prev": "<sha256 of line 41>", "hash": "<sha256 of this line>"}

``hash`` is the SHA-256 (hex) of the line's own bytes *without* its ``,"hash":"…"``
suffix, i.e. of ``line[:line.rindex(',"hash":')] + "}"``. ``prev`` is the previous
line's ``hash`` in the same stream (the first line of a file chains to the last line
of the stream's previous file; the very first line of a stream to
:data:`GENESIS_HASH`), and ``seq`` counts the stream's lines from 1. So a removed,
edited or reordered line breaks the chain where it was (:mod:`secvf.store.logquery`
verifies it).

**Appending.** A writer holds an ``flock`` on the stream's lock file
(``.<stream>.lock``) while it reads the last link (the tail of the newest file, a few
KiB) and appends its line with one ``write()`` on an ``O_APPEND`` descriptor, so
concurrent processes (supervisors, backends, switches, the CLI) neither interleave
lines nor fork the chain. The lock file holds the name of the stream's newest file, so
a wall clock that steps back writes on in that file instead of forking the chain in an
older one. A torn last line (a writer killed mid-write, a full disk)
is ended with a newline first and skipped by the chain: nothing is ever truncated or
rewritten.

**Retention**, enforced by writers (never at start-up): files older than
``retention_days`` and, oldest first, files past ``max_total_bytes`` for the whole
directory are removed; never a file of the current UTC day and never a stream's newest
file (the one the next line chains to). Each removal is recorded in a ``log_rotated``
event (security stream) with each removed file's last ``seq`` and ``hash``, so the
chain of what is left still verifies. The policy is read from ``config/logs.json``
beside the log directory (``$SECVF_HOME/config/logs.json``); see :class:`RetentionPolicy`.

This module imports nothing outside the standard library (and :mod:`secvf.errors`),
so the stdlib-only vsock backend and switch write their events with it;
:mod:`secvf.store.events` is the same log at SecVF's default place for everything else.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from secvf.errors import ConfigError
from secvf.model.settingsfile import read_settings_text

LOG_FILE_MODE = 0o600

#: ``prev`` of a stream's very first line.
GENESIS_HASH = "0" * 64

#: The fields every line ends with, in this order; an event's own fields never use them.
CHAIN_FIELDS = ("seq", "prev", "hash")

#: The fixed fields every line starts with.
BASE_FIELDS = ("time", "severity", "event", "vm", "vm_id", "pid", "uid")

#: How much of a file's end a writer reads at a time to find the last link.
TAIL_CHUNK_BYTES = 8 * 1024

#: Writers check retention when a file crosses a multiple of this size ...
RETENTION_CHECK_BYTES = 256 * 1024
#: ... when they create a file, and at least this often per process and directory.
RETENTION_CHECK_INTERVAL = timedelta(hours=1)

#: The retention policy when ``logs.json`` does not exist.
DEFAULT_RETENTION_DAYS = 90
DEFAULT_MAX_TOTAL_BYTES = 1 << 30

#: The policy file's name, in the ``config`` directory beside the log directory.
CONFIG_FILE_NAME = "logs.json"

#: ``<stream>-YYYY-MM-DD.jsonl``
FILE_NAME = re.compile(r"^(?P<stream>[a-z][a-z0-9_]*)-(?P<day>\d{4}-\d{2}-\d{2})\.jsonl$")

_HASH_SUFFIX = re.compile(rb',"hash":"([0-9a-f]{64})"\}$')
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

#: The last time this process checked retention, per log directory.
_last_retention_check: dict[Path, datetime] = {}

Clock = Callable[[], datetime]


class Severity(StrEnum):
    """How urgent an event is; CRITICAL means a promise of the product was at risk."""

    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"


def utc_now() -> datetime:
    """The current time, UTC (the default clock)."""
    return datetime.now(UTC)


# ---- the chain ------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """Where a stream's chain ends: the last line's ``seq`` and ``hash``."""

    seq: int  # the line's number in its stream, from 1
    hash: str  # the line's SHA-256 (hex)


#: Where a stream with no line yet starts.
NO_LINK = Link(0, GENESIS_HASH)


class LineKind(StrEnum):
    """What a line of a log file is."""

    CHAINED = "chained"  # a JSON object with seq, prev and hash
    UNCHAINED = "unchained"  # a JSON object without them (written before the chain)
    CORRUPT = "corrupt"  # not a JSON object


@dataclass(frozen=True)
class ParsedLine:
    """One line of a log file, parsed (see :func:`parse_line`)."""

    kind: LineKind
    record: dict[str, Any] | None  # the JSON object (None for a corrupt line)
    seq: int = 0  # CHAINED: the line's seq
    prev: str = ""  # CHAINED: the hash it claims to follow
    hash: str = ""  # CHAINED: the hash it claims to have
    intact: bool = False  # CHAINED: the line's bytes hash to its ``hash``


def seal(record: Mapping[str, Any], after: Link) -> tuple[bytes, Link]:
    """The line (with its newline) that appends ``record`` after ``after``, and its link.

    Chain fields in ``record`` are replaced (the writer owns them).
    """
    body = {k: v for k, v in record.items() if k not in CHAIN_FIELDS}
    body["seq"] = after.seq + 1
    body["prev"] = after.hash
    text = json.dumps(body, default=str, separators=(",", ":")).encode()
    digest = hashlib.sha256(text).hexdigest()
    return text[:-1] + b',"hash":"' + digest.encode() + b'"}\n', Link(after.seq + 1, digest)


def parse_line(raw: bytes) -> ParsedLine:
    """Parse one line (without its newline) of a log file; never raises."""
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return ParsedLine(LineKind.CORRUPT, None)
    if not isinstance(record, dict):
        return ParsedLine(LineKind.CORRUPT, None)
    seq, prev, claimed = record.get("seq"), record.get("prev"), record.get("hash")
    if not (isinstance(seq, int) and isinstance(prev, str) and isinstance(claimed, str)):
        return ParsedLine(LineKind.UNCHAINED, record)
    match = _HASH_SUFFIX.search(raw)
    intact = (match is not None and match.group(1).decode() == claimed
              and hashlib.sha256(raw[:match.start()] + b"}").hexdigest() == claimed)
    return ParsedLine(LineKind.CHAINED, record, seq, prev, claimed, intact)


def last_link(path: Path) -> tuple[Link | None, bool]:
    """The link of the last chained line of ``path`` (None if it has none or does not
    exist), and whether the file ends in a torn line (no final newline).

    Reads the file from its end, :data:`TAIL_CHUNK_BYTES` at a time, only as far back as
    the last chained line.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, False
    try:
        end = os.fstat(fd).st_size
        tail = b""
        pos = end
        torn: bool | None = None
        while pos > 0:
            start = max(0, pos - TAIL_CHUNK_BYTES)
            tail = os.pread(fd, pos - start, start) + tail
            pos = start
            if torn is None:
                torn = not tail.endswith(b"\n")
            lines = tail.split(b"\n")
            # lines[0] may be cut (unless this reached the start); the last piece is
            # what follows the final newline: b"" or a torn line.
            complete = lines[1:-1] if pos > 0 else lines[:-1]
            for raw in reversed(complete):
                parsed = parse_line(raw)
                if parsed.kind is LineKind.CHAINED:
                    return Link(parsed.seq, parsed.hash), torn
            tail = lines[0] + b"\n"  # the cut line, completed by the next chunk
        return None, bool(torn)
    finally:
        os.close(fd)


# ---- retention policy -----------------------------------------------------------------


@dataclass(frozen=True)
class RetentionPolicy:
    """How long and how much of the log directory is kept (``config/logs.json``)::

        {"retention_days": 90, "max_total_size": "1G"}

    ``retention_days``: files whose UTC day is more than this many days before today
    are removed (a whole number >= 1, or null: no age limit). ``max_total_size``: the
    most the directory's log files may hold together, bytes or a size with K, M, G or T
    (powers of 1024); oldest files are removed first until the rest fit (null: no size
    limit). Files of today and each stream's newest file are never removed, so the
    directory can stay above the cap until the next day.
    """

    retention_days: int | None = DEFAULT_RETENTION_DAYS
    max_total_bytes: int | None = DEFAULT_MAX_TOTAL_BYTES

    @classmethod
    def from_mapping(cls, data: object, source: str) -> RetentionPolicy:
        """The policy ``data`` (the parsed JSON of ``source``) describes.

        Raises:
            ConfigError: ``data`` is not an object, has unknown keys or a bad value;
                the message names ``source`` and says what is allowed.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object like "
                              '{"retention_days": 90, "max_total_size": "1G"}')
        unknown = sorted(set(data) - {"retention_days", "max_total_size"})
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}; "
                              "allowed: retention_days, max_total_size")
        days = data.get("retention_days", DEFAULT_RETENTION_DAYS)
        if days is not None and (isinstance(days, bool) or not isinstance(days, int)
                                 or days < 1):
            raise ConfigError(f"{source}: retention_days must be a whole number of days, "
                              f"1 or more (or null for no age limit), not {days!r}")
        size = data.get("max_total_size", DEFAULT_MAX_TOTAL_BYTES)
        return cls(days, None if size is None else parse_size(size, f"{source}: max_total_size"))

    @classmethod
    def load(cls, path: Path) -> RetentionPolicy:
        """The policy in ``path``, or the defaults if it does not exist.

        Raises:
            ConfigError: the file cannot be read, is not JSON or is invalid.
        """
        text = read_settings_text(path)
        if text is None:
            return cls()
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_mapping(data, str(path))


def parse_size(value: object, what: str) -> int:
    """``value`` (bytes, or ``"500M"``-style text with K/M/G/T, powers of 1024) in bytes.

    Raises:
        ConfigError: ``value`` is not such a size or is 0; ``what`` names it.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
    else:
        raise ConfigError(f"{what} must be a number of bytes or a size such as \"500M\" "
                          f"or \"2G\" (or null for no size limit), not {value!r}")
    if size < 1:
        raise ConfigError(f"{what} must be more than 0, not {value!r}")
    return size


# ---- the log --------------------------------------------------------------------------


@dataclass(frozen=True)
class LogFile:
    """One file of the log directory."""

    path: Path
    stream: str
    day: date
    size: int


class EventLog:
    """The event streams kept in ``directory`` (which must exist, mode 0700).

    ``clock`` (UTC, aware) stamps records and picks files, ``policy`` overrides
    ``config/logs.json``; both exist for tests.
    """

    def __init__(self, directory: Path, *, clock: Clock = utc_now,
                 policy: RetentionPolicy | None = None) -> None:
        self.directory = directory
        self.clock = clock
        self._policy = policy

    def __repr__(self) -> str:
        return f"EventLog({str(self.directory)!r})"

    @property
    def config_path(self) -> Path:
        """The retention policy file: ``config/logs.json`` beside the log directory."""
        return self.directory.parent / "config" / CONFIG_FILE_NAME

    def policy(self) -> RetentionPolicy:
        """The retention policy in force.

        Raises:
            ConfigError: ``config/logs.json`` is unreadable or invalid.
        """
        return self._policy or RetentionPolicy.load(self.config_path)

    def path(self, stream: str = "security", when: datetime | None = None) -> Path:
        """The file that holds ``stream``'s events for the UTC day of ``when``."""
        day = (when or self.clock()).astimezone(UTC).strftime("%Y-%m-%d")
        return self.directory / f"{stream}-{day}.jsonl"

    def files(self, stream: str | None = None) -> list[LogFile]:
        """The log files of ``stream`` (every stream: None), oldest day first."""
        found = []
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        for entry in entries:
            match = FILE_NAME.match(entry.name)
            if not match or (stream is not None and match["stream"] != stream):
                continue
            try:
                day = date.fromisoformat(match["day"])
                size = entry.stat(follow_symlinks=False).st_size
            except (ValueError, OSError):
                continue
            found.append(LogFile(Path(entry.path), match["stream"], day, size))
        return sorted(found, key=lambda f: (f.day, f.stream))

    @contextlib.contextmanager
    def locked(self, name: str, *, wait: bool = True) -> Iterator[int | None]:
        """Hold the ``flock`` on ``.<name>.lock`` in the directory (a stream's name, or
        ``retention``) and yield the lock file's descriptor; with ``wait=False``, yield
        None at once if another holds it."""
        fd = os.open(self.directory / f".{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     LOG_FILE_MODE)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield None
                return
            yield fd
        finally:
            os.close(fd)  # releases the lock

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
        """Append one event and return the record as written (with its chain fields).

        Then enforces retention if it is due (see the module docstring).

        Never raises for an unwritable log: the failure is reported on stderr and
        the event is dropped (logging must not take a supervisor or backend down).
        """
        record, created, crossed = self._append(
            stream, lambda now: make_record(event, severity=severity, vm=vm, vm_id=vm_id,
                                            now=now, **fields))
        if created or crossed or self._retention_check_due():
            self.enforce_retention()
        return record

    def _append(self, stream: str, build: Callable[[datetime], dict[str, Any]]
                ) -> tuple[dict[str, Any], bool, bool]:
        """Append the record ``build(now)`` makes to ``stream`` under the stream's lock.

        Returns the record as written, whether its file was created, and whether the
        file crossed a multiple of :data:`RETENTION_CHECK_BYTES`.
        """
        try:
            with self.locked(stream) as lock_fd:
                assert lock_fd is not None
                now = self.clock()
                record = build(now)
                path = self._head(stream, lock_fd, self.path(stream, now))
                link, torn = last_link(path)
                if link is None:
                    link = self._link_before(stream, path)
                line, new = seal(record, link)
                record.update(seq=new.seq, prev=link.hash, hash=new.hash)
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                             LOG_FILE_MODE)
                try:
                    size = os.fstat(fd).st_size
                    os.write(fd, (b"\n" if torn else b"") + line)
                finally:
                    os.close(fd)
                if size == 0:  # a new newest file (the line is written whatever this does)
                    with contextlib.suppress(OSError):
                        os.ftruncate(lock_fd, 0)
                        os.pwrite(lock_fd, path.name.encode(), 0)
        except OSError as exc:
            report_unwritable(stream, exc)
            return build(self.clock()), False, False
        crossed = size // RETENTION_CHECK_BYTES != (size + len(line)) // RETENTION_CHECK_BYTES
        return record, size == 0, crossed

    @staticmethod
    def _head(stream: str, lock_fd: int, path: Path) -> Path:
        """``path``, or the stream's newest file if that is newer (the wall clock went
        back): the chain only goes forward. The newest file's name is kept in the
        stream's lock file by whoever created it."""
        head = os.pread(lock_fd, 256, 0).decode(errors="replace").strip()
        match = FILE_NAME.match(head)
        if match and match["stream"] == stream and head > path.name \
                and (path.parent / head).exists():
            return path.parent / head
        return path

    def _link_before(self, stream: str, path: Path) -> Link:
        """The last link of ``stream`` in a file older than ``path`` (newest first)."""
        for older in reversed(self.files(stream)):
            if older.path.name < path.name:
                link, _ = last_link(older.path)
                if link is not None:
                    return link
        return NO_LINK

    def _retention_check_due(self) -> bool:
        last = _last_retention_check.get(self.directory)
        return last is None or abs(self.clock() - last) >= RETENTION_CHECK_INTERVAL

    def enforce_retention(self) -> list[dict[str, Any]]:
        """Remove what the retention policy no longer keeps; return what was removed.

        Removed files are listed in one ``log_rotated`` event. Does nothing while another
        process enforces retention in this directory, or when the policy file is invalid
        (that is reported on stderr: an unreadable policy must not delete anything).
        Never raises.
        """
        now = self.clock()
        _last_retention_check[self.directory] = now
        try:
            policy = self.policy()
        except ConfigError as exc:
            report(f"log retention not enforced (nothing removed): {exc}")
            return []
        try:
            with self.locked("retention", wait=False) as mine:
                if mine is None:
                    return []
                removed = [r for f, reason in self._expired(policy, now.astimezone(UTC).date())
                           if (r := self._remove(f, reason)) is not None]
        except OSError as exc:
            report(f"log retention not enforced in {self.directory}: {exc}")
            return []
        if removed:
            self._append("security", lambda when: make_record(
                "log_rotated", now=when, removed=removed,
                removed_bytes=sum(r["bytes"] for r in removed),
                kept_bytes=sum(f.size for f in self.files()),
                retention_days=policy.retention_days, max_total_bytes=policy.max_total_bytes))
        return removed

    def _expired(self, policy: RetentionPolicy, today: date) -> list[tuple[LogFile, str]]:
        """The files ``policy`` removes, oldest first, each with why (``age``/``size``)."""
        files = self.files()
        newest = {f.stream: f for f in files}  # files are oldest first
        removable = [f for f in files if f.day < today and newest[f.stream] is not f]
        chosen: list[tuple[LogFile, str]] = []
        if policy.retention_days is not None:
            cutoff = today - timedelta(days=policy.retention_days)
            chosen = [(f, "age") for f in removable if f.day < cutoff]
        if policy.max_total_bytes is not None:
            total = sum(f.size for f in files) - sum(f.size for f, _ in chosen)
            for f in removable[len(chosen):]:
                if total <= policy.max_total_bytes:
                    break
                chosen.append((f, "size"))
                total -= f.size
        return chosen

    def _remove(self, file: LogFile, reason: str) -> dict[str, Any] | None:
        """Unlink ``file`` under its stream's lock; what ``log_rotated`` says of it."""
        with self.locked(file.stream):
            link, _ = last_link(file.path)
            try:
                size = file.path.stat().st_size
                file.path.unlink()
            except FileNotFoundError:
                return None  # removed meanwhile (by hand: verify will say so)
            except OSError as exc:
                report(f"log retention could not remove {file.path}: {exc}")
                return None
        return {"file": file.path.name, "stream": file.stream, "bytes": size, "reason": reason,
                "last_seq": link.seq if link else None, "last_hash": link.hash if link else None}

    def read(self, stream: str = "security") -> Iterator[dict[str, Any]]:
        """Yield every event of ``stream``, oldest file first; skips lines that are not
        JSON objects."""
        for file in self.files(stream):
            with contextlib.suppress(FileNotFoundError), file.path.open("rb") as fh:
                for raw in fh:
                    parsed = parse_line(raw.rstrip(b"\n"))
                    if parsed.record is not None:
                        yield parsed.record


def make_record(
    event: str,
    *,
    severity: Severity = Severity.INFO,
    vm: str | None = None,
    vm_id: str | None = None,
    now: datetime | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """The JSON object one event line holds before it is sealed: the fixed keys, then
    ``fields`` (without the chain fields, which the writer adds)."""
    when = (now or utc_now()).astimezone(UTC)
    record: dict[str, Any] = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "severity": str(severity),
        "event": event,
        "vm": vm,
        "vm_id": vm_id,
        "pid": os.getpid(),
        "uid": os.getuid(),
    }
    # a field named like a chain field keeps its value under another name
    record.update((f"event_{k}" if k in CHAIN_FIELDS else k, v) for k, v in fields.items())
    return record


def report_unwritable(stream: str, exc: Exception) -> None:
    """Say on stderr that an event of ``stream`` was dropped, and why."""
    report(f"cannot write {stream} log: {exc}")


def report(message: str) -> None:
    """Say ``message`` on stderr (``secvf: `` first); never raises."""
    with contextlib.suppress(OSError):
        os.write(2, f"secvf: {message}\n".encode())
