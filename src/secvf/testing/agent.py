"""Test doubles for SecVF seams, kept beside the code they stand in for.

:class:`HostileAgent` is a fake guest agent on a Unix socket that misbehaves on purpose,
so the host-side exec client can be tested against a guest that is broken or malicious.
It speaks just enough of :mod:`secvf.exec.protocol` (the handshake, ``started``) to bring the
client to the point where each misbehaviour hurts::

    with HostileAgent(tmp_path / "agent.sock", Misbehaviour.OVERSIZED_FRAME) as fake:
        with pytest.raises(ProtocolError):
            ExecClient.connect(fake.path).run(["true"])

:class:`AgentProcess` runs the *real* guest agent on the host, as the guest would (plain
``python3 -I`` on the agent zipapp the sandbox image carries), listening on a Unix socket
instead of vsock.
"""

from __future__ import annotations

import enum
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from secvf.exec import protocol
from secvf.image.agent_zipapp import agent_zipapp

#: The plain interpreter the guest has; falls back to ours where it is missing.
GUEST_LIKE_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
AGENT_START_TIMEOUT_S = 10.0

#: Body of the endless/flood output frames.
FLOOD_CHUNK = b"\xff" * protocol.DATA_CHUNK_BYTES


class Misbehaviour(enum.Enum):
    """What the fake agent does wrong (after answering hello, unless stated)."""

    SILENT = "silent"  # accepts the connection, never answers hello
    REFUSE = "refuse"  # answers hello with an ERROR frame "refused" (like the bridge)
    GARBAGE = "garbage"  # answers hello with bytes that are not a frame (bad magic)
    OVERSIZED_FRAME = "oversized_frame"  # a header announcing MAX_FRAME_BYTES + 1
    TRUNCATED_FRAME = "truncated_frame"  # half a frame, then closes
    UNKNOWN_MESSAGE = "unknown_message"  # a well-formed control frame with t="bogus"
    WRONG_STREAM = "wrong_stream"  # output for a stream the client never opened
    STALL_AFTER_START = "stall_after_start"  # "started", then nothing at all, forever
    TRICKLE = "trickle"  # "started", then one byte of a frame every 0.2 s
    KEEPALIVE_FOREVER = "keepalive_forever"  # "started", keepalives, never exits
    ENDLESS_OUTPUT = "endless_output"  # "started", then stdout forever, never exits
    FLOOD = "flood"  # "started", flood_bytes of stdout as fast as possible, then exit 0


class HostileAgent:
    """A misbehaving agent listening on a Unix socket; one thread per connection.

    Attributes:
        path: the socket path clients connect to.
        bytes_sent: total bytes written to clients (grows while a flood runs).
        connections: number of connections accepted so far.
    """

    def __init__(
        self, path: Path, misbehaviour: Misbehaviour, *, flood_bytes: int = 64 * 1024 * 1024
    ) -> None:
        self.path = Path(path)
        self.misbehaviour = misbehaviour
        self.flood_bytes = flood_bytes
        self.bytes_sent = 0
        self.connections = 0
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._threads: list[threading.Thread] = []

    def __repr__(self) -> str:
        return f"<HostileAgent {self.misbehaviour.value} at {self.path}>"

    def __enter__(self) -> HostileAgent:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Bind, listen and start accepting in a background thread."""
        if self.path.exists():
            os.unlink(self.path)
        self._listener.bind(os.fspath(self.path))
        self._listener.listen(16)
        self._spawn(self._bh_accept)

    def close(self) -> None:
        """Stop accepting, end every connection thread, remove the socket."""
        self._stop.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=5)
        if self.path.exists():
            os.unlink(self.path)

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _bh_accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            self._spawn(self._bh_serve, conn)

    def _bh_serve(self, conn: socket.socket) -> None:
        try:
            self._misbehave(conn)
        except OSError:
            pass  # the client gave up, as it should
        finally:
            conn.close()

    def _send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.bytes_sent += len(data)

    def _wait_for_request(self, conn: socket.socket) -> int:
        """Read client frames until an exec/upload/download request; return its stream id."""
        decoder = protocol.FrameDecoder()
        while data := conn.recv(65536):
            for frame in decoder.feed(data):
                if frame.flags & protocol.FLAG_START:
                    return frame.stream_id
        raise OSError("client closed before sending a request")

    def _answer_hello(self, conn: socket.socket) -> None:
        self._wait_for_hello(conn)
        hello = protocol.encode_message(
            "hello", generation=protocol.GENERATION, software="hostile-agent", capabilities=[]
        )
        self._send(conn, hello)

    @staticmethod
    def _wait_for_hello(conn: socket.socket) -> None:
        decoder = protocol.FrameDecoder()
        while True:
            data = conn.recv(65536)
            if not data:
                raise OSError("client closed before hello")
            if decoder.feed(data):
                return

    def _misbehave(self, conn: socket.socket) -> None:
        kind = self.misbehaviour
        if kind is Misbehaviour.SILENT:
            self._stop.wait()
            return
        if kind is Misbehaviour.REFUSE:
            self._wait_for_hello(conn)
            self._send(conn, protocol.encode_error_frame("refused", "uid 1234 is not allowed"))
            return
        if kind is Misbehaviour.GARBAGE:
            self._wait_for_hello(conn)
            self._send(conn, b"HTTP/1.1 400 Bad Request\r\n\r\n")
            return
        self._answer_hello(conn)
        stream_id = self._wait_for_request(conn)
        self._after_request(conn, kind, stream_id)

    def _after_request(self, conn: socket.socket, kind: Misbehaviour, stream_id: int) -> None:
        if kind is Misbehaviour.OVERSIZED_FRAME:
            header = protocol.HEADER.pack(
                protocol.MAGIC,
                protocol.FrameType.STDOUT,
                0,
                stream_id,
                protocol.MAX_FRAME_BYTES + 1,
            )
            self._send(conn, header)
            self._stop.wait()
        elif kind is Misbehaviour.TRUNCATED_FRAME:
            frame = protocol.encode_message("started", stream_id, pid=42)
            self._send(conn, frame[: len(frame) // 2])
        elif kind is Misbehaviour.UNKNOWN_MESSAGE:
            body = b'{"v":1,"t":"bogus","p":{}}'
            self._send(conn, protocol.encode_frame(protocol.FrameType.CONTROL, stream_id, body))
            self._stop.wait()
        elif kind is Misbehaviour.WRONG_STREAM:
            self._send(conn, protocol.encode_message("started", stream_id, pid=42))
            self._send(conn, protocol.encode_data(protocol.FrameType.STDOUT, stream_id + 99, b"x"))
            self._stop.wait()
        else:
            self._send(conn, protocol.encode_message("started", stream_id, pid=42))
            self._output_phase(conn, kind, stream_id)

    def _output_phase(self, conn: socket.socket, kind: Misbehaviour, stream_id: int) -> None:
        if kind is Misbehaviour.STALL_AFTER_START:
            self._stop.wait()
        elif kind is Misbehaviour.TRICKLE:
            frame = protocol.encode_data(protocol.FrameType.STDOUT, stream_id, b"slow")
            for byte in frame:
                if self._stop.wait(0.2):
                    return
                self._send(conn, bytes([byte]))
        elif kind is Misbehaviour.KEEPALIVE_FOREVER:
            while not self._stop.wait(0.05):
                self._send(conn, protocol.encode_message("keepalive"))
        elif kind is Misbehaviour.ENDLESS_OUTPUT:
            frame = protocol.encode_data(protocol.FrameType.STDOUT, stream_id, FLOOD_CHUNK)
            while not self._stop.is_set():
                self._send(conn, frame)
        elif kind is Misbehaviour.FLOOD:
            self._flood(conn, stream_id)

    def _flood(self, conn: socket.socket, stream_id: int) -> None:
        frame = protocol.encode_data(protocol.FrameType.STDOUT, stream_id, FLOOD_CHUNK)
        started = time.monotonic()
        for _ in range(self.flood_bytes // len(FLOOD_CHUNK)):
            self._send(conn, frame)
        duration_ms = int((time.monotonic() - started) * 1000)
        self._send(
            conn, protocol.encode_message("exit", stream_id, code=0, duration_ms=duration_ms)
        )


class AgentProcess:
    """The real guest agent as a host subprocess listening on ``<workdir>/agent.sock``.

    The agent zipapp the sandbox image gets (:func:`~secvf.image.agent_zipapp.agent_zipapp`) is
    written to ``<workdir>/agent.pyz`` and started with ``python3 -I``, so the test fails
    if the agent needs anything but the standard library and what the zipapp holds.

    Example::

        with AgentProcess(tmp_path, default_user="root") as agent:
            client = ExecClient.connect(agent.socket_path)
    """

    def __init__(
        self,
        workdir: Path,
        *,
        default_user: str,
        keepalive_interval_s: float = protocol.KEEPALIVE_INTERVAL_S,
        extra_args: tuple[str, ...] = (),
        popen_options: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.socket_path = self.workdir / "agent.sock"
        self.log_path = self.workdir / "agent.log"
        self.zipapp_path = self.workdir / "agent.pyz"
        self.argv = [
            GUEST_LIKE_PYTHON,
            "-I",
            os.fspath(self.zipapp_path),
            "--unix",
            os.fspath(self.socket_path),
            "--default-user",
            default_user,
            "--keepalive-interval",
            str(keepalive_interval_s),
            *extra_args,
        ]
        self._popen_options = popen_options or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"<AgentProcess pid={pid} socket={self.socket_path}>"

    def __enter__(self) -> AgentProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Write the agent zipapp, start it, wait until its socket accepts connections.

        Raises:
            RuntimeError: the agent exited or did not listen within AGENT_START_TIMEOUT_S
                (the message carries its log).
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.zipapp_path.write_bytes(agent_zipapp())
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=log, cwd=self.workdir, **self._popen_options
            )
        deadline = time.monotonic() + AGENT_START_TIMEOUT_S
        while not self._accepts():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"agent did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.02)

    def _accepts(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(os.fspath(self.socket_path))
            except OSError:
                return False
        return True

    def stop(self) -> None:
        """Terminate the agent (SIGTERM, then SIGKILL after 5 s) and reap it."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


__all__ = ["HostileAgent", "Misbehaviour", "AgentProcess", "FLOOD_CHUNK"]
