"""A running command: its event stream, its stdin, signals and terminal size.

An :class:`ExecSession` is what :meth:`secvf.exec.ExecClient.start` returns. Iterating
it yields output and status events until ``Exited``; its input methods (stdin, EOF,
signal, resize, cancel) may be called from another thread while one thread iterates::

    session = client.start("cat -n", stdin=True)
    feeder = StdinFeeder(session, b"hello\\n")   # writes, then sends EOF, in a thread
    result = session.collect()                   # reads until Exited
    feeder.join()

Reading and writing must happen in different threads once there is more input than
the guest's pipe holds: the agent applies back-pressure to stdin and to output alike.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, BinaryIO, Self

from secvf.errors import AgentUnavailable
from secvf.exec import protocol
from secvf.exec.channel import FrameChannel, expect
from secvf.exec.outcome import (
    ExecEvent,
    ExecResult,
    Exited,
    OutputDropped,
    Stderr,
    StdinError,
    Stdout,
)

if TYPE_CHECKING:
    from secvf.exec.replies import AttachResult

#: Default cap on captured stdout and on captured stderr, each.
DEFAULT_MAX_OUTPUT_BYTES = 16 * 1024 * 1024

OutputCallback = Callable[[bytes], None]
"""Receives every output chunk as it arrives (on the reading thread)."""


class OutputStream:
    """What an exec and an attach share: a stream of output events ending in ``Exited``.

    Iterating yields :data:`~secvf.exec.ExecEvent` objects and ends with ``Exited``
    (also stored in :attr:`exited`); :meth:`collect` reads to the end.
    """

    #: The control messages a stream of this kind carries before ``exit``.
    _MESSAGES: tuple[str, ...] = ()

    def __init__(
        self,
        channel: FrameChannel,
        stream_id: int,
        pid: int,
        hard_deadline: float | None,
        *,
        on_end: Callable[[], None],
        on_broken: Callable[[], None],
    ) -> None:
        """Wrap a started command; :meth:`ExecClient.start` builds sessions.

        ``on_end`` runs once the command exited (the connection is free again);
        ``on_broken`` when the connection can no longer be used (error, early close).
        """
        self._channel = channel
        self.stream_id = stream_id  # the protocol stream of this command
        self.pid = pid  # guest pid of the command
        self.exited: Exited | None = None  # set when the command has ended
        self._hard_deadline = hard_deadline
        self._on_end = on_end
        self._on_broken = on_broken

    def __repr__(self) -> str:
        state = "exited" if self.exited else "running"
        return f"<{type(self).__name__} stream={self.stream_id} pid={self.pid} {state}>"

    def __enter__(self) -> Self:
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
            Either way the connection is closed (an exec's command is killed in the
            guest; an attached background process keeps running).
        """
        try:
            while self.exited is None:
                yield self._next_event()
        except BaseException:
            self._on_broken()
            raise
        self._on_end()

    def collect(
        self,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> ExecResult:
        """Read the session to its end and return the exit status with the output.

        The callbacks receive every chunk; the result keeps the first
        ``max_output_bytes`` of each stream and flags the rest as truncated.

        Raises:
            AgentUnavailable, ProtocolError, ExecRefused: see :meth:`events`.
        """
        out, err = _CappedBuffer(max_output_bytes), _CappedBuffer(max_output_bytes)
        for event in self:
            if isinstance(event, Stdout):
                out.add(event.data)
                if on_stdout:
                    on_stdout(event.data)
            elif isinstance(event, Stderr):
                err.add(event.data)
                if on_stderr:
                    on_stderr(event.data)
        exited = self.exited
        assert exited is not None  # events() only ends normally after Exited
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

    def _next_event(self) -> ExecEvent:
        frame = self._channel.recv_for(self.stream_id, self._hard_deadline)
        if frame.type is protocol.FrameType.STDOUT:
            return Stdout(frame.body)
        if frame.type is protocol.FrameType.STDERR:
            return Stderr(frame.body)
        msg = expect(frame, (*self._MESSAGES, "exit"))
        p = msg.payload
        if msg.name == "stdin_error":
            return StdinError(p["errno"], p["errno_name"], p["message"])
        if msg.name == "output_dropped":
            return OutputDropped(p["bytes"])
        self.exited = Exited(
            p["code"], p["signal"], p["timed_out"], p["cancelled"], p["duration_ms"]
        )
        return self.exited

    def close(self) -> None:
        """Drop the connection if the stream has not ended yet (an exec's command
        is killed by the guest; an attached process keeps running)."""
        if self.exited is None:
            self._on_broken()


class ExecSession(OutputStream):
    """A running command: iterate over its events, feed stdin, signal, resize, cancel.

    Iterating yields :data:`~secvf.exec.ExecEvent` objects (``Stdout``, ``Stderr``,
    ``StdinError``) and ends with ``Exited`` (also stored in :attr:`exited`). Leaving
    the session early (``close()`` or the context manager) closes the connection, which
    kills the command in the guest.
    """

    _MESSAGES = ("stdin_error",)

    def write_stdin(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` to the command's stdin (needs ``start(..., stdin=True)`` or tty).

        Blocks while the guest applies back-pressure; ``data`` goes out in
        :data:`~secvf.exec.protocol.STDIN_FRAME_BYTES` frames, uncopied, and must not change
        until this returns. Data sent after the command exited is dropped by the agent.

        Raises:
            AgentUnavailable: the connection broke; a prefix of ``data`` may have been
                delivered.
        """
        parts = protocol.data_frame_parts(
            protocol.FrameType.STDIN, self.stream_id, data, protocol.STDIN_FRAME_BYTES
        )
        for start in range(0, len(parts), 2):  # a frame per send: signals and cancels share
            self._channel.send_parts(parts[start : start + 2])  # the lock, need not wait long

    def close_stdin(self) -> None:
        """Send EOF on stdin (for a PTY: the terminal's EOF character).

        Raises:
            AgentUnavailable: the connection broke.
        """
        self._channel.send(protocol.encode_message("stdin_eof", self.stream_id))

    def send_signal(self, signum: int) -> None:
        """Deliver signal ``signum`` to the command's process group in the guest.

        Raises:
            AgentUnavailable: the connection broke.
        """
        self._channel.send(protocol.encode_message("signal", self.stream_id, signum=int(signum)))

    def resize(self, rows: int, cols: int) -> None:
        """Resize the command's PTY (no effect without a tty).

        Raises:
            AgentUnavailable: the connection broke.
        """
        self._channel.send(protocol.encode_message("resize", self.stream_id, rows=rows, cols=cols))

    def cancel(self) -> None:
        """Ask the guest to kill the command's process group; ``Exited`` follows.

        Raises:
            AgentUnavailable: the connection broke.
        """
        self._channel.send(protocol.encode_message("cancel", self.stream_id))


class AttachSession(OutputStream):
    """An attach to a background process: its buffered, then live output, to ``Exited``.

    What :meth:`secvf.exec.ExecClient.attach` returns. Iterating yields ``Stdout`` and
    ``Stderr`` chunks, ``OutputDropped`` where output was lost (first, if the agent's
    buffer had dropped a prefix already; later, if this reader was too slow for it), and
    ends with ``Exited``. Leaving early (``close()``, the context manager, Ctrl-C) only
    detaches: the process keeps running. It has no stdin; signals go through
    :meth:`secvf.exec.ExecClient.kill_detached`.
    """

    _MESSAGES = ("output_dropped",)

    def __init__(
        self,
        channel: FrameChannel,
        stream_id: int,
        process_id: str,
        pid: int,
        dropped_bytes: int,
        *,
        on_end: Callable[[], None],
        on_broken: Callable[[], None],
    ) -> None:
        """Wrap an accepted attach; :meth:`ExecClient.attach` builds them."""
        super().__init__(channel, stream_id, pid, None, on_end=on_end, on_broken=on_broken)
        self.process_id = process_id  # the background process's id
        self.dropped_bytes = dropped_bytes  # output lost to this attach so far
        self._pending_drop = dropped_bytes  # reported as the first event

    def __repr__(self) -> str:
        state = "exited" if self.exited else "running"
        return f"<AttachSession {self.process_id} pid={self.pid} {state}>"

    def _next_event(self) -> ExecEvent:
        if self._pending_drop:
            first, self._pending_drop = OutputDropped(self._pending_drop), 0
            return first
        event = super()._next_event()
        if isinstance(event, OutputDropped):
            self.dropped_bytes += event.size
        return event

    def collect(
        self,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> AttachResult:
        """Follow the process to its end; the result adds ``dropped_bytes`` (see
        :meth:`ExecSession.collect` for the rest).

        Raises:
            AgentUnavailable, ProtocolError, ExecRefused: see :meth:`events`.
        """
        from secvf.exec.replies import AttachResult  # made only here (see that module)

        result = super().collect(
            on_stdout=on_stdout, on_stderr=on_stderr, max_output_bytes=max_output_bytes
        )
        return AttachResult(**vars(result), dropped_bytes=self.dropped_bytes)


class StdinFeeder:
    """Streams bytes or a binary file to a session's stdin (then EOF) from a thread.

    Used by :meth:`ExecClient.run` so that output is read while input is written (the
    two would deadlock in one thread once the guest's pipes fill up).
    """

    def __init__(self, session: ExecSession, source: bytes | BinaryIO) -> None:
        """Start the feeding thread at once."""
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
                self._session.write_stdin(bytes(self._source))  # a copy the caller cannot change
            else:
                while chunk := self._source.read(protocol.STDIN_FRAME_BYTES):
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
