"""The SecVF exec protocol: framing, message catalogue, incremental decoder.

This module is the single source of truth for the wire format between the host (the
exec client in :mod:`secvf.exec`) and the guest agent (``secvf/guest/agent.py``). It is
**standard-library only** and is copied unchanged into guest images next to the agent
(``/usr/lib/secvf/agent/protocol.py``); a test fails if it imports anything else.

Primer
======

Every frame is a fixed 12-byte header followed by a body (all integers big-endian)::

    offset  size  field
    0       2     magic        0x5356 ("SV")
    2       1     frame type   CONTROL, STDOUT, STDERR, STDIN, FILE_DATA, ERROR
    3       1     flags        FLAG_START (first frame of a stream), FLAG_END (last one)
    4       4     stream id    0 = the connection itself; >0 = one exec or file transfer
    8       4     body length  at most MAX_FRAME_BYTES, checked before the body is buffered

* CONTROL and ERROR bodies are UTF-8 JSON objects ``{"v": gen, "t": type, "p": {...}}``:
  ``v`` is the protocol generation the sender speaks, ``t`` a message name from
  :data:`MESSAGES`, ``p`` its payload. Unknown payload keys are ignored (so newer peers
  may add optional fields); missing keys take the defaults listed in :data:`MESSAGES`.
* STDOUT, STDERR, STDIN and FILE_DATA bodies are raw bytes (no base64, binary-safe).
* Five payload fields are enumerations, ``str`` enums here: ``error.code``
  (:class:`ErrorCode`), ``start_failed.kind`` (:class:`StartFailureKind`),
  ``file_error.kind`` (:class:`FileErrorKind`), ``restore_failed.kind``
  (:class:`RestoreFailureKind`) and ``detached_error.kind`` (:class:`DetachedErrorKind`).
  Their values are append-only; a sender cannot encode a value outside them, and a
  receiver keeps one it does not know.

Handshake: the client sends ``hello`` on stream 0; the agent answers ``hello`` with its
version, the negotiated generation (the minimum of both), its capabilities and its
keepalive interval. A peer that refuses a connection (for example the host's exec bridge
after a failed credential check) sends one ERROR frame and closes.

Restore (generation 2): after a guest was restored from saved state (a sandbox template),
the host sends ``restore`` on stream 0 with its time, fresh entropy, the hostname, MAC and
shares the guest should have; the agent applies them and answers ``restored`` (what it
did, with a list of per-item errors) or ``restore_failed`` (nothing was changed). Both
sides check the request with :func:`check_restore_request`. Agents that can carry it out
list ``restore`` in their ``hello`` capabilities.

Background processes (generation 3): ``exec`` with ``detach`` starts a command that
outlives the connection; the agent answers ``detached`` (its id) at once and keeps the
last output of it in a bounded buffer. ``ps`` lists them (``process_list``), ``attach``
streams one's buffered and then live output to its ``exit`` (``attached`` first, with the
bytes already dropped; ``output_dropped`` when a slow attacher was overtaken), and
``kill`` signals one's process group (``killed``). An id the agent does not know, a
process that is no longer running, or a full table get ``detached_error``. Agents that
support it list ``detach`` in their ``hello`` capabilities.

Streams: the client opens a stream by sending ``exec``, ``upload`` or ``download`` with a
fresh non-zero stream id and FLAG_START. Frames for that operation carry the same id;
the agent's last frame for it carries FLAG_END (``exit``, ``start_failed``,
``upload_done``, ``download_end``, ``file_error``). Frames the client sends for a stream
that has already ended (a late ``signal`` or stdin chunk) are ignored by the agent.

Errors raised here (all plain ``Exception`` subclasses, no secvf imports)::

    ProtocolViolation           the bytes or the JSON break this specification
     ├── BadFrame               bad magic, unknown frame type, decoder already failed
     ├── FrameTooLarge          a header announced a body above the limit (.size, .limit)
     ├── UnsupportedGeneration  the peer's generation is below MIN_GENERATION
     └── BadMessage             JSON that is not a valid message (bad shape, bad field)
          └── UnknownMessage    a message name this generation does not know (.name)
    InvalidRestore (ValueError) a restore request breaks a field rule (.field)
"""

from __future__ import annotations

import enum
import json
import os
import re
import select
import socket
import struct
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Protocol generation implemented by this module (see docs/VERSIONING.md).
#: 2 added ``restore`` / ``restored`` / ``restore_failed``; 3 added background processes
#: (``exec.detach``, ``detached``, ``ps``, ``process_list``, ``attach``, ``attached``,
#: ``output_dropped``, ``kill``, ``killed``, ``detached_error``).
GENERATION = 3
#: Oldest generation this module can still speak.
MIN_GENERATION = 1

MAGIC = 0x5356
HEADER = struct.Struct(">HBBII")
HEADER_BYTES = HEADER.size
#: Largest body a frame may carry; a header announcing more is rejected before reading it.
MAX_FRAME_BYTES = 1024 * 1024
#: Size of the data chunks (stdout, stderr, stdin, files) senders should use.
DATA_CHUNK_BYTES = 64 * 1024
#: Stdin frames from the host SDK: larger than output frames, so the guest (whose one vCPU
#: is what limits stdin) handles a quarter of the frames and writes; every generation's
#: agent accepts frames up to MAX_FRAME_BYTES.
STDIN_FRAME_BYTES = 256 * 1024
#: Largest stream id (u32).
MAX_STREAM_ID = 0xFFFFFFFF
#: Guest vsock port the agent listens on.
AGENT_VSOCK_PORT = 2222
#: How often the agent sends a keepalive while a command runs (silent or not).
KEEPALIVE_INTERVAL_S = 5.0
#: How long a client waits for *any* complete frame before declaring the agent dead.
AGENT_SILENCE_TIMEOUT_S = 30.0
#: Grace between SIGTERM and SIGKILL when the agent kills a command's process group.
KILL_GRACE_S = 2.0

assert DATA_CHUNK_BYTES <= STDIN_FRAME_BYTES <= MAX_FRAME_BYTES
assert AGENT_SILENCE_TIMEOUT_S >= 3 * KEEPALIVE_INTERVAL_S, "clients must tolerate lost beats"


class FrameType(enum.IntEnum):
    """The frame type byte: how to read the body."""

    CONTROL = 0x01  # JSON message
    STDOUT = 0x10  # raw bytes, agent -> client (also the PTY's combined output)
    STDERR = 0x11  # raw bytes, agent -> client
    STDIN = 0x12  # raw bytes, client -> agent
    FILE_DATA = 0x13  # raw bytes, either direction (upload or download chunk)
    ERROR = 0x7F  # JSON message "error"; the sender closes the connection after it


DATA_FRAME_TYPES = frozenset(
    {FrameType.STDOUT, FrameType.STDERR, FrameType.STDIN, FrameType.FILE_DATA}
)

FLAG_START = 0x01
FLAG_END = 0x02
KNOWN_FLAGS = FLAG_START | FLAG_END


class ErrorCode(enum.StrEnum):
    """``error.code``: why a peer sent an ERROR frame (and closed the connection).

    Values are append-only (docs/VERSIONING.md). A receiver accepts a code it does not
    know and treats it as a protocol error; a sender cannot encode one.
    """

    BAD_FRAME = "bad_frame"  # bad magic, unknown frame type or flags, handshake timeout
    FRAME_TOO_LARGE = "frame_too_large"  # a header announced a body above the limit
    BAD_MESSAGE = "bad_message"  # JSON that is not a valid message
    UNKNOWN_MESSAGE = "unknown_message"  # a message name this generation does not define
    PROTOCOL_VIOLATION = "protocol_violation"  # any other break of this specification
    UNSUPPORTED_GENERATION = "unsupported_generation"  # peer below MIN_GENERATION
    REFUSED = "refused"  # the bridge: the caller may not use this VM's exec channel
    BUSY = "busy"  # the bridge or the agent: too many sessions, retry later
    AGENT_UNAVAILABLE = "agent_unavailable"  # the bridge only: it cannot reach the agent


class StartFailureKind(enum.StrEnum):
    """``start_failed.kind``: why a command did not start."""

    NOT_FOUND = "not_found"  # no such program (a shell would exit 127)
    PERMISSION_DENIED = "permission_denied"  # not executable, or the user switch is denied
    BAD_CWD = "bad_cwd"  # the user cannot enter the working directory
    UNKNOWN_USER = "unknown_user"  # no such guest account
    INVALID_REQUEST = "invalid_request"  # the exec request itself is unusable
    OTHER = "other"  # any other system-call failure (see errno)


class FileErrorKind(enum.StrEnum):
    """``file_error.kind``: why an upload or download failed."""

    NOT_FOUND = "not_found"  # the path (or a directory on it) does not exist
    IS_A_DIRECTORY = "is_a_directory"  # the path names a directory
    NOT_REGULAR_FILE = "not_regular_file"  # a device, FIFO, socket ...
    PERMISSION_DENIED = "permission_denied"  # the user may not read or write it
    UNKNOWN_USER = "unknown_user"  # no such guest account
    OTHER = "other"  # any other system-call failure (see errno)


class RestoreFailureKind(enum.StrEnum):
    """``restore_failed.kind``: why the agent changed nothing for a ``restore``."""

    INVALID_REQUEST = "invalid_request"  # a field breaks its rule (restore_failed.field)
    UNSUPPORTED = "unsupported"  # this agent cannot apply restores (not root, not a guest)


class DetachedErrorKind(enum.StrEnum):
    """``detached_error.kind``: why the agent refused a background-process request."""

    NOT_FOUND = "not_found"  # no background process has this id (never had, or forgotten)
    NOT_RUNNING = "not_running"  # kill: the process has already exited
    LIMIT_REACHED = "limit_reached"  # too many background processes, or attachers of one
    INVALID_REQUEST = "invalid_request"  # the request itself is unusable (a bad signal)


class ProtocolViolation(Exception):
    """The peer sent bytes or JSON that break the exec protocol."""

    #: Machine-readable code, also sent in ERROR frames.
    code: ErrorCode = ErrorCode.PROTOCOL_VIOLATION


class BadFrame(ProtocolViolation):
    """A frame header is malformed (magic, type) or the decoder already failed."""

    code = ErrorCode.BAD_FRAME


class FrameTooLarge(ProtocolViolation):
    """A frame announced (or a sender tried to build) a body larger than the limit."""

    code = ErrorCode.FRAME_TOO_LARGE

    def __init__(self, size: int, limit: int = MAX_FRAME_BYTES) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"frame body of {size} bytes exceeds the limit of {limit} bytes")


class BadMessage(ProtocolViolation):
    """A CONTROL or ERROR body is not a valid message."""

    code = ErrorCode.BAD_MESSAGE


class UnsupportedGeneration(ProtocolViolation):
    """The peer only speaks generations this side no longer supports."""

    code = ErrorCode.UNSUPPORTED_GENERATION


class UnknownMessage(BadMessage):
    """A message name that this generation does not define."""

    code = ErrorCode.UNKNOWN_MESSAGE

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"unknown message type {name!r}")


# --------------------------------------------------------------------------- catalogue

REQUIRED: Any = object()
"""Sentinel default meaning "the sender must set this field"."""

#: Field kinds and the Python values they accept. "?" suffix = may also be null.
_KIND_CHECKS = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
    "map[str,str]": lambda v: (
        isinstance(v, dict) and all(isinstance(k, str) and isinstance(i, str) for k, i in v.items())
    ),
    "list[map[str,str]]": lambda v: isinstance(v, list) and all(_is_str_map(i) for i in v),
    "list[share]": lambda v: isinstance(v, list) and all(_is_share(i) for i in v),
    "list[process]": lambda v: isinstance(v, list) and all(_is_process(i) for i in v),
}


def _is_str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(i, str) for k, i in value.items()
    )


def _is_share(value: Any) -> bool:
    """A ``list[share]`` item: ``{"tag": str, "path": str, "read_only": bool}`` (more keys
    are ignored, like unknown payload keys)."""
    return (
        isinstance(value, dict)
        and isinstance(value.get("tag"), str)
        and isinstance(value.get("path"), str)
        and isinstance(value.get("read_only"), bool)
    )


#: The keys of a ``list[process]`` item (a background process in ``process_list``) and
#: the kind of each; more keys are ignored, like unknown payload keys.
PROCESS_FIELDS = {
    "id": "str",  # the agent's id for it (not a pid; never reused by one agent run)
    "argv": "list[str]",  # what runs (a shell command as ["/bin/sh", "-c", ...])
    "user": "str",  # the account it runs as
    "pid": "int",  # its guest pid (leader of its process group)
    "state": "str",  # "running" or "exited"
    "started_at": "number",  # when it started, seconds since the epoch (guest clock)
    "code": "int?",  # its exit status once exited (null: running, or a signal ended it)
    "signal": "int?",  # the signal that ended it, if one did
    "duration_ms": "int?",  # spawn to exit, once exited
    "buffered_bytes": "int",  # output bytes kept in its buffer now
    "dropped_bytes": "int",  # output bytes dropped from the buffer's front so far
}


def _is_process(value: Any) -> bool:
    """A ``list[process]`` item: every key of :data:`PROCESS_FIELDS` with its kind."""
    if not isinstance(value, dict):
        return False
    for key, kind in PROCESS_FIELDS.items():
        if key not in value:
            return False
        if value[key] is None:
            if not kind.endswith("?"):
                return False
        elif not _KIND_CHECKS[kind.rstrip("?")](value[key]):
            return False
    return True


@dataclass(frozen=True)
class FieldSpec:
    """One payload field of a message."""

    name: str  # key in the JSON payload
    kind: str  # one of _KIND_CHECKS, optionally suffixed "?" (null allowed)
    default: Any = REQUIRED  # value used when absent; REQUIRED = must be present
    introduced_in: int = 1  # generation that added the field
    choices: type[enum.StrEnum] | None = None  # the values a sender may use, if enumerated

    def accepts(self, value: Any) -> bool:
        """Return True if ``value`` is valid for this field."""
        if value is None:
            return self.kind.endswith("?")
        return _KIND_CHECKS[self.kind.rstrip("?")](value)

    def may_send(self, value: Any) -> bool:
        """Return True unless the field is enumerated and ``value`` is not one of its values.

        Only senders check this: a receiver keeps a value it does not know, so a value
        appended later does not break old peers (docs/VERSIONING.md).
        """
        return self.choices is None or value in {member.value for member in self.choices}


@dataclass(frozen=True)
class MessageSpec:
    """One message type: its name, direction, fields and place in a stream."""

    name: str  # the "t" value on the wire
    direction: str  # "to_agent", "to_client" or "both"
    stream: str  # "connection" (stream 0), "opens" (starts a stream), "within", "ends"
    fields: tuple[FieldSpec, ...] = ()
    introduced_in: int = 1  # generation that added the message
    doc: str = ""  # one line for docs/protocol.md and the snapshot


def _f(
    name: str,
    kind: str,
    default: Any = REQUIRED,
    choices: type[enum.StrEnum] | None = None,
    introduced_in: int = 1,
) -> FieldSpec:
    return FieldSpec(name, kind, default, introduced_in, choices)


def _f2(
    name: str, kind: str, default: Any = REQUIRED, choices: type[enum.StrEnum] | None = None
) -> FieldSpec:
    """A field of a generation-2 message."""
    return _f(name, kind, default, choices, introduced_in=2)


def _f3(
    name: str, kind: str, default: Any = REQUIRED, choices: type[enum.StrEnum] | None = None
) -> FieldSpec:
    """A field of a generation-3 message (or added to an older one in generation 3)."""
    return _f(name, kind, default, choices, introduced_in=3)


_START_FAILURE_FIELDS = (
    _f("kind", "str", choices=StartFailureKind),
    _f("errno", "int?", None),
    _f("errno_name", "str?", None),
    _f("stage", "str", "exec"),
    _f("message", "str", ""),
)

_FILE_ERROR_FIELDS = (
    _f("kind", "str", choices=FileErrorKind),
    _f("path", "str", ""),
    _f("errno", "int?", None),
    _f("errno_name", "str?", None),
    _f("message", "str", ""),
)

#: Every message of this generation, keyed by wire name.
MESSAGES: dict[str, MessageSpec] = {
    spec.name: spec
    for spec in (
        MessageSpec(
            "hello",
            "both",
            "connection",
            (
                _f("generation", "int"),
                _f("software", "str", ""),
                _f("capabilities", "list[str]", []),
                _f("keepalive_interval_ms", "int?", None),
                _f("max_frame_bytes", "int?", None),
            ),
            doc="handshake; client first, agent answers with the negotiated generation",
        ),
        MessageSpec(
            "error",
            "both",
            "connection",
            (_f("code", "str", choices=ErrorCode), _f("message", "str", "")),
        ),
        MessageSpec("keepalive", "to_client", "connection", doc="sent while commands run"),
        MessageSpec("ping", "to_agent", "connection", doc="readiness probe"),
        MessageSpec("pong", "to_client", "connection", (_f("agent_version", "str", ""),)),
        MessageSpec("info", "to_agent", "connection", doc="asks for agent_info"),
        MessageSpec(
            "agent_info",
            "to_client",
            "connection",
            (
                _f("agent_version", "str"),
                _f("generation", "int"),
                _f("hostname", "str", ""),
                _f("uptime_s", "number", 0),
                _f("users", "list[str]", []),
                _f("default_user", "str", ""),
                _f("python", "str", ""),
                _f("kernel", "str", ""),
            ),
        ),
        MessageSpec(
            "exec",
            "to_agent",
            "opens",
            (
                _f("argv", "list[str]?", None),
                _f("shell", "str?", None),
                _f("env", "map[str,str]", {}),
                _f("cwd", "str?", None),
                _f("user", "str?", None),
                _f("tty", "bool", False),
                _f("rows", "int", 24),
                _f("cols", "int", 80),
                _f("stdin", "bool", False),
                _f("timeout_s", "number?", None),
                _f3("detach", "bool", False),
            ),
            doc="run argv (or shell via /bin/sh -c); exactly one of argv/shell; "
            "detach (gen 3): in the background, answered by detached",
        ),
        MessageSpec("started", "to_client", "within", (_f("pid", "int"),)),
        MessageSpec("start_failed", "to_client", "ends", _START_FAILURE_FIELDS),
        MessageSpec(
            "stdin_error",
            "to_client",
            "within",
            (_f("errno", "int?", None), _f("errno_name", "str?", None), _f("message", "str", "")),
            doc="writing stdin failed (non-terminal); further stdin is dropped",
        ),
        MessageSpec(
            "exit",
            "to_client",
            "ends",
            (
                _f("code", "int?", None),
                _f("signal", "int?", None),
                _f("timed_out", "bool", False),
                _f("cancelled", "bool", False),
                _f("duration_ms", "int", 0),
            ),
        ),
        MessageSpec("stdin_eof", "to_agent", "within", doc="close the command's stdin"),
        MessageSpec("signal", "to_agent", "within", (_f("signum", "int"),)),
        MessageSpec("resize", "to_agent", "within", (_f("rows", "int"), _f("cols", "int"))),
        MessageSpec("cancel", "to_agent", "within", doc="kill the process group (TERM, KILL)"),
        MessageSpec(
            "upload",
            "to_agent",
            "opens",
            (_f("path", "str"), _f("mode", "int?", None), _f("user", "str?", None)),
            doc="write a file as user; FILE_DATA chunks follow upload_ready",
        ),
        MessageSpec("upload_ready", "to_client", "within"),
        MessageSpec("upload_end", "to_agent", "within", doc="all FILE_DATA sent"),
        MessageSpec(
            "upload_done",
            "to_client",
            "ends",
            (_f("path", "str"), _f("size", "int"), _f("mode", "int")),
        ),
        MessageSpec(
            "download",
            "to_agent",
            "opens",
            (_f("path", "str"), _f("user", "str?", None)),
            doc="read a file as user",
        ),
        MessageSpec(
            "download_start",
            "to_client",
            "within",
            (_f("path", "str"), _f("size", "int"), _f("mode", "int")),
        ),
        MessageSpec("download_end", "to_client", "ends", (_f("size", "int"),)),
        MessageSpec("file_error", "to_client", "ends", _FILE_ERROR_FIELDS),
        MessageSpec(
            "restore",
            "to_agent",
            "connection",
            (
                _f2("time_ns", "int"),
                _f2("entropy", "str"),
                _f2("hostname", "str?", None),
                _f2("mac", "str?", None),
                _f2("shares", "list[share]", []),
                _f2("clean_tmp", "bool", False),
            ),
            introduced_in=2,
            doc="make a restored guest its own machine: clock, RNG, hostname, MAC, /tmp, shares",
        ),
        MessageSpec(
            "restored",
            "to_client",
            "connection",
            (
                _f2("clock_offset_ns", "int?", None),
                _f2("guest_time_ns", "int", 0),
                _f2("reseeded", "bool", False),
                _f2("hostname", "str", ""),
                _f2("mac", "str?", None),
                _f2("dhcp_restarted", "bool", False),
                _f2("mounted", "list[share]", []),
                _f2("tmp_entries_removed", "int", 0),
                _f2("errors", "list[map[str,str]]", []),
            ),
            introduced_in=2,
            doc="what restore did; errors: [{item, message}] for the parts that failed",
        ),
        MessageSpec(
            "restore_failed",
            "to_client",
            "connection",
            (
                _f2("kind", "str", choices=RestoreFailureKind),
                _f2("field", "str?", None),
                _f2("message", "str", ""),
            ),
            introduced_in=2,
            doc="restore refused before anything was changed",
        ),
        MessageSpec(
            "detached",
            "to_client",
            "ends",
            (_f3("id", "str"), _f3("pid", "int")),
            introduced_in=3,
            doc="a detached exec started: its id (for ps, attach, kill) and pid",
        ),
        MessageSpec(
            "ps", "to_agent", "opens", introduced_in=3, doc="list the background processes"
        ),
        MessageSpec(
            "process_list",
            "to_client",
            "ends",
            (_f3("processes", "list[process]", []),),
            introduced_in=3,
            doc="every background process the agent knows, oldest first",
        ),
        MessageSpec(
            "attach",
            "to_agent",
            "opens",
            (_f3("id", "str"),),
            introduced_in=3,
            doc="stream a background process's buffered, then live output until it exits",
        ),
        MessageSpec(
            "attached",
            "to_client",
            "within",
            (
                _f3("id", "str"),
                _f3("pid", "int"),
                _f3("state", "str"),
                _f3("dropped_bytes", "int", 0),
            ),
            introduced_in=3,
            doc="attach accepted; dropped_bytes: output lost before the first byte sent",
        ),
        MessageSpec(
            "output_dropped",
            "to_client",
            "within",
            (_f3("bytes", "int"),),
            introduced_in=3,
            doc="this attacher fell behind the buffer: that many bytes were skipped here",
        ),
        MessageSpec(
            "kill",
            "to_agent",
            "opens",
            (_f3("id", "str"), _f3("signum", "int", 15)),
            introduced_in=3,
            doc="send signum to a background process's process group",
        ),
        MessageSpec(
            "killed",
            "to_client",
            "ends",
            (_f3("id", "str"), _f3("signum", "int")),
            introduced_in=3,
            doc="the signal was delivered",
        ),
        MessageSpec(
            "detached_error",
            "to_client",
            "ends",
            (
                _f3("kind", "str", choices=DetachedErrorKind),
                _f3("id", "str", ""),
                _f3("message", "str", ""),
            ),
            introduced_in=3,
            doc="a detach, ps, attach or kill request refused",
        ),
    )
}


# --------------------------------------------------------------------------- restore rules

#: Host entropy a ``restore`` carries (hex in ``restore.entropy``), in bytes.
RESTORE_MIN_ENTROPY_BYTES = 16
RESTORE_MAX_ENTROPY_BYTES = 512
#: Most shares one ``restore`` may mount.
RESTORE_MAX_SHARES = 32
#: Longest hostname (the kernel's HOST_NAME_MAX).
HOSTNAME_MAX_BYTES = 64
#: Longest virtio-fs tag (the device's config field).
SHARE_TAG_MAX_BYTES = 36
#: Longest guest mount point a share may have.
GUEST_PATH_MAX_BYTES = 255
#: The earliest host time a ``restore`` may carry (2020-01-01T00:00:00Z); earlier means
#: the host's own clock is broken, and the guest keeps its clock.
RESTORE_MIN_TIME_NS = 1_577_836_800 * 1_000_000_000
#: Guest directories no share is mounted on or below (the same list as
#: ``secvf.machine.shares.GUEST_SYSTEM_DIRS``; a unit test keeps them equal).
GUEST_SYSTEM_DIRS = (
    "bin",
    "boot",
    "dev",
    "etc",
    "home",
    "lib",
    "lib32",
    "lib64",
    "libx32",
    "proc",
    "root",
    "run",
    "sbin",
    "sys",
    "tmp",
    "usr",
    "var",
)

_HOSTNAME_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
_SHARE_TAG = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_GUEST_PATH_CHARS = re.compile(r"[A-Za-z0-9._@+/-]+")
_HEX = re.compile(r"[0-9a-f]*")


class InvalidRestore(ValueError):
    """A ``restore`` request breaks a field rule; nothing may be applied.

    ``field`` names the payload field (``shares[2].path`` for one share's path).
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"restore.{field}: {message}")


def check_hostname(name: str) -> None:
    """Check a hostname: dot-separated labels of letters, digits and inner hyphens.

    Raises:
        InvalidRestore: field ``hostname``.
    """
    if len(name.encode()) > HOSTNAME_MAX_BYTES:
        raise InvalidRestore("hostname", f"longer than {HOSTNAME_MAX_BYTES} bytes")
    if not name or not all(_HOSTNAME_LABEL.fullmatch(label) for label in name.split(".")):
        raise InvalidRestore(
            "hostname",
            f"{name[:80]!r} is not a hostname (labels of letters, digits and inner '-', "
            "separated by '.')",
        )


def check_mac(mac: str) -> None:
    """Check a MAC address: six lower-case hex pairs with ':', unicast, not all zero.

    Raises:
        InvalidRestore: field ``mac``.
    """
    if not _MAC.fullmatch(mac):
        raise InvalidRestore(
            "mac", f"{mac[:80]!r} is not a MAC address like 52:54:00:12:34:56 (lower-case hex)"
        )
    if int(mac[:2], 16) & 1:
        raise InvalidRestore("mac", f"{mac} is a multicast address; a NIC needs a unicast one")
    if mac == "00:00:00:00:00:00":
        raise InvalidRestore("mac", "the all-zero address is not a NIC address")


def check_guest_path(path: str, field: str = "path") -> None:
    """Check a share's guest mount point: absolute, normalised, plain characters, not on
    or below a guest system directory (the host's rule for shares).

    Raises:
        InvalidRestore: field ``field``.
    """
    parts = path.split("/")
    if len(path.encode()) > GUEST_PATH_MAX_BYTES:
        raise InvalidRestore(field, f"longer than {GUEST_PATH_MAX_BYTES} bytes")
    if path == "/" or parts[0] or any(p in ("", ".", "..") for p in parts[1:]):
        raise InvalidRestore(
            field,
            f"{path[:80]!r} must be an absolute, normalised path "
            "below / (no '.', '..' or empty components)",
        )
    if not _GUEST_PATH_CHARS.fullmatch(path):
        raise InvalidRestore(
            field, f"{path[:80]!r} may only contain letters, digits and . _ @ + - /"
        )
    if parts[1] in GUEST_SYSTEM_DIRS:
        raise InvalidRestore(
            field,
            f"{path!r} would hide the guest's own /{parts[1]}; use "
            "/workspace, /mnt/..., /srv/... or a new top-level directory",
        )


def check_restore_request(payload: Mapping[str, Any]) -> None:
    """Check the rules of a ``restore`` payload (as :func:`build_payload` returns it).

    The host client calls this before sending and the agent before applying anything.

    Raises:
        InvalidRestore: the first rule broken, with the field and what is wrong.
    """
    if payload["time_ns"] < RESTORE_MIN_TIME_NS:
        raise InvalidRestore(
            "time_ns", f"{payload['time_ns']} is before 2020: the host's clock is wrong"
        )
    entropy = payload["entropy"]
    if len(entropy) % 2 or not _HEX.fullmatch(entropy):
        raise InvalidRestore("entropy", "must be lower-case hex (two digits per byte)")
    if not RESTORE_MIN_ENTROPY_BYTES <= len(entropy) // 2 <= RESTORE_MAX_ENTROPY_BYTES:
        raise InvalidRestore(
            "entropy",
            f"{len(entropy) // 2} bytes; send "
            f"{RESTORE_MIN_ENTROPY_BYTES}-{RESTORE_MAX_ENTROPY_BYTES}",
        )
    if payload["hostname"] is not None:
        check_hostname(payload["hostname"])
    if payload["mac"] is not None:
        check_mac(payload["mac"])
    shares = payload["shares"]
    if len(shares) > RESTORE_MAX_SHARES:
        raise InvalidRestore("shares", f"{len(shares)} shares; at most {RESTORE_MAX_SHARES}")
    tags: set[str] = set()
    paths: list[str] = []
    for i, share in enumerate(shares):
        tag, path = share["tag"], share["path"]
        if len(tag.encode()) > SHARE_TAG_MAX_BYTES or not _SHARE_TAG.fullmatch(tag):
            raise InvalidRestore(
                f"shares[{i}].tag",
                f"{tag[:80]!r} must be a letter then "
                f"letters, digits, '_' or '-', at most {SHARE_TAG_MAX_BYTES} bytes",
            )
        if tag in tags:
            raise InvalidRestore(f"shares[{i}].tag", f"two shares are tagged {tag!r}")
        tags.add(tag)
        check_guest_path(path, f"shares[{i}].path")
        for other in paths:
            if path == other or path.startswith(other + "/") or other.startswith(path + "/"):
                raise InvalidRestore(f"shares[{i}].path", f"{path} overlaps {other}")
        paths.append(path)


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class Frame:
    """One decoded frame: header fields plus the raw body."""

    type: FrameType  # how to read the body
    flags: int  # FLAG_START / FLAG_END bits
    stream_id: int  # 0 = connection, >0 = one operation
    body: bytes  # JSON (CONTROL, ERROR) or raw data

    @property
    def ends_stream(self) -> bool:
        """True if this is the sender's last frame for its stream."""
        return bool(self.flags & FLAG_END)


@dataclass(frozen=True)
class Message:
    """A decoded CONTROL or ERROR body, validated and filled with defaults."""

    name: str  # wire name ("exec", "exit", ...)
    payload: dict[str, Any]  # every field of the spec, defaults applied
    generation: int  # the "v" the sender put on the message
    stream_id: int = 0  # copied from the frame
    flags: int = 0  # copied from the frame

    def __getitem__(self, key: str) -> Any:
        return self.payload[key]


def encode_frame(frame_type: FrameType, stream_id: int, body: bytes, flags: int = 0) -> bytes:
    """Return header + body for one frame.

    Raises:
        FrameTooLarge: ``body`` is longer than :data:`MAX_FRAME_BYTES`.
        ValueError: ``stream_id`` or ``flags`` out of range.
    """
    if len(body) > MAX_FRAME_BYTES:
        raise FrameTooLarge(len(body))
    if not 0 <= stream_id <= MAX_STREAM_ID:
        raise ValueError(f"stream id {stream_id} out of range")
    if flags & ~KNOWN_FLAGS:
        raise ValueError(f"unknown flag bits {flags:#x}")
    return HEADER.pack(MAGIC, int(frame_type), flags, stream_id, len(body)) + body


def build_payload(name: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``fields`` against message ``name`` and return the full payload.

    Raises:
        UnknownMessage: ``name`` is not in :data:`MESSAGES`.
        BadMessage: a field is missing, unknown to the spec, of the wrong type, or not
            one of its enumeration's values.
    """
    spec = MESSAGES.get(name)
    if spec is None:
        raise UnknownMessage(name)
    unknown = set(fields) - {f.name for f in spec.fields}
    if unknown:
        raise BadMessage(f"{name}: unknown field(s) {sorted(unknown)}")
    payload = _apply_spec(spec, fields)
    for fs in spec.fields:
        if not fs.may_send(payload[fs.name]):
            value = payload[fs.name]
            raise BadMessage(f"{name}: field {fs.name!r} has no value {value!r:.80}")
    return payload


def encode_message(name: str, stream_id: int = 0, flags: int | None = None, **fields: Any) -> bytes:
    """Return a CONTROL frame (ERROR frame for ``error``) carrying message ``name``.

    ``flags`` defaults to what the message's place in a stream implies: FLAG_START for
    messages that open a stream, FLAG_END for messages that end one.

    Raises:
        UnknownMessage, BadMessage: see :func:`build_payload`.
        FrameTooLarge: the JSON body is over :data:`MAX_FRAME_BYTES`.
    """
    payload = build_payload(name, fields)
    spec_flags = {"opens": FLAG_START, "ends": FLAG_END}.get(MESSAGES[name].stream, 0)
    body = json.dumps(
        {"v": GENERATION, "t": name, "p": payload}, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    frame_type = FrameType.ERROR if name == "error" else FrameType.CONTROL
    return encode_frame(frame_type, stream_id, body, spec_flags if flags is None else flags)


def encode_error_frame(code: str, message: str, stream_id: int = 0) -> bytes:
    """Return an ERROR frame; the sender should close the connection right after it.

    Used by the agent for protocol violations and by the host's exec bridge to refuse a
    connection (``refused``, ``busy``, ``agent_unavailable``).

    Raises:
        BadMessage: ``code`` is not an :class:`ErrorCode` value.
    """
    return encode_message("error", stream_id, code=code, message=message[:4096])


def encode_data(frame_type: FrameType, stream_id: int, data: bytes, flags: int = 0) -> bytes:
    """Return a data frame (STDOUT, STDERR, STDIN, FILE_DATA) carrying raw ``data``."""
    if frame_type not in DATA_FRAME_TYPES:
        raise ValueError(f"{frame_type!r} is not a data frame type")
    return encode_frame(frame_type, stream_id, data, flags)


def data_frame_parts(
    frame_type: FrameType,
    stream_id: int,
    data: bytes | bytearray | memoryview,
    chunk_bytes: int = DATA_CHUNK_BYTES,
) -> list[bytes | memoryview]:
    """Return ``data`` as consecutive data frames of at most ``chunk_bytes`` (at most
    :data:`MAX_FRAME_BYTES`), as a list ``[header, body, header, body, ...]`` for
    :func:`sendmsg_all`.

    The bodies are views of ``data`` (nothing is copied), so ``data`` must not change
    until the parts are sent. The bytes on the wire equal
    ``encode_data`` of each ``chunk_bytes`` slice of ``data``, joined.

    Raises:
        ValueError: not a data frame type, ``stream_id`` out of range, or ``chunk_bytes``
            not in 1..MAX_FRAME_BYTES.
    """
    if frame_type not in DATA_FRAME_TYPES:
        raise ValueError(f"{frame_type!r} is not a data frame type")
    if not 0 < chunk_bytes <= MAX_FRAME_BYTES:
        raise ValueError(f"chunk of {chunk_bytes} bytes; frames carry 1..{MAX_FRAME_BYTES}")
    if not 0 <= stream_id <= MAX_STREAM_ID:
        raise ValueError(f"stream id {stream_id} out of range")
    view = memoryview(data).cast("B")
    parts: list[bytes | memoryview] = []
    for start in range(0, len(view), chunk_bytes):
        body = view[start : start + chunk_bytes]
        parts += (HEADER.pack(MAGIC, int(frame_type), 0, stream_id, len(body)), body)
    return parts


#: Most buffers handed to one ``sendmsg`` (Linux's IOV_MAX is 1024).
SENDMSG_MAX_PARTS = 512


def sendmsg_all(sock: socket.socket, parts: Sequence[bytes | memoryview]) -> None:
    """``sendall`` for a list of buffers (e.g. :func:`data_frame_parts`): ``sendmsg``
    until every byte is written, nothing copied.

    Raises:
        OSError: from the socket (part of the data may have been sent).
    """
    pending = [memoryview(part).cast("B") for part in parts if len(part)]
    while pending:
        sent = sock.sendmsg(pending[:SENDMSG_MAX_PARTS])
        while sent:
            if sent >= len(pending[0]):
                sent -= len(pending.pop(0))
            else:
                pending[0] = pending[0][sent:]
                sent = 0


def _apply_spec(spec: MessageSpec, fields: Mapping[str, Any]) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    for fs in spec.fields:
        if fs.name in fields:
            value = fields[fs.name]
        elif fs.default is REQUIRED:
            raise BadMessage(f"{spec.name}: missing required field {fs.name!r}")
        else:
            value = _copy_default(fs.default)
        if not fs.accepts(value):
            raise BadMessage(f"{spec.name}: field {fs.name!r} must be {fs.kind}, got {value!r:.80}")
        payload[fs.name] = value
    return payload


def _copy_default(value: Any) -> Any:
    return type(value)(value) if isinstance(value, list | dict) else value


def decode_message(frame: Frame | FrameView) -> Message:
    """Parse and validate the JSON body of a CONTROL or ERROR frame.

    Payload keys unknown to this generation are dropped; absent optional keys get their
    defaults.

    Raises:
        BadMessage: the body is not UTF-8 JSON of the shape ``{"v","t","p"}``, or a field
            has the wrong type.
        UnknownMessage: ``t`` is not a message of this generation.
    """
    if frame.type not in (FrameType.CONTROL, FrameType.ERROR):
        raise BadMessage(f"frame type {frame.type.name} has no JSON body")
    try:
        doc = json.loads(str(frame.body, "utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadMessage(f"body is not UTF-8 JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise BadMessage("body must be a JSON object")
    version, name, payload = doc.get("v"), doc.get("t"), doc.get("p", {})
    if not (isinstance(version, int) and not isinstance(version, bool) and version >= 1):
        raise BadMessage(f"'v' must be a positive integer, got {version!r:.40}")
    if not isinstance(name, str):
        raise BadMessage("'t' must be a string")
    if not isinstance(payload, dict):
        raise BadMessage("'p' must be an object")
    spec = MESSAGES.get(name)
    if spec is None:
        raise UnknownMessage(name[:64])
    if (frame.type is FrameType.ERROR) != (name == "error"):
        raise BadMessage(f"message {name!r} in a {frame.type.name} frame")
    return Message(name, _apply_spec(spec, payload), version, frame.stream_id, frame.flags)


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get whole frames back.

    The header is checked as soon as it is complete: a bad magic, an unknown frame type
    or unknown flags raise :class:`BadFrame`, and a length above ``max_frame_bytes``
    raises :class:`FrameTooLarge` *before* any of the body is buffered, so a hostile
    peer can make the decoder hold at most one header plus one maximum-size body.
    After an error the decoder is poisoned: every later :meth:`feed` raises BadFrame.

    Example::

        decoder = FrameDecoder()
        for frame in decoder.feed(sock.recv(65536)):
            handle(frame)
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._start = 0  # where the next frame begins in _buffer (consumed bytes before it)
        self._failed: ProtocolViolation | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for a frame that is not complete yet."""
        return len(self._buffer) - self._start

    @property
    def at_frame_boundary(self) -> bool:
        """True if no partial frame is buffered (a clean place for the peer to close)."""
        return self.buffered_bytes == 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Append ``data`` and return every frame it completes, in order.

        Each body is copied once, straight out of the buffer; consumed bytes are dropped
        once per call, not once per frame.

        Raises:
            BadFrame, FrameTooLarge: the stream is corrupt; the decoder stays failed.
        """
        if self._failed is not None:
            raise BadFrame(f"decoder already failed: {self._failed}")
        self._buffer += data
        frames: list[Frame] = []
        try:
            while (frame := self._next_frame()) is not None:
                frames.append(frame)
        except ProtocolViolation as exc:
            self._failed = exc
            self._buffer.clear()
            self._start = 0
            raise
        if self._start:
            del self._buffer[: self._start]
            self._start = 0
        return frames

    def _next_frame(self) -> Frame | None:
        buf, start = self._buffer, self._start
        header = frame_header(buf, start, len(buf), self.max_frame_bytes)
        if header is None:
            return None
        frame_type, flags, stream_id, length = header
        end = start + HEADER_BYTES + length
        if len(buf) < end:
            return None
        with memoryview(buf) as view:
            body = bytes(view[start + HEADER_BYTES : end])
        self._start = end
        return Frame(frame_type, flags, stream_id, body)


def frame_header(
    buf: bytes | bytearray, start: int, end: int, max_frame_bytes: int
) -> tuple[FrameType, int, int, int] | None:
    """Check the frame header at ``buf[start:end]``; return its type, flags, stream id and
    body length, or None while fewer than :data:`HEADER_BYTES` bytes are there.

    The magic is checked as soon as two bytes are there, so a stream that is not SecVF's
    fails at once.

    Raises:
        BadFrame: bad magic, unknown frame type or unknown flags.
        FrameTooLarge: the body is longer than ``max_frame_bytes``.
    """
    if end - start < 2:
        return None
    if int.from_bytes(buf[start : start + 2], "big") != MAGIC:
        raise BadFrame(f"bad magic {bytes(buf[start : start + 2])!r}: not a SecVF exec stream")
    if end - start < HEADER_BYTES:
        return None
    _, type_byte, flags, stream_id, length = HEADER.unpack_from(buf, start)
    try:
        frame_type = FrameType(type_byte)
    except ValueError:
        raise BadFrame(f"unknown frame type {type_byte:#04x}") from None
    if flags & ~KNOWN_FLAGS:
        raise BadFrame(f"unknown flag bits {flags:#04x}")
    if length > max_frame_bytes:
        raise FrameTooLarge(length, max_frame_bytes)
    return frame_type, flags, stream_id, length


@dataclass(frozen=True)
class FrameView:
    """A frame read by :class:`FrameReader`: its body is a view of the reader's buffer,
    valid only until the reader is asked for the next frame (copy what must outlive it)."""

    type: FrameType
    flags: int
    stream_id: int
    body: memoryview
    rest: int = 0  # body bytes still on the socket, after ``body`` (see FrameReader.splice_rest)


class FrameReader:
    """Frames read from a socket into one reused buffer, bodies handed out uncopied.

    ``recv_into`` is the socket's ``recv_into`` (returns 0 at EOF). :meth:`frames` yields
    each complete frame as a :class:`FrameView` whose body is released when the next one
    is asked for, so a consumer that writes the body on (a pipe, a file) copies it only
    into the kernel. The buffer grows to what the frames and ``recv_bytes`` need (at most
    one header plus ``max_frame_bytes`` plus ``recv_bytes``) and never shrinks; a second
    one of ``recv_bytes`` is made the first time the rest of a body is received rather
    than spliced (:meth:`receive_rest`). Headers are checked as in :class:`FrameDecoder`,
    before a body is read.

    With ``splice_from`` (the socket's descriptor), a STDIN frame whose body has at least
    :attr:`SPLICE_MIN_BYTES` still to come is yielded at once with what is buffered as
    ``body`` and the count still on the socket as ``rest``: the consumer moves that part
    with :meth:`splice_rest` (kernel to kernel, e.g. into a pipe), and whatever it leaves
    is read and dropped when it asks for the next frame. After such a frame the reader
    receives the next header alone, so a run of large STDIN frames is spliced whole.

    Example::

        for frame in FrameReader(sock.recv_into).frames():
            os.write(fd, frame.body)
    """

    #: Buffer size before the peer sends more than fits (a control message or two).
    INITIAL_BYTES = 16 * 1024
    #: Least body left on the socket worth splicing instead of receiving.
    SPLICE_MIN_BYTES = 16 * 1024
    SPLICED_TYPES = frozenset({FrameType.STDIN})

    def __init__(
        self,
        recv_into: Callable[[memoryview], int],
        max_frame_bytes: int = MAX_FRAME_BYTES,
        recv_bytes: int = 256 * 1024,
        splice_from: int | None = None,
    ) -> None:
        self._recv_into = recv_into
        self.max_frame_bytes = max_frame_bytes
        self.recv_bytes = recv_bytes
        self._splice_from = splice_from
        self._buffer = bytearray(self.INITIAL_BYTES)
        self._start = 0  # unconsumed bytes are _buffer[_start:_end]
        self._end = 0
        self._streaming = False  # the last receive filled all the room it was given
        self._header_only = False  # the next receive takes one header, no more
        self._rest = 0  # body bytes of the yielded frame still on the socket
        self._scratch: bytearray | None = None  # where receive_rest puts them (made once)
        self._eof = False  # the peer closed while a body was being spliced

    @property
    def rest(self) -> int:
        """Body bytes of the current frame still on the socket."""
        return self._rest

    def receive_rest(self) -> Iterator[memoryview]:
        """Receive the rest of the current frame's body, yielding a view of each piece
        (valid until the next one is asked for). The pieces go to a second buffer of
        ``recv_bytes``, so the frame's ``body`` view stays what it was."""
        if self._rest and self._scratch is None:
            self._scratch = bytearray(self.recv_bytes)
        with memoryview(self._scratch or b"") as whole:
            while self._rest:
                received = self._recv_into(whole[: min(self._rest, len(whole))])
                if not received:
                    self._eof = True
                    return
                self._rest -= received
                with whole[:received] as piece:
                    yield piece

    def wait_for_rest(self) -> None:
        """Block until the socket has some of the rest to splice (or the peer closed)."""
        assert self._splice_from is not None
        poller = select.poll()
        poller.register(self._splice_from, select.POLLIN)
        poller.poll()

    def splice_rest(self, fd: int) -> int:
        """Move up to :attr:`rest` bytes from the socket into ``fd`` with one
        ``os.splice``; return how many (0: the peer closed). ``fd`` should be a
        non-blocking pipe; the socket should be readable (:meth:`wait_for_rest`), else
        this blocks until it is.

        Raises:
            BlockingIOError: ``fd`` is full.
            OSError: from ``os.splice``.
        """
        assert self._splice_from is not None
        moved = os.splice(self._splice_from, fd, self._rest, flags=os.SPLICE_F_NONBLOCK)
        if moved == 0:
            self._eof = True
        self._rest -= moved
        return moved

    @property
    def at_frame_boundary(self) -> bool:
        """True if no partial frame is buffered (a clean place for the peer to close)."""
        return self._start == self._end

    def frames(self) -> Iterator[FrameView]:
        """Yield frames until the peer closes (returns) or breaks the framing (raises).

        Raises:
            BadFrame, FrameTooLarge: the stream is corrupt.
            OSError: from ``recv_into``.
        """
        while True:
            length = yield from self._complete_frames()
            if self._eof or not self._fill(length):
                return

    def _complete_frames(self) -> Generator[FrameView, None, int | None]:
        """Yield the frames whole in the buffer (and a spliceable one begun); return the
        next one's body length if its header is there."""
        buf = self._buffer
        while True:
            header = frame_header(buf, self._start, self._end, self.max_frame_bytes)
            if header is None:
                return None
            self._header_only = False
            frame_type, flags, stream_id, length = header
            body_start = self._start + HEADER_BYTES
            end = min(body_start + length, self._end)
            rest = body_start + length - end
            if rest and not self._spliceable(frame_type, rest):
                return length
            with memoryview(buf) as whole, whole[body_start:end] as body:
                self._start, self._rest = end, rest
                yield FrameView(frame_type, flags, stream_id, body, rest)
            if rest:
                self._drop_rest()
                self._header_only = True
                if self._eof:
                    return None

    def _spliceable(self, frame_type: FrameType, rest: int) -> bool:
        return (
            self._splice_from is not None
            and frame_type in self.SPLICED_TYPES
            and rest >= self.SPLICE_MIN_BYTES
        )

    def _drop_rest(self) -> None:
        """Receive and drop what the consumer did not take of the last frame's body."""
        for _ in self.receive_rest():
            pass

    def _fill(self, pending_length: int | None) -> int:
        """Make room and receive once; return the bytes received (0: the peer closed).

        The room is what the next frame still lacks (``pending_length`` is its body length
        if its header is in), or ``recv_bytes`` while the peer fills whatever it is given.
        Unconsumed bytes move to the front only when the room is not there behind them.
        """
        buf, unconsumed = self._buffer, self._end - self._start
        wanted = max(HEADER_BYTES + (pending_length or 0) - unconsumed, 1)
        if self._streaming and not self._header_only:
            wanted = max(wanted, self.recv_bytes)
        if len(buf) - self._end < wanted:
            buf[:unconsumed] = buf[self._start : self._end]
            self._start, self._end = 0, unconsumed
            if len(buf) - unconsumed < wanted:
                buf.extend(bytes(unconsumed + wanted - len(buf)))
        limit = self._end + wanted if self._header_only else len(buf)
        with memoryview(buf) as whole, whole[self._end : limit] as room:
            received = self._recv_into(room)
            self._streaming = received == len(room)
        self._end += received
        return received


# --------------------------------------------------------------------------- negotiation


def negotiate_generation(peer_generation: int) -> int:
    """Return the generation both sides speak, given the peer's ``hello.generation``.

    Raises:
        UnsupportedGeneration: the peer only speaks generations older than MIN_GENERATION.
    """
    chosen = min(GENERATION, peer_generation)
    if chosen < MIN_GENERATION:
        raise UnsupportedGeneration(
            f"peer speaks generation {peer_generation}, this side needs >= {MIN_GENERATION}"
        )
    return chosen


def describe_contract() -> dict[str, Any]:
    """Return the wire contract as plain data (the source of tests/schema/gen-N.json)."""
    return {
        "generation": GENERATION,
        "min_generation": MIN_GENERATION,
        "frame": {
            "magic": MAGIC,
            "header_format": HEADER.format,
            "header_bytes": HEADER_BYTES,
            "max_frame_bytes": MAX_FRAME_BYTES,
            "data_chunk_bytes": DATA_CHUNK_BYTES,
            "types": {t.name: int(t) for t in FrameType},
            "flags": {"FLAG_START": FLAG_START, "FLAG_END": FLAG_END},
        },
        "messages": {
            spec.name: {
                "direction": spec.direction,
                "stream": spec.stream,
                "introduced_in": spec.introduced_in,
                "fields": {
                    fs.name: {
                        "kind": fs.kind,
                        "required": fs.default is REQUIRED,
                        "default": None if fs.default is REQUIRED else fs.default,
                        "introduced_in": fs.introduced_in,
                    }
                    for fs in spec.fields
                },
            }
            for spec in MESSAGES.values()
        },
        "start_failure_kinds": [kind.value for kind in StartFailureKind],
        "file_error_kinds": [kind.value for kind in FileErrorKind],
        "error_codes": [code.value for code in ErrorCode],
        "restore_failure_kinds": [kind.value for kind in RestoreFailureKind],
        "detached_error_kinds": [kind.value for kind in DetachedErrorKind],
        "process_fields": dict(PROCESS_FIELDS),
        "restore_limits": {
            "min_entropy_bytes": RESTORE_MIN_ENTROPY_BYTES,
            "max_entropy_bytes": RESTORE_MAX_ENTROPY_BYTES,
            "max_shares": RESTORE_MAX_SHARES,
            "hostname_max_bytes": HOSTNAME_MAX_BYTES,
            "share_tag_max_bytes": SHARE_TAG_MAX_BYTES,
            "guest_path_max_bytes": GUEST_PATH_MAX_BYTES,
            "min_time_ns": RESTORE_MIN_TIME_NS,
            "guest_system_dirs": list(GUEST_SYSTEM_DIRS),
        },
        "timing": {
            "keepalive_interval_s": KEEPALIVE_INTERVAL_S,
            "agent_silence_timeout_s": AGENT_SILENCE_TIMEOUT_S,
            "kill_grace_s": KILL_GRACE_S,
        },
        "agent_vsock_port": AGENT_VSOCK_PORT,
    }


__all__ = [
    "GENERATION",
    "MIN_GENERATION",
    "MAX_FRAME_BYTES",
    "DATA_CHUNK_BYTES",
    "HEADER_BYTES",
    "MAGIC",
    "AGENT_VSOCK_PORT",
    "KEEPALIVE_INTERVAL_S",
    "AGENT_SILENCE_TIMEOUT_S",
    "KILL_GRACE_S",
    "FLAG_START",
    "FLAG_END",
    "FrameType",
    "Frame",
    "Message",
    "MessageSpec",
    "FieldSpec",
    "MESSAGES",
    "ErrorCode",
    "StartFailureKind",
    "FileErrorKind",
    "RestoreFailureKind",
    "DetachedErrorKind",
    "PROCESS_FIELDS",
    "FrameDecoder",
    "FrameReader",
    "FrameView",
    "frame_header",
    "encode_frame",
    "encode_message",
    "encode_data",
    "encode_error_frame",
    "decode_message",
    "build_payload",
    "data_frame_parts",
    "sendmsg_all",
    "negotiate_generation",
    "describe_contract",
    "ProtocolViolation",
    "BadFrame",
    "FrameTooLarge",
    "BadMessage",
    "UnknownMessage",
    "UnsupportedGeneration",
    "InvalidRestore",
    "check_restore_request",
    "check_hostname",
    "check_mac",
    "check_guest_path",
    "RESTORE_MIN_ENTROPY_BYTES",
    "RESTORE_MAX_ENTROPY_BYTES",
    "RESTORE_MAX_SHARES",
    "HOSTNAME_MAX_BYTES",
    "SHARE_TAG_MAX_BYTES",
    "GUEST_PATH_MAX_BYTES",
    "RESTORE_MIN_TIME_NS",
    "GUEST_SYSTEM_DIRS",
]
