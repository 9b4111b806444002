"""One client connection: the handshake, then frames routed to the session's streams."""

from __future__ import annotations

import enum
import logging
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING

from secvf.exec import protocol
from secvf.guest.agent import AGENT_VERSION
from secvf.guest.agent.attach import AttachTask
from secvf.guest.agent.command import ExecTask
from secvf.guest.agent.connection import Connection, ConnectionGone
from secvf.guest.agent.detached import DetachedRefused
from secvf.guest.agent.errors import RequestFailed
from secvf.guest.agent.files import DownloadTask, UploadTask

if TYPE_CHECKING:
    from secvf.guest.agent.server import Agent

HELLO_TIMEOUT_S = 10.0
RECV_BYTES = 256 * 1024
CAPABILITIES = ["exec", "tty", "stdin", "signal", "resize", "files", "info", "keepalive"]
#: Listed as well when the agent can apply ``restore`` (root, in a guest).
RESTORE_CAPABILITY = "restore"
#: The generation that introduced ``restore``.
RESTORE_GENERATION = protocol.MESSAGES["restore"].introduced_in
#: Listed as well on connections that speak background processes (exec detach, ps,
#: attach, kill).
DETACH_CAPABILITY = "detach"
#: The generation that introduced them.
DETACH_GENERATION = protocol.MESSAGES["detached"].introduced_in
#: Stream openers that need it.
_DETACH_OPENERS = ("ps", "attach", "kill")
#: Longest id echoed back in a ``detached_error`` (real ids have 8 characters).
ECHOED_ID_CHARS = 80

log = logging.getLogger("secvf.agent")


class SessionState(enum.Enum):
    """Lifecycle of one connection."""

    HANDSHAKE = "handshake"
    READY = "ready"
    CLOSED = "closed"


Task = ExecTask | UploadTask | DownloadTask | AttachTask

_OPENERS: dict[
    str, type[ExecTask] | type[UploadTask] | type[DownloadTask] | type[AttachTask]
] = {
    "exec": ExecTask,
    "upload": UploadTask,
    "download": DownloadTask,
    "attach": AttachTask,
}


class Session:
    """One client connection: handshake, then frames routed to its streams."""

    def __init__(self, agent: Agent, sock: socket.socket, number: int) -> None:
        self.agent = agent
        self.conn = Connection(sock)
        # STDIN bodies too large for the buffer are left on the socket for ExecTask to splice
        self._reader = protocol.FrameReader(
            sock.recv_into, recv_bytes=RECV_BYTES, splice_from=sock.fileno()
        )
        self.number = number
        self.state = SessionState.HANDSHAKE
        self.generation = protocol.GENERATION
        self.log = log.getChild(f"s{number}")
        self._streams: dict[int, Task] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._restoring = False  # a restore is being applied (keepalives are sent)

    def __repr__(self) -> str:
        return f"<Session {self.number} state={self.state.value} streams={len(self._streams)}>"

    def serve(self) -> None:
        """Run the session until the client leaves or breaks the protocol (reader thread)."""
        try:
            self.conn.sock.settimeout(HELLO_TIMEOUT_S)
            for frame in self._reader.frames():
                self._handle(frame)
            self.log.debug("client closed the connection")
        except protocol.ProtocolViolation as exc:
            self.log.warning("protocol violation: %s", exc)
            self._send_error(exc.code, str(exc))
        except TimeoutError:
            self._send_error("bad_frame", "no hello within the handshake timeout")
        except (OSError, ConnectionGone) as exc:
            self.log.debug("connection lost: %s", exc)
        finally:
            self.close()

    def _send_error(self, code: str, message: str) -> None:
        try:
            self.conn.send(protocol.encode_error_frame(code, message))
        except ConnectionGone:
            pass

    def close(self) -> None:
        """Abort every stream and close the socket (idempotent)."""
        with self._lock:
            self.state = SessionState.CLOSED
            tasks = list(self._streams.values())
            self._streams.clear()
        self._closed.set()
        for task in tasks:
            task.abort()
        self.conn.close()

    def stream_ended(self, stream_id: int) -> None:
        """Forget a finished stream (called by the task that ended it)."""
        with self._lock:
            self._streams.pop(stream_id, None)

    def running_commands(self) -> int:
        """Number of exec and attach streams in progress (they get keepalives)."""
        with self._lock:
            return sum(isinstance(t, ExecTask | AttachTask) for t in self._streams.values())

    # -- dispatch (reader thread) ---------------------------------------------------------

    def _handle(self, frame: protocol.FrameView) -> None:
        self.log.debug(
            "<- %s stream=%d %d bytes", frame.type.name, frame.stream_id, len(frame.body)
        )
        if self.state is SessionState.HANDSHAKE:
            self._handshake(frame)
        elif frame.type is protocol.FrameType.CONTROL:
            self._handle_message(protocol.decode_message(frame))
        elif frame.type is protocol.FrameType.STDIN:
            task = self._task(frame.stream_id)
            if isinstance(task, ExecTask):
                task.write_stdin(frame.body)
                if frame.rest:  # left on the socket by the reader: moved without a copy
                    task.take_stdin_rest(self._reader)
        elif frame.type is protocol.FrameType.FILE_DATA:
            task = self._task(frame.stream_id)
            if isinstance(task, UploadTask):
                task.write_chunk(frame.body)
        elif frame.type is protocol.FrameType.ERROR:
            raise ConnectionGone(f"client sent error: {bytes(frame.body[:200])!r}")
        else:
            raise protocol.BadFrame(f"{frame.type.name} frames cannot be sent to the agent")

    def _handshake(self, frame: protocol.FrameView) -> None:
        msg = protocol.decode_message(frame)
        if msg.name != "hello":
            raise protocol.BadMessage(f"expected hello, got {msg.name!r}")
        self.generation = protocol.negotiate_generation(msg["generation"])
        capabilities = list(CAPABILITIES)
        if self.agent.restorer.enabled and self.generation >= RESTORE_GENERATION:
            capabilities.append(RESTORE_CAPABILITY)
        if self.generation >= DETACH_GENERATION:
            capabilities.append(DETACH_CAPABILITY)
        self.conn.message(
            "hello",
            generation=self.generation,
            software=f"secvf-agent/{AGENT_VERSION}",
            capabilities=capabilities,
            keepalive_interval_ms=int(self.agent.keepalive_interval_s * 1000),
            max_frame_bytes=protocol.MAX_FRAME_BYTES,
        )
        self.conn.sock.settimeout(None)
        self.state = SessionState.READY
        self.agent.workers.run(self._bh_keepalive)

    def _handle_message(self, msg: protocol.Message) -> None:
        if msg.name in _OPENERS or msg.name in _DETACH_OPENERS:
            self._open_stream(msg)
        elif msg.name == "ping":
            self.conn.message("pong", agent_version=AGENT_VERSION)
        elif msg.name == "info":
            self.conn.message("agent_info", **self.agent.describe(self.generation))
        elif msg.name == "restore":
            self._restore(msg)
        elif msg.name in ("stdin_eof", "signal", "resize", "cancel", "upload_end"):
            self._stream_control(msg)
        else:
            raise protocol.BadMessage(f"{msg.name!r} cannot be sent to the agent")

    def _restore(self, msg: protocol.Message) -> None:
        """Apply a ``restore`` (in this reader thread) and answer it on stream 0."""
        received = time.monotonic()
        if msg.stream_id != 0:
            raise protocol.BadMessage("restore travels on stream 0")
        if self.generation < RESTORE_GENERATION:
            raise protocol.BadMessage(
                f"restore needs protocol generation {RESTORE_GENERATION}; this connection "
                f"speaks {self.generation}"
            )
        self._restoring = True
        try:
            name, fields = self.agent.restorer.handle(dict(msg.payload), received)
        finally:
            self._restoring = False
        self.conn.message(name, **fields)

    def _open_stream(self, msg: protocol.Message) -> None:
        sid = msg.stream_id
        if sid == 0:
            raise protocol.BadMessage(f"{msg.name} needs a non-zero stream id")
        answered_at_once = msg.name in ("ps", "kill") or (msg.name == "exec" and msg["detach"])
        if answered_at_once or msg.name == "attach":
            self._require_detach_generation(msg.name)
        with self._lock:
            if sid in self._streams:
                raise protocol.BadMessage(f"stream {sid} is already in use")
            task = None if answered_at_once else _OPENERS[msg.name](self, sid, msg.payload)
            if task is not None:
                self._streams[sid] = task
        try:
            if task is None:
                self._answer_detach_request(msg)
            else:
                task.start()
        except RequestFailed as failure:
            self.stream_ended(sid)
            self._report_failure(msg.name, sid, failure)

    def _require_detach_generation(self, name: str) -> None:
        if self.generation < DETACH_GENERATION:
            raise protocol.BadMessage(
                f"{name} of background processes needs protocol generation "
                f"{DETACH_GENERATION}; this connection speaks {self.generation}"
            )

    def _answer_detach_request(self, msg: protocol.Message) -> None:
        """``exec`` with ``detach``, ``ps`` or ``kill``: done now, answered on the stream.

        Raises:
            RequestFailed: the command did not start; DetachedRefused: refused.
        """
        registry, sid = self.agent.detached, msg.stream_id
        if msg.name == "ps":
            self.conn.message("process_list", sid, processes=registry.describe_all())
        elif msg.name == "kill":
            if not 1 <= msg["signum"] <= signal.SIGRTMAX:
                raise DetachedRefused(
                    protocol.DetachedErrorKind.INVALID_REQUEST,
                    f"invalid signal number {msg['signum']}",
                    msg["id"],
                )
            registry.kill(msg["id"], msg["signum"])
            self.conn.message("killed", sid, id=msg["id"], signum=msg["signum"])
        else:
            process = registry.launch(self, sid, dict(msg.payload))
            assert process.proc is not None  # started
            self.conn.message("detached", sid, id=process.id, pid=process.proc.pid)

    def _report_failure(self, opener: str, sid: int, failure: RequestFailed) -> None:
        if isinstance(failure, DetachedRefused):
            process_id = failure.process_id[:ECHOED_ID_CHARS]  # a hostile id stays small
            fields = {"kind": failure.kind, "id": process_id, "message": str(failure)}
            self.conn.message("detached_error", sid, **fields)
        elif opener == "exec":
            stage = failure.stage or "exec"
            fields = {"kind": failure.kind, "stage": stage, **failure.fields()}
            self.conn.message("start_failed", sid, **fields)
        else:
            fields = {"kind": failure.kind, "path": failure.path, **failure.fields()}
            self.conn.message("file_error", sid, **fields)

    def _stream_control(self, msg: protocol.Message) -> None:
        task = self._task(msg.stream_id)
        if msg.name == "signal" and not 1 <= msg["signum"] <= signal.SIGRTMAX:
            raise protocol.BadMessage(f"invalid signal number {msg['signum']}")
        if isinstance(task, ExecTask):
            if msg.name == "stdin_eof":
                task.close_stdin()
            elif msg.name == "signal":
                task.send_signal(msg["signum"])
            elif msg.name == "resize":
                self._resize(task, msg)
            elif msg.name == "cancel":
                task.cancel()
        elif isinstance(task, UploadTask) and msg.name == "upload_end":
            task.finish()

    @staticmethod
    def _resize(task: ExecTask, msg: protocol.Message) -> None:
        try:
            task.resize(msg["rows"], msg["cols"])
        except RequestFailed as exc:
            raise protocol.BadMessage(str(exc)) from None

    def _task(self, stream_id: int) -> Task | None:
        with self._lock:
            return self._streams.get(stream_id)

    def _bh_keepalive(self) -> None:
        frame = protocol.encode_message("keepalive")
        while not self._closed.wait(self.agent.keepalive_interval_s):
            if self.running_commands() or self._restoring:
                try:
                    self.conn.send(frame)
                except ConnectionGone:
                    return
