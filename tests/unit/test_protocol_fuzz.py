"""Hypothesis fuzzing of the frame decoder and the message parser."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from secvf.exec import protocol
from secvf.exec.protocol import (
    HEADER,
    HEADER_BYTES,
    MAGIC,
    Frame,
    FrameDecoder,
    FrameType,
    ProtocolViolation,
)

SMALL_LIMIT = 4096

frames = st.builds(
    Frame,
    type=st.sampled_from(list(FrameType)),
    flags=st.sampled_from([0, protocol.FLAG_START, protocol.FLAG_END, 3]),
    stream_id=st.integers(0, protocol.MAX_STREAM_ID),
    body=st.binary(max_size=600),
)


def _encode(frame: Frame) -> bytes:
    return protocol.encode_frame(frame.type, frame.stream_id, frame.body, frame.flags)


@given(st.lists(frames, max_size=8), st.data())
def test_any_split_of_valid_frames_decodes_to_the_same_frames(items, data):
    stream = b"".join(_encode(f) for f in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = FrameDecoder()
    out = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out.extend(decoder.feed(stream[start:end]))
    assert out == items
    assert decoder.at_frame_boundary


@settings(max_examples=400)
@given(st.lists(st.binary(max_size=200), max_size=10))
def test_arbitrary_bytes_only_raise_protocol_violations_and_stay_bounded(chunks):
    decoder = FrameDecoder(max_frame_bytes=SMALL_LIMIT)
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            assert decoder.buffered_bytes <= HEADER_BYTES + SMALL_LIMIT + 200
    except ProtocolViolation:
        pass


@given(
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
)
def test_any_header_is_accepted_or_rejected_without_buffering_a_huge_body(t, flags, sid, length):
    decoder = FrameDecoder(max_frame_bytes=SMALL_LIMIT)
    try:
        frames = decoder.feed(HEADER.pack(MAGIC, t, flags, sid, length))
    except ProtocolViolation:
        assert decoder.buffered_bytes == 0
    else:
        assert length <= SMALL_LIMIT
        # an empty body completes the frame at once; otherwise only the header is held
        if length == 0:
            assert len(frames) == 1 and decoder.buffered_bytes == 0
        else:
            assert frames == [] and decoder.buffered_bytes == HEADER_BYTES


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)


@settings(max_examples=400)
@given(
    st.sampled_from([*protocol.MESSAGES, "bogus"]),
    st.dictionaries(st.text(max_size=15), json_values, max_size=6),
    json_values,
)
def test_decode_message_only_raises_protocol_violations(name, payload, version):
    body = json.dumps({"v": version, "t": name, "p": payload}).encode()
    frame_type = FrameType.ERROR if name == "error" else FrameType.CONTROL
    try:
        msg = protocol.decode_message(Frame(frame_type, 0, 1, body))
    except ProtocolViolation:
        return
    spec = protocol.MESSAGES[name]
    assert set(msg.payload) == {f.name for f in spec.fields}
    assert all(f.accepts(msg.payload[f.name]) for f in spec.fields)


@given(st.binary(max_size=300))
def test_decode_message_on_random_bodies(body):
    try:
        protocol.decode_message(Frame(FrameType.CONTROL, 0, 0, body))
    except ProtocolViolation:
        pass
