"""The local terminal side of ``secvf vm exec``: live output, stdin, raw mode, resize.

Streams the command's stdout and stderr to this process's as they arrive and forwards
stdin (``-i``) with an explicit EOF. With ``-t`` on a terminal it also puts the local
terminal in raw mode (every key, Ctrl-C and Ctrl-D included, goes to the guest's
PTY), forwards input even without ``-i``, forwards window-size changes, and restores
the terminal on the way out.

In raw mode nothing the user types reaches SecVF, so a session that hangs could not be
left. As in ssh, ``~`` at the start of a line (after Enter, or first thing) begins an
escape (:class:`EscapeScanner`): ``~.`` closes the connection (the guest then kills
the command; exit 130, as for Ctrl-C without ``-t``), ``~~`` sends one ``~``, ``~?``
lists the escapes. A ``~`` before anything else is sent as typed.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
import signal
import struct
import sys
import termios
import threading
import tty
from collections.abc import Iterator, Mapping, Sequence
from types import FrameType

from secvf import api
from secvf.errors import ExitCode
from secvf.faces.cli.common import note

STDIN_CHUNK_BYTES = 64 * 1024
DEFAULT_TERMINAL_SIZE = (24, 80)
#: Exit status when the user left the session (Ctrl-C, or ``~.``), as a shell reports SIGINT.
INTERRUPTED_EXIT = ExitCode.SIGNAL_BASE + signal.SIGINT

ESCAPE_CHAR = ord("~")
LINE_ENDS = (ord("\r"), ord("\n"))
ESCAPE_HELP = (
    b"\r\nSupported escape sequences (after Enter):\r\n"
    b"  ~.  close the connection (the command is killed in the guest)\r\n"
    b"  ~~  send a ~\r\n"
    b"  ~?  this message\r\n"
)


class Escape(enum.Enum):
    """What an escape sequence asks SecVF to do."""

    DISCONNECT = "."  # close the connection
    HELP = "?"  # list the escapes


class EscapeScanner:
    """Finds ssh-style escapes in the bytes typed on the local terminal.

    Feed it what was read from the terminal; it returns the bytes to send to the guest
    with :class:`Escape` requests in between, in order. A ``~`` that may start an escape
    is held back until the next byte arrives (or :meth:`flush` at EOF)::

        scanner = EscapeScanner()
        scanner.feed(b"ls\\r~")    # [b"ls\\r"]
        scanner.feed(b".")         # [Escape.DISCONNECT]
    """

    def __init__(self) -> None:
        self.at_line_start = True  # the next byte begins a line
        self.holding_tilde = False  # a ``~`` at the start of a line is held back

    def feed(self, data: bytes) -> list[bytes | Escape]:
        """Split ``data`` into bytes for the guest and escape requests.

        After :attr:`Escape.DISCONNECT` the rest of ``data`` is dropped.
        """
        items: list[bytes | Escape] = []
        pending = bytearray()
        for byte in data:
            if self.holding_tilde:
                self.holding_tilde = False
                action = _ESCAPES.get(byte)
                if action is not None:
                    if pending:
                        items.append(bytes(pending))
                        pending.clear()
                    items.append(action)
                    if action is Escape.DISCONNECT:
                        return items
                    continue
                pending.append(ESCAPE_CHAR)  # ``~~`` sends one; ``~x`` sends both
                if byte == ESCAPE_CHAR:
                    self.at_line_start = False
                    continue
            if byte == ESCAPE_CHAR and self.at_line_start:
                self.holding_tilde = True
                continue
            pending.append(byte)
            self.at_line_start = byte in LINE_ENDS
        if pending:
            items.append(bytes(pending))
        return items

    def flush(self) -> bytes:
        """The ``~`` still held back, if any (call at EOF)."""
        held, self.holding_tilde = self.holding_tilde, False
        return bytes([ESCAPE_CHAR]) if held else b""


_ESCAPES = {ord(escape.value): escape for escape in Escape}


def stdin_is_terminal() -> bool:
    """True if this process's stdin is a terminal."""
    return os.isatty(sys.stdin.fileno())


def forwards_stdin(tty_mode: bool, interactive: bool) -> bool:
    """Whether ``vm exec`` sends this process's stdin to the command: with ``-i``, and
    with ``-t`` on a terminal (a PTY nobody can type into would lock the terminal)."""
    return interactive or (tty_mode and stdin_is_terminal())


def run_streaming(
    name: str,
    command: str | Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | None,
    user: str | None,
    tty_mode: bool,
    interactive: bool,
    timeout: float | None,
) -> int:
    """Run ``command`` in VM ``name`` with live output; return the exit status.

    stdin is forwarded as :func:`forwards_stdin` says. ``tty_mode`` with a terminal on
    stdin also means raw mode and escapes: ``~.`` closes the connection (the guest
    kills the command) and returns :data:`INTERRUPTED_EXIT`. A KeyboardInterrupt
    (Ctrl-C outside raw mode) closes the connection too and propagates.

    Raises:
        NoExecChannel, AgentUnavailable, CommandStartFailed, ProtocolError.
    """
    escapes = tty_mode and stdin_is_terminal()
    forward = forwards_stdin(tty_mode, interactive)
    forwarder = _StdinForwarder(EscapeScanner() if escapes else None)
    rows, cols = terminal_size()
    with api.connect_exec(name) as client, raw_terminal(escapes):
        session = client.start(command, env=env, cwd=cwd, user=user, tty=tty_mode,
                               rows=rows, cols=cols, stdin=forward, timeout=timeout)
        with _forwarding_resizes(session, tty_mode):
            if forward:
                forwarder.start(session)
            exited = _print_events(session, forwarder)
    if exited is None:
        note("connection closed (~.): the guest kills the command")
        return INTERRUPTED_EXIT
    return exit_status(exited)


def exit_status(exited: api.Exited) -> int:
    """The status ``vm exec`` (and ``vm attach``) exits with for a command that ended."""
    return api.exit_code_for(api.ExecResult(exited.exit_code, exited.signal, exited.timed_out,
                                            exited.cancelled, exited.duration_ms, b"", b"",
                                            False, False))


def follow_detached(name: str, process_id: str) -> int:
    """Write background process ``process_id``'s buffered, then live output here (stdout
    to stdout, stderr to stderr) until it exits; return its exit status. Output the
    agent's buffer dropped is reported on stderr, never skipped silently. A
    KeyboardInterrupt detaches (the process keeps running) and propagates.

    Raises:
        DetachedProcessError: no such process (``not_found``), ``limit_reached``,
            ``unsupported``. NoExecChannel, AgentUnavailable, ProtocolError.
    """
    with api.connect_exec(name) as client:
        session = client.attach(process_id)
        for event in session:
            if isinstance(event, api.Stdout):
                _write(sys.stdout.fileno(), event.data)
            elif isinstance(event, api.Stderr):
                _write(sys.stderr.fileno(), event.data)
            elif isinstance(event, api.OutputDropped):
                note(f"{event.size} bytes of output of {process_id} were dropped here "
                     "(the guest keeps the last 1 MiB of a background process's output)")
    assert session.exited is not None  # the loop ends at Exited
    return exit_status(session.exited)


def _print_events(session: api.ExecSession, forwarder: _StdinForwarder) -> api.Exited | None:
    """Write the command's output here until it exits; None if ``~.`` ended the session.

    Raises:
        AgentUnavailable, ProtocolError: the connection failed (not by ``~.``).
    """
    try:
        for event in session:
            if isinstance(event, api.Stdout):
                _write(sys.stdout.fileno(), event.data)
            elif isinstance(event, api.Stderr):
                _write(sys.stderr.fileno(), event.data)
    except (api.AgentUnavailable, OSError):
        if forwarder.disconnected.is_set():  # ~. closed the socket under the reader
            return None
        raise
    return session.exited


class _StdinForwarder:
    """Copies this process's stdin to a session from a daemon thread, then sends EOF.

    With an :class:`EscapeScanner` (raw mode) it acts on escapes: ``~.`` closes the
    session's connection, which wakes the reading thread, and sets :attr:`disconnected`.
    """

    def __init__(self, escapes: EscapeScanner | None) -> None:
        self.escapes = escapes  # None: forward every byte as it is
        self.disconnected = threading.Event()  # set once ``~.`` closed the connection

    def start(self, session: api.ExecSession) -> None:
        """Start forwarding to ``session``."""
        threading.Thread(target=self._bh_forward, args=(session,), name="stdin",
                         daemon=True).start()

    def _bh_forward(self, session: api.ExecSession) -> None:
        fd = sys.stdin.fileno()
        try:
            while data := os.read(fd, STDIN_CHUNK_BYTES):
                if not self._send(session, data):
                    return
            if self.escapes is not None and (held := self.escapes.flush()):
                session.write_stdin(held)
            session.close_stdin()
        except (api.AgentUnavailable, OSError):
            pass  # the connection or stdin is gone; the reading thread reports the former

    def _send(self, session: api.ExecSession, data: bytes) -> bool:
        """Forward ``data``; False once ``~.`` closed the connection."""
        if self.escapes is None:
            session.write_stdin(data)
            return True
        for item in self.escapes.feed(data):
            if item is Escape.DISCONNECT:
                self.disconnected.set()
                session.close()
                return False
            if item is Escape.HELP:
                _write(sys.stderr.fileno(), ESCAPE_HELP)
            elif isinstance(item, bytes):
                session.write_stdin(item)
        return True


@contextlib.contextmanager
def _forwarding_resizes(session: api.ExecSession, enabled: bool) -> Iterator[None]:
    """While the block runs, send the local window size to ``session`` on SIGWINCH."""
    if not enabled:
        yield
        return

    def resize(_signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(api.AgentUnavailable):
            session.resize(*terminal_size())

    previous = signal.signal(signal.SIGWINCH, resize)
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, previous)


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def terminal_size() -> tuple[int, int]:
    """Rows and columns of the terminal on stdout (24x80 when it is not one)."""
    try:
        packed = fcntl.ioctl(sys.stdout.fileno(), termios.TIOCGWINSZ, b"\0" * 8)
        rows, cols, _, _ = struct.unpack("HHHH", packed)
        if rows and cols:
            return rows, cols
    except OSError:
        pass
    return DEFAULT_TERMINAL_SIZE


@contextlib.contextmanager
def raw_terminal(enabled: bool) -> Iterator[None]:
    """Put the terminal on stdin in raw mode (if ``enabled`` and it is one); restore it."""
    fd = sys.stdin.fileno()
    if not enabled or not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
