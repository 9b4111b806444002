"""One session's socket: whole frames out, sends serialised across threads."""

from __future__ import annotations

import socket
import threading
from collections.abc import Sequence
from typing import Any

from secvf.exec import protocol


class ConnectionGone(Exception):
    """Sending failed: the client went away."""


class Connection:
    """The socket of one session; sends are serialised by a lock (thread-safe)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self.broken = False

    def send(self, data: bytes) -> None:
        """Send whole frames; blocks while the client does not read (back-pressure).

        Raises:
            ConnectionGone: the socket is closed or the peer went away.
        """
        self.send_parts([data])

    def send_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        """Send ``parts`` (e.g. :func:`~secvf.exec.protocol.data_frame_parts`) in order,
        as whole frames, with as few ``sendmsg`` calls as the socket allows
        (:func:`~secvf.exec.protocol.sendmsg_all`); blocks like :meth:`send`.

        Raises:
            ConnectionGone: the socket is closed or the peer went away.
        """
        with self._send_lock:
            if self.broken:
                raise ConnectionGone("connection already failed")
            try:
                protocol.sendmsg_all(self.sock, parts)
            except OSError as exc:
                self.broken = True
                raise ConnectionGone(str(exc)) from exc

    def message(self, name: str, stream_id: int = 0, **fields: Any) -> None:
        """Encode and send one control message."""
        self.send(protocol.encode_message(name, stream_id, **fields))

    def close(self) -> None:
        """Shut the socket down both ways (wakes a blocked recv) and close it."""
        self.broken = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
