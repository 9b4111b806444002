"""``secvf vm exec -t`` on a real terminal: the real CLI on a pseudo-terminal, the real
agent behind the real bridge (tests/unit/running_sandbox.py). Input reaches the guest
without ``-i``, ``~.`` leaves a stuck session, ``~~``/``~?`` work, the terminal comes
back as it was; and the escape scanner on its own."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from secvf.faces.cli.terminal import Escape, EscapeScanner
from secvf.store.events import read_events
from tests.unit.running_sandbox import WAIT_S, RunningSandbox, wait_for


class TerminalCli:
    """The real CLI with a pseudo-terminal as its stdin, stdout and stderr; the test
    types on the other side and reads what the terminal shows."""

    def __init__(self, *args: str) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        self.settings = termios.tcgetattr(self.slave)
        self.proc = subprocess.Popen([sys.executable, "-m", "secvf", *args],
                                     stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                     env=os.environ.copy(), start_new_session=True)
        self.shown = b""

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def expect(self, text: bytes) -> None:
        """Read until ``text`` is on the screen (fails after WAIT_S, or if the CLI exits)."""
        deadline = time.monotonic() + WAIT_S
        while text not in self.shown:
            assert time.monotonic() < deadline, f"never shown: {text!r}; shown: {self.shown!r}"
            assert self._read(0.1) or self.proc.poll() is None, self.shown
        assert text in self.shown

    def exit_status(self) -> int:
        """Wait for the CLI to exit; read what it showed last."""
        status = self.proc.wait(WAIT_S)
        while self._read(0):
            pass
        return status

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            self.shown += os.read(self.master, 65536)
        except OSError:  # EIO: nothing holds the other side any more
            return False
        return True

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def box(tmp_path: Path) -> Iterator[RunningSandbox]:
    with RunningSandbox(tmp_path, "agent1") as running:
        yield running


Opener = Callable[..., TerminalCli]


@pytest.fixture
def terminal() -> Iterator[Opener]:
    """Opens TerminalCli sessions; closes each at the end of the test."""
    opened: list[TerminalCli] = []

    def open_cli(*args: str) -> TerminalCli:
        cli = TerminalCli(*args)
        opened.append(cli)
        return cli

    yield open_cli
    for cli in opened:
        cli.close()


def test_t_without_i_forwards_what_is_typed_and_restores_the_terminal(
        box: RunningSandbox, terminal: Opener) -> None:
    cli = terminal("vm", "exec", "agent1", "-t", "--", "sh", "-c",
                   'echo ready; read line; echo "got:$line"; stty size')
    cli.expect(b"ready")
    cli.type(b"hello\r")
    cli.expect(b"got:hello")
    assert cli.exit_status() == 0
    assert b"30 100" in cli.shown  # the guest PTY got this terminal's size
    assert termios.tcgetattr(cli.slave) == cli.settings  # raw mode undone


def test_tilde_dot_leaves_a_stuck_session_and_the_guest_kills_the_command(
        box: RunningSandbox, terminal: Opener) -> None:
    cli = terminal("vm", "exec", "agent1", "-t", "--", "sh", "-c", "echo ready; exec sleep 300")
    cli.expect(b"ready")
    cli.type(b"\r~.")
    assert cli.exit_status() == 130
    assert b"connection closed (~.)" in cli.shown
    assert termios.tcgetattr(cli.slave) == cli.settings
    records = wait_for(lambda: [e for e in read_events("exec") if e.get("event") == "exec"])
    assert records[0]["outcome"] == "disconnected"


def test_tilde_tilde_sends_a_tilde_and_tilde_question_mark_helps(
        box: RunningSandbox, terminal: Opener) -> None:
    cli = terminal("vm", "exec", "agent1", "-t", "--", "sh", "-c",
                   'echo ready; read line; echo "got:$line"')
    cli.expect(b"ready")
    cli.type(b"~?")
    cli.expect(b"~.  close the connection")
    cli.type(b"~~x~y\r")  # only a ~ at the start of a line is special
    cli.expect(b"got:~x~y")
    assert cli.exit_status() == 0


def test_ctrl_c_in_raw_mode_goes_to_the_command(box: RunningSandbox, terminal: Opener) -> None:
    cli = terminal("vm", "exec", "agent1", "-t", "--", "sh", "-c",
                   "trap 'echo interrupted; exit 7' INT; echo ready; sleep 300 & wait")
    cli.expect(b"ready")
    cli.type(b"\x03")
    cli.expect(b"interrupted")
    assert cli.exit_status() == 7


# ---- the escape scanner -------------------------------------------------------------------


@pytest.mark.parametrize(("chunks", "expected"), [
    ([b"~."], [Escape.DISCONNECT]),
    ([b"ls\r~.rest"], [b"ls\r", Escape.DISCONNECT]),
    ([b"ls\n~", b"."], [b"ls\n", Escape.DISCONNECT]),
    ([b"a~."], [b"a~."]),
    ([b"~~."], [b"~."]),
    ([b"~x"], [b"~x"]),
    ([b"~?~."], [Escape.HELP, Escape.DISCONNECT]),
    ([b"\x03~."], [b"\x03~."]),  # Ctrl-C is not a line end
])
def test_escape_scanner(chunks: list[bytes], expected: list[bytes | Escape]) -> None:
    scanner = EscapeScanner()
    items: list[bytes | Escape] = []
    for chunk in chunks:
        items += scanner.feed(chunk)
    assert items == expected


def test_a_held_tilde_is_sent_at_eof() -> None:
    scanner = EscapeScanner()
    assert scanner.feed(b"~") == [] and scanner.flush() == b"~" and scanner.flush() == b""
