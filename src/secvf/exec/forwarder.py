"""The host end of a port forward: a TCP listener whose connections reach a guest port.

Each accepted connection gets a vsock stream of its own to the guest agent's forward
relay, through the VM's private hybrid-vsock socket (``CONNECT 1022``), then the
handshake of :mod:`secvf.exec.forwarding`. A guest port nobody listens on resets the
host connection (the nearest a TCP client gets to "connection refused" once its
connect has been accepted). Bytes are copied blocking, one chunk per direction, so a
side that stops reading stops the other (no buffering on the host).

Standard library only.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from secvf.errors import ConnectFailed, SecVFError
from secvf.exec import forwarding
from secvf.exec.channel import dial_hybrid

log = logging.getLogger(__name__)

#: Most forwarded connections one forward keeps open at once (the next is reset).
MAX_CONNECTIONS = 256
#: How long reaching the guest relay may take for one connection.
DIAL_TIMEOUT_S = 10.0


class ForwardError(SecVFError):
    """A port forward could not be set up (the host address or port is unusable)."""


@dataclass
class ForwardStats:
    """What a forward has carried so far."""

    connections: int = 0  # accepted host connections
    active: int = 0  # of those, open now
    refused: int = 0  # reset: the guest port was closed, or the relay unreachable or busy
    bytes_to_guest: int = 0
    bytes_from_guest: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a dict (``--json``)."""
        return asdict(self)


class PortForward:
    """Forward TCP connections to ``host_addr:host_port`` to guest TCP ``guest_port``.

    ``host_port`` 0 picks a free port (:attr:`host_port` says which, once started).
    ``on_refused(errno_name, text)`` is called when a connection could not reach the
    guest port. Use as a context manager, or :meth:`start` and :meth:`close`::

        with PortForward(vsock_socket, 8000) as fwd:
            urllib.request.urlopen(f"http://127.0.0.1:{fwd.host_port}/")
    """

    def __init__(self, vsock_socket: Path, guest_port: int, *, host_addr: str = "127.0.0.1",
                 host_port: int = 0,
                 on_refused: Callable[[str, str], None] | None = None) -> None:
        self.vsock_socket = Path(vsock_socket)
        self.guest_port = forwarding.check_port(guest_port)
        self.host_addr = host_addr
        self.host_port = host_port
        self.stats = ForwardStats()
        self._on_refused = on_refused
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []

    def start(self) -> PortForward:
        """Listen and start accepting (``with`` does it too, unless already started).

        Raises:
            ForwardError: the address cannot be listened on (in use, not local, ...).
        """
        family = socket.AF_INET6 if ":" in self.host_addr else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host_addr, self.host_port))
            listener.listen(64)
        except OSError as exc:
            listener.close()
            raise ForwardError(f"cannot listen on {self.host_addr} port {self.host_port}: "
                               f"{exc.strerror or exc}") from exc
        self.host_port = listener.getsockname()[1]
        self._listener = listener
        accept = threading.Thread(target=self._accept_loop, name="forward-accept", daemon=True)
        accept.start()
        self._threads.append(accept)
        return self

    def close(self) -> None:
        """Stop listening and end every forwarded connection."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns = list(self._open)
        if listener is not None:
            listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            _shut(conn)
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> PortForward:
        return self if self._listener is not None else self.start()

    def __exit__(self, _t: type[BaseException] | None, _e: BaseException | None,
                 _tb: TracebackType | None) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while True:
            listener = self._listener
            if listener is None:
                return
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                self.stats.connections += 1
                busy = self.stats.active >= MAX_CONNECTIONS
                if not busy:
                    self.stats.active += 1
                    self._open.add(client)
            if busy:
                self._refused(client, "EBUSY", f"{MAX_CONNECTIONS} connections are open")
                continue
            worker = threading.Thread(target=self._serve, args=(client,), name="forward",
                                      daemon=True)
            worker.start()
            self._threads = [t for t in self._threads if t.is_alive()] + [worker]

    def _serve(self, client: socket.socket) -> None:
        guest: socket.socket | None = None
        try:
            try:
                guest = self._reach_guest()
            except forwarding.ForwardRefused as exc:
                self._refused(client, exc.errno_name, exc.text)
                return
            with self._lock:
                self._open.add(guest)
            forwarding.relay(client, guest, self._count)
        finally:
            with self._lock:
                self.stats.active -= 1
                self._open.discard(client)
                if guest is not None:
                    self._open.discard(guest)
            client.close()
            if guest is not None:
                guest.close()

    def _reach_guest(self) -> socket.socket:
        """A stream to the guest port, handshake done.

        Raises:
            forwarding.ForwardRefused: the relay said no, or could not be reached.
        """
        try:
            guest = dial_hybrid(self.vsock_socket, forwarding.FORWARD_VSOCK_PORT,
                                DIAL_TIMEOUT_S)
        except ConnectFailed as exc:
            raise forwarding.ForwardRefused("EHOSTUNREACH", str(exc)) from exc
        try:
            guest.settimeout(forwarding.HANDSHAKE_TIMEOUT_S)
            guest.sendall(forwarding.encode_request(self.guest_port))
            forwarding.parse_reply(forwarding.read_line(guest))
            guest.settimeout(None)
        except (OSError, forwarding.ForwardRefused) as exc:
            guest.close()
            if isinstance(exc, forwarding.ForwardRefused):
                raise
            raise forwarding.ForwardRefused("EPIPE", f"the guest relay: {exc}") from exc
        return guest

    def _count(self, to_guest: int, from_guest: int) -> None:
        with self._lock:
            self.stats.bytes_to_guest += to_guest
            self.stats.bytes_from_guest += from_guest

    def _refused(self, client: socket.socket, errno_name: str, text: str) -> None:
        """Reset ``client`` (an RST, not a clean close) and count it."""
        with self._lock:
            self.stats.refused += 1
        log.info("forward to guest port %d refused: %s %s", self.guest_port, errno_name, text)
        if self._on_refused is not None:
            self._on_refused(errno_name, text)
        try:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        client.close()

    def describe(self) -> dict[str, Any]:
        """Where it listens, where it goes, and its counters."""
        return {"host_addr": self.host_addr, "host_port": self.host_port,
                "guest_port": self.guest_port, **self.stats.as_dict()}


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
