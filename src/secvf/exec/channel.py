"""The framed connection to an exec socket: dialling, frames in and out, deadlines, limits.

A :class:`FrameChannel` is one connected stream socket plus an incremental
:class:`~secvf.exec.protocol.FrameDecoder`. It is the only place the host client reads
from the guest, so the hostile-guest rules live here:

* a frame header announcing more than :data:`~secvf.exec.protocol.MAX_FRAME_BYTES` is
  rejected before its body is buffered (:class:`~secvf.errors.ProtocolError`);
* a read waits at most ``silence_timeout_s`` for a *complete* frame (bytes trickled one
  at a time do not reset the clock), and never past an optional hard deadline
  (:class:`~secvf.errors.AgentUnavailable`);
* a frame for a stream the caller is not waiting on is a protocol error; connection
  frames (stream 0) in between are only ``keepalive`` or a terminal ERROR.

Two ways to get the socket::

    sock = dial(Path("secvf-exec-<uuid>.sock"), timeout=10)        # the exec bridge
    sock = dial_hybrid(Path("vsock-<uuid>.sock"), 2222, timeout=10)  # the vsock backend

The hybrid form sends ``CONNECT <port>\\n`` and needs ``OK <hostport>\\n`` back before
the protocol's bytes start (the Firecracker convention, docs/protocol.md).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from secvf.errors import AgentUnavailable, ConnectFailed, ExecError, ExecRefused, ProtocolError
from secvf.exec import protocol
from secvf.exec.forwarding import read_line

#: Default bound on dialling plus the protocol handshake.
CONNECT_TIMEOUT_S = 10.0
#: Bytes asked of the kernel per ``recv``.
RECV_BYTES = 256 * 1024
#: Longest ``OK <hostport>\n`` reply read from a hybrid vsock socket.
MAX_HYBRID_REPLY_BYTES = 64
#: Longest piece of peer-supplied text copied into an exception message.
MAX_PEER_TEXT_CHARS = 500
#: Longest unknown error code kept from a peer.
MAX_ERROR_CODE_CHARS = 64

log = logging.getLogger("secvf.exec")


def dial(path: Path, timeout: float) -> socket.socket:
    """Connect a stream socket to the Unix socket ``path``.

    Raises:
        ConnectFailed: the socket does not exist, refuses, or ``timeout`` passed.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(os.fspath(path))
    except OSError as exc:
        sock.close()
        raise ConnectFailed(Path(path), exc.strerror or str(exc)) from exc
    return sock


def dial_hybrid(path: Path, port: int, timeout: float) -> socket.socket:
    """Connect through a hybrid vsock socket to guest ``port`` (``CONNECT``/``OK``).

    Raises:
        ConnectFailed: dialling failed, or the backend answered anything but ``OK``
            (the guest port is closed).
    """
    sock = dial(path, timeout)
    try:
        sock.sendall(f"CONNECT {port}\n".encode())
        reply = read_line(sock, MAX_HYBRID_REPLY_BYTES)
    except OSError as exc:
        sock.close()
        raise ConnectFailed(Path(path), f"hybrid vsock handshake failed: {exc}") from exc
    if not reply.startswith(b"OK "):
        sock.close()
        raise ConnectFailed(Path(path), f"vsock backend answered {reply[:40]!r}, not OK")
    return sock


def decode(frame: protocol.Frame) -> protocol.Message:
    """Decode the JSON body of a CONTROL or ERROR frame from the guest.

    Raises:
        ProtocolError: the body is not a valid message (``.code`` says why).
    """
    try:
        return protocol.decode_message(frame)
    except protocol.ProtocolViolation as exc:
        raise ProtocolError(f"invalid message from the guest agent: {exc}", exc.code) from exc


def expect(frame: protocol.Frame, names: Sequence[str]) -> protocol.Message:
    """Return the CONTROL message in ``frame`` if its name is one of ``names``.

    Raises:
        ProtocolError: a data frame, or another message.
    """
    msg = decode(frame) if frame.type is protocol.FrameType.CONTROL else None
    if msg is None or msg.name not in names:
        got = msg.name if msg else frame.type.name
        raise ProtocolError(f"expected {' or '.join(names)} from the agent, got {got}")
    return msg


def peer_error(msg: protocol.Message) -> ExecError:
    """Turn a peer's ``error`` message into the exception the caller should see.

    ``refused`` and ``busy`` become :class:`ExecRefused`; ``agent_unavailable`` (sent by
    the exec bridge when it cannot reach the guest) :class:`AgentUnavailable`; every
    other code, known or not, :class:`ProtocolError`.
    """
    code, text = _error_code(msg["code"]), msg["message"][:MAX_PEER_TEXT_CHARS]
    if code in (protocol.ErrorCode.REFUSED, protocol.ErrorCode.BUSY):
        return ExecRefused(code, text)
    if code is protocol.ErrorCode.AGENT_UNAVAILABLE:
        return AgentUnavailable(f"exec bridge: {text}")
    return ProtocolError(f"the guest agent reported a protocol error ({code}): {text}", code)


def _error_code(raw: str) -> str:
    """The :class:`~secvf.exec.protocol.ErrorCode` named ``raw``, else ``raw`` shortened."""
    try:
        return protocol.ErrorCode(raw)
    except ValueError:
        return raw[:MAX_ERROR_CODE_CHARS]


class FrameChannel:
    """A connected socket plus a decoder, with frame-level read deadlines.

    Sends are serialised by a lock, so one thread may send (stdin) while another reads.
    After :meth:`close`, sends raise :class:`AgentUnavailable`.
    """

    def __init__(self, sock: socket.socket, silence_timeout_s: float) -> None:
        self.sock = sock  # the connected stream socket
        self.silence_timeout_s = silence_timeout_s  # longest wait for one complete frame
        self.log = log.getChild(f"c{id(self):x}")  # this connection's logger
        self._decoder = protocol.FrameDecoder()
        self._pending: list[protocol.Frame] = []
        self._send_lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<FrameChannel fd={self.sock.fileno()} {state}>"

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    def send(self, data: bytes) -> None:
        """Send ``data`` whole (blocks while the peer applies back-pressure).

        Raises:
            AgentUnavailable: the channel is closed or the connection broke; part of
                ``data`` may have been sent.
        """
        self.send_parts([data])

    def send_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        """Send ``parts`` (e.g. :func:`~secvf.exec.protocol.data_frame_parts`) in order,
        whole, without joining them; blocks like :meth:`send`.

        Raises:
            AgentUnavailable: as for :meth:`send`.
        """
        with self._send_lock:
            if self._closed:
                raise AgentUnavailable("the exec connection is closed")
            try:
                protocol.sendmsg_all(self.sock, parts)
            except OSError as exc:
                raise AgentUnavailable(f"exec connection lost while sending: {exc}") from exc

    def recv_frame(self, hard_deadline: float | None = None) -> protocol.Frame:
        """Return the next frame, of any stream.

        Args:
            hard_deadline: a ``time.monotonic()`` value never to wait past.

        Raises:
            AgentUnavailable: the silence timeout or the hard deadline passed; the peer
                closed or the connection broke.
            ProtocolError: the bytes are not a valid frame (oversized, bad magic, ...).
        """
        deadline = time.monotonic() + self.silence_timeout_s
        if hard_deadline is not None:
            deadline = min(deadline, hard_deadline)
        while not self._pending:
            self._fill(deadline, hard_deadline)
        return self._pending.pop(0)

    def recv_for(self, stream_id: int, hard_deadline: float | None = None) -> protocol.Frame:
        """Return the next frame of ``stream_id``, consuming keepalives on stream 0.

        Raises:
            ExecRefused, AgentUnavailable, ProtocolError: an ERROR frame arrived (see
                :func:`peer_error`).
            ProtocolError: a frame for another stream, or an unexpected connection
                message.
            AgentUnavailable: as for :meth:`recv_frame`.
        """
        while True:
            frame = self.recv_frame(hard_deadline)
            self.log.debug("<- %s stream=%d %dB", frame.type.name, frame.stream_id, len(frame.body))
            if frame.stream_id == stream_id:
                return frame
            if frame.stream_id != 0 or frame.type not in (
                protocol.FrameType.CONTROL,
                protocol.FrameType.ERROR,
            ):
                raise ProtocolError(f"agent sent a frame for unknown stream {frame.stream_id}")
            msg = decode(frame)
            if msg.name == "error":
                raise peer_error(msg)
            if msg.name != "keepalive":
                raise ProtocolError(f"unexpected {msg.name!r} message from the guest agent")

    def recv_message(self, stream_id: int, names: Sequence[str]) -> protocol.Message:
        """Return the next message of ``stream_id``, which must be one of ``names``.

        Raises:
            ProtocolError: anything else arrived; and as for :meth:`recv_for`.
        """
        return expect(self.recv_for(stream_id), names)

    def close(self) -> None:
        """Shut the socket down (wakes a blocked reader) and close it; idempotent."""
        with self._send_lock:
            self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already disconnected
        self.sock.close()

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
