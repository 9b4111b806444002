"""A root shell on a generic VM's serial console (``--autologin``), driven over the
VM's console socket: how tests look inside a VM that has no exec channel."""

from __future__ import annotations

import select
import socket
import time
import uuid

from secvf.store.bundle import RuntimeFiles
from secvf.store.library import get_vm

#: How long one command may take to answer (TCG, loaded host).
ANSWER_TIMEOUT_S = 120.0
#: How often Enter is pressed while waiting for the shell's prompt.
PROMPT_RETRY_S = 2.0
#: Lines the guest's own services print on the console (init, the restore watch, the
#: kernel) whenever they have something to say: not the command's output.
CONSOLE_NOTE_PREFIXES = ("secvf-init: ", "secvf-agent: ")


class SerialShell:
    """One connection to a running VM's console socket (reconnect after a restart)."""

    def __init__(self, name: str) -> None:
        _, config = get_vm(name)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(RuntimeFiles(config.id).console_socket))
        self._prompted = False

    def __enter__(self) -> SerialShell:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def run(self, command: str, timeout: float = ANSWER_TIMEOUT_S) -> str:
        """Run ``command`` in the console's shell; return what it printed (stripped).

        The markers are typed split in two (``'BEG''IN'``), so the echo of the typed
        line never matches them; only the shell's output does.
        """
        if not self._prompted:
            self._wait_for_prompt(timeout)
        token = uuid.uuid4().hex[:8]
        begin, end = f"BEGIN{token}", f"END{token}"
        line = f"echo 'BEG''IN{token}'; {command}; echo 'EN''D{token}'\r"
        self.sock.sendall(line.encode())
        seen = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.sock], [], [], 0.5)
            if ready:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                seen += chunk
                text = seen.decode(errors="replace")
                if text.count(end) and text.count(begin):
                    body = text.rsplit(begin, 1)[1].split(end, 1)[0]
                    return _without_console_notes(body.replace("\r", "")).strip()
        raise AssertionError(f"no answer to {command!r} within {timeout:.0f} s; saw "
                             f"{seen[-500:]!r}")

    def _wait_for_prompt(self, timeout: float) -> None:
        """Press Enter until the root shell shows its prompt: what is typed while the
        console's login is still starting is thrown away (the tty is flushed)."""
        seen = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.sendall(b"\r")
            ready, _, _ = select.select([self.sock], [], [], PROMPT_RETRY_S)
            if ready:
                seen += self.sock.recv(65536)
                if b"# " in seen:
                    self._prompted = True
                    return
        raise AssertionError(f"no shell prompt within {timeout:.0f} s; saw {seen[-500:]!r}")


def _without_console_notes(text: str) -> str:
    """``text`` without the lines the guest's services printed meanwhile (a restored
    guest's restore watch says "clock was ... behind" at a moment of its own)."""
    return "\n".join(line for line in text.split("\n")
                     if not line.startswith(CONSOLE_NOTE_PREFIXES))
