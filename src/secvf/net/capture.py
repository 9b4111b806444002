"""The client side of capture: live streams and the ring dump from a network's switch.

Usage::

    with open_capture(netdir) as stream:
        for item in stream:
            if isinstance(item, Interfaces): ...   # first item, and when ports change
            elif isinstance(item, Frame): ...      # ts_ns, interface, data
            else: ...                              # Dropped: frames this client missed

    interfaces, frames = read_ring(netdir)

The stream yields :class:`Interfaces` first (the reply to ``capture``), then what the
switch sends. It ends when the switch closes the connection (it stopped or restarted).
:class:`Frame` is a NamedTuple because one is made per captured frame.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

from secvf.net.config import NetPaths
from secvf.net.control import (
    DEFAULT_TIMEOUT_S,
    FRAME_HEADER,
    FRAME_PREFIX_BYTES,
    FRAME_TAG,
    MAX_MESSAGE_BYTES,
    MAX_REPLY_BYTES,
    OP_CAPTURE,
    OP_DROPPED,
    OP_END,
    OP_INTERFACES,
    OP_RING,
    SwitchUnavailable,
    connect,
    decode,
    encode,
    receive,
    unavailable,
)

FRAME_BYTE = FRAME_TAG[0]


@dataclass(frozen=True)
class Interface:
    """One port as a capture interface; ``index`` is never reused within a capture."""

    index: int
    port: str
    vm: str
    nic: int
    mac: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Interface:
        """Parse an interface object of the control protocol."""
        return cls(int(data["index"]), str(data["port"]), str(data["vm"]), int(data["nic"]),
                   str(data["mac"]))


@dataclass(frozen=True)
class Interfaces:
    """The interfaces a capture covers now (every earlier index stays valid)."""

    interfaces: tuple[Interface, ...]


class Frame(NamedTuple):
    """One captured frame."""

    ts_ns: int  # wall-clock time the switch accepted it, ns since the epoch
    interface: int  # its interface's index (Interface.index)
    data: bytes  # the Ethernet frame


@dataclass(frozen=True)
class Dropped:
    """The switch dropped frames for this client; ``total`` counts all since it began."""

    total: int


CaptureItem = Interfaces | Frame | Dropped


def parse_message(message: bytes) -> CaptureItem | dict[str, Any]:
    """A capture message as an item, or the JSON object if it is another message.

    Raises:
        ValueError: a message that is neither a frame nor a JSON object.
    """
    if message[0] == FRAME_BYTE:
        if len(message) < FRAME_PREFIX_BYTES:
            raise ValueError(f"frame message of {len(message)} bytes")
        ts_ns, index = FRAME_HEADER.unpack_from(message, 1)
        return Frame(ts_ns, index, message[FRAME_PREFIX_BYTES:])
    obj = decode(message)
    if obj.get("op") == OP_INTERFACES:
        return _interfaces(obj)
    if obj.get("op") == OP_DROPPED:
        return Dropped(int(obj["total"]))
    return obj


def _interfaces(obj: dict[str, Any]) -> Interfaces:
    return Interfaces(tuple(Interface.from_json(i) for i in obj.get("interfaces", [])))


class CaptureStream:
    """A live capture connection (see the module docstring); a context manager."""

    def __init__(self, sock: socket.socket, path: Path, interfaces: Interfaces) -> None:
        self._sock = sock
        self._path = path
        self.interfaces = interfaces  # the list the switch replied with

    def __repr__(self) -> str:
        return f"CaptureStream({str(self._path)!r}, interfaces={len(self.interfaces.interfaces)})"

    def __enter__(self) -> CaptureStream:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __iter__(self) -> Iterator[CaptureItem]:
        yield self.interfaces
        while (item := self.read()) is not None:
            yield item

    def read(self, timeout: float | None = None) -> CaptureItem | None:
        """The next item; None once the switch has closed the stream.

        Raises:
            TimeoutError: nothing arrived within ``timeout`` seconds (None: wait forever).
            ValueError: the switch sent a message that is not part of a capture.
        """
        self._sock.settimeout(timeout)
        while True:
            message = self._sock.recv(MAX_MESSAGE_BYTES)
            if not message:
                return None
            item = parse_message(message)
            if not isinstance(item, dict):
                return item

    def fileno(self) -> int:
        """The socket's fd, for ``select``."""
        return self._sock.fileno()

    def close(self) -> None:
        """End the capture."""
        self._sock.close()


def open_capture(netdir: Path, ports: list[str] | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S) -> CaptureStream:
    """Start capturing ``ports`` (names; None for every port, including later ones).

    Raises:
        SwitchUnavailable: no switch answered, or it refused the request.
    """
    path = NetPaths(netdir).control
    sock = connect(netdir, timeout)
    try:
        reply = _request(sock, path, {"op": OP_CAPTURE, "ports": ports})
    except BaseException:
        sock.close()
        raise
    return CaptureStream(sock, path, _interfaces(reply))


def read_ring(netdir: Path, timeout: float = DEFAULT_TIMEOUT_S
              ) -> tuple[list[Interface], list[Frame]]:
    """The switch's ring: the interfaces it refers to and its frames, oldest first.

    Raises:
        SwitchUnavailable: no switch answered, or the dump ended early.
    """
    path = NetPaths(netdir).control
    with connect(netdir, timeout) as sock:
        interfaces = list(_interfaces(_request(sock, path, {"op": OP_RING})).interfaces)
        frames = []
        while True:
            item = parse_message(receive(sock, path, MAX_MESSAGE_BYTES))
            if isinstance(item, Frame):
                frames.append(item)
            elif isinstance(item, dict) and item.get("op") == OP_END:
                return interfaces, frames


def _request(sock: socket.socket, path: Path, request: dict[str, Any]) -> dict[str, Any]:
    try:
        sock.send(encode(request))
    except OSError as exc:
        raise unavailable(path, exc) from exc
    reply = decode(receive(sock, path, MAX_REPLY_BYTES))
    if not reply.get("ok"):
        raise SwitchUnavailable(errno.EINVAL, f"the switch refused {request['op']}: "
                                f"{reply.get('error')}", str(path))
    return reply
