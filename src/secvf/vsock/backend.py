"""The backend process: listening sockets, the event loop, and clean shutdown.

One backend serves one VM. It listens on the vhost-user socket (QEMU connects once) and
on the hybrid Unix socket (host clients), both mode 0600, and then runs a single-threaded
``selectors`` loop over the vhost-user connection, the rx/tx kick eventfds, the hybrid
sockets and the connections' host sockets. After each batch of events it pumps the tx
queue (guest to host) and the rx queue (host to guest), signals the call eventfds, and
re-arms socket interest. It exits when QEMU disconnects or on SIGTERM, removing its
socket files.
"""

from __future__ import annotations

import logging
import os
import platform
import selectors
import signal
import socket
import stat
import threading
import time
from functools import partial
from pathlib import Path
from types import FrameType

from secvf.store.eventlog import EventLog
from secvf.vsock.device import (
    MESSAGE_READ_TIMEOUT_S,
    RX_QUEUE,
    TX_QUEUE,
    VhostUserVsockDevice,
    receive_message,
)
from secvf.vsock.errors import BindFailed, VhostUserError, VsockError
from secvf.vsock.incidents import ViolationReporter
from secvf.vsock.limits import DEFAULT_MAX_CONNECTIONS
from secvf.vsock.muxer import Muxer
from secvf.vsock.packet import MIN_GUEST_CID, U32_MASK
from secvf.vsock.trace import VringTrace
from secvf.vsock.virtqueue import SplitVirtqueue

log = logging.getLogger(__name__)

SOCKET_MODE = 0o600
#: Hosts whose store ordering (x86 TSO) makes fence-free ring updates safe.
SUPPORTED_MACHINES = ("x86_64", "AMD64")
#: The "listening" bit in the Flags column of /proc/net/unix.
_SO_ACCEPTCON = 0x10000
#: Pump rounds per loop turn while tx waits for rx to drain the control backlog.
_MAX_PUMP_ROUNDS = 8


class VsockBackend:
    """A vhost-user-vsock backend for one VM.

    Example::

        with VsockBackend(Path("vu.sock"), Path("vsock.sock"), guest_cid=3) as backend:
            backend.run(ready_fd=None)      # returns when QEMU disconnects or stop()

    Raises (from the constructor):
        BindFailed: a socket path is taken by a live socket or is not a socket.
        VsockError: the host is not x86-64, or the guest CID or the limit is invalid.
    """

    def __init__(
        self,
        vhost_user_socket: Path,
        uds_path: Path,
        guest_cid: int,
        *,
        vm_name: str | None = None,
        vm_id: str | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        log_dir: Path | None = None,
        trace_file: Path | None = None,
    ) -> None:
        if platform.machine() not in SUPPORTED_MACHINES:
            raise VsockError(
                f"the pure-Python vsock backend needs an x86-64 host (TSO memory ordering); "
                f"this host is {platform.machine()}"
            )
        if not MIN_GUEST_CID <= guest_cid < U32_MASK:
            raise VsockError(f"guest CID {guest_cid} is reserved or out of range (3..2^32-2)")
        if max_connections < 1:
            raise VsockError(f"--max-connections must be at least 1, not {max_connections}")
        self._selector = selectors.DefaultSelector()
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._wakeup_w.setblocking(False)
        self._selector.register(self._wakeup_r, selectors.EVENT_READ, self._bh_wakeup)
        self._bound: list[tuple[Path, int, int]] = []  # (path, st_dev, st_ino) we created
        self._frontend: socket.socket | None = None
        self._watched_kicks: dict[int, int] = {}  # ring index -> kick fd in the selector
        self._stop_requested = False
        self._failure: VsockError | None = None
        self.trace = VringTrace(trace_file)
        self.device = VhostUserVsockDevice(guest_cid, self.trace)
        try:
            self._vu_listener = self._listen(vhost_user_socket)
            uds_listener = self._listen(uds_path)
        except BaseException:
            self.close()
            raise
        self._selector.register(self._vu_listener, selectors.EVENT_READ, self._bh_accept_frontend)
        self.muxer = Muxer(
            self._selector,
            uds_listener,
            uds_path,
            guest_cid=guest_cid,
            max_connections=max_connections,
            reporter=ViolationReporter(vm_name, vm_id,
                                       log=EventLog(log_dir) if log_dir else None),
        )

    def __enter__(self) -> VsockBackend:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def run(self, ready_fd: int | None = None) -> None:
        """Write ``READY\\n`` to ``ready_fd`` (then close it) and serve until done.

        Raises:
            VhostUserError: the frontend broke the protocol; the session was ended.
        """
        if ready_fd is not None:
            try:
                os.write(ready_fd, b"READY\n")
            finally:
                os.close(ready_fd)
        busy = False
        while not self._stop_requested:
            for key, mask in self._selector.select(self._select_timeout(busy)):
                key.data(mask)
                if self._stop_requested:
                    break
            self.muxer.expire(time.monotonic())
            busy = self._pump()
            self.trace.flush()
        if self._failure is not None:
            raise self._failure

    def stop(self) -> None:
        """Ask :meth:`run` to return; safe from signal handlers and other threads."""
        self._stop_requested = True
        try:
            self._wakeup_w.send(b"\0")
        except OSError:
            pass  # a wakeup is already pending, or the loop is gone

    def close(self) -> None:
        """Close every socket and fd and remove the socket files this backend created."""
        muxer = getattr(self, "muxer", None)
        if muxer is not None:
            muxer.close()
        self._unwatch_kicks()
        self.device.close()
        for sock in (self._frontend, getattr(self, "_vu_listener", None)):
            if sock is not None:
                sock.close()
        self._wakeup_r.close()
        self._wakeup_w.close()
        self._selector.close()
        self.trace.close()
        for path, dev, ino in self._bound:
            _unlink_if_same(path, dev, ino)
        self._bound.clear()

    # -- setup -----------------------------------------------------------------------------

    def _listen(self, path: Path) -> socket.socket:
        path = Path(os.path.abspath(path))
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(path))
            os.chmod(path, SOCKET_MODE)
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise BindFailed(path, exc) from exc
        finally:
            os.umask(old_umask)
        info = os.stat(path)
        self._bound.append((path, info.st_dev, info.st_ino))
        log.info("listening on %s", path)
        return sock

    # -- event handlers --------------------------------------------------------------------

    def _bh_wakeup(self, _mask: int) -> None:
        self._wakeup_r.recv(64)

    def _bh_accept_frontend(self, _mask: int) -> None:
        try:
            frontend, _ = self._vu_listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self._selector.unregister(self._vu_listener)
        self._vu_listener.close()
        frontend.settimeout(MESSAGE_READ_TIMEOUT_S)
        self._frontend = frontend
        self._selector.register(frontend, selectors.EVENT_READ, self._bh_frontend_message)
        log.info("vhost-user frontend connected")

    def _bh_frontend_message(self, _mask: int) -> None:
        assert self._frontend is not None
        self._unwatch_kicks()
        try:
            message = receive_message(self._frontend)
            if message is None:
                log.info("vhost-user frontend disconnected; exiting")
                self._stop_requested = True
                return
            reply = self.device.handle(message)
            if reply is not None:
                self._frontend.sendall(reply)
                if self.trace.enabled:
                    self.trace.event("reply", req=message.request, payload=reply[12:].hex())
        except VhostUserError as exc:
            log.error("vhost-user session ended: %s", exc)
            self._failure = exc
            self._stop_requested = True
            return
        except OSError as exc:
            log.error("vhost-user socket failed: %s", exc)
            self._failure = VhostUserError(f"vhost-user socket failed: {exc}")
            self._stop_requested = True
            return
        if self.device.reset_pending:
            self.device.reset_pending = False
            self.trace.event("reset_begin")
            self.muxer.reset()
            self.trace.event("reset_end")

    def _bh_kick(self, index: int, fd: int, _mask: int) -> None:
        if self._watched_kicks.get(index) != fd:
            # An event collected before a frontend message in the same batch replaced or
            # closed this fd: the number may now be closed or name another file. The ring
            # is pumped after the batch anyway.
            return
        try:
            os.eventfd_read(fd)
        except (BlockingIOError, InterruptedError):
            pass

    # -- pumping ---------------------------------------------------------------------------

    def _pump(self) -> bool:
        """Move packets both ways; returns True if tx work is left over (poll again now)."""
        queues = self.device.running_queues()
        if self.trace.enabled:
            self._audit(queues)
        rx, tx = queues.get(RX_QUEUE), queues.get(TX_QUEUE)
        tx_left = False
        for _ in range(_MAX_PUMP_ROUNDS):
            tx_left = self.muxer.process_tx(tx) if tx is not None else False
            tx_paused = self.muxer.tx_backlogged
            delivered = self.muxer.process_rx(rx) if rx is not None else False
            if not (delivered and tx_paused):
                break  # else rx made room: resume tx now, the guest will not kick again
        for index, queue in queues.items():
            if queue.take_used_added():
                self.device.signal(index)
        self.muxer.sync_interest()
        self._watch_kicks()
        return tx_left

    def _audit(self, queues: dict[int, SplitVirtqueue]) -> None:
        """Trace any ``used.idx`` that changed under a running ring since the device wrote it."""
        for index, queue in queues.items():
            if (value := queue.foreign_used_idx()) is not None:
                log.warning("vring %d: used.idx is %d in memory, the device wrote %d",
                            index, value, queue.next_used)
                self.trace.event("foreign", vq=index, gen=queue.generation,
                                 next_used=queue.next_used, mem_idx=value)

    def _select_timeout(self, busy: bool) -> float | None:
        if busy:
            return 0.0
        deadline = self.muxer.next_deadline()
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _watch_kicks(self) -> None:
        wanted = {
            index: fd
            for index in self.device.running_queues()
            if (fd := self.device.kick_fd(index)) is not None
        }
        for index, fd in list(self._watched_kicks.items()):
            if wanted.get(index) != fd:
                self._selector.unregister(fd)
                del self._watched_kicks[index]
        for index, fd in wanted.items():
            if index not in self._watched_kicks:
                self._selector.register(fd, selectors.EVENT_READ, partial(self._bh_kick, index, fd))
                self._watched_kicks[index] = fd

    def _unwatch_kicks(self) -> None:
        for fd in self._watched_kicks.values():
            self._selector.unregister(fd)
        self._watched_kicks.clear()


def serve(
    vhost_user_socket: Path,
    uds_path: Path,
    guest_cid: int,
    *,
    ready_fd: int | None = None,
    vm_name: str | None = None,
    vm_id: str | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    log_dir: Path | None = None,
    trace_file: Path | None = None,
) -> None:
    """Run a vsock backend until QEMU disconnects or SIGTERM/SIGINT arrives.

    Listens on ``vhost_user_socket`` and ``uds_path`` (both 0600), writes ``READY\\n`` to
    ``ready_fd`` when both listen, serves one QEMU connection, and removes both socket
    files before returning. Signal handlers are installed only in the main thread.
    Guest violations are written as security events to the event log in ``log_dir``
    (see :mod:`secvf.store.eventlog`) when one is given. ``trace_file`` turns on the vring
    lifecycle trace (:mod:`secvf.vsock.trace`).

    Raises:
        BindFailed: a socket path is in use.
        VsockError: invalid arguments, or the host is not x86-64.
        VhostUserError: QEMU broke the vhost-user protocol (the sockets are cleaned up).
    """
    with VsockBackend(
        vhost_user_socket,
        uds_path,
        guest_cid,
        vm_name=vm_name,
        vm_id=vm_id,
        max_connections=max_connections,
        log_dir=log_dir,
        trace_file=trace_file,
    ) as backend:
        if threading.current_thread() is not threading.main_thread():
            backend.run(ready_fd)
            return

        def _on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("%s received; exiting", signal.Signals(signum).name)
            backend.stop()

        previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            backend.run(ready_fd)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _remove_stale_socket(path: Path) -> None:
    """Remove a leftover socket file nobody listens on; refuse anything else.

    Listening is checked in /proc/net/unix rather than by connecting: a probe connection
    would be taken by a live backend as its one QEMU connection.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise BindFailed(path, "the path exists and is not a socket")
    if _has_listener(path):
        raise BindFailed(path, "another process is listening on it")
    log.info("removing stale socket %s", path)
    path.unlink()


def _has_listener(path: Path) -> bool:
    """Whether a listening Unix socket is bound to ``path`` (per /proc/net/unix)."""
    wanted = {str(path), os.path.abspath(path)}
    with open("/proc/net/unix", encoding="utf-8", errors="replace") as table:
        next(table)  # header: Num RefCount Protocol Flags Type St Inode Path
        for line in table:
            fields = line.split(maxsplit=7)
            if len(fields) == 8 and int(fields[3], 16) & _SO_ACCEPTCON:
                if fields[7].rstrip("\n") in wanted:
                    return True
    return False


def _unlink_if_same(path: Path, dev: int, ino: int) -> None:
    try:
        info = os.lstat(path)
        if (info.st_dev, info.st_ino) == (dev, ino):
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)
