"""The switch process: ``python -m secvf.net.switch NETDIR``.

One process per isolated network, run by that network's watchdog; it only ever opens
the sockets of its own ``NETDIR``, so frames cannot cross between networks.

Why datagrams: QEMU's ``-netdev dgram`` sends one Ethernet frame per ``AF_UNIX``
``SOCK_DGRAM`` datagram with no header, resolves the switch's path on every send and
so reconnects by itself after the switch restarts; the socket directory's 0700 mode
and the per-port sender check decide who can talk to a port (see
``shared/notes/prototype-switch.md``).

The loop: one ``epoll`` selector over every port socket, the control socket and its
connections, and a wakeup pipe for signals. On each wakeup a ready port socket is read
up to :data:`BATCH_FRAMES` times (``recvfrom`` with a 64 KiB buffer, so a frame of any
length is seen whole and its size judged) and every frame goes through
:class:`secvf.net.engine.Engine` with the batch's timestamp. Sends are non-blocking:
a full peer queue is a drop, never a stall. Every :data:`TICK_S` the engine closes
rate windows, capture clients get their owed messages, and the switch exits if its
parent (the watchdog) is gone.

Exit status: 0 on SIGTERM/SIGINT or when the watchdog is gone, 2 if ``switch.json``
cannot be used (the reason is on stderr, which the watchdog sends to ``switch.log``).
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from secvf.net.config import ConfigError, NetPaths, load_ports, load_switch_config
from secvf.net.control import (
    MAX_REQUEST_BYTES,
    OP_CAPTURE,
    OP_END,
    OP_PING,
    OP_RELOAD,
    OP_RING,
    OP_STATS,
    decode,
    encode,
)
from secvf.net.engine import TX_ERROR, TX_FULL, Engine, Port
from secvf.net.events import SWITCH_STARTED, log_emitter
from secvf.net.taps import CaptureClient, Ring, frame_message
from secvf.store.eventlog import Severity

BATCH_FRAMES = 256  # datagrams read from one port per wakeup before serving the others
RECV_BYTES = 65536  # larger than any datagram QEMU or a foreign sender can send here
SOCKET_BUFFER_BYTES = 4 << 20
TICK_S = 0.5
MAX_CONTROL_CONNECTIONS = 64
PEERCRED = struct.Struct("3i")  # pid, uid, gid
#: A port's socket: any jailed QEMU may send to it (its QEMU runs as the VM's own uid);
#: the switch takes frames on it only from the port's own QEMU socket (foreign_sender)
PORT_SOCKET_MODE = 0o622
SOCKET_MODE = 0o600  # the control socket


def log(message: str) -> None:
    """One line on stderr (``switch.log``)."""
    print(f"secvf-switch[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


class ControlConn:
    """One accepted control connection: requests in, replies queued out."""

    __slots__ = ("sock", "out", "capture")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.out: deque[bytes] = deque()  # replies not yet sent (a ring dump is many)
        self.capture: CaptureClient | None = None  # set once it asked for a capture

    def __repr__(self) -> str:
        return f"ControlConn(fd={self.sock.fileno()}, queued={len(self.out)})"


class Switch:
    """The socket side of one network's switch (see the module docstring)."""

    def __init__(self, paths: NetPaths) -> None:
        self.paths = paths
        self.config = load_switch_config(paths)
        self.engine = Engine(self.config, self._transmit, log_emitter(self.config.logs_dir))
        self.selector = selectors.DefaultSelector()
        self.sockets: dict[str, socket.socket] = {}  # port name -> bound .s socket
        self.bound: dict[str, int] = {}  # path -> inode we bound (unlink only our own)
        self.senders: dict[str, Callable[[bytes, str], int]] = {}  # port name -> sendto
        self.conns: dict[int, ControlConn] = {}  # fd -> control connection
        self.ring = Ring(self.config.ring_frames)
        self.interfaces: dict[int, dict[str, Any]] = {}  # capture index -> interface
        self.capture_dropped = 0  # drops of capture clients that have gone
        self.started_at = datetime.now(UTC).isoformat(timespec="seconds")
        self.parent = os.getppid()
        self.stopping = False
        self._next_tick = 0.0  # monotonic time of the next housekeeping pass
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def __repr__(self) -> str:
        return f"Switch({str(self.paths.root)!r}, ports={sorted(self.sockets)})"

    # ---- lifecycle -------------------------------------------------------------------

    def run(self) -> None:
        """Bind the ports, then the control socket (a ping answering means the ports are
        up), and forward until stopped; always unlinks what it bound."""
        try:
            self.reload()
            self._listen()
            self._watch_signals()
            self.engine.network_event(SWITCH_STARTED, Severity.INFO, switch_pid=os.getpid(),
                                      ports=len(self.engine.ports))
            log(f"network {self.config.network}: {len(self.engine.ports)} port(s)")
            while not self.stopping:
                self._serve_once()
        finally:
            self._close_all()

    def _listen(self) -> None:
        path = self.paths.control
        self._unlink_stale(path)
        self.listener.bind(str(path))
        os.chmod(path, SOCKET_MODE)
        self.bound[str(path)] = os.stat(path).st_ino
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)

    def _watch_signals(self) -> None:
        self._wakeup_r.setblocking(False)
        self._wakeup_w.setblocking(False)
        signal.set_wakeup_fd(self._wakeup_w.fileno())
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.selector.register(self._wakeup_r, selectors.EVENT_READ, self._drain_wakeup)

    def _on_signal(self, signum: int, _frame: object) -> None:
        log(f"signal {signal.Signals(signum).name}: stopping")
        self.stopping = True

    def _drain_wakeup(self, _mask: int) -> None:
        try:
            self._wakeup_r.recv(4096)
        except BlockingIOError:
            pass

    def _close_all(self) -> None:
        for name in list(self.sockets):
            self._close_port(name)
        for conn in list(self.conns.values()):
            self._drop_conn(conn)
        self._unlink_ours(str(self.paths.control))
        self.listener.close()
        self.selector.close()

    # ---- the loop --------------------------------------------------------------------

    def _serve_once(self) -> None:
        events = self.selector.select(TICK_S)
        now = time.monotonic()
        for key, mask in events:
            data = key.data
            if isinstance(data, Port):
                self._drain(key.fileobj, data, now)  # type: ignore[arg-type]
            else:
                data(mask)
        if now >= self._next_tick:
            self._tick(now)

    def _drain(self, sock: socket.socket, port: Port, now: float) -> None:
        """Read up to BATCH_FRAMES datagrams from ``port`` and switch them."""
        recvfrom = sock.recvfrom
        ingress = self.engine.ingress
        remember = self.ring.frames.append
        time_ns = time.time_ns
        serial = port.serial
        for _ in range(BATCH_FRAMES):
            try:
                frame, sender = recvfrom(RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log(f"port {port.name}: receive failed: {exc}")
                return
            if ingress(port, sender, frame, now):
                ts = time_ns()
                remember((ts, serial, frame))
                if port.taps:
                    message = frame_message(ts, serial, frame)
                    for tap in port.taps:
                        tap.push(message)

    def _transmit(self, target: Port, frame: bytes) -> str | None:
        try:
            self.senders[target.name](frame, target.qemu_path)
        except BlockingIOError:
            return TX_FULL
        except OSError:
            return TX_ERROR
        return None

    def _tick(self, now: float) -> None:
        self._next_tick = now + TICK_S
        self.engine.tick(now)
        for conn in list(self.conns.values()):
            if conn.capture is not None:
                conn.capture.flush()
                if conn.capture.broken:
                    self._drop_conn(conn)
        if os.getppid() != self.parent:
            log("the watchdog is gone: stopping")
            self.stopping = True

    # ---- ports -----------------------------------------------------------------------

    def reload(self) -> int:
        """Re-read ``switch.json`` and ``ports/``; bind new ports, close gone ones.

        Raises:
            ConfigError, OSError: ``switch.json`` is unusable (the old one stays in force).
        """
        config = load_switch_config(self.paths)
        ports = load_ports(self.paths)
        for name in set(self.sockets) - {p.port for p in ports}:
            self._close_port(name)
        ports = [p for p in ports if p.port in self.sockets or self._open_port(p.port)]
        self.config = config
        self.ring.resize(config.ring_frames)
        self.engine.configure(config, ports)
        for name in set(self.sockets) - set(self.engine.ports):
            self._close_port(name)
        for name, port in self.engine.ports.items():
            self.selector.modify(self.sockets[name], selectors.EVENT_READ, port)
            self.interfaces[port.serial] = _interface(port)
        self._refresh_taps()
        return len(self.engine.ports)

    def _open_port(self, name: str) -> bool:
        path = self.paths.switch_path(name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._unlink_stale(path)
            sock.bind(str(path))
            os.chmod(path, PORT_SOCKET_MODE)
        except OSError as exc:
            sock.close()
            log(f"port {name}: cannot bind {path}: {exc}; skipped")
            return False
        self.bound[str(path)] = os.stat(path).st_ino
        sock.setblocking(False)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        self.sockets[name] = sock
        self.senders[name] = sock.sendto
        self.selector.register(sock, selectors.EVENT_READ, None)
        return True

    def _close_port(self, name: str) -> None:
        sock = self.sockets.pop(name)
        del self.senders[name]
        self.selector.unregister(sock)
        sock.close()
        self._unlink_ours(str(self.paths.switch_path(name)))

    def _unlink_stale(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass

    def _unlink_ours(self, path: str) -> None:
        inode = self.bound.pop(path, None)
        try:
            if inode is not None and os.stat(path).st_ino == inode:
                os.unlink(path)
        except FileNotFoundError:
            pass

    def _refresh_taps(self) -> None:
        live = {p.serial for p in self.engine.ports.values()}
        keep = live | self.ring.indexes()
        self.interfaces = {i: v for i, v in self.interfaces.items() if i in keep}
        current = [self.interfaces[p.serial] for p in self.engine.ports.values()]
        clients = [c.capture for c in self.conns.values() if c.capture is not None]
        for client in clients:
            client.update(current)
        for port in self.engine.ports.values():
            port.taps = tuple(c for c in clients if c.wants(port.name))

    # ---- control connections -----------------------------------------------------------

    def _accept(self, _mask: int) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        pid, uid, _gid = PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))
        if uid != os.getuid() or len(self.conns) >= MAX_CONTROL_CONNECTIONS:
            log(f"control: refused pid {pid} uid {uid} ({len(self.conns)} connections)")
            sock.close()
            return
        sock.setblocking(False)
        conn = ControlConn(sock)
        self.conns[sock.fileno()] = conn
        self.selector.register(sock, selectors.EVENT_READ, lambda mask: self._on_conn(conn, mask))

    def _on_conn(self, conn: ControlConn, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush_conn(conn)
        if mask & selectors.EVENT_READ and conn.sock.fileno() in self.conns:
            self._read_request(conn)

    def _read_request(self, conn: ControlConn) -> None:
        try:
            message = conn.sock.recv(MAX_REQUEST_BYTES + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            message = b""
        if not message:
            self._drop_conn(conn)
        elif conn.capture is not None:
            pass  # a capture connection has nothing more to say; ignore it
        elif len(message) > MAX_REQUEST_BYTES:
            self._reply(conn, _error(f"request larger than {MAX_REQUEST_BYTES} bytes"))
            self._flush_conn(conn)
            self._drop_conn(conn)
        else:
            self._handle(conn, message)

    def _handle(self, conn: ControlConn, message: bytes) -> None:
        try:
            request = decode(message)
        except (ValueError, RecursionError) as exc:
            self._reply(conn, _error(f"request is not a JSON object: {exc}"))
            return
        op = request.get("op")
        handler = self._handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            self._reply(conn, _error(f"unknown op {request.get('op')!r}; want one of "
                                     f"{sorted(self._handlers)}"))
            return
        handler(self, conn, request)

    def _ping(self, conn: ControlConn, _request: dict[str, Any]) -> None:
        self._reply(conn, {"ok": True, "pid": os.getpid()})

    def _reload(self, conn: ControlConn, _request: dict[str, Any]) -> None:
        try:
            count = self.reload()
        except (ConfigError, OSError) as exc:
            self._reply(conn, _error(f"reload failed, old configuration kept: {exc}"))
            return
        self._reply(conn, {"ok": True, "ports": count})

    def _stats(self, conn: ControlConn, _request: dict[str, Any]) -> None:
        clients = [c.capture for c in self.conns.values() if c.capture is not None]
        self._reply(conn, {
            "ok": True, "network": self.config.network, "pid": os.getpid(),
            "started_at": self.started_at, "cpu_s": round(time.process_time(), 6),
            "ports": [p.stats() for p in self.engine.ports.values()],
            "drops": self.engine.drop_totals(),
            "capture": {"clients": len(clients),
                        "dropped": self.capture_dropped + sum(c.dropped for c in clients)},
            "ring": self.ring.stats()})

    def _capture(self, conn: ControlConn, request: dict[str, Any]) -> None:
        ports = request.get("ports")
        if ports is not None and not (isinstance(ports, list)
                                      and all(isinstance(p, str) for p in ports)):
            self._reply(conn, _error("ports must be a list of port names or null"))
            return
        client = CaptureClient(conn.sock, None if ports is None else frozenset(ports))
        current = [self.interfaces[p.serial] for p in self.engine.ports.values()]
        mine = client.interfaces(current)
        client.announced = {i["index"] for i in mine}
        self._reply(conn, {"ok": True, "interfaces": mine})
        conn.capture = client
        self._refresh_taps()

    def _ring(self, conn: ControlConn, _request: dict[str, Any]) -> None:
        frames = list(self.ring.frames)
        wanted = {index for _, index, _ in frames} | {p.serial for p in self.engine.ports.values()}
        interfaces = [self.interfaces[i] for i in sorted(wanted) if i in self.interfaces]
        self._reply(conn, {"ok": True, "interfaces": interfaces})
        conn.out.extend(frame_message(ts, index, frame) for ts, index, frame in frames)
        self._reply(conn, {"op": OP_END})

    _handlers: dict[str, Callable[[Switch, ControlConn, dict[str, Any]], None]] = {
        OP_PING: _ping, OP_RELOAD: _reload, OP_STATS: _stats, OP_CAPTURE: _capture,
        OP_RING: _ring}

    def _reply(self, conn: ControlConn, message: dict[str, Any]) -> None:
        conn.out.append(encode(message))
        self._flush_conn(conn)

    def _flush_conn(self, conn: ControlConn) -> None:
        """Send queued replies until the socket is full; wait for EVENT_WRITE if so."""
        if conn.sock.fileno() not in self.conns:
            return
        while conn.out:
            try:
                conn.sock.send(conn.out[0])
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                    log(f"control: send failed: {exc}")
                self._drop_conn(conn)
                return
            conn.out.popleft()
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
        self.selector.modify(conn.sock, events, self.selector.get_key(conn.sock).data)

    def _drop_conn(self, conn: ControlConn) -> None:
        fd = conn.sock.fileno()
        if self.conns.pop(fd, None) is None:
            return
        self.selector.unregister(conn.sock)
        conn.sock.close()
        if conn.capture is not None:
            self.capture_dropped += conn.capture.dropped
            self._refresh_taps()


def _interface(port: Port) -> dict[str, Any]:
    c = port.config
    return {"index": port.serial, "port": c.port, "vm": c.vm, "nic": c.nic, "mac": c.mac}


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the switch for ``NETDIR`` (the only argument) until stopped."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m secvf.net.switch NETDIR", file=sys.stderr)
        return 2
    paths = NetPaths(Path(args[0]).absolute())
    try:
        switch = Switch(paths)
    except (ConfigError, OSError) as exc:
        log(f"cannot start: {exc}")
        return 2
    switch.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
