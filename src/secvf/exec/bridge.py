"""The exec bridge (the original's ``VsockExecBridgeManager``), living in the supervisor.

``start_bridge(vm, files)`` creates ``<runtime dir>/secvf-exec-<UUID>.sock`` and
joins every accepted connection to the guest agent's vsock port 2222 through the
VM's hybrid vsock socket (``CONNECT 2222`` / ``OK <port>``). For a VM without a
vsock device it does nothing. ``stop_bridge(vm_id)`` closes it and removes the
socket; where no bridge exists it does nothing. Both are idempotent and
serialised per VM, so a second start can never unlink the first one's socket.

Who may connect — two gates:

1. **File permissions.** With an empty allowlist the runtime dir is 0700 and the
   socket 0600: nobody but the owner can even connect. Only when
   ``$SECVF_HOME/config/exec-allowlist`` names other users does the bridge open
   the path (runtime dir 0711, socket 0666), and then gate 2 decides.
2. **Peer credentials.** ``SO_PEERCRED`` of every connection must be the VM
   owner's uid or a uid/user named in the allowlist (re-read on each connection).
   A refusal is a security event.

Refusals are answered with one protocol ERROR frame before any byte reaches the
guest: ``refused`` (gate 2 said no), ``busy`` (the cap below is reached) or
``agent_unavailable`` (the vsock backend would not connect to guest port 2222). The
client reads them as ``ExecRefused`` and ``AgentUnavailable``.

Per VM at most :data:`MAX_CONNECTIONS` sessions run at once. The bridge forwards
bytes unchanged in both directions with bounded buffers (back-pressure via
``drain``) and decodes a copy of the frames to write the exec audit log: who ran
what, as which user, how it ended and how long it took.

An audit record stays small whatever the request or the guest sends (a frame may be
1 MiB): each string in it (an argv element, cwd, user, path, an environment variable's
name, the guest's failure kind) keeps at most :data:`AUDIT_FIELD_MAX_BYTES` of UTF-8,
the shell string and argv as a whole at most :data:`AUDIT_COMMAND_MAX_BYTES`, and argv
and the variable names at most :data:`AUDIT_MAX_ITEMS` entries. A field that was cut
gets ``<field>_bytes`` (its original UTF-8 size; for a list, of all its entries) and
``<field>_truncated: true`` beside it. Environment values are never logged, only the
names (``env_names``): values often carry tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secvf.exec import protocol
from secvf.model.config import VMConfig
from secvf.store import events as seclog
from secvf.store import paths
from secvf.store.bundle import RuntimeFiles
from secvf.store.events import Severity

MAX_CONNECTIONS = 16
AGENT_PORT = protocol.AGENT_VSOCK_PORT
HYBRID_CONNECT_TIMEOUT_S = 5.0
COPY_CHUNK_BYTES = 64 * 1024
ALLOWLIST_NAME = "exec-allowlist"
REFUSE_LINGER_S = 2.0
BUSY_WAIT_S = 5.0
#: Exec audit caps (see the module docstring): one string of a record, in UTF-8 bytes;
AUDIT_FIELD_MAX_BYTES = 1024
#: the shell string, and all argv elements together;
AUDIT_COMMAND_MAX_BYTES = 8192
#: argv elements and environment variable names kept.
AUDIT_MAX_ITEMS = 64

log = logging.getLogger("secvf.exec.bridge")

_BRIDGES: dict[str, ExecBridge] = {}
_LOCKS: dict[str, asyncio.Lock] = {}


def allowlist_path() -> Path:
    """``$SECVF_HOME/config/exec-allowlist``."""
    return paths.config_dir() / ALLOWLIST_NAME


def read_allowlist(path: Path | None = None) -> set[int]:
    """Uids named in the allowlist file (uids or user names; ``#`` starts a comment).

    Unknown user names are skipped with a warning; a missing file is an empty list.
    """
    path = path or allowlist_path()
    try:
        text = path.read_text()
    except OSError:
        return set()
    uids: set[int] = set()
    for raw in text.splitlines():
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        if entry.isdigit():
            uids.add(int(entry))
            continue
        try:
            uids.add(pwd.getpwnam(entry).pw_uid)
        except KeyError:
            log.warning("exec allowlist %s: unknown user %r ignored", path, entry)
    return uids


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process on the other end of a Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


@dataclass
class ExecBridge:
    """One VM's exec bridge: a Unix server joined to guest port 2222."""

    vm: VMConfig  # the VM this bridge serves
    files: RuntimeFiles  # its runtime paths
    max_connections: int = MAX_CONNECTIONS
    server: asyncio.AbstractServer | None = None
    active: set[asyncio.Task[None]] = field(default_factory=set)
    slots: asyncio.Semaphore | None = None  # one per joined session, made in start()

    @property
    def socket_path(self) -> Path:
        """``<runtime dir>/secvf-exec-<UUID>.sock``."""
        return self.files.exec_socket

    async def start(self) -> None:
        """Bind the socket (atomically: bind a temp name, set its mode, rename)."""
        others = read_allowlist() - {os.getuid()}
        tmp = self.socket_path.with_name(f".{self.socket_path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(tmp))
        os.chmod(tmp, 0o666 if others else 0o600)
        os.chmod(self.files.dir, 0o711 if others else 0o700)
        sock.listen(64)
        self.slots = asyncio.Semaphore(self.max_connections)
        self.server = await asyncio.start_unix_server(self._on_client, sock=sock)
        os.rename(tmp, self.socket_path)
        seclog.write_event(
            "exec_bridge_started",
            vm=self.vm.name,
            vm_id=self.vm.id,
            socket=str(self.socket_path),
            shared_with=sorted(others),
        )

    async def stop(self) -> None:
        """Close the server and every session; remove the socket file."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for task in list(self.active):
            task.cancel()
        await asyncio.gather(*self.active, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        seclog.write_event("exec_bridge_stopped", vm=self.vm.name, vm_id=self.vm.id)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.active.add(task)
        try:
            await self._session(reader, writer)
        except asyncio.CancelledError:
            pass
        finally:
            self.active.discard(task)
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid = peer_uid(writer.get_extra_info("socket"))
        allowed = {os.getuid()} | read_allowlist()
        if uid not in allowed:
            seclog.write_event(
                "exec_refused",
                severity=Severity.WARNING,
                vm=self.vm.name,
                vm_id=self.vm.id,
                peer_uid=uid,
                reason="uid not allowed",
            )
            await _refuse(
                reader,
                writer,
                protocol.ErrorCode.REFUSED,
                f"uid {uid} may not use the exec channel of "
                f"VM '{self.vm.name}' (not the owner, not in the exec allowlist)",
            )
            return
        assert self.slots is not None
        try:
            # a session that just ended may still be draining in the guest: wait briefly
            await asyncio.wait_for(self.slots.acquire(), BUSY_WAIT_S)
        except TimeoutError:
            await _refuse(
                reader,
                writer,
                protocol.ErrorCode.BUSY,
                f"VM '{self.vm.name}' already has {self.max_connections} exec sessions",
            )
            return
        try:
            await self._joined_session(reader, writer, uid)
        finally:
            self.slots.release()

    async def _joined_session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, uid: int
    ) -> None:
        try:
            g_reader, g_writer = await asyncio.wait_for(
                self._dial_agent(), HYBRID_CONNECT_TIMEOUT_S
            )
        except (TimeoutError, OSError, ValueError) as exc:
            await _refuse(
                reader,
                writer,
                protocol.ErrorCode.AGENT_UNAVAILABLE,
                f"the guest agent of VM '{self.vm.name}' is not reachable: {exc}",
            )
            return
        audit = ExecAudit(self.vm, uid)
        try:
            await asyncio.gather(
                _pump(reader, g_writer, audit.from_client),
                _pump(g_reader, writer, audit.from_agent),
            )
        finally:
            g_writer.close()
            audit.finish()

    async def _dial_agent(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_unix_connection(str(self.files.vsock_socket))
        writer.write(f"CONNECT {AGENT_PORT}\n".encode())
        await writer.drain()
        line = await reader.readline()
        if not line.startswith(b"OK "):
            writer.close()
            raise ValueError("the vsock backend refused the connection (agent not listening)")
        return reader, writer


async def _refuse(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    code: protocol.ErrorCode,
    message: str,
) -> None:
    """Answer with an ``error`` frame, then let the client finish sending (its hello) for
    a moment before the connection closes, so it reads the frame instead of EPIPE."""
    with contextlib.suppress(ConnectionError, TimeoutError):
        writer.write(protocol.encode_error_frame(code, message))
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        await asyncio.wait_for(_discard_until_eof(reader), REFUSE_LINGER_S)


async def _discard_until_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(COPY_CHUNK_BYTES):
        pass


async def _pump(
    src: asyncio.StreamReader, dst: asyncio.StreamWriter, observe: Callable[[bytes], None]
) -> None:
    """Copy ``src`` to ``dst`` until EOF, then half-close ``dst``; bounded by ``drain``."""
    try:
        while data := await src.read(COPY_CHUNK_BYTES):
            observe(data)
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except OSError:  # a connection reset or broken pipe on either side
        dst.close()


def audit_request_fields(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The audit fields of an ``exec``, ``upload``, ``download`` or ``kill`` request, capped.

    argv or the shell string, cwd, user, tty, path (those the request has), for an
    exec with an environment ``env_names``, for a detached exec ``detach: true``, for a
    kill of a background process its ``process_id`` and ``signum``; see
    :func:`capped_field`.
    """
    fields: dict[str, Any] = {}
    for key in ("argv", "shell", "cwd", "user", "tty", "path", "signum"):
        if key in payload:
            fields.update(capped_field(key, payload[key]))
    if payload.get("env"):
        fields.update(capped_field("env_names", list(payload["env"])))
    if payload.get("detach"):
        fields["detach"] = True
    if "id" in payload:
        fields.update(capped_field("process_id", payload["id"]))
    return fields


def capped_field(key: str, value: Any) -> dict[str, Any]:
    """``{key: value}`` within the audit caps; if ``value`` had to be cut, also
    ``{key}_bytes`` (its original UTF-8 size) and ``{key}_truncated: True``.

    The shell string is capped at :data:`AUDIT_COMMAND_MAX_BYTES`, every other string at
    :data:`AUDIT_FIELD_MAX_BYTES`, a list of strings by :func:`_cut_list`; other values
    (numbers, flags, None) are kept as they are.
    """
    if isinstance(value, str):
        limit = AUDIT_COMMAND_MAX_BYTES if key == "shell" else AUDIT_FIELD_MAX_BYTES
        kept: Any = _cut(value, limit)
        size = _utf8_size(value)
    elif isinstance(value, list):
        kept = _cut_list(value)
        size = sum(_utf8_size(item) for item in value)
    else:
        return {key: value}
    if kept == value:
        return {key: value}
    return {key: kept, f"{key}_bytes": size, f"{key}_truncated": True}


def _cut_list(items: list[str]) -> list[str]:
    """The first :data:`AUDIT_MAX_ITEMS` of ``items``, each cut to
    :data:`AUDIT_FIELD_MAX_BYTES`, until :data:`AUDIT_COMMAND_MAX_BYTES` are used up."""
    kept: list[str] = []
    budget = AUDIT_COMMAND_MAX_BYTES
    for item in items[:AUDIT_MAX_ITEMS]:
        if budget <= 0:
            break
        piece = _cut(item, min(AUDIT_FIELD_MAX_BYTES, budget))
        kept.append(piece)
        budget -= _utf8_size(piece)
    return kept


def _utf8_size(text: str) -> int:
    """The UTF-8 size of ``text`` (a lone surrogate from JSON counts as 3 bytes)."""
    return len(text.encode("utf-8", "surrogatepass"))


def _cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, at a character boundary."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", "ignore")


#: The agent's answers that end an audited request (``detached``: a background process
#: started, its id recorded as ``started_id``).
_RECORD_ENDS = ("exit", "start_failed", "upload_done", "download_end", "file_error",
                "detached", "killed", "detached_error")


class ExecAudit:
    """Watches a copy of one session's frames and writes the exec audit records."""

    def __init__(self, vm: VMConfig, uid: int) -> None:
        self.vm = vm
        self.uid = uid
        self.client = protocol.FrameDecoder()
        self.agent = protocol.FrameDecoder()
        self.open: dict[int, dict[str, Any]] = {}
        self.broken = False

    def from_client(self, data: bytes) -> None:
        """Observe client -> agent bytes (exec and file requests)."""
        for msg in self._messages(self.client, data):
            if msg.name in ("exec", "upload", "download", "kill"):
                self.open[msg.stream_id] = {
                    "op": msg.name,
                    "started": time.monotonic(),
                    **audit_request_fields(msg.payload),
                }

    def from_agent(self, data: bytes) -> None:
        """Observe agent -> client bytes (exit and failures close a record)."""
        for msg in self._messages(self.agent, data):
            if msg.name in _RECORD_ENDS:
                self._close(msg.stream_id, msg.name, msg.payload)

    def _messages(self, decoder: protocol.FrameDecoder, data: bytes) -> list[protocol.Message]:
        if self.broken:
            return []
        try:
            frames = decoder.feed(data)
            return [
                protocol.decode_message(f)
                for f in frames
                if f.type in (protocol.FrameType.CONTROL, protocol.FrameType.ERROR)
            ]
        except protocol.ProtocolViolation:
            self.broken = True
            return []

    def _close(self, stream_id: int, outcome: str, payload: dict[str, Any]) -> None:
        record = self.open.pop(stream_id, None)
        if record is None:
            return
        started = record.pop("started")
        outcome_fields: dict[str, Any] = {}
        for key in ("code", "signal", "timed_out", "kind", "errno_name"):
            if key in payload:
                outcome_fields.update(capped_field(key, payload[key]))
        if outcome == "detached":
            outcome_fields.update(capped_field("started_id", payload["id"]))
        seclog.write_event(
            "exec",
            stream="exec",
            vm=self.vm.name,
            vm_id=self.vm.id,
            caller_uid=self.uid,
            outcome=outcome,
            duration_ms=int((time.monotonic() - started) * 1000),
            **record,
            **outcome_fields,
        )

    def finish(self) -> None:
        """Log requests that never finished (client or guest went away)."""
        for stream_id in list(self.open):
            self._close(stream_id, "disconnected", {})


async def start_bridge(vm: VMConfig, files: RuntimeFiles) -> ExecBridge | None:
    """Start ``vm``'s exec bridge; a no-op returning None for a VM without vsock.

    Idempotent: a second call returns the running bridge.
    """
    if vm.channels is None:
        return None
    async with _LOCKS.setdefault(vm.id, asyncio.Lock()):
        bridge = _BRIDGES.get(vm.id)
        if bridge is None:
            bridge = ExecBridge(vm, files)
            await bridge.start()
            _BRIDGES[vm.id] = bridge
        return bridge


async def stop_bridge(vm_id: str) -> None:
    """Stop the bridge of VM ``vm_id``; a safe no-op if it has none."""
    async with _LOCKS.setdefault(vm_id, asyncio.Lock()):
        bridge = _BRIDGES.pop(vm_id, None)
        if bridge is not None:
            await bridge.stop()
