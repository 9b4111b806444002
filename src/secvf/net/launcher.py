"""Starting, feeding and releasing a network's switch, as the VM side calls it.

Daemonless: there is no network daemon. The first VM that needs a network calls
:func:`ensure_switch`, which starts that network's watchdog (and so its switch) in a
session of its own, so it outlives the VM supervisor that started it; later VMs find
it running and send ``reload``. Each VM adds its port with :func:`write_port` before
QEMU starts and removes it with :func:`release_port` when its run ends; the watchdog
stops the switch once no port is left.

Every change happens under ``NETDIR/launch.lock`` (``flock``), which the watchdog also
takes before it decides to exit, so a port written while the watchdog is leaving
always finds a switch: either the old one (which reloads) or a new one.

Files are written atomically (temporary file, fsync, rename), mode 0600, in
directories of mode 0700.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from secvf.net.config import ConfigError, NetPaths, PortConfig, SwitchConfig
from secvf.net.control import OP_PING, OP_RELOAD, SwitchUnavailable, query
from secvf.store.locks import is_locked

DIR_MODE = 0o700
SOCKETS_DIR_MODE = 0o1733
FILE_MODE = 0o600
DGRAM_QLEN_PATH = Path("/proc/sys/net/unix/max_dgram_qlen")
MIN_DGRAM_QLEN = 512  # below this the switch drops under load (prototype-switch.md §3b)
START_TIMEOUT_S = 5.0
POLL_S = 0.05
LOG_TAIL_BYTES = 2000
WATCHDOG_MODULE = "secvf.net.watchdog"

logger = logging.getLogger(__name__)


def ensure_switch(netdir: Path, switch_config: dict[str, Any]) -> None:
    """Make sure ``netdir``'s switch runs with ``switch_config`` (the ``switch.json`` object).

    Writes ``switch.json``, raises ``net.unix.max_dgram_qlen`` to at least 512 when
    running as root, then sends ``reload`` to a running switch or starts the watchdog
    and waits (at most 5 s) until the switch answers ``ping``.

    Raises:
        ConfigError: ``switch_config`` is not a valid ``switch.json``.
        SwitchUnavailable: the switch did not answer within 5 s (the message holds
            the end of ``NETDIR/switch.log``).
    """
    paths = prepare(netdir)
    SwitchConfig.from_json(switch_config, paths.switch_json)
    with locked(paths.launch_lock):
        atomic_write_json(paths.switch_json, switch_config)
        raise_dgram_qlen()
        _reload_or_start(paths)


def write_port(netdir: Path, port: dict[str, Any]) -> None:
    """Add (or replace) one port: write ``ports/<port>.json`` and have the switch reload.

    Either order works: before :func:`ensure_switch` (then nothing is started yet when
    ``switch.json`` does not exist, and ``ensure_switch`` starts the switch with this
    port) or after it (then the watchdog is started again if it has just left).

    Raises:
        ConfigError: ``port`` is not a valid port object.
        SwitchUnavailable: ``switch.json`` exists but no switch answers or starts.
    """
    paths = prepare(netdir)
    name = port.get("port")
    if not isinstance(name, str):
        raise ConfigError(f"port object without a 'port' name: {port!r}")
    PortConfig.from_json(port, paths.port_file(name), paths)
    with locked(paths.launch_lock):
        atomic_write_json(paths.port_file(name), port)
        if paths.switch_json.exists():
            _reload_or_start(paths)


def release_port(netdir: Path, port_name: str) -> None:
    """Remove port ``port_name`` and tell the switch, if one answers. Never raises for a
    port that is already gone or a switch that is not running."""
    paths = NetPaths(netdir)
    if not paths.root.is_dir():
        return
    with locked(paths.launch_lock):
        with contextlib.suppress(FileNotFoundError):
            paths.port_file(port_name).unlink()
        with contextlib.suppress(SwitchUnavailable):
            query(netdir, {"op": OP_RELOAD})


def prepare(netdir: Path) -> NetPaths:
    """Create ``netdir`` and its ``ports/`` directory (mode 0700) and ``p/`` (mode 1733:
    each VM's jailed QEMU, its own uid, binds its socket there and can remove only its
    own; nobody lists it. Only jails show ``p/``: ``netdir`` itself is 0700)."""
    paths = NetPaths(netdir.absolute())
    for directory, mode in ((paths.root, DIR_MODE), (paths.ports, DIR_MODE),
                            (paths.sockets, SOCKETS_DIR_MODE)):
        directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.chmod(directory, mode)
    return paths


@contextlib.contextmanager
def locked(path: Path) -> Iterator[int]:
    """Hold an exclusive ``flock`` on ``path`` (created 0600) for the ``with`` block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def atomic_write_json(path: Path, value: dict[str, Any]) -> None:
    """Write ``value`` to ``path`` as JSON: temporary file, fsync, rename; mode 0600."""
    data = json.dumps(value, indent=1, sort_keys=True).encode() + b"\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def raise_dgram_qlen(path: Path = DGRAM_QLEN_PATH) -> int | None:
    """Raise ``net.unix.max_dgram_qlen`` to :data:`MIN_DGRAM_QLEN` when root and lower;
    return the value now in force (None if unknown). Logs what it did or why it could not.

    The default of 10 datagrams per socket makes the switch drop (``tx_full``) whenever
    a guest is briefly slow to read; the kernel reads the value when a socket is made,
    so it must be raised before QEMU and the switch create theirs.
    """
    try:
        current = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError) as exc:
        logger.warning("cannot read %s: %s", path, exc)
        return None
    if current >= MIN_DGRAM_QLEN:
        return current
    if os.geteuid() != 0:
        logger.warning("%s is %d (< %d) and SecVF is not root: isolated networks will drop "
                       "frames under load; run: sysctl -w net.unix.max_dgram_qlen=%d",
                       path, current, MIN_DGRAM_QLEN, MIN_DGRAM_QLEN)
        return current
    try:
        path.write_text(f"{MIN_DGRAM_QLEN}\n")
    except OSError as exc:
        logger.warning("cannot raise %s from %d to %d: %s", path, current, MIN_DGRAM_QLEN, exc)
        return current
    logger.info("raised %s from %d to %d for the isolated-network switch", path, current,
                MIN_DGRAM_QLEN)
    return MIN_DGRAM_QLEN


def watchdog_running(paths: NetPaths) -> bool:
    """True if a watchdog holds ``watchdog.lock``."""
    return is_locked(paths.watchdog_lock)


def _reload_or_start(paths: NetPaths) -> None:
    if watchdog_running(paths):
        try:
            query(paths.root, {"op": OP_RELOAD})
            return
        except SwitchUnavailable:
            pass  # restarting: the new switch reads everything when it starts
        _wait_ready(paths, None)
    else:
        _wait_ready(paths, _start_watchdog(paths))


def _start_watchdog(paths: NetPaths) -> subprocess.Popen[bytes]:
    with paths.log.open("ab") as log:
        os.chmod(paths.log, FILE_MODE)
        return subprocess.Popen(
            [sys.executable, "-m", WATCHDOG_MODULE, str(paths.root)],
            start_new_session=True, close_fds=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=log)


def _wait_ready(paths: NetPaths, watchdog: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            query(paths.root, {"op": OP_PING}, timeout=1.0)
            return
        except SwitchUnavailable as exc:
            exited = watchdog is not None and watchdog.poll() not in (None, 0)
            if exited or time.monotonic() >= deadline:
                raise SwitchUnavailable(exc.errno, f"the switch for {paths.root} did not "
                                        f"start: {exc.strerror}; end of {paths.log}:\n"
                                        f"{_log_tail(paths.log)}", str(paths.control)
                                        ) from exc
        time.sleep(POLL_S)


def _log_tail(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - LOG_TAIL_BYTES))
            return fh.read().decode(errors="replace")
    except OSError as exc:
        return f"(cannot read: {exc})"
