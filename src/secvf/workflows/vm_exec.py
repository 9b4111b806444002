"""``secvf vm exec``: find a VM's exec channel and run one command through it.

This is the layer between the CLI and :class:`~secvf.exec.client.ExecClient`:
it refuses VMs that have no channel (by design, or because they are stopped),
streams output live, forwards stdin (``-i``) and, with ``-t``, puts the local
terminal in raw mode, forwards window-size changes and restores the terminal.
It returns the exit status ``secvf vm exec`` should exit with.
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
from dataclasses import asdict
from pathlib import Path
from typing import Any

from secvf.errors import NoExecChannel
from secvf.exec.client import ExecClient, ExecResult, Exited, Stderr, Stdout, exit_code_for
from secvf.model.config import VMKind
from secvf.store.bundle import RuntimeFiles
from secvf.store.library import get_vm
from secvf.store.runstate import is_running

STDIN_CHUNK_BYTES = 64 * 1024


def exec_socket_for(name: str) -> Path:
    """The exec socket of running AI sandbox ``name``.

    Raises:
        NoExecChannel: the VM has no channel by design, or is not running.
    """
    bundle, config = get_vm(name)
    if config.kind is not VMKind.AI_SANDBOX:
        raise NoExecChannel(f"VM '{name}' is a {config.kind} VM: it has no exec channel by design")
    if not is_running(bundle):
        raise NoExecChannel(f"VM '{name}' is not running (start it: secvf vm start {name})")
    path = RuntimeFiles(config.id).exec_socket
    if not path.exists():
        raise NoExecChannel(f"VM '{name}' has no exec socket yet (is it still booting?)")
    return path


def run_captured(name: str, command: str | Sequence[str], **options: Any) -> ExecResult:
    """Run ``command`` in VM ``name`` and capture its output (for ``--json``)."""
    with ExecClient.connect(exec_socket_for(name)) as client:
        return client.run(command, **options)


def result_json(result: ExecResult) -> dict[str, Any]:
    """The ``--json`` shape: exit status, timing, output (UTF-8, invalid bytes replaced)."""
    data = asdict(result)
    data["stdout"] = result.stdout.decode("utf-8", "replace")
    data["stderr"] = result.stderr.decode("utf-8", "replace")
    data["exit_status"] = exit_code_for(result)
    return data


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
    """Run ``command`` in VM ``name`` with live output; return the exit status."""
    path = exec_socket_for(name)
    rows, cols = _terminal_size()
    with ExecClient.connect(path) as client, _raw_terminal(tty_mode):
        session = client.start(command, env=env, cwd=cwd, user=user, tty=tty_mode,
                               rows=rows, cols=cols, stdin=interactive, timeout=timeout)
        if tty_mode:
            signal.signal(signal.SIGWINCH, lambda *_: session.resize(*_terminal_size()))
        if interactive:
            threading.Thread(target=_forward_stdin, args=(session,), daemon=True).start()
        exited: Exited | None = None
        for event in session:
            if isinstance(event, Stdout):
                _write(sys.stdout.fileno(), event.data)
            elif isinstance(event, Stderr):
                _write(sys.stderr.fileno(), event.data)
            elif isinstance(event, Exited):
                exited = event
    assert exited is not None
    return exit_code_for(ExecResult(exited.exit_code, exited.signal, exited.timed_out,
                                    exited.cancelled, exited.duration_ms, b"", b"", False, False))


def _forward_stdin(session: Any) -> None:
    fd = sys.stdin.fileno()
    with contextlib.suppress(Exception):
        while data := os.read(fd, STDIN_CHUNK_BYTES):
            session.write_stdin(data)
        session.close_stdin()


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _terminal_size() -> tuple[int, int]:
    try:
        packed = fcntl.ioctl(sys.stdout.fileno(), termios.TIOCGWINSZ, b"\0" * 8)
        rows, cols, _, _ = struct.unpack("HHHH", packed)
        if rows and cols:
            return rows, cols
    except OSError:
        pass
    return 24, 80


@contextlib.contextmanager
def _raw_terminal(enabled: bool) -> Iterator[None]:
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
