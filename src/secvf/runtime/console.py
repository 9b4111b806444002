"""The serial console: print/follow one run's log, or attach interactively.

Each run of a VM has its own serial log (see :class:`~secvf.store.bundle.Bundle`);
:func:`print_log` prints the current (or last) run's, or an earlier kept one's, and
follows a run only for as long as it lasts.

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

from secvf.errors import LockBusy, NoExecChannel, NotFound, StateError
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


def print_log(bundle: Bundle, *, run: int | None = None, follow: bool = False) -> None:
    """Write one run's serial log to stdout: run ``run``, or the current (or last) run.

    With ``follow``, keep printing what the guest writes for as long as that run lasts:
    until the VM stops (or a new run begins). A VM that never ran prints nothing.

    Raises:
        NotFound: no serial log of run ``run`` is kept (the message lists those that are).
    """
    if run is None:
        path, run = bundle.serial_log, bundle.current_run()
    else:
        path = bundle.run_serial_log(run)
        if not path.is_file():
            kept = ", ".join(map(str, bundle.serial_runs())) or "none yet"
            raise NotFound(f"VM '{bundle.name}' has no serial log of run {run} (runs kept: "
                           f"{kept}; the current or last one is shown without --run)")
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return
    with fh:
        while True:
            live = follow and is_running(bundle) and bundle.current_run() == run
            while chunk := fh.read(65536):  # all there is, also after the run ended
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
            if not live:
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
        with sock:
            _pump(sock, f"attached to '{name}' (detach: Ctrl-])\r\n")
        sys.stderr.write("\r\ndetached\r\n")
    finally:
        lock.release()


def _pump(sock: socket.socket, banner: str) -> None:
    """Copy between the socket and the terminal; ``banner`` goes to stderr once the
    terminal is raw (setting it raw drops what was typed before)."""
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    try:
        if saved is not None:
            tty.setraw(stdin)
        sys.stderr.write(banner)
        sys.stderr.flush()
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
