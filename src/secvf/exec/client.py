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

Everything from the guest is treated as hostile (the limits live in
:mod:`secvf.exec.channel`); in addition, with a ``timeout`` the host gives up
``HOST_DEADLINE_MARGIN_S`` after the guest should have killed the command, so a guest
that ignores timeouts cannot hang us, and captured output and downloads are capped.
"""

from __future__ import annotations

import enum
import os
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from secvf.errors import (
    AgentUnavailable,
    CommandStartFailed,
    DetachedProcessError,
    FileTransferError,
    ProtocolError,
    RestoreFailed,
    StateError,
)
from secvf.exec import protocol
from secvf.exec.channel import (
    CONNECT_TIMEOUT_S,
    MAX_PEER_TEXT_CHARS,
    FrameChannel,
    decode,
    dial,
    dial_hybrid,
    expect,
    peer_error,
)
from secvf.exec.outcome import ExecResult
from secvf.exec.stream import (
    DEFAULT_MAX_OUTPUT_BYTES,
    AttachSession,
    ExecSession,
    OutputCallback,
    StdinFeeder,
)

if TYPE_CHECKING:  # imported where they are made: a command's run does not need them
    from secvf.exec.replies import (
        AgentInfo,
        DetachedProcessInfo,
        DetachedStart,
        FileTransfer,
        RestoreResult,
        RestoreShare,
    )

#: Default cap on a downloaded file.
DEFAULT_MAX_DOWNLOAD_BYTES = 4 * 1024 * 1024 * 1024
#: How long after a command's guest-side timeout (plus kill grace) the host stops waiting.
HOST_DEADLINE_MARGIN_S = 10.0
#: What the host tells the agent it can do (``hello.capabilities``).
HOST_CAPABILITIES = ("exec", "files", "restore")
#: Bytes of host entropy a restore sends by default.
RESTORE_ENTROPY_BYTES = 64
#: How long a restore may take in the guest (hot-plugged shares appearing, DHCP) before
#: the host gives up on the agent.
RESTORE_TIMEOUT_S = 60.0
#: Most per-item errors (and mounted shares) kept from a restore reply.
MAX_RESTORE_ITEMS = 64
#: The generation that added background processes (exec detach, ps, attach, kill).
DETACH_GENERATION = protocol.MESSAGES["detached"].introduced_in
#: Most background processes kept from a ``process_list`` (the agent keeps 64 + 32).
MAX_LISTED_PROCESSES = 256
#: Most argv words kept per listed process.
MAX_LISTED_ARGS = 64

Command = Sequence[str] | str
"""argv (a sequence of strings) or a shell command line (run with /bin/sh -c)."""


class ClientState(enum.StrEnum):
    """States of an :class:`ExecClient`."""

    IDLE = "idle"  # ready for the next operation
    BUSY = "busy"  # an operation (exec session, transfer, ping) is in progress
    CLOSED = "closed"  # the connection is gone; open a new client


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
        self.deadline_margin_s = deadline_margin_s  # see connect()
        self.generation: int = hello["generation"]  # negotiated protocol generation
        self.agent_software: str = hello["software"]  # the agent's hello.software
        self.capabilities: frozenset[str] = frozenset(hello["capabilities"])
        self.state = ClientState.IDLE
        self._next_stream_id = 1

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
            ExecRefused: the bridge or agent refused (``refused``, ``busy``).
            AgentUnavailable: no hello within ``timeout``, or the bridge cannot reach
                the guest agent (``agent_unavailable``).
            ProtocolError: the peer's answer is not valid protocol.
        """
        sock = dial(path, timeout)
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
        sock = dial_hybrid(uds_path, port, timeout)
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
                        capabilities=list(HOST_CAPABILITIES),
                    )
                )
            except AgentUnavailable:
                # a refusing bridge may have written its error frame and closed before
                # our hello arrived: the frame is still in the receive buffer
                pass
            msg = decode(channel.recv_frame(time.monotonic() + timeout))
            if msg.name == "error":
                raise peer_error(msg)
            if msg.name != "hello":
                raise ProtocolError(f"expected hello from the guest agent, got {msg.name!r}")
            if not protocol.MIN_GENERATION <= msg["generation"] <= protocol.GENERATION:
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
        """Claim the connection for one operation and return its stream id."""
        if self.state is not ClientState.IDLE:
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
        """The operation finished cleanly: the connection can take the next one."""
        if self.state is ClientState.BUSY:
            self.state = ClientState.IDLE

    def _fail(self) -> None:
        """An operation broke mid-way: the connection is no longer usable."""
        self.close()

    # -- simple calls ---------------------------------------------------------------------

    def ping(self) -> float:
        """Send ``ping`` and return the round-trip time in seconds.

        Raises:
            StateError: this client already runs an operation.
            AgentUnavailable, ProtocolError, ExecRefused: the agent is not healthy.
        """
        self._begin()
        started = time.monotonic()
        try:
            self._channel.send(protocol.encode_message("ping"))
            self._channel.recv_message(0, ("pong",))
        except BaseException:
            self._fail()
            raise
        self._end()
        return time.monotonic() - started

    def info(self) -> AgentInfo:
        """Return the agent's version, hostname, uptime and accounts.

        Raises:
            StateError: this client already runs an operation.
            AgentUnavailable, ProtocolError, ExecRefused: the agent is not healthy.
        """
        self._begin()
        try:
            self._channel.send(protocol.encode_message("info"))
            p = self._channel.recv_message(0, ("agent_info",)).payload
        except BaseException:
            self._fail()
            raise
        self._end()
        from secvf.exec.replies import AgentInfo

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

    def restore(
        self,
        *,
        hostname: str | None = None,
        mac: str | None = None,
        shares: Sequence[RestoreShare | tuple[str, str, bool]] = (),
        clean_tmp: bool = True,
        entropy: bytes | None = None,
        timeout: float = RESTORE_TIMEOUT_S,
        check: bool = True,
    ) -> RestoreResult:
        """Make a guest restored from saved state its own machine (``restore``).

        The agent sets the clock to this host's (sent just before the request leaves),
        mixes ``entropy`` (default: 64 bytes of ``os.urandom``) into the kernel RNG and
        reseeds it and its own generators, sets ``hostname`` (and ``/etc/hosts``), sets
        eth0's ``mac`` (restarting DHCP if the VM uses it), empties ``/tmp`` if
        ``clean_tmp``, and mounts ``shares`` - ``(tag, guest_path, read_only)`` - waiting
        up to 10 s for each hot-plugged virtio-fs tag. ``None`` leaves hostname or MAC as
        they are. The request is checked here first, by the same rules the agent uses.

        Returns:
            What the guest did; ``errors`` lists the items that failed (only with
            ``check=False``: otherwise they raise).

        Raises:
            RestoreFailed: kind ``invalid_request`` (a bad hostname, MAC, share path or
                tag, ...: nothing was sent or changed; ``field`` names it),
                ``unsupported`` (the agent is too old, or cannot restore), or, with
                ``check``, ``incomplete`` (some items failed; ``result`` has them).
            StateError: this client already runs an operation.
            AgentUnavailable, ProtocolError, ExecRefused: the channel failed (the
                connection is closed).
        """
        if (
            self.generation < protocol.MESSAGES["restore"].introduced_in
            or "restore" not in self.capabilities
        ):
            raise RestoreFailed(
                protocol.RestoreFailureKind.UNSUPPORTED,
                f"the guest agent ({self.agent_software or 'unknown'}, protocol generation "
                f"{self.generation}) cannot restore; rebuild the image "
                "(secvf image build sandbox --force) and the template",
            )
        fields: dict[str, Any] = {
            "time_ns": time.time_ns(),
            "entropy": (os.urandom(RESTORE_ENTROPY_BYTES) if entropy is None else entropy).hex(),
            "hostname": hostname,
            "mac": mac.lower() if mac is not None else None,
            "shares": [
                {"tag": tag, "path": path, "read_only": read_only}
                for tag, path, read_only in shares
            ],
            "clean_tmp": clean_tmp,
        }
        try:
            protocol.check_restore_request(protocol.build_payload("restore", fields))
        except protocol.InvalidRestore as exc:
            raise RestoreFailed(
                protocol.RestoreFailureKind.INVALID_REQUEST, str(exc), exc.field
            ) from None
        except protocol.BadMessage as exc:
            raise RestoreFailed(protocol.RestoreFailureKind.INVALID_REQUEST, str(exc)) from None
        self._begin()
        try:
            fields["time_ns"] = time.time_ns()
            self._channel.send(protocol.encode_message("restore", **fields))
            msg = self._recv_connection_reply(
                ("restored", "restore_failed"), time.monotonic() + timeout
            )
        except BaseException:
            self._fail()
            raise
        received_ns = time.time_ns()
        self._end()
        if msg.name == "restore_failed":
            p = msg.payload
            field = p["field"][:MAX_PEER_TEXT_CHARS] if p["field"] is not None else None
            raise RestoreFailed(
                _known(protocol.RestoreFailureKind, p["kind"])[:MAX_PEER_TEXT_CHARS],
                p["message"][:MAX_PEER_TEXT_CHARS],
                field,
            )
        result = _restore_result(msg, received_ns)
        if check and result.errors:
            summary = "; ".join(f"{e.item}: {e.message}" for e in result.errors)
            raise RestoreFailed(RestoreFailed.INCOMPLETE, summary, result=result)
        return result

    def _recv_connection_reply(
        self, names: Sequence[str], hard_deadline: float
    ) -> protocol.Message:
        """The next message on stream 0 that is one of ``names`` (keepalives skipped)."""
        while True:
            frame = self._channel.recv_frame(hard_deadline)
            if frame.stream_id != 0:
                raise ProtocolError(f"agent sent a frame for unknown stream {frame.stream_id}")
            if frame.type is protocol.FrameType.ERROR:
                raise peer_error(decode(frame))
            msg = expect(frame, (*names, "keepalive"))
            if msg.name != "keepalive":
                return msg

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
            AgentUnavailable, ProtocolError, ExecRefused: the channel failed (the
                connection is closed).
        """
        stream_id = self._begin()
        argv, shell = (None, command) if isinstance(command, str) else (list(command), None)
        hard_deadline = None
        if timeout is not None:
            margin = protocol.KILL_GRACE_S + self.deadline_margin_s
            hard_deadline = time.monotonic() + timeout + margin
        try:
            self._channel.send(
                protocol.encode_message(
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
            )
            msg = self._channel.recv_message(stream_id, ("started", "start_failed"))
        except BaseException:
            self._fail()
            raise
        if msg.name == "start_failed":
            self._end()
            raise _start_failed(msg)
        return ExecSession(
            self._channel,
            stream_id,
            msg["pid"],
            hard_deadline,
            on_end=self._end,
            on_broken=self._fail,
        )

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
            OSError: reading the local ``stdin`` file failed.
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
        feeder = StdinFeeder(session, stdin) if stdin is not None else None
        result = session.collect(
            on_stdout=on_stdout, on_stderr=on_stderr, max_output_bytes=max_output_bytes
        )
        if feeder is not None:
            feeder.join()
        return result

    # -- background processes -------------------------------------------------------------

    def _require_detach(self, what: str) -> None:
        """Refuse locally if the agent has no background processes.

        Raises:
            DetachedProcessError: kind ``unsupported``.
        """
        if self.generation < DETACH_GENERATION or "detach" not in self.capabilities:
            raise DetachedProcessError(
                DetachedProcessError.UNSUPPORTED,
                f"the guest agent ({self.agent_software or 'unknown'}, protocol generation "
                f"{self.generation}) has no background processes, so it cannot {what}; "
                "rebuild the image (secvf image build sandbox --force)",
            )

    def _request(self, opener: bytes, stream_id: int, names: Sequence[str]) -> protocol.Message:
        """Send a stream-opening request and return the agent's first answer on it."""
        try:
            self._channel.send(opener)
            return self._channel.recv_message(stream_id, (*names, "detached_error"))
        except BaseException:
            self._fail()
            raise

    def start_detached(
        self,
        command: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> DetachedStart:
        """Start ``command`` in the background: it outlives this connection (a dev server,
        a watcher) and runs until it exits, :meth:`kill_detached` or the VM stops.

        It starts like :meth:`start` (same user, environment and cwd rules), with no
        terminal and stdin from /dev/null. The agent keeps its last 1 MiB of output, for
        :meth:`attach`.

        Returns:
            Its id (for :meth:`list_detached`, :meth:`attach`, :meth:`kill_detached`) and
            guest pid.

        Raises:
            DetachedProcessError: ``limit_reached`` (64 run already), or ``unsupported``
                (the agent is too old; nothing was sent).
            CommandStartFailed: the guest could not start the command.
            StateError, AgentUnavailable, ProtocolError, ExecRefused: as for :meth:`start`.
        """
        self._require_detach("start one")
        stream_id = self._begin()
        argv, shell = (None, command) if isinstance(command, str) else (list(command), None)
        request = protocol.encode_message(
            "exec", stream_id, argv=argv, shell=shell, env=dict(env or {}), cwd=cwd,
            user=user, detach=True,
        )  # fmt: skip
        msg = self._request(request, stream_id, ("detached", "start_failed"))
        self._end()
        if msg.name == "start_failed":
            raise _start_failed(msg)
        if msg.name == "detached_error":
            raise _detached_error(msg)
        from secvf.exec.replies import DetachedStart

        return DetachedStart(msg["id"][:MAX_PEER_TEXT_CHARS], msg["pid"])

    def list_detached(self) -> list[DetachedProcessInfo]:
        """The agent's background processes, running and recently exited, oldest first.

        Raises:
            DetachedProcessError: ``unsupported`` (the agent is too old).
            StateError, AgentUnavailable, ProtocolError, ExecRefused: the channel failed.
        """
        self._require_detach("list them")
        stream_id = self._begin()
        msg = self._request(protocol.encode_message("ps", stream_id), stream_id,
                            ("process_list",))  # fmt: skip
        self._end()
        if msg.name == "detached_error":
            raise _detached_error(msg)
        return [_process_info(item) for item in msg["processes"][:MAX_LISTED_PROCESSES]]

    def attach(self, process_id: str) -> AttachSession:
        """Follow background process ``process_id``: its buffered output, then live output,
        until it exits (at once, for one that has exited already).

        Iterate the session for ``Stdout``/``Stderr``/``OutputDropped`` events and the
        final ``Exited``; closing it early only detaches (the process keeps running).
        This connection is busy until then. Several attaches to one process may run at
        once (on several connections, up to 8).

        Raises:
            DetachedProcessError: ``not_found`` (no such id, or forgotten: the agent
                remembers the last 32 that exited), ``limit_reached`` (8 attaches follow
                it already) or ``unsupported``.
            StateError, AgentUnavailable, ProtocolError, ExecRefused: the channel failed.
        """
        self._require_detach("attach")
        stream_id = self._begin()
        msg = self._request(protocol.encode_message("attach", stream_id, id=process_id),
                            stream_id, ("attached",))  # fmt: skip
        if msg.name == "detached_error":
            self._end()
            raise _detached_error(msg)
        return AttachSession(
            self._channel,
            stream_id,
            msg["id"][:MAX_PEER_TEXT_CHARS],
            msg["pid"],
            msg["dropped_bytes"],
            on_end=self._end,
            on_broken=self._fail,
        )

    def kill_detached(self, process_id: str, signum: int = signal.SIGTERM) -> None:
        """Send ``signum`` (default SIGTERM) to background process ``process_id``'s
        process group.

        Raises:
            DetachedProcessError: ``not_found``, ``not_running`` (it has exited),
                ``invalid_request`` (not a signal number) or ``unsupported``.
            StateError, AgentUnavailable, ProtocolError, ExecRefused: the channel failed.
        """
        self._require_detach("kill one")
        stream_id = self._begin()
        request = protocol.encode_message("kill", stream_id, id=process_id, signum=int(signum))
        msg = self._request(request, stream_id, ("killed",))
        self._end()
        if msg.name == "detached_error":
            raise _detached_error(msg)

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
                msg = self._channel.recv_message(stream_id, ("upload_ready", "file_error"))
                if msg.name == "upload_ready":
                    self._send_file_data(stream_id, source)
                    msg = self._channel.recv_message(stream_id, ("upload_done", "file_error"))
            except BaseException:
                self._fail()
                raise
        self._end()
        if msg.name == "file_error":
            raise _file_error(msg, remote)
        from secvf.exec.replies import FileTransfer

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
                is larger than ``max_bytes`` (kind ``too_large``; the connection is
                closed to stop the transfer).
            OSError: ``local``'s directory is not writable.
            AgentUnavailable, ProtocolError, StateError: the channel failed.
        """
        import tempfile  # only downloads need it; a CLI command's start does not

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
            if exc.kind == FileTransferError.TOO_LARGE:
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
        msg = self._channel.recv_message(stream_id, ("download_start", "file_error"))
        if msg.name == "file_error":
            raise _file_error(msg, remote)
        path, declared, mode = msg["path"], msg["size"], msg["mode"]
        if declared > max_bytes:
            raise FileTransferError(
                FileTransferError.TOO_LARGE, path, f"{declared} bytes > cap {max_bytes}"
            )
        received = 0
        while True:
            frame = self._channel.recv_for(stream_id)
            if frame.type is protocol.FrameType.FILE_DATA:
                received += len(frame.body)
                if received > max_bytes:
                    raise FileTransferError(
                        FileTransferError.TOO_LARGE, path, f"more than {max_bytes} bytes"
                    )
                sink.write(frame.body)
                continue
            end = expect(frame, ("download_end", "file_error"))
            if end.name == "file_error":
                raise _file_error(end, remote)
            if end["size"] != received:
                raise ProtocolError(f"agent announced {end['size']} bytes but sent {received}")
            from secvf.exec.replies import FileTransfer

            return FileTransfer(path, received, mode & 0o7777)


def _known(kinds: type[enum.StrEnum], raw: str) -> str:
    """``raw`` as a member of ``kinds`` if it is one (an unknown value stays as sent)."""
    try:
        return kinds(raw)
    except ValueError:
        return raw


def _restore_result(msg: protocol.Message, received_ns: int) -> RestoreResult:
    """A ``restored`` payload as a :class:`RestoreResult` (guest text shortened)."""
    from secvf.exec.replies import RestoreIssue, RestoreResult, RestoreShare

    p = msg.payload
    offset = p["clock_offset_ns"]
    return RestoreResult(
        clock_offset_s=offset / 1e9 if offset is not None else None,
        clock_skew_s=(p["guest_time_ns"] - received_ns) / 1e9,
        reseeded=p["reseeded"],
        hostname=p["hostname"][:MAX_PEER_TEXT_CHARS],
        mac=p["mac"][:MAX_PEER_TEXT_CHARS] if p["mac"] is not None else None,
        dhcp_restarted=p["dhcp_restarted"],
        mounted=tuple(
            RestoreShare(
                s["tag"][:MAX_PEER_TEXT_CHARS], s["path"][:MAX_PEER_TEXT_CHARS], s["read_only"]
            )
            for s in p["mounted"][:MAX_RESTORE_ITEMS]
        ),
        tmp_entries_removed=p["tmp_entries_removed"],
        errors=tuple(
            RestoreIssue(
                e.get("item", "?")[:MAX_PEER_TEXT_CHARS], e.get("message", "")[:MAX_PEER_TEXT_CHARS]
            )
            for e in p["errors"][:MAX_RESTORE_ITEMS]
        ),
    )


def _start_failed(msg: protocol.Message) -> CommandStartFailed:
    p = msg.payload
    return CommandStartFailed(
        _known(protocol.StartFailureKind, p["kind"]),
        p["message"][:MAX_PEER_TEXT_CHARS],
        p["errno"],
        p["errno_name"],
        p["stage"],
    )


def _detached_error(msg: protocol.Message) -> DetachedProcessError:
    p = msg.payload
    return DetachedProcessError(
        _known(protocol.DetachedErrorKind, p["kind"])[:MAX_PEER_TEXT_CHARS],
        p["message"][:MAX_PEER_TEXT_CHARS],
        p["id"][:MAX_PEER_TEXT_CHARS],
    )


def _process_info(item: dict[str, Any]) -> DetachedProcessInfo:
    """A ``process_list`` item (checked by the protocol's ``list[process]`` kind), its
    text shortened."""
    from secvf.exec.replies import DetachedProcessInfo

    return DetachedProcessInfo(
        id=item["id"][:MAX_PEER_TEXT_CHARS],
        argv=tuple(arg[:MAX_PEER_TEXT_CHARS] for arg in item["argv"][:MAX_LISTED_ARGS]),
        user=item["user"][:MAX_PEER_TEXT_CHARS],
        pid=item["pid"],
        state=item["state"][:MAX_PEER_TEXT_CHARS],
        started_at=float(item["started_at"]),
        exit_code=item["code"],
        signal=item["signal"],
        duration_ms=item["duration_ms"],
        buffered_bytes=item["buffered_bytes"],
        dropped_bytes=item["dropped_bytes"],
    )


def _file_error(msg: protocol.Message, remote: str) -> FileTransferError:
    p = msg.payload
    return FileTransferError(
        _known(protocol.FileErrorKind, p["kind"]),
        p["path"] or remote,
        p["message"][:MAX_PEER_TEXT_CHARS],
        p["errno"],
        p["errno_name"],
    )
