"""The forward relay: host connections to TCP ports on the guest's loopback.

The agent listens on vsock port :data:`~secvf.exec.forwarding.FORWARD_VSOCK_PORT` (a
reserved port: only root may bind it) besides its exec port. Each connection from the
host (CID 2; any other peer is closed at once) sends ``TCP <port>``; the relay connects
to ``127.0.0.1:<port>`` (then ``[::1]:<port>``), answers ``OK`` or ``ERR``, and copies
bytes both ways until both sides are done (:func:`secvf.exec.forwarding.relay`). At
most :data:`MAX_FORWARDS` run at once; the next one gets ``ERR EBUSY``.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading

from secvf.exec import forwarding

log = logging.getLogger("secvf.agent")

#: Most forwarded connections at once.
MAX_FORWARDS = 256
#: How long a connect to a guest port may take.
CONNECT_TIMEOUT_S = 5.0
#: The host's vsock CID: the only peer a forward may come from.
HOST_CID = 2


def serve_forwards(listener: socket.socket) -> None:
    """Accept forwarded connections until the listener is closed."""
    slots = threading.BoundedSemaphore(MAX_FORWARDS)
    while True:
        try:
            conn, peer = listener.accept()
        except OSError:
            if listener.fileno() < 0:
                return
            raise
        if peer[0] != HOST_CID:
            log.warning("forward: connection from CID %s refused (only the host forwards)",
                        peer[0])
            conn.close()
            continue
        if not slots.acquire(blocking=False):
            _refuse(conn, errno.EBUSY, f"{MAX_FORWARDS} forwarded connections are open")
            continue
        threading.Thread(target=_serve_one, args=(conn, slots), name="forward",
                         daemon=True).start()


def _serve_one(conn: socket.socket, slots: threading.BoundedSemaphore) -> None:
    try:
        conn.settimeout(forwarding.HANDSHAKE_TIMEOUT_S)
        try:
            port = forwarding.parse_request(forwarding.read_line(conn))
        except (OSError, ValueError) as exc:
            _refuse(conn, errno.EPROTO, str(exc))
            return
        try:
            target = connect_loopback(port)
        except OSError as exc:
            _refuse(conn, exc.errno or errno.EIO, exc.strerror or str(exc))
            return
        with conn, target:
            conn.settimeout(None)
            conn.sendall(forwarding.encode_ok())
            forwarding.relay(conn, target)
    except OSError as exc:
        log.info("forward: connection ended: %s", exc)
    finally:
        slots.release()


def connect_loopback(port: int) -> socket.socket:
    """A connection to ``port`` on 127.0.0.1, or on ::1 if IPv4 has nobody there.

    Raises:
        OSError: neither answered (the IPv4 error, e.g. ECONNREFUSED).
    """
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT_S)
    except OSError as first:
        try:
            sock = socket.create_connection(("::1", port), timeout=CONNECT_TIMEOUT_S)
        except OSError:
            raise first from None
    sock.settimeout(None)  # the relay blocks: an idle connection stays open
    return sock


def _refuse(conn: socket.socket, code: int, text: str) -> None:
    try:
        conn.sendall(forwarding.encode_error(code, text))
    except OSError:
        pass
    finally:
        conn.close()
