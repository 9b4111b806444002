"""A fake hybrid-vsock backend: the VM side of the exec bridge, without QEMU.

A real AI-sandbox VM gives the supervisor one Unix socket (``vsock-<UUID>.sock``) that
speaks the Firecracker "hybrid vsock" contract (see :mod:`secvf.vsock.muxer`)::

    host client  -> backend   CONNECT <port>\\n
    backend      -> client    OK <hostport>\\n        then raw bytes both ways
                              (or the socket closes: nothing listens on that guest port)

:class:`FakeVsockBackend` serves the same contract on a Unix socket and joins each
accepted ``CONNECT <port>`` to a host Unix socket standing in for the guest service on
that port: an :class:`~secvf.testing.agent.AgentProcess` or a
:class:`~secvf.testing.agent.HostileAgent`. A port with nothing behind it is refused
as the real backend refuses it, by closing the connection. Everything runs on real
sockets in background threads, so code under test (the exec bridge's asyncio loop) sees
exactly what it would see with a VM::

    with AgentProcess(tmp_path, default_user="root") as agent, FakeVsockBackend(
        RuntimeFiles(vm.id).vsock_socket, {2222: agent.socket_path}
    ) as backend:
        ...                      # start the exec bridge, connect a client through it
        assert backend.requests == [2222]
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from secvf.vsock.limits import CONNECT_LINE_MAX_BYTES, FIRST_HOST_PORT

#: How long a client may take to send its ``CONNECT`` line.
CONNECT_LINE_TIMEOUT_S = 5.0
#: Bytes copied per ``recv`` while splicing.
SPLICE_CHUNK_BYTES = 64 * 1024

_CONNECT_LINE = re.compile(rb"CONNECT ([0-9]{1,10})\n")


class FakeVsockBackend:
    """A hybrid-vsock Unix socket whose guest ports are host Unix sockets.

    Attributes:
        path: the socket clients connect to (where the VM's backend socket would be).
        ports: guest port -> Unix socket of the service that "listens" on it.
        requests: the port of every well-formed ``CONNECT`` line, in arrival order.
        refused: how many connections were closed without ``OK`` (malformed line,
            nothing on the port, or the service socket refused).
    """

    def __init__(self, path: Path, ports: Mapping[int, Path]) -> None:
        """Prepare the fake; :meth:`start` (or ``with``) binds and serves it."""
        self.path = Path(path)
        self.ports = dict(ports)
        self.requests: list[int] = []
        self.refused = 0
        self._lock = threading.Lock()
        self._active = 0
        self._next_host_port = FIRST_HOST_PORT
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._open: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []

    def __repr__(self) -> str:
        return f"<FakeVsockBackend {self.path} ports={sorted(self.ports)} active={self.active}>"

    def __enter__(self) -> FakeVsockBackend:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def active(self) -> int:
        """Connections currently joined to a service (``OK`` sent, not yet closed)."""
        with self._lock:
            return self._active

    def start(self) -> None:
        """Bind ``path`` (replacing a stale file), listen, and accept in a thread."""
        Path(self.path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # vm_dir
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._listener.bind(os.fspath(self.path))
        self._listener.listen(64)
        self._spawn(self._bh_accept)

    def close(self) -> None:
        """Stop accepting, cut every connection, join the threads, remove the socket."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            still_open = list(self._open)
        for sock in still_open:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # -- background threads ---------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _bh_accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            self._spawn(self._bh_serve, client)

    def _bh_serve(self, client: socket.socket) -> None:
        self._track(client)
        try:
            service = self._bh_connect(client)
        except OSError:
            service = None
        if service is None:
            with self._lock:
                self.refused += 1
            self._untrack(client)
            client.close()
            return
        with self._lock:
            self._active += 1
        try:
            self._splice(client, service)
        finally:
            with self._lock:
                self._active -= 1
            for sock in (client, service):
                self._untrack(sock)
                sock.close()

    def _bh_connect(self, client: socket.socket) -> socket.socket | None:
        """Read the ``CONNECT`` line; return the joined service socket, None to refuse."""
        client.settimeout(CONNECT_LINE_TIMEOUT_S)
        line = bytearray()
        while not line.endswith(b"\n") and len(line) < CONNECT_LINE_MAX_BYTES:
            byte = client.recv(1)  # one byte at a time: later bytes belong to the service
            if not byte:
                return None
            line += byte
        client.settimeout(None)
        match = _CONNECT_LINE.fullmatch(bytes(line))
        if match is None:
            return None
        port = int(match.group(1))
        with self._lock:
            self.requests.append(port)
        target = self.ports.get(port)
        if target is None:
            return None
        service = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            service.connect(os.fspath(target))
        except OSError:
            service.close()
            return None
        self._track(service)
        client.sendall(f"OK {self._host_port()}\n".encode())
        return service

    def _host_port(self) -> int:
        with self._lock:
            port = self._next_host_port
            self._next_host_port += 1
            return port

    def _splice(self, client: socket.socket, service: socket.socket) -> None:
        """Copy both ways until both directions reached EOF (half-closes passed on)."""
        upstream = threading.Thread(target=_bh_copy, args=(client, service), daemon=True)
        upstream.start()
        _bh_copy(service, client)
        upstream.join()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.add(sock)

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)


def _bh_copy(src: socket.socket, dst: socket.socket) -> None:
    """Copy ``src`` to ``dst`` until EOF or an error, then half-close ``dst``."""
    try:
        while data := src.recv(SPLICE_CHUNK_BYTES):
            dst.sendall(data)
    except OSError:
        pass  # either side went away: the other direction ends too
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


__all__ = ["FakeVsockBackend"]
