"""Where accepted frames go besides their destination: capture clients and the ring.

A capture client is a control connection that sent ``{"op": "capture"}``. The switch
writes one ``F`` message per frame to it with a non-blocking ``send``; when the
client's socket is full the frame is dropped for that client only and counted, and
``{"op": "dropped", "total": n}`` is sent once there is room again. Messages the client
must not miss (a new interface list, the drop report) are kept and sent before the
next frame, so a slow reader loses frames but never the meaning of an index.

The ring is a bounded deque of the last ``ring_frames`` accepted frames, always on, so
``secvf net`` can show what just happened without a capture having been running.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Iterable
from typing import Any

from secvf.net.control import FRAME_HEADER, FRAME_TAG, OP_DROPPED, OP_INTERFACES, encode

CAPTURE_SNDBUF_BYTES = 4 << 20
RingEntry = tuple[int, int, bytes]  # ts_ns, interface index, frame


def frame_message(ts_ns: int, index: int, frame: bytes) -> bytes:
    """The ``F`` message for one frame."""
    return FRAME_TAG + FRAME_HEADER.pack(ts_ns, index) + frame


class CaptureClient:
    """One capture connection (a :class:`secvf.net.engine.Tap`)."""

    __slots__ = ("sock", "ports", "dropped", "reported", "announce", "announced", "broken")

    def __init__(self, sock: socket.socket, ports: frozenset[str] | None) -> None:
        self.sock = sock
        self.ports = ports  # port names wanted, None for all
        self.dropped = 0  # frames dropped for this client because its socket was full
        self.reported = 0  # the total last sent in a "dropped" message
        self.announce: bytes | None = None  # an interfaces message not sent yet
        self.announced: set[int] = set()  # interface indexes this client has been told of
        self.broken = False  # a send failed with something other than "full"
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CAPTURE_SNDBUF_BYTES)
        except OSError:
            pass  # the default buffer still works, with more drops

    def __repr__(self) -> str:
        return f"CaptureClient(fd={self.sock.fileno()}, ports={self.ports}, dropped={self.dropped})"

    def wants(self, port: str) -> bool:
        """True if this client captures port ``port``."""
        return self.ports is None or port in self.ports

    def interfaces(self, interfaces: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """The subset of ``interfaces`` this client captures."""
        return [i for i in interfaces if self.wants(i["port"])]

    def update(self, interfaces: Iterable[dict[str, Any]]) -> None:
        """Tell the client the current interface list if it holds an index it has not seen
        or lost one; sent before the next frame."""
        mine = self.interfaces(interfaces)
        indexes = {i["index"] for i in mine}
        if indexes != self.announced:
            self.announced = indexes
            self.announce = encode({"op": OP_INTERFACES, "interfaces": mine})
            self.flush()

    def push(self, message: bytes) -> None:
        """Send one frame message, or drop and count it; never blocks, never raises."""
        if (self.announce is not None or self.dropped != self.reported) and not self.flush():
            self.dropped += 1
            return
        try:
            self.sock.send(message)
        except BlockingIOError:
            self.dropped += 1
        except OSError:
            self.broken = True

    def flush(self) -> bool:
        """Send what must precede the next frame; True once nothing is owed."""
        try:
            if self.announce is not None:
                self.sock.send(self.announce)
                self.announce = None
            if self.dropped != self.reported:
                total = self.dropped
                self.sock.send(encode({"op": OP_DROPPED, "total": total}))
                self.reported = total
        except BlockingIOError:
            return False
        except OSError:
            self.broken = True
            return False
        return True


class Ring:
    """The last ``capacity`` accepted frames, oldest first."""

    __slots__ = ("frames",)

    def __init__(self, capacity: int) -> None:
        self.frames: deque[RingEntry] = deque(maxlen=capacity)

    def __repr__(self) -> str:
        return f"Ring({len(self.frames)}/{self.frames.maxlen})"

    def resize(self, capacity: int) -> None:
        """Change the capacity, keeping the newest frames."""
        if capacity != self.frames.maxlen:
            self.frames = deque(self.frames, maxlen=capacity)

    def indexes(self) -> set[int]:
        """The interface indexes of the frames held."""
        return {index for _, index, _ in self.frames}

    def stats(self) -> dict[str, int]:
        """The ``ring`` object of the ``stats`` reply."""
        return {"frames": len(self.frames), "capacity": self.frames.maxlen or 0}
