"""The switch's control protocol (``NETDIR/control.sock``) and its one-shot client.

The socket is ``AF_UNIX``/``SOCK_SEQPACKET``: connection-oriented (so the switch can
check the peer's uid with ``SO_PEERCRED`` once) and message-framed (so a request or a
captured frame is one ``send``, with no length prefix to parse or trust). A request is
one JSON object; a reply is one JSON message (first byte ``{``) or, in a capture or
ring dump, a frame message::

    b"F" + struct ">QH" (ts_ns, interface index) + frame bytes

Requests larger than :data:`MAX_REQUEST_BYTES` get an error reply and the connection
is closed. Ops and reply shapes: ``docs/networks.md`` ("Files and protocol").

Errors: :class:`SwitchUnavailable` (an :class:`OSError`) when nothing answers on the
socket; a reply with ``"ok": false`` is returned as data, not raised.
"""

from __future__ import annotations

import errno
import json
import socket
import struct
from pathlib import Path
from typing import Any

from secvf.net.config import NetPaths

MAX_REQUEST_BYTES = 64 << 10  # the switch refuses larger requests
MAX_REPLY_BYTES = 16 << 20  # the largest JSON reply the client accepts (stats of many ports)
MAX_MESSAGE_BYTES = 65536 + 16  # a frame message: tag, header, up to 65535 bytes of frame
FRAME_TAG = b"F"
FRAME_HEADER = struct.Struct(">QH")  # ts_ns, interface index
FRAME_PREFIX_BYTES = len(FRAME_TAG) + FRAME_HEADER.size
DEFAULT_TIMEOUT_S = 2.0

OP_PING = "ping"
OP_RELOAD = "reload"
OP_STATS = "stats"
OP_CAPTURE = "capture"
OP_RING = "ring"
OP_INTERFACES = "interfaces"  # switch -> capture client
OP_DROPPED = "dropped"  # switch -> capture client
OP_END = "end"  # end of a ring dump


class SwitchUnavailable(OSError):
    """No switch answered on ``control.sock`` (not running, restarting, or wedged).

    ``errno`` is the cause's (ENOENT, ECONNREFUSED, ETIMEDOUT ...), ``filename`` the socket.
    """


def encode(message: dict[str, Any]) -> bytes:
    """One JSON control message."""
    return json.dumps(message, separators=(",", ":")).encode()


def decode(message: bytes) -> dict[str, Any]:
    """A JSON control message as a dict; raises ValueError if it is not a JSON object."""
    value = json.loads(message)
    if not isinstance(value, dict):
        raise ValueError(f"want a JSON object, got {type(value).__name__}")
    return value


def connect(netdir: Path, timeout: float = DEFAULT_TIMEOUT_S) -> socket.socket:
    """A connection to ``netdir``'s switch, with ``timeout`` on every call.

    Raises:
        SwitchUnavailable: nothing listens on ``control.sock``.
    """
    path = NetPaths(netdir).control
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise unavailable(path, exc) from exc
    return sock


def unavailable(path: Path, exc: OSError) -> SwitchUnavailable:
    """A :class:`SwitchUnavailable` for ``path`` caused by ``exc``."""
    code = exc.errno if exc.errno is not None else errno.ETIMEDOUT
    return SwitchUnavailable(code, f"no switch answers on {path} ({exc}); is a VM using "
                             "this network running?", str(path))


def receive(sock: socket.socket, path: Path, limit: int = MAX_REPLY_BYTES) -> bytes:
    """One message from ``sock``; raises :class:`SwitchUnavailable` on EOF or timeout."""
    try:
        message = sock.recv(limit)
    except OSError as exc:
        raise unavailable(path, exc) from exc
    if not message:
        raise unavailable(path, ConnectionResetError(errno.ECONNRESET, "switch closed"))
    return message


def query(netdir: Path, request: dict[str, Any], timeout: float = DEFAULT_TIMEOUT_S
          ) -> dict[str, Any]:
    """Send one request to ``netdir``'s switch and return its reply (``ok`` may be false).

    Raises:
        SwitchUnavailable: nothing answered within ``timeout`` seconds.
    """
    path = NetPaths(netdir).control
    with connect(netdir, timeout) as sock:
        try:
            sock.send(encode(request))
        except OSError as exc:
            raise unavailable(path, exc) from exc
        reply = receive(sock, path)
    try:
        return decode(reply)
    except ValueError as exc:
        raise unavailable(path, OSError(errno.EPROTO, f"bad reply: {exc}")) from None
