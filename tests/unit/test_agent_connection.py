"""The agent's Connection.send_parts: every byte, in order, across partial sendmsg calls."""

from __future__ import annotations

import pytest

from secvf.exec import protocol
from secvf.guest.agent.connection import Connection, ConnectionGone


class _TrickleSocket:
    """A socket whose sendmsg takes at most ``step`` bytes per call."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.sent = bytearray()
        self.calls = 0

    def sendmsg(self, buffers: list[memoryview]) -> int:
        self.calls += 1
        room = self.step
        for buf in buffers:
            take = bytes(buf[:room])
            self.sent += take
            room -= len(take)
            if not room:
                break
        return self.step - room


def test_send_parts_writes_every_byte_in_order_across_partial_sends() -> None:
    data = bytes(range(256)) * 600
    parts = protocol.data_frame_parts(protocol.FrameType.STDOUT, 3, data)
    sock = _TrickleSocket(step=10_007)
    Connection(sock).send_parts(parts)  # type: ignore[arg-type]
    assert bytes(sock.sent) == b"".join(bytes(p) for p in parts)
    assert sock.calls > 1


def test_send_parts_on_a_broken_socket_raises_connection_gone() -> None:
    class Broken:
        def sendmsg(self, buffers: list[memoryview]) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    conn = Connection(Broken())  # type: ignore[arg-type]
    with pytest.raises(ConnectionGone):
        conn.send_parts([b"x"])
    assert conn.broken
