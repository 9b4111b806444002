"""``secvf tui`` in a real terminal: tmux runs it with an empty ``$SECVF_HOME``,
``send-keys`` drives it, ``capture-pane`` reads the screen. tmux runs on a private
socket, and only the server this test started is killed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("textual")

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None,
                                reason="tmux is missing (scripts/install-system-deps.sh)")

#: How many looks at the pane a wait takes before it fails (a bound, not a timing).
LOOKS = 300


class Tmux:
    """One tmux server on its own socket, with one 80x24 session."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-S", str(self.socket), *args], capture_output=True,
                              text=True, timeout=30, check=False)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "tui").stdout

    def wait_for(self, condition: Callable[[str], bool], what: str) -> str:
        """The screen once ``condition`` holds; else fail, naming any error notification
        seen meanwhile (they vanish after a few seconds)."""
        notes: dict[str, None] = {}
        for _ in range(LOOKS):
            text = self.screen()
            if condition(text):
                return text
            notes.update(dict.fromkeys(line.strip() for line in text.splitlines()
                                       if "error" in line.lower()))
            time.sleep(0.1)
        raise AssertionError(f"never on screen: {what}\nerror lines seen: {list(notes)}\n"
                             f"{self.screen()}")

    def alive(self) -> bool:
        return self.run("has-session", "-t", "tui").returncode == 0


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    term = Tmux(tmp_path / "tmux.sock")
    yield term
    term.run("kill-server")


def test_tui_in_tmux_with_an_empty_home(tmux: Tmux, tmp_path: Path) -> None:
    home, runtime = tmp_path / "home", tmp_path / "run"
    env = {"SECVF_HOME": str(home), "SECVF_RUNTIME_DIR": str(runtime), "TERM": "xterm-256color"}
    command = " ".join(f"{k}={v}" for k, v in env.items()) + f" {sys.executable} -m secvf tui"
    result = tmux.run("new-session", "-d", "-s", "tui", "-x", "80", "-y", "24",
                      "-e", f"PATH={os.environ.get('PATH', '')}", command)
    assert result.returncode == 0, result.stderr
    screen = tmux.wait_for(lambda s: "NAME" in s and "? Help" in s, "the VM table")
    assert "1 VMs" in screen and "6 Audit" in screen
    tmux.run("send-keys", "-t", "tui", "?")
    tmux.wait_for(lambda s: "Keys (Esc closes)" in s, "the help")
    tmux.run("send-keys", "-t", "tui", "Escape")
    tmux.wait_for(lambda s: "Keys (Esc closes)" not in s, "the help closed")
    tmux.run("send-keys", "-t", "tui", "6")
    tmux.wait_for(lambda s: "0 VM(s), no findings" in s, "the empty audit")
    tmux.run("send-keys", "-t", "tui", "q")
    for _ in range(LOOKS):
        if not tmux.alive():
            break
        time.sleep(0.1)
    assert not tmux.alive(), "q did not end secvf tui"
