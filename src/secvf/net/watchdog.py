"""The watchdog: ``python -m secvf.net.watchdog NETDIR``, one per running network.

Why a separate process: the switch parses frames that hostile guests send, so it is
the part most likely to die, and it must be restarted by something that does not
parse anything. The watchdog holds ``flock`` on ``watchdog.lock`` for its whole life
(so there is at most one per network, and the launcher can tell whether one runs),
runs the switch as its child and:

- restarts it within :data:`POLL_S` if it dies while ports remain, writing a
  ``switch_restarted`` WARNING event with the exit status (QEMU's ``dgram`` backend
  resends to the same path, so guests talk again as soon as the new switch binds);
- removes port files whose supervisor ``pid`` is dead (a supervisor killed with -9
  never releases its port) and tells the switch to reload;
- once no port file has remained for :data:`IDLE_EXIT_S`, takes ``launch.lock``,
  checks again, stops the switch and exits with a ``switch_stopped`` event.

SIGTERM or SIGINT stop the switch and the watchdog the same way. The switch exits by
itself if the watchdog is gone (it watches its parent pid).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from secvf.net.config import ConfigError, NetPaths, PortConfig, load_ports, load_switch_config
from secvf.net.control import OP_RELOAD, SwitchUnavailable, query
from secvf.net.events import SWITCH_RESTARTED, SWITCH_STOPPED, log_emitter
from secvf.net.launcher import FILE_MODE
from secvf.store.eventlog import Severity

POLL_S = 0.1  # how often the switch's liveness is checked
SCAN_S = 0.5  # how often ports/ is scanned for stale and remaining ports
IDLE_EXIT_S = 2.0  # no port file for this long: stop
STOP_TIMEOUT_S = 2.0  # SIGTERM to SIGKILL for the switch
CRASH_WINDOW_S = 10.0
CRASH_LIMIT = 5  # restarts within CRASH_WINDOW_S before backing off
CRASH_BACKOFF_S = 2.0
SWITCH_MODULE = "secvf.net.switch"


def log(message: str) -> None:
    """One line on stderr (``switch.log``)."""
    print(f"secvf-watchdog[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def describe_exit(returncode: int) -> dict[str, Any]:
    """The event fields for a child's ``returncode`` (negative: killed by a signal)."""
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() \
            else str(-returncode)
        return {"status": f"killed by signal {-returncode} ({name})", "signal": -returncode}
    return {"status": f"exited with status {returncode}", "exit_code": returncode}


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


class Watchdog:
    """Keeps one network's switch running while it has ports (module docstring)."""

    def __init__(self, paths: NetPaths) -> None:
        self.paths = paths
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.restarts: list[float] = []  # monotonic times of recent restarts
        self._lock_fd = -1

    def __repr__(self) -> str:
        pid = self.child.pid if self.child else None
        return f"Watchdog({str(self.paths.root)!r}, switch_pid={pid})"

    def run(self) -> int:
        """Supervise until idle or signalled; 0 also when another watchdog already runs."""
        if not self._take_lock():
            log("another watchdog holds the lock; exiting")
            return 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.child = self._spawn()
        try:
            self._supervise()
        finally:
            self._stop_switch()
            self._event(SWITCH_STOPPED, Severity.INFO, reason="signal" if self.stopping
                        else "no ports left")
            os.close(self._lock_fd)  # before launch.lock: a launcher then sees us gone
        return 0

    def _take_lock(self) -> bool:
        fd = os.open(self.paths.watchdog_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        return True

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stopping = True

    def _spawn(self) -> subprocess.Popen[bytes]:
        child = subprocess.Popen([sys.executable, "-m", SWITCH_MODULE, str(self.paths.root)],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        log(f"switch started, pid {child.pid}")
        return child

    def _supervise(self) -> None:
        idle_since: float | None = None
        next_scan = 0.0
        while not self.stopping:
            time.sleep(POLL_S)
            now = time.monotonic()
            if now >= next_scan:
                next_scan = now + SCAN_S
                live = self._live_ports()
                idle_since = None if live else (idle_since or now)
                if idle_since is not None and now - idle_since >= IDLE_EXIT_S \
                        and self._confirm_idle():
                    return
            self._check_switch(now)

    def _live_ports(self) -> list[PortConfig]:
        """The ports whose supervisor lives; stale port files are removed."""
        ports = load_ports(self.paths, report=False)
        stale = [p for p in ports if not pid_alive(p.pid)]
        for port in stale:
            log(f"port {port.port} (VM {port.vm}): supervisor pid {port.pid} is gone; "
                "removing its port file")
            with contextlib.suppress(FileNotFoundError):
                self.paths.port_file(port.port).unlink()
        if stale:
            with contextlib.suppress(SwitchUnavailable):
                query(self.paths.root, {"op": OP_RELOAD})
        return [p for p in ports if p not in stale]

    def _confirm_idle(self) -> bool:
        """Under ``launch.lock``, still no port: keep the lock until the process exits."""
        fd = os.open(self.paths.launch_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if self._live_ports():
            os.close(fd)
            return False
        return True  # fd stays open (and locked) until exit, after the watchdog lock

    def _check_switch(self, now: float) -> None:
        assert self.child is not None
        returncode = self.child.poll()
        if returncode is None or self.stopping:
            return
        if not self._live_ports():
            return  # nothing to serve; the idle timer decides
        self.restarts = [t for t in self.restarts if now - t < CRASH_WINDOW_S]
        if len(self.restarts) >= CRASH_LIMIT:
            log(f"{len(self.restarts)} restarts in {CRASH_WINDOW_S:.0f} s; waiting "
                f"{CRASH_BACKOFF_S} s")
            time.sleep(CRASH_BACKOFF_S)
            self.restarts.clear()
        fields = describe_exit(returncode)
        log(f"switch pid {self.child.pid} {fields['status']}; restarting")
        self.child = self._spawn()
        self.restarts.append(now)
        self._event(SWITCH_RESTARTED, Severity.WARNING, switch_pid=self.child.pid,
                    restarts=len(self.restarts), **fields)

    def _stop_switch(self) -> None:
        child = self.child
        if child is None or child.poll() is not None:
            return
        child.terminate()
        try:
            child.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log(f"switch pid {child.pid} ignored SIGTERM for {STOP_TIMEOUT_S} s; killing it")
            child.kill()
            child.wait()

    def _event(self, event: str, severity: Severity, **fields: Any) -> None:
        try:
            config = load_switch_config(self.paths)
        except (ConfigError, OSError) as exc:
            log(f"cannot write event {event}: {exc}")
            return
        log_emitter(config.logs_dir)(event, severity, {
            "vm": None, "vm_id": None, "network": config.network, **fields})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the watchdog for ``NETDIR`` (the only argument)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m secvf.net.watchdog NETDIR", file=sys.stderr)
        return 2
    return Watchdog(NetPaths(Path(args[0]).absolute())).run()


if __name__ == "__main__":
    sys.exit(main())
