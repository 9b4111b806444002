"""The serial console: print/follow the log, or attach interactively.

Attaching connects to the VM's console socket (QEMU's chardev server) and puts
the local terminal in raw mode; ``Ctrl-]`` detaches and restores the terminal. One
console at a time: QEMU serves one client and leaves a second one hanging, so an
attached console holds an ``flock`` on the bundle's ``console.lock`` and a second
attach is refused.
Malware-analysis VMs have no console socket at all (their serial port is
output-only), so attaching falls back to following the log, read-only.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import termios
import time
import tty
from pathlib import Path

from secvf.errors import LockBusy, NoExecChannel, StateError
from secvf.model.config import VMKind
from secvf.store.bundle import Bundle, RuntimeFiles
from secvf.store.library import get_vm
from secvf.store.locks import FileLock
from secvf.store.runstate import is_running

DETACH_BYTE = b"\x1d"  # Ctrl-]
FOLLOW_POLL_S = 0.2


def console_lock(bundle: Bundle) -> Path:
    """The file an attached console of ``bundle``'s VM holds an ``flock`` on."""
    return bundle.path / "console.lock"


def print_log(bundle: Bundle, *, follow: bool) -> None:
    """Write the serial log to stdout; with ``follow``, keep going while the VM runs."""
    try:
        fh = bundle.serial_log.open("rb")
    except FileNotFoundError:
        if not follow:
            return
        while not bundle.serial_log.exists():
            time.sleep(FOLLOW_POLL_S)
        fh = bundle.serial_log.open("rb")
    with fh:
        while True:
            chunk = fh.read(65536)
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
                continue
            if not follow:
                return
            time.sleep(FOLLOW_POLL_S)


def attach_console(name: str) -> None:
    """Attach the terminal to VM ``name``'s serial console until Ctrl-] or VM exit."""
    bundle, config = get_vm(name)
    if not is_running(bundle):
        raise StateError(f"VM '{name}' is not running", "stopped", ["running"])
    if config.kind is VMKind.MALWARE_ANALYSIS:
        sys.stderr.write(f"VM '{name}' is a malware-analysis VM: its console is output-only."
                         " Following the log (Ctrl-C to stop).\n")
        print_log(bundle, follow=True)
        return
    try:
        lock = FileLock(console_lock(bundle), f"the console of VM '{name}'").acquire()
    except LockBusy:
        raise LockBusy(f"another console is attached to VM '{name}'") from None
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(RuntimeFiles(config.id).console_socket))
        except OSError as exc:
            sock.close()
            raise NoExecChannel(f"cannot attach to the console of '{name}': "
                                f"{exc.strerror}") from exc
        sys.stderr.write(f"attached to '{name}' (detach: Ctrl-])\r\n")
        with sock:
            _pump(sock)
        sys.stderr.write("\r\ndetached\r\n")
    finally:
        lock.release()


def _pump(sock: socket.socket) -> None:
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    try:
        if saved is not None:
            tty.setraw(stdin)
        while True:
            ready, _, _ = select.select([sock, stdin], [], [])
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    return
                os.write(sys.stdout.fileno(), data)
            if stdin in ready:
                data = os.read(stdin, 4096)
                if not data or DETACH_BYTE in data:
                    return
                sock.sendall(data)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
