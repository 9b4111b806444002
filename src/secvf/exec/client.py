"""Host-side client of the guest exec agent.

The client speaks :mod:`secvf.exec.protocol` over a connected stream socket: the per-VM exec
bridge socket (transparent once its credential check passed), or a vsock hybrid socket
after the ``CONNECT <port>\\n`` / ``OK <hostport>\\n`` handshake.

Tutorial::

    with ExecClient.connect(Path("/run/user/1000/secvf/secvf-exec-<uuid>.sock")) as client:
        result = client.run(["uname", "-a"], timeout=30)
        print(result.exit_code, result.stdout.decode())

        session = client.start("cat -n", stdin=True)
        session.write_stdin(b"hello\\n")
        session.close_stdin()
        for event in session:
            if isinstance(event, Stdout):
                print(event.data)
        print(session.exited)

One :class:`ExecClient` is one connection and runs one operation at a time (a second
``start`` while a session is active raises :class:`~secvf.errors.StateError`). Open one
client per concurrent command; connections are cheap.

Everything from the guest is treated as hostile:

* frames above :data:`~secvf.exec.protocol.MAX_FRAME_BYTES` are rejected before their body
  is read (:class:`ProtocolError`);
* if no complete frame arrives for ``silence_timeout_s`` (the agent sends keepalives
  while commands run) the client gives up with :class:`AgentUnavailable`;
* with a ``timeout``, the host also gives up ``HOST_DEADLINE_MARGIN_S`` after the guest
  should have killed the command, so a guest that ignores timeouts cannot hang us;
* captured output is capped (``max_output_bytes`` per stream) and truncation is flagged
  in the result, never silent; callbacks still see every byte.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from secvf.errors import SecVFError, StateError
from secvf.exec import protocol
from secvf.exec.errors import (
    AgentUnavailable,
    CommandStartFailed,
    ConnectFailed,
    ExecRefused,
    FileTransferError,
    ProtocolError,
)

#: Default cap on captured stdout and on captured stderr, each.
DEFAULT_MAX_OUTPUT_BYTES = 16 * 1024 * 1024
#: Default cap on a downloaded file.
DEFAULT_MAX_DOWNLOAD_BYTES = 4 * 1024 * 1024 * 1024
#: How long after a command's guest-side timeout (plus kill grace) the host stops waiting.
HOST_DEADLINE_MARGIN_S = 10.0
CONNECT_TIMEOUT_S = 10.0
RECV_BYTES = 256 * 1024
MAX_HYBRID_REPLY_BYTES = 64
EXIT_TIMEOUT = 124
EXIT_SECVF_ERROR = 125
EXIT_SIGNAL_BASE = 128

log = logging.getLogger("secvf.exec")

Command = Sequence[str] | str
"""argv (a sequence of strings) or a shell command line (run with /bin/sh -c)."""
OutputCallback = Callable[[bytes], None]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Started:
    """The command is running in the guest."""

    pid: int  # guest pid of the command (leader of its process group)


@dataclass(frozen=True)
class Stdout:
    """A chunk of standard output (all output when a PTY is used)."""

    data: bytes


@dataclass(frozen=True)
class Stderr:
    """A chunk of standard error."""

    data: bytes


@dataclass(frozen=True)
class StdinError:
    """Writing the command's stdin failed (non-terminal; later stdin is dropped)."""

    errno: int | None  # guest errno, e.g. 32 (EPIPE)
    errno_name: str | None
    message: str


@dataclass(frozen=True)
class Exited:
    """The command ended; always the last event of a session."""

    exit_code: int | None  # exit status, or None if a signal ended it
    signal: int | None  # the signal that ended it, if any
    timed_out: bool  # the guest killed it because the timeout passed
    cancelled: bool  # the guest killed it because the client cancelled
    duration_ms: int  # wall time in the guest, spawn to exit


ExecEvent = Started | Stdout | Stderr | StdinError | Exited
"""Everything :meth:`ExecSession.events` can yield."""


@dataclass(frozen=True)
class ExecResult:
    """Outcome of :meth:`ExecClient.run`."""

    exit_code: int | None  # exit status, or None if a signal ended the command
    signal: int | None  # signal number that ended the command, if any
    timed_out: bool  # killed by the guest because the timeout passed
    cancelled: bool  # killed because the client cancelled
    duration_ms: int  # wall time in the guest
    stdout: bytes  # captured stdout (at most max_output_bytes)
    stderr: bytes  # captured stderr (at most max_output_bytes)
    stdout_truncated: bool  # True if stdout was longer than the cap
    stderr_truncated: bool  # True if stderr was longer than the cap

    @property
    def ok(self) -> bool:
        """True if the command exited with status 0."""
        return self.exit_code == 0

    @property
    def shell_exit_code(self) -> int:
        """The exit code a shell would report: the code, 128+N for signal N, 124 timeout."""
        return exit_code_for(self)


@dataclass(frozen=True)
class FileTransfer:
    """Outcome of an upload or download."""

    path: str  # the guest path, absolute
    size: int  # bytes transferred
    mode: int  # permission bits of the file


@dataclass(frozen=True)
class AgentInfo:
    """What ``info`` reports about the guest agent."""

    agent_version: str
    generation: int  # negotiated protocol generation
    hostname: str
    uptime_s: float  # guest uptime
    users: tuple[str, ...]  # accounts commands can run as
    default_user: str
    python: str  # guest Python version
    kernel: str  # guest kernel release


def exit_code_for(outcome: ExecResult | BaseException) -> int:
    """Map an exec outcome to a process exit code (what ``secvf vm exec`` returns).

    The command's own code; 128+N if signal N ended it; 124 if it timed out; 127 if it
    was not found and 126 if it could not be started otherwise; 125 for any other
    SecVF or unexpected error.
    """
    if isinstance(outcome, ExecResult):
        if outcome.timed_out:
            return EXIT_TIMEOUT
        if outcome.signal is not None:
            return EXIT_SIGNAL_BASE + outcome.signal
        return outcome.exit_code if outcome.exit_code is not None else EXIT_SECVF_ERROR
    if isinstance(outcome, SecVFError):
        return outcome.exit_code
    return EXIT_SECVF_ERROR


class _CappedBuffer:
    """Collects bytes up to a limit and remembers whether more were offered."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[: max(room, 0)]
        self.data += chunk


# --------------------------------------------------------------------------- channel


class FrameChannel:
    """A connected socket plus a decoder, with frame-level read deadlines.

    ``recv_frame`` waits at most ``silence_timeout_s`` for a *complete* frame (a peer
    trickling bytes does not reset the clock) and never past an optional hard deadline.
    Sends are serialised by a lock, so one thread may send (stdin) while another reads.
    """

    def __init__(self, sock: socket.socket, silence_timeout_s: float) -> None:
        self.sock = sock
        self.silence_timeout_s = silence_timeout_s
        self._decoder = protocol.FrameDecoder()
        self._pending: list[protocol.Frame] = []
        self._send_lock = threading.Lock()
        self.closed = False

    def send(self, data: bytes) -> None:
        """Send bytes.

        Raises:
            AgentUnavailable: the connection is closed or broke.
        """
        with self._send_lock:
            if self.closed:
                raise AgentUnavailable("the exec connection is closed")
            try:
                self.sock.sendall(data)
            except OSError as exc:
                raise AgentUnavailable(f"exec connection lost while sending: {exc}") from exc

    def recv_frame(self, hard_deadline: float | None = None) -> protocol.Frame:
        """Return the next frame.

        Raises:
            AgentUnavailable: silence or hard deadline passed; the peer closed.
            ProtocolError: the bytes are not a valid frame (oversized, bad magic, ...).
        """
        deadline = time.monotonic() + self.silence_timeout_s
        if hard_deadline is not None:
            deadline = min(deadline, hard_deadline)
        while not self._pending:
            self._fill(deadline, hard_deadline)
        return self._pending.pop(0)

    def _fill(self, deadline: float, hard_deadline: float | None) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._timeout_error(hard_deadline)
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(RECV_BYTES)
        except TimeoutError:
            raise self._timeout_error(hard_deadline) from None
        except OSError as exc:
            raise AgentUnavailable(f"exec connection lost: {exc}") from exc
        if not data:
            raise AgentUnavailable("the guest agent closed the connection unexpectedly")
        try:
            self._pending.extend(self._decoder.feed(data))
        except protocol.ProtocolViolation as exc:
            raise ProtocolError(f"invalid data from the guest agent: {exc}", exc.code) from exc

    def _timeout_error(self, hard_deadline: float | None) -> AgentUnavailable:
        if hard_deadline is not None and time.monotonic() >= hard_deadline:
            return AgentUnavailable(
                "the guest agent did not end the command after its timeout; giving up"
            )
        return AgentUnavailable(
            f"guest agent not responding: no frame for {self.silence_timeout_s:g} s"
        )

    def close(self) -> None:
        """Shut the socket down (wakes a blocked reader) and close it; idempotent."""
        with self._send_lock:
            self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _message(frame: protocol.Frame) -> protocol.Message:
    try:
        return protocol.decode_message(frame)
    except protocol.ProtocolViolation as exc:
        raise ProtocolError(f"invalid message from the guest agent: {exc}", exc.code) from exc


def _error_from_peer(msg: protocol.Message) -> ExecRefused | ProtocolError:
    code, text = msg["code"], msg["message"][:500]
    if code in ("refused", "busy"):
        return ExecRefused(code, text)
    return ProtocolError(f"the guest agent reported a protocol error ({code}): {text}", code)


# --------------------------------------------------------------------------- client


class ClientState:
    """States of an :class:`ExecClient` (plain strings for readable errors)."""

    IDLE = "idle"
    BUSY = "busy"
    CLOSED = "closed"


class ExecClient:
    """One connection to a guest exec agent.

    Example::

        with ExecClient.connect(sock_path, timeout=10) as client:
            client.ping()
            print(client.run("echo hi").stdout)
    """

    def __init__(
        self,
        channel: FrameChannel,
        hello: protocol.Message,
        deadline_margin_s: float = HOST_DEADLINE_MARGIN_S,
    ) -> None:
        """Wrap a channel whose handshake is done; use :meth:`connect` instead."""
        self._channel = channel
        self.deadline_margin_s = deadline_margin_s
        self.generation: int = hello["generation"]
        self.agent_software: str = hello["software"]
        self.capabilities: frozenset[str] = frozenset(hello["capabilities"])
        self.state = ClientState.IDLE
        self._next_stream_id = 1
        self.log = log.getChild(f"c{id(self):x}")

    def __repr__(self) -> str:
        return f"<ExecClient agent={self.agent_software!r} gen={self.generation} {self.state}>"

    # -- connecting -----------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        path: Path,
        *,
        timeout: float = CONNECT_TIMEOUT_S,
        silence_timeout_s: float = protocol.AGENT_SILENCE_TIMEOUT_S,
        deadline_margin_s: float = HOST_DEADLINE_MARGIN_S,
    ) -> ExecClient:
        """Connect to an exec socket (the VM's bridge) and do the protocol handshake.

        ``timeout`` bounds connecting and the handshake; ``silence_timeout_s`` is the
        longest wait for any frame afterwards; ``deadline_margin_s`` is how long past a
        command's timeout (plus kill grace) the host keeps waiting for its exit.

        Raises:
            ConnectFailed: the socket does not exist or refuses connections.
            ExecRefused: the bridge or agent answered with an ERROR frame.
            AgentUnavailable: no hello within ``timeout``.
            ProtocolError: the peer's answer is not valid protocol.
        """
        sock = _dial(path, timeout)
        return cls._handshake(sock, timeout, silence_timeout_s, deadline_margin_s)

    @classmethod
    def connect_hybrid(
        cls,
        uds_path: Path,
        port: int = protocol.AGENT_VSOCK_PORT,
        *,
        timeout: float = CONNECT_TIMEOUT_S,
        silence_timeout_s: float = protocol.AGENT_SILENCE_TIMEOUT_S,
        deadline_margin_s: float = HOST_DEADLINE_MARGIN_S,
    ) -> ExecClient:
        """Connect through a hybrid-vsock socket: ``CONNECT <port>\\n`` → ``OK <n>\\n``.

        Raises:
            ConnectFailed: dialling failed or the backend did not answer ``OK``.
            ExecRefused, AgentUnavailable, ProtocolError: as for :meth:`connect`.
        """
        sock = _dial(uds_path, timeout)
        try:
            sock.sendall(f"CONNECT {port}\n".encode())
            reply = _read_line(sock, MAX_HYBRID_REPLY_BYTES)
        except OSError as exc:
            sock.close()
            raise ConnectFailed(uds_path, f"hybrid vsock handshake failed: {exc}") from exc
        if not reply.startswith(b"OK "):
            sock.close()
            raise ConnectFailed(uds_path, f"vsock backend answered {reply[:40]!r}, not OK")
        return cls._handshake(sock, timeout, silence_timeout_s, deadline_margin_s)

    @classmethod
    def _handshake(
        cls, sock: socket.socket, timeout: float, silence_timeout_s: float, margin_s: float
    ) -> ExecClient:
        channel = FrameChannel(sock, silence_timeout_s)
        try:
            try:
                channel.send(
                    protocol.encode_message(
                        "hello",
                        generation=protocol.GENERATION,
                        software="secvf-host",
                        capabilities=["exec", "files"],
                    )
                )
            except AgentUnavailable:
                # a refusing bridge may have written its error frame and closed before
                # our hello arrived: the frame is still in the receive buffer
                pass
            msg = _message(channel.recv_frame(time.monotonic() + timeout))
            if msg.name == "error":
                raise _error_from_peer(msg)
            if msg.name != "hello":
                raise ProtocolError(f"expected hello from the guest agent, got {msg.name!r}")
            if msg["generation"] > protocol.GENERATION or msg["generation"] < 1:
                raise ProtocolError(f"agent chose unsupported generation {msg['generation']}")
        except BaseException:
            channel.close()
            raise
        return cls(channel, msg, margin_s)

    # -- context manager / lifecycle ------------------------------------------------------

    def __enter__(self) -> ExecClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection. A command still running in the guest is killed there."""
        self.state = ClientState.CLOSED
        self._channel.close()

    def _begin(self) -> int:
        if self.state != ClientState.IDLE:
            raise StateError(
                f"exec client is {self.state}; open another connection for concurrent work",
                self.state,
                (ClientState.IDLE,),
            )
        self.state = ClientState.BUSY
        stream_id = self._next_stream_id
        self._next_stream_id += 1
        return stream_id

    def _end(self) -> None:
        if self.state == ClientState.BUSY:
            self.state = ClientState.IDLE

    def _fail(self) -> None:
        """An operation broke mid-way: the connection is no longer usable."""
        self.close()

    def _recv_for(self, stream_id: int, hard_deadline: float | None = None) -> protocol.Frame:
        """Return the next frame of ``stream_id``, handling connection-level frames."""
        while True:
            frame = self._channel.recv_frame(hard_deadline)
            self.log.debug("<- %s stream=%d %dB", frame.type.name, frame.stream_id, len(frame.body))
            if frame.stream_id == stream_id:
                return frame
            if frame.stream_id != 0 or frame.type not in (
                protocol.FrameType.CONTROL,
                protocol.FrameType.ERROR,
            ):
                raise ProtocolError(f"agent sent a frame for unknown stream {frame.stream_id}")
            msg = _message(frame)
            if msg.name == "error":
                raise _error_from_peer(msg)
            if msg.name != "keepalive":
                raise ProtocolError(f"unexpected {msg.name!r} message from the guest agent")

    def _recv_message(self, stream_id: int, expected: Sequence[str]) -> protocol.Message:
        frame = self._recv_for(stream_id)
        msg = _message(frame) if frame.type is protocol.FrameType.CONTROL else None
        if msg is None or msg.name not in expected:
            got = msg.name if msg else frame.type.name
            raise ProtocolError(f"expected {' or '.join(expected)} from the agent, got {got}")
        return msg

    # -- simple calls ---------------------------------------------------------------------

    def ping(self) -> float:
        """Send ``ping`` and return the round-trip time in seconds.

        Raises:
            AgentUnavailable, ProtocolError, ExecRefused: the agent is not healthy.
        """
        self._begin()
        started = time.monotonic()
        try:
            self._channel.send(protocol.encode_message("ping"))
            self._recv_message(0, ("pong",))
        except BaseException:
            self._fail()
            raise
        self._end()
        return time.monotonic() - started

    def info(self) -> AgentInfo:
        """Return the agent's version, hostname, uptime and accounts.

        Raises:
            AgentUnavailable, ProtocolError, ExecRefused: the agent is not healthy.
        """
        self._begin()
        try:
            self._channel.send(protocol.encode_message("info"))
            p = self._recv_message(0, ("agent_info",)).payload
        except BaseException:
            self._fail()
            raise
        self._end()
        return AgentInfo(
            agent_version=p["agent_version"],
            generation=p["generation"],
            hostname=p["hostname"],
            uptime_s=float(p["uptime_s"]),
            users=tuple(p["users"]),
            default_user=p["default_user"],
            python=p["python"],
            kernel=p["kernel"],
        )

    # -- exec -------------------------------------------------------------------------------

    def start(
        self,
        command: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
        stdin: bool = False,
        timeout: float | None = None,
    ) -> ExecSession:
        """Start ``command`` in the guest and return a streaming session.

        Args:
            command: argv list, or a string run with ``/bin/sh -c``.
            env: variables added to the guest's clean default environment.
            cwd: working directory (default: /workspace if it exists, else home).
            user: guest account (default: the agent's default user, ``agent``).
            tty: run under a pseudo-terminal of ``rows`` x ``cols`` (stderr is merged).
            stdin: keep stdin open for :meth:`ExecSession.write_stdin`; otherwise the
                command reads /dev/null.
            timeout: seconds after which the guest kills the whole process group.

        Raises:
            StateError: this client already runs an operation.
            CommandStartFailed: the guest could not start the command.
            AgentUnavailable, ProtocolError, ExecRefused: the channel failed.
        """
        stream_id = self._begin()
        argv, shell = (None, command) if isinstance(command, str) else (list(command), None)
        request = protocol.encode_message(
            "exec",
            stream_id,
            argv=argv,
            shell=shell,
            env=dict(env or {}),
            cwd=cwd,
            user=user,
            tty=tty,
            rows=rows,
            cols=cols,
            stdin=stdin,
            timeout_s=timeout,
        )
        hard_deadline = None
        if timeout is not None:
            margin = protocol.KILL_GRACE_S + self.deadline_margin_s
            hard_deadline = time.monotonic() + timeout + margin
        try:
            self._channel.send(request)
            msg = self._recv_message(stream_id, ("started", "start_failed"))
        except BaseException:
            self._fail()
            raise
        if msg.name == "start_failed":
            self._end()
            p = msg.payload
            raise CommandStartFailed(
                p["kind"], p["message"], p["errno"], p["errno_name"], p["stage"]
            )
        return ExecSession(self, stream_id, msg["pid"], hard_deadline)

    def run(
        self,
        command: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
        stdin: bytes | BinaryIO | None = None,
        timeout: float | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> ExecResult:
        """Run ``command`` to completion and return its exit status and output.

        ``stdin`` (bytes or a binary file object) is streamed from a helper thread while
        output is read, then closed (EOF). ``on_stdout``/``on_stderr`` receive every
        chunk as it arrives; captured output keeps the first ``max_output_bytes`` of
        each stream and flags the rest as truncated. Other arguments as for
        :meth:`start`. If this call is interrupted (for example by KeyboardInterrupt)
        the connection is closed, which kills the command in the guest.

        Raises:
            CommandStartFailed: the guest could not start the command.
            AgentUnavailable, ProtocolError, ExecRefused, StateError: see :meth:`start`.
        """
        session = self.start(
            command,
            env=env,
            cwd=cwd,
            user=user,
            tty=tty,
            rows=rows,
            cols=cols,
            stdin=stdin is not None,
            timeout=timeout,
        )
        out, err = _CappedBuffer(max_output_bytes), _CappedBuffer(max_output_bytes)
        feeder = StdinFeeder(session, stdin) if stdin is not None else None
        for event in session:
            if isinstance(event, Stdout):
                out.add(event.data)
                if on_stdout:
                    on_stdout(event.data)
            elif isinstance(event, Stderr):
                err.add(event.data)
                if on_stderr:
                    on_stderr(event.data)
        if feeder is not None:
            feeder.join()
        exited = session.exited
        assert exited is not None
        return ExecResult(
            exit_code=exited.exit_code,
            signal=exited.signal,
            timed_out=exited.timed_out,
            cancelled=exited.cancelled,
            duration_ms=exited.duration_ms,
            stdout=bytes(out.data),
            stderr=bytes(err.data),
            stdout_truncated=out.truncated,
            stderr_truncated=err.truncated,
        )

    # -- files ------------------------------------------------------------------------------

    def put_file(
        self, local: Path, remote: str, *, mode: int | None = None, user: str | None = None
    ) -> FileTransfer:
        """Upload ``local`` to ``remote`` in the guest, streamed, any size.

        The file is written as ``user`` (owned by that user, with that user's
        permissions) and renamed into place when complete. ``mode`` defaults to the
        local file's permission bits. A relative ``remote`` is relative to /workspace
        (or the user's home).

        Raises:
            FileTransferError: the guest refused (missing directory, permission, ...).
            OSError: ``local`` cannot be read.
            AgentUnavailable, ProtocolError, StateError: the channel failed.
        """
        local = Path(local)
        with open(local, "rb") as source:
            if mode is None:
                mode = os.fstat(source.fileno()).st_mode & 0o7777
            stream_id = self._begin()
            try:
                self._channel.send(
                    protocol.encode_message("upload", stream_id, path=remote, mode=mode, user=user)
                )
                msg = self._recv_message(stream_id, ("upload_ready", "file_error"))
                if msg.name == "upload_ready":
                    self._send_file_data(stream_id, source)
                    msg = self._recv_message(stream_id, ("upload_done", "file_error"))
            except BaseException:
                self._fail()
                raise
        self._end()
        if msg.name == "file_error":
            raise _file_error(msg, remote)
        return FileTransfer(msg["path"], msg["size"], msg["mode"])

    def _send_file_data(self, stream_id: int, source: BinaryIO) -> None:
        while chunk := source.read(protocol.DATA_CHUNK_BYTES):
            self._channel.send(protocol.encode_data(protocol.FrameType.FILE_DATA, stream_id, chunk))
        self._channel.send(protocol.encode_message("upload_end", stream_id))

    def get_file(
        self,
        remote: str,
        local: Path,
        *,
        user: str | None = None,
        max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
    ) -> FileTransfer:
        """Download ``remote`` from the guest into ``local``, streamed, keeping its mode.

        The data goes to a temporary file next to ``local`` that is renamed into place
        only when the whole file arrived; on any failure ``local`` is left untouched.

        Raises:
            FileTransferError: missing file, directory, permission denied, or the file
                is larger than ``max_bytes`` (kind ``too_large``).
            OSError: ``local``'s directory is not writable.
            AgentUnavailable, ProtocolError, StateError: the channel failed.
        """
        local = Path(local)
        stream_id = self._begin()
        fd, tmp_name = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as sink:
                self._channel.send(
                    protocol.encode_message("download", stream_id, path=remote, user=user)
                )
                result = self._receive_file(stream_id, sink, remote, max_bytes)
            os.chmod(tmp_name, result.mode)
            os.replace(tmp_name, local)
        except FileTransferError as exc:
            os.unlink(tmp_name)
            if exc.kind == "too_large":
                self._fail()
            else:
                self._end()
            raise
        except BaseException:
            os.unlink(tmp_name)
            self._fail()
            raise
        self._end()
        return result

    def _receive_file(
        self, stream_id: int, sink: BinaryIO, remote: str, max_bytes: int
    ) -> FileTransfer:
        msg = self._recv_message(stream_id, ("download_start", "file_error"))
        if msg.name == "file_error":
            raise _file_error(msg, remote)
        path, declared, mode = msg["path"], msg["size"], msg["mode"]
        if declared > max_bytes:
            raise FileTransferError("too_large", path, f"{declared} bytes > cap {max_bytes}")
        received = 0
        while True:
            frame = self._recv_for(stream_id)
            if frame.type is protocol.FrameType.FILE_DATA:
                received += len(frame.body)
                if received > max_bytes:
                    raise FileTransferError("too_large", path, f"more than {max_bytes} bytes")
                sink.write(frame.body)
                continue
            end = self._recv_message_from(frame, ("download_end", "file_error"))
            if end.name == "file_error":
                raise _file_error(end, remote)
            if end["size"] != received:
                raise ProtocolError(f"agent announced {end['size']} bytes but sent {received}")
            return FileTransfer(path, received, mode & 0o7777)

    @staticmethod
    def _recv_message_from(frame: protocol.Frame, expected: Sequence[str]) -> protocol.Message:
        msg = _message(frame) if frame.type is protocol.FrameType.CONTROL else None
        if msg is None or msg.name not in expected:
            got = msg.name if msg else frame.type.name
            raise ProtocolError(f"expected {' or '.join(expected)} from the agent, got {got}")
        return msg


def _file_error(msg: protocol.Message, remote: str) -> FileTransferError:
    p = msg.payload
    return FileTransferError(
        p["kind"], p["path"] or remote, p["message"][:500], p["errno"], p["errno_name"]
    )


def _dial(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(os.fspath(path))
    except OSError as exc:
        sock.close()
        raise ConnectFailed(Path(path), exc.strerror or str(exc)) from exc
    return sock


def _read_line(sock: socket.socket, limit: int) -> bytes:
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte or len(line) >= limit:
            break
        line += byte
    return bytes(line)


# --------------------------------------------------------------------------- session


class ExecSession:
    """A running command: iterate over its events, feed stdin, signal, resize, cancel.

    Iterating yields :data:`ExecEvent` objects (``Stdout``, ``Stderr``, ``StdinError``)
    and ends with ``Exited`` (also stored in :attr:`exited`). Input methods may be
    called from another thread while one thread iterates. Leaving the session early
    (``close()`` or the context manager) closes the connection, which kills the command
    in the guest.
    """

    def __init__(
        self, client: ExecClient, stream_id: int, pid: int, hard_deadline: float | None
    ) -> None:
        self._client = client
        self._channel = client._channel
        self.stream_id = stream_id
        self.pid = pid  # guest pid of the command
        self.exited: Exited | None = None  # set when the command has ended
        self._hard_deadline = hard_deadline

    def __repr__(self) -> str:
        state = "exited" if self.exited else "running"
        return f"<ExecSession stream={self.stream_id} pid={self.pid} {state}>"

    def __enter__(self) -> ExecSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[ExecEvent]:
        return self.events()

    def events(self) -> Iterator[ExecEvent]:
        """Yield output and status events until the command exits.

        Raises:
            AgentUnavailable: the agent went silent, hung up, or ignored the timeout.
            ProtocolError, ExecRefused: the agent broke the protocol.
        """
        try:
            while self.exited is None:
                event = self._next_event()
                if event is not None:
                    yield event
        except BaseException:
            self._client._fail()
            raise
        self._client._end()

    def _next_event(self) -> ExecEvent | None:
        frame = self._client._recv_for(self.stream_id, self._hard_deadline)
        if frame.type is protocol.FrameType.STDOUT:
            return Stdout(frame.body)
        if frame.type is protocol.FrameType.STDERR:
            return Stderr(frame.body)
        msg = ExecClient._recv_message_from(frame, ("stdin_error", "exit"))
        p = msg.payload
        if msg.name == "stdin_error":
            return StdinError(p["errno"], p["errno_name"], p["message"])
        self.exited = Exited(
            p["code"], p["signal"], p["timed_out"], p["cancelled"], p["duration_ms"]
        )
        return self.exited

    def write_stdin(self, data: bytes) -> None:
        """Send ``data`` to the command's stdin (needs ``start(..., stdin=True)`` or tty).

        Blocks while the guest applies back-pressure. Data sent after the command
        exited is dropped by the agent.

        Raises:
            AgentUnavailable: the connection broke.
        """
        for chunk in protocol.iter_chunks(data):
            self._channel.send(
                protocol.encode_data(protocol.FrameType.STDIN, self.stream_id, chunk)
            )

    def close_stdin(self) -> None:
        """Send EOF on stdin (for a PTY: the terminal's EOF character)."""
        self._channel.send(protocol.encode_message("stdin_eof", self.stream_id))

    def send_signal(self, signum: int) -> None:
        """Deliver signal ``signum`` to the command's process group in the guest."""
        self._channel.send(protocol.encode_message("signal", self.stream_id, signum=int(signum)))

    def resize(self, rows: int, cols: int) -> None:
        """Resize the command's PTY (no effect without a tty)."""
        self._channel.send(protocol.encode_message("resize", self.stream_id, rows=rows, cols=cols))

    def cancel(self) -> None:
        """Ask the guest to kill the command's process group; ``exit`` follows."""
        self._channel.send(protocol.encode_message("cancel", self.stream_id))

    def close(self) -> None:
        """Drop the connection if the command is still running (the guest kills it)."""
        if self.exited is None:
            self._client._fail()


class StdinFeeder:
    """Streams bytes or a binary file to a session's stdin (then EOF) from a thread.

    Used by :meth:`ExecClient.run` so that output is read while input is written (the
    two would deadlock in one thread once the guest's pipes fill up).
    """

    def __init__(self, session: ExecSession, source: bytes | BinaryIO) -> None:
        self._session = session
        self._source = source
        self._error: OSError | None = None
        self._thread = threading.Thread(
            target=self._bh_feed, name=f"stdin-{session.stream_id}", daemon=True
        )
        self._thread.start()

    def _bh_feed(self) -> None:
        try:
            if isinstance(self._source, bytes | bytearray | memoryview):
                self._session.write_stdin(bytes(self._source))
            else:
                while chunk := self._source.read(protocol.DATA_CHUNK_BYTES):
                    self._session.write_stdin(chunk)
            self._session.close_stdin()
        except AgentUnavailable:
            pass  # the reading side sees the same broken connection
        except OSError as exc:  # the local source failed: report it from join()
            self._error = exc

    def join(self) -> None:
        """Wait for the thread.

        Raises:
            OSError: reading the local stdin source failed (the command saw partial input).
        """
        self._thread.join()
        if self._error is not None:
            raise self._error
