"""The local terminal side of ``secvf vm exec``: live output, stdin, raw mode, resize.

Streams the command's stdout and stderr to this process's as they arrive,
forwards stdin (``-i``) with an explicit EOF, and with ``-t`` puts the local
terminal in raw mode, forwards window-size changes and restores the terminal on
the way out.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import struct
import sys
import termios
import threading
import tty
from collections.abc import Iterator, Mapping, Sequence

from secvf import api

STDIN_CHUNK_BYTES = 64 * 1024
DEFAULT_TERMINAL_SIZE = (24, 80)


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

    Raises:
        NoExecChannel, AgentUnavailable, CommandStartFailed, ProtocolError.
    """
    rows, cols = terminal_size()
    with api.connect_exec(name) as client, raw_terminal(tty_mode):
        session = client.start(command, env=env, cwd=cwd, user=user, tty=tty_mode,
                               rows=rows, cols=cols, stdin=interactive, timeout=timeout)
        if tty_mode:
            signal.signal(signal.SIGWINCH, lambda *_: session.resize(*terminal_size()))
        if interactive:
            threading.Thread(target=_forward_stdin, args=(session,), daemon=True).start()
        exited: api.Exited | None = None
        for event in session:
            if isinstance(event, api.Stdout):
                _write(sys.stdout.fileno(), event.data)
            elif isinstance(event, api.Stderr):
                _write(sys.stderr.fileno(), event.data)
            elif isinstance(event, api.Exited):
                exited = event
    assert exited is not None
    return api.exit_code_for(api.ExecResult(exited.exit_code, exited.signal, exited.timed_out,
                                            exited.cancelled, exited.duration_ms, b"", b"",
                                            False, False))


def _forward_stdin(session: api.ExecSession) -> None:
    fd = sys.stdin.fileno()
    with contextlib.suppress(Exception):
        while data := os.read(fd, STDIN_CHUNK_BYTES):
            session.write_stdin(data)
        session.close_stdin()


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
