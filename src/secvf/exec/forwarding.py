"""The port-forward handshake: host TCP connections to a TCP port inside an AI sandbox.

A forwarded connection is a vsock stream of its own to the guest agent's forward relay
on :data:`FORWARD_VSOCK_PORT` (through the VM's private hybrid-vsock socket, as the exec
bridge reaches port 2222). The port is a reserved vsock port (below 1024): only root in
the guest can listen on it, so no guest user can stand in for the relay.

The host sends one line, ``TCP <port>\\n``; the relay connects to that port on the
guest's loopback (``127.0.0.1``, then ``::1``) and answers ``OK\\n``, or
``ERR <ERRNO_NAME> <text>\\n`` and closes. After ``OK`` the stream carries the
connection's bytes both ways; a half-close is passed on as a half-close.

Standard library only: the guest agent uses this module too.
"""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Callable

#: The guest relay's vsock port (reserved: binding it needs CAP_NET_BIND_SERVICE).
FORWARD_VSOCK_PORT = 1022
#: Longest handshake line either side reads.
MAX_LINE_BYTES = 256
#: How long either side waits for the other's handshake line, in seconds.
HANDSHAKE_TIMEOUT_S = 10.0
#: Bytes one relay read takes (a blocking read: the peer's pace is the relay's).
RELAY_CHUNK_BYTES = 64 * 1024


class ForwardRefused(Exception):
    """The relay could not reach the guest port (``errno_name`` says why)."""

    def __init__(self, errno_name: str, text: str) -> None:
        self.errno_name = errno_name
        self.text = text
        super().__init__(f"{errno_name}: {text}" if text else errno_name)


def encode_request(port: int) -> bytes:
    """The host's line asking for guest TCP ``port``.

    Raises:
        ValueError: ``port`` is not 1-65535.
    """
    return f"TCP {check_port(port)}\n".encode()


def parse_request(line: bytes) -> int:
    """The guest TCP port a request line asks for.

    Raises:
        ValueError: the line is not ``TCP <1-65535>\\n``.
    """
    words = line.decode("ascii", "replace").split()
    if len(words) != 2 or words[0] != "TCP" or not words[1].isdigit() or not line.endswith(b"\n"):
        raise ValueError(f"not a forward request: {line[:40]!r}")
    return check_port(int(words[1]))


def encode_ok() -> bytes:
    """The relay's line once it is connected to the guest port."""
    return b"OK\n"


def encode_error(code: int, text: str) -> bytes:
    """The relay's line when it could not connect (``code``: an errno)."""
    name = errno.errorcode.get(code, "EIO")
    clean = " ".join(text.split())[: MAX_LINE_BYTES - len(name) - 6]
    return f"ERR {name} {clean}\n".encode("ascii", "replace")


def parse_reply(line: bytes) -> None:
    """Accept an ``OK`` line.

    Raises:
        ForwardRefused: an ``ERR`` line, or anything else (then ``EPROTO``).
    """
    if line == b"OK\n":
        return
    words = line.decode("ascii", "replace").rstrip("\n").split(" ", 2)
    if words[0] == "ERR" and len(words) >= 2 and words[1] in errno.errorcode.values():
        raise ForwardRefused(words[1], words[2] if len(words) == 3 else "")
    raise ForwardRefused("EPROTO", f"the guest relay answered {line[:40]!r}")


def check_port(port: int) -> int:
    """``port`` if it is a TCP port number (1-65535).

    Raises:
        ValueError: it is not.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port {port!r} is not 1-65535")
    return port


def read_line(sock: socket.socket, limit: int = MAX_LINE_BYTES) -> bytes:
    """Read a handshake line, one byte at a time so no data byte after it is consumed
    (at most ``limit`` bytes; shorter at EOF). The hybrid-vsock ``CONNECT`` reply is read
    with it too (:func:`secvf.exec.channel.dial_hybrid`)."""
    line = bytearray()
    while not line.endswith(b"\n") and len(line) < limit:
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return bytes(line)


def relay(one: socket.socket, other: socket.socket,
          counted: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """Copy bytes both ways between two connected sockets until both directions have
    ended; an EOF is passed on as ``shutdown(SHUT_WR)``. Each direction blocks on its
    own reads and writes, so a peer that stops reading stops the other side (bounded
    memory: one chunk per direction). ``counted(one_to_other, other_to_one)`` is called
    after every chunk. Returns the bytes moved each way. Closes neither socket.
    """
    moved = [0, 0]

    def pump(source: socket.socket, sink: socket.socket, index: int) -> None:
        try:
            while chunk := source.recv(RELAY_CHUNK_BYTES):
                sink.sendall(chunk)
                moved[index] += len(chunk)
                if counted is not None:
                    counted(len(chunk) if index == 0 else 0, len(chunk) if index == 1 else 0)
        except OSError:
            pass  # a reset or a closed socket ends this direction
        finally:
            for sock, how in ((sink, socket.SHUT_WR), (source, socket.SHUT_RD)):
                try:
                    sock.shutdown(how)
                except OSError:
                    pass

    back = threading.Thread(target=pump, args=(other, one, 1), name="relay-back", daemon=True)
    back.start()
    pump(one, other, 0)
    back.join()
    return moved[0], moved[1]
