"""Running the real CLI on a terminal (a pty), for commands that ask before acting."""

from __future__ import annotations

import os
import pty
import subprocess
import sys


def run_on_a_terminal(args: list[str], answer: bytes) -> tuple[int, str]:
    """Run ``secvf ARGS`` with a pty as its terminal and type ``answer``; return its exit
    status and everything it printed."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "secvf", *args], stdin=terminal,
                            stdout=terminal, stderr=terminal, env=os.environ.copy())
    os.close(terminal)
    os.write(controller, answer)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the CLI exited and the terminal closed
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    return proc.wait(timeout=300), output.decode(errors="replace")
