"""FrameReader: frames received into one reused buffer, bodies handed out as views."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import socket
import threading
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secvf.exec import protocol
from secvf.exec.protocol import (
    HEADER,
    HEADER_BYTES,
    MAGIC,
    BadFrame,
    BadMessage,
    FrameDecoder,
    FrameReader,
    FrameTooLarge,
    FrameType,
)

DATA_TYPES = sorted(protocol.DATA_FRAME_TYPES)
RECV_BYTES = st.one_of(st.integers(1, 64), st.sampled_from([4096, 64 * 1024, 256 * 1024]))


class FakeSocket:
    """``recv_into`` over ``stream``, giving ``size(room)`` bytes a call; at the end it
    returns 0 (EOF) or raises ``error``."""

    def __init__(
        self,
        stream: bytes,
        size: Callable[[int], int] = lambda room: room,
        error: OSError | None = None,
    ) -> None:
        self.stream, self.size, self.error = stream, size, error
        self.pos = self.calls = 0

    def recv_into(self, room: memoryview) -> int:
        assert len(room) > 0, "an empty room would read as EOF"
        self.calls += 1
        if self.pos == len(self.stream) and self.error is not None:
            raise self.error
        n = min(self.size(len(room)), len(self.stream) - self.pos)
        room[:n] = self.stream[self.pos : self.pos + n]
        self.pos += n
        return n


def _read(reader: FrameReader) -> list[tuple[FrameType, int, int, bytes]]:
    """Every frame, its body copied while the view is still valid."""
    return [(f.type, f.flags, f.stream_id, bytes(f.body)) for f in reader.frames()]


@st.composite
def wire_frames(draw: st.DrawFn) -> bytes:
    stream_id = draw(st.integers(0, protocol.MAX_STREAM_ID))
    kind = draw(st.sampled_from(["data", "data", "ping", "exec", "error"]))
    if kind == "ping":
        return protocol.encode_message("ping", stream_id)
    if kind == "exec":
        argv = draw(st.lists(st.text(max_size=20), min_size=1, max_size=4))
        return protocol.encode_message("exec", stream_id, argv=argv)
    if kind == "error":
        return protocol.encode_error_frame("bad_frame", draw(st.text(max_size=50)), stream_id)
    # near the buffer's initial size, a data chunk and the top size, or anywhere up to it
    if draw(st.booleans()):
        near = draw(st.sampled_from([0, 64, 16 * 1024, 64 * 1024, 300 * 1024]))
        size = max(0, near + draw(st.integers(-64, 64)))
    else:
        size = draw(st.integers(0, 300 * 1024))
    body = random.Random(draw(st.integers(0, 2**32))).randbytes(size)
    flags = draw(st.sampled_from([0, protocol.FLAG_START, protocol.FLAG_END, 3]))
    return protocol.encode_data(draw(st.sampled_from(DATA_TYPES)), stream_id, body, flags)


@settings(max_examples=150, deadline=None)
@given(st.lists(wire_frames(), max_size=8), st.randoms(), RECV_BYTES)
def test_frames_come_out_whole_and_in_order_whatever_the_receive_sizes(wires, rng, recv_bytes):
    stream = b"".join(wires)
    expected = [(FrameType(t), flags, sid, w[HEADER_BYTES:]) for w in wires
                for _, t, flags, sid, _ in [HEADER.unpack_from(w)]]  # fmt: skip
    sock = FakeSocket(stream, lambda room: rng.choice([1, rng.randint(1, room), room]))
    reader = FrameReader(sock.recv_into, recv_bytes=recv_bytes)
    assert _read(reader) == expected
    assert [(f.type, f.flags, f.stream_id, f.body) for f in FrameDecoder().feed(stream)] == expected
    assert reader.at_frame_boundary and sock.pos == len(stream)


def test_a_body_view_is_released_when_the_next_frame_is_asked_for():
    stream = b"".join(protocol.encode_data(FrameType.STDOUT, 1, b) for b in (b"first", b"second"))
    frames = FrameReader(FakeSocket(stream).recv_into).frames()
    first = next(frames).body
    assert first == b"first"
    second = next(frames).body
    with pytest.raises(ValueError):
        bytes(first)
    assert second == b"second"
    assert next(frames, None) is None
    with pytest.raises(ValueError):
        bytes(second)


@pytest.mark.parametrize("recv_bytes", [1, 5000, 256 * 1024])
@pytest.mark.parametrize("piece", [None, 7001, 1 << 20])
def test_the_buffer_holds_at_most_a_header_a_max_body_and_one_receive(recv_bytes, piece):
    limit = 64 * 1024
    body = random.Random(0).randbytes(limit)
    stream = protocol.encode_data(FrameType.FILE_DATA, 1, body) * 20
    size = (lambda room: room) if piece is None else (lambda room: min(room, piece))
    reader = FrameReader(FakeSocket(stream, size).recv_into, limit, recv_bytes)
    # _buffer is private, but the bound is the reader's documented memory promise (what a
    # hostile peer can make the agent hold) and nothing public exposes the buffer's size.
    buffer = reader._buffer
    bound = max(FrameReader.INITIAL_BYTES, HEADER_BYTES + limit + recv_bytes)
    count = 0
    for frame in reader.frames():
        assert frame.body == body
        assert len(reader._buffer) <= bound
        count += 1
    assert count == 20 and reader._buffer is buffer


@pytest.mark.parametrize(
    "bad, error, fragment",
    [
        (b"GET / HTTP/1.1\r\n", BadFrame, "bad magic"),
        (HEADER.pack(MAGIC, 0x55, 0, 0, 0), BadFrame, "unknown frame type"),
        (HEADER.pack(MAGIC, FrameType.CONTROL, 0x80, 0, 0), BadFrame, "unknown flag"),
        (HEADER.pack(MAGIC, FrameType.STDOUT, 0, 1, 100), FrameTooLarge, "exceeds the limit"),
    ],
)
def test_corrupt_streams_raise_as_the_decoder_does(bad, error, fragment):
    stream = protocol.encode_message("ping") + bad + bytes(200)
    got = []
    with pytest.raises(error, match=fragment):
        for frame in FrameReader(FakeSocket(stream).recv_into, max_frame_bytes=99).frames():
            got.append(frame.type)
    assert got == [FrameType.CONTROL]
    with pytest.raises(error, match=fragment):
        FrameDecoder(max_frame_bytes=99).feed(stream)


@pytest.mark.parametrize("piece", [1, 2])
def test_bad_magic_is_raised_from_two_bytes_before_more_is_received(piece):
    sock = FakeSocket(b"XX" + bytes(100), lambda room: piece)
    with pytest.raises(BadFrame, match="bad magic"):
        next(FrameReader(sock.recv_into).frames())
    assert sock.pos == 2 and sock.calls == 2 // piece


@pytest.mark.parametrize("piece", [1, 5, HEADER_BYTES])
def test_an_oversized_length_raises_before_the_body_is_received(piece):
    limit = protocol.MAX_FRAME_BYTES
    header = HEADER.pack(MAGIC, FrameType.STDOUT, 0, 1, limit + 1)
    sock = FakeSocket(header + bytes(limit + 1), lambda room: min(room, piece))
    reader = FrameReader(sock.recv_into)
    with pytest.raises(FrameTooLarge) as info:
        next(reader.frames())
    assert (info.value.size, info.value.limit) == (limit + 1, limit)
    # asked no more once the header was in (a receive may bring body bytes along with it)
    assert sock.calls == -(-HEADER_BYTES // piece) and sock.pos == sock.calls * piece
    assert len(reader._buffer) == FrameReader.INITIAL_BYTES  # private: nothing grew for it


def test_a_frame_at_exactly_the_limit_is_read():
    stream = protocol.encode_data(FrameType.FILE_DATA, 1, b"x" * 1000)
    assert _read(FrameReader(FakeSocket(stream).recv_into, max_frame_bytes=1000)) == [
        (FrameType.FILE_DATA, 0, 1, b"x" * 1000)
    ]


@pytest.mark.parametrize("stream", [b"", protocol.encode_message("ping") * 3])
def test_the_frames_end_at_a_clean_eof(stream):
    reader = FrameReader(FakeSocket(stream).recv_into)
    assert len(_read(reader)) == len(stream) // len(protocol.encode_message("ping"))
    assert reader.at_frame_boundary


@pytest.mark.parametrize("cut", [1, 2, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 4])
def test_eof_inside_a_frame_ends_the_frames_off_a_boundary(cut):
    partial = protocol.encode_data(FrameType.STDIN, 1, b"hello")[:cut]
    reader = FrameReader(FakeSocket(protocol.encode_message("ping") + partial).recv_into)
    assert [t for t, *_ in _read(reader)] == [FrameType.CONTROL]
    assert not reader.at_frame_boundary


@pytest.mark.parametrize(
    "error", [ConnectionResetError(errno.ECONNRESET, "reset"), OSError(errno.EIO, "io"),
              TimeoutError("timed out")],
)  # fmt: skip
def test_a_receive_error_propagates(error):
    sock = FakeSocket(protocol.encode_message("ping"), error=error)
    got = []
    with pytest.raises(type(error)) as info:
        for frame in FrameReader(sock.recv_into).frames():
            got.append(frame.type)
    assert info.value is error and got == [FrameType.CONTROL]


@pytest.mark.parametrize(
    "wire",
    [
        protocol.encode_message("ping"),
        protocol.encode_message("exec", 5, argv=["true", "é"]),
        protocol.encode_error_frame("busy", "no", 2),
    ],
)
def test_decode_message_reads_a_frame_view_like_a_frame(wire):
    (frame,) = FrameDecoder().feed(wire)
    for view in FrameReader(FakeSocket(wire).recv_into).frames():
        assert isinstance(view.body, memoryview)
        assert protocol.decode_message(view) == protocol.decode_message(frame)


def test_decode_message_rejects_a_bad_view_body_like_a_bad_frame_body():
    wire = protocol.encode_frame(FrameType.CONTROL, 0, b"\xff{")
    for view in FrameReader(FakeSocket(wire).recv_into).frames():
        with pytest.raises(BadMessage, match="not UTF-8 JSON"):
            protocol.decode_message(view)


# -- splicing the rest of large STDIN bodies -------------------------------------------


def _spliced_stream(frames: list[bytes]) -> tuple[socket.socket, FrameReader, threading.Thread]:
    """A reader over a real socket pair (splice needs real descriptors), fed ``frames`` by
    a thread that closes its end afterwards."""
    ours, theirs = socket.socketpair()

    def send() -> None:
        with theirs:
            theirs.sendall(b"".join(frames))

    sender = threading.Thread(target=send)
    sender.start()
    return ours, FrameReader(ours.recv_into, recv_bytes=4096, splice_from=ours.fileno()), sender


def _drain(fd: int, into: bytearray) -> None:
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 1 << 20):
            into.extend(chunk)


def test_the_rest_of_a_large_stdin_body_is_spliced_into_a_pipe():
    bodies = [bytes([i]) * (300_000 + i) for i in range(3)]
    frames = [protocol.encode_message("ping")]
    frames += [protocol.encode_data(FrameType.STDIN, 5, body) for body in bodies]
    frames.append(protocol.encode_message("ping"))
    sock, reader, sender = _spliced_stream(frames)
    pipe_r, pipe_w = os.pipe()
    os.set_blocking(pipe_r, False)
    os.set_blocking(pipe_w, False)
    got, kinds, spliced = [], [], 0
    with sock:
        for frame in reader.frames():
            kinds.append(frame.type)
            if frame.type is not FrameType.STDIN:
                continue
            received = bytearray(frame.body)
            while reader.rest:
                reader.wait_for_rest()
                with contextlib.suppress(BlockingIOError):
                    spliced += reader.splice_rest(pipe_w)
                _drain(pipe_r, received)
            got.append(bytes(received))
    sender.join()
    assert kinds == [FrameType.CONTROL, *[FrameType.STDIN] * 3, FrameType.CONTROL]
    assert got == bodies
    assert spliced > sum(map(len, bodies)) * 0.9  # nearly all of it went kernel to kernel


def test_a_rest_the_consumer_leaves_is_dropped_and_the_next_frames_still_come():
    frames = [protocol.encode_data(FrameType.STDIN, 5, b"x" * 200_000),
              protocol.encode_data(FrameType.STDOUT, 6, b"y" * 200_000),
              protocol.encode_message("ping")]  # fmt: skip
    sock, reader, sender = _spliced_stream(frames)
    with sock:
        seen = [(f.type, f.rest > 0, bytes(f.body)[:1]) for f in reader.frames()]
    sender.join()
    assert seen[0][:2] == (FrameType.STDIN, True)  # only STDIN is left on the socket
    assert seen[1] == (FrameType.STDOUT, False, b"y")
    assert seen[2][0] is FrameType.CONTROL


def test_receive_rest_hands_the_rest_over_in_pieces():
    body = bytes(range(256)) * 1000
    sock, reader, sender = _spliced_stream([protocol.encode_data(FrameType.STDIN, 5, body)])
    with sock:
        for frame in reader.frames():
            received = bytearray(frame.body)
            for piece in reader.receive_rest():
                received += piece
    sender.join()
    assert bytes(received) == body


def test_receiving_the_rest_leaves_the_frames_body_view_intact():
    body = random.Random(7).randbytes(256_000)
    sock, reader, sender = _spliced_stream([protocol.encode_data(FrameType.STDIN, 5, body)])
    with sock:
        for frame in reader.frames():
            first = bytes(frame.body)
            pieces = [bytes(piece) for piece in reader.receive_rest()]
            assert bytes(frame.body) == first  # still the body's start, not the rest
    sender.join()
    assert first + b"".join(pieces) == body


def test_the_peer_closing_inside_a_spliced_body_ends_the_frames():
    whole = protocol.encode_data(FrameType.STDIN, 5, b"z" * 100_000)
    sock, reader, sender = _spliced_stream([whole[:50_000]])
    pipe_r, pipe_w = os.pipe()
    os.set_blocking(pipe_w, False)
    moved, frames = [], 0
    with sock:
        for frame in reader.frames():
            frames += 1
            moved.append(len(frame.body))
            while reader.rest:
                reader.wait_for_rest()
                moved.append(reader.splice_rest(pipe_w))
                if moved[-1] == 0:
                    break
    sender.join()
    assert frames == 1 and moved[-1] == 0  # EOF seen, and no further frame
    assert sum(moved) == 50_000 - HEADER_BYTES
