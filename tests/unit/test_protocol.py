"""secvf.exec.protocol: framing, validation, decoder limits, stdlib-only rule."""

from __future__ import annotations

import ast
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from secvf.exec import protocol
from secvf.exec.protocol import (
    FLAG_END,
    FLAG_START,
    HEADER,
    MAGIC,
    MAX_FRAME_BYTES,
    BadFrame,
    BadMessage,
    Frame,
    FrameDecoder,
    FrameTooLarge,
    FrameType,
    UnknownMessage,
    UnsupportedGeneration,
)
from secvf.image.agent_zipapp import agent_zipapp
from secvf.testing.agent import GUEST_LIKE_PYTHON

PROTOCOL_SOURCE = Path(protocol.__file__)
AGENT_MODULES = sorted((PROTOCOL_SOURCE.parent.parent / "guest" / "agent").glob("*.py"))


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_protocol_imports_only_the_standard_library():
    outside = _imported_modules(PROTOCOL_SOURCE) - set(sys.stdlib_module_names) - {"__future__"}
    assert outside == set()


def _secvf_imports(path: Path) -> set[tuple[str, str]]:
    """(module, name) for every ``from secvf… import name`` and ``import secvf…`` in ``path``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update((a.name, "") for a in node.names if a.name.split(".")[0] == "secvf")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "secvf":
            found.update((node.module, a.name) for a in node.names)
    return found


@pytest.mark.parametrize("module", AGENT_MODULES, ids=lambda path: path.stem)
def test_agent_module_imports_only_the_standard_library_protocol_and_agent(module: Path):
    allowed = set(sys.stdlib_module_names) | {"__future__", "secvf"}
    assert _imported_modules(module) - allowed == set()
    agent = {"secvf.guest.agent"} | {f"secvf.guest.agent.{m.stem}" for m in AGENT_MODULES}
    allowed_secvf = agent | {"secvf.exec.protocol", "secvf.exec.forwarding",
                             "secvf.guest.restore_watch"}  # what the zipapp holds
    outside = {(m, n) for m, n in _secvf_imports(module)
               if m not in allowed_secvf and f"{m}.{n}" not in allowed_secvf}
    assert outside == set()


def test_the_restore_watch_is_one_standard_library_file():
    # it is copied alone into every image: nothing of secvf, nothing third-party
    watch = PROTOCOL_SOURCE.parent.parent / "guest" / "restore_watch.py"
    allowed = set(sys.stdlib_module_names) | {"__future__"}
    assert _imported_modules(watch) - allowed == set()


def test_the_agent_is_a_package_of_several_modules():
    assert {m.stem for m in AGENT_MODULES} >= {"__init__", "__main__", "session", "server"}


def test_agent_zipapp_runs_with_python_isolated_from_an_empty_directory(tmp_path: Path):
    app = tmp_path / "agent.pyz"
    app.write_bytes(agent_zipapp())
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([GUEST_LIKE_PYTHON, "-I", str(app), "--help"], cwd=empty,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "SecVF guest exec agent" in proc.stdout and "--unix PATH" in proc.stdout


def test_constant_relations():
    assert protocol.DATA_CHUNK_BYTES <= MAX_FRAME_BYTES
    assert protocol.AGENT_SILENCE_TIMEOUT_S >= 3 * protocol.KEEPALIVE_INTERVAL_S
    assert protocol.HEADER_BYTES == 12
    assert protocol.MIN_GENERATION <= protocol.GENERATION


# --------------------------------------------------------------------------- frames


def test_frame_round_trip_through_the_decoder():
    data = protocol.encode_data(FrameType.STDOUT, 7, b"\x00\xffbinary", FLAG_END)
    assert FrameDecoder().feed(data) == [Frame(FrameType.STDOUT, FLAG_END, 7, b"\x00\xffbinary")]


def test_decoder_is_incremental_byte_by_byte():
    stream = protocol.encode_message("ping") + protocol.encode_data(FrameType.STDIN, 3, b"abc")
    decoder = FrameDecoder()
    frames = [f for i in range(len(stream)) for f in decoder.feed(stream[i : i + 1])]
    assert [f.type for f in frames] == [FrameType.CONTROL, FrameType.STDIN]
    assert decoder.at_frame_boundary


def test_oversized_header_is_rejected_before_the_body_arrives():
    header = HEADER.pack(MAGIC, FrameType.STDOUT, 0, 1, MAX_FRAME_BYTES + 1)
    decoder = FrameDecoder()
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(header)
    assert (info.value.size, info.value.limit) == (MAX_FRAME_BYTES + 1, MAX_FRAME_BYTES)
    assert decoder.buffered_bytes == 0


def test_frame_at_exactly_the_limit_is_accepted():
    body = b"x" * MAX_FRAME_BYTES
    (frame,) = FrameDecoder().feed(protocol.encode_data(FrameType.FILE_DATA, 1, body))
    assert len(frame.body) == MAX_FRAME_BYTES


def test_encoder_refuses_oversized_bodies():
    with pytest.raises(FrameTooLarge):
        protocol.encode_frame(FrameType.STDOUT, 1, b"x" * (MAX_FRAME_BYTES + 1))


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"GET / HTTP/1.1\r\n", "bad magic"),
        (HEADER.pack(MAGIC, 0x55, 0, 0, 0), "unknown frame type"),
        (HEADER.pack(MAGIC, FrameType.CONTROL, 0x80, 0, 0), "unknown flag"),
    ],
)
def test_bad_headers(data, fragment):
    with pytest.raises(BadFrame, match=fragment):
        FrameDecoder().feed(data)


def test_decoder_stays_failed_after_an_error():
    decoder = FrameDecoder()
    with pytest.raises(BadFrame):
        decoder.feed(b"XX")
    with pytest.raises(BadFrame, match="already failed"):
        decoder.feed(protocol.encode_message("ping"))


def test_message_flags_follow_stream_position():
    (opens,) = FrameDecoder().feed(protocol.encode_message("exec", 1, argv=["true"]))
    (ends,) = FrameDecoder().feed(protocol.encode_message("exit", 1, code=0))
    (within,) = FrameDecoder().feed(protocol.encode_message("started", 1, pid=5))
    assert (opens.flags, ends.flags, within.flags) == (FLAG_START, FLAG_END, 0)
    assert ends.ends_stream and not within.ends_stream


# --------------------------------------------------------------------------- messages


def _decode(data: bytes) -> protocol.Message:
    (frame,) = FrameDecoder().feed(data)
    return protocol.decode_message(frame)


def test_defaults_are_filled_in():
    msg = _decode(protocol.encode_message("exec", 4, shell="echo hi"))
    assert msg.name == "exec" and msg.stream_id == 4
    assert msg["argv"] is None and msg["env"] == {} and msg["tty"] is False
    assert (msg["rows"], msg["cols"], msg["timeout_s"], msg["user"]) == (24, 80, None, None)


def test_unknown_payload_fields_from_newer_peers_are_ignored():
    body = b'{"v":2,"t":"started","p":{"pid":9,"cgroup":"x"}}'
    msg = protocol.decode_message(Frame(FrameType.CONTROL, 0, 1, body))
    assert msg.payload == {"pid": 9} and msg.generation == 2


def test_senders_cannot_add_unknown_fields():
    with pytest.raises(BadMessage, match="unknown field"):
        protocol.encode_message("started", 1, pid=3, extra=1)


@pytest.mark.parametrize(
    "body, error",
    [
        (b"\xff\xfe", BadMessage),
        (b"[1,2]", BadMessage),
        (b'{"v":true,"t":"ping","p":{}}', BadMessage),
        (b'{"v":1,"t":7,"p":{}}', BadMessage),
        (b'{"v":1,"t":"ping","p":[]}', BadMessage),
        (b'{"v":1,"t":"nope","p":{}}', UnknownMessage),
        (b'{"v":1,"t":"started","p":{}}', BadMessage),
        (b'{"v":1,"t":"started","p":{"pid":true}}', BadMessage),
        (b'{"v":1,"t":"exec","p":{"env":{"A":1}}}', BadMessage),
        (b'{"v":1,"t":"error","p":{"code":"x"}}', BadMessage),  # error outside ERROR frame
    ],
)
def test_invalid_bodies(body, error):
    with pytest.raises(error):
        protocol.decode_message(Frame(FrameType.CONTROL, 0, 0, body))


def test_data_frames_have_no_json_body():
    with pytest.raises(BadMessage):
        protocol.decode_message(Frame(FrameType.STDOUT, 0, 1, b"{}"))


def test_error_frame_helper():
    msg = _decode(protocol.encode_error_frame("refused", "not on the allowlist"))
    assert (msg.name, msg["code"], msg["message"]) == ("error", "refused", "not on the allowlist")


def test_generation_negotiation():
    assert protocol.negotiate_generation(protocol.GENERATION + 5) == protocol.GENERATION
    assert protocol.negotiate_generation(protocol.MIN_GENERATION) == protocol.MIN_GENERATION
    with pytest.raises(UnsupportedGeneration):
        protocol.negotiate_generation(protocol.MIN_GENERATION - 1)


@pytest.mark.parametrize("chunk", [1000, protocol.DATA_CHUNK_BYTES, protocol.STDIN_FRAME_BYTES])
def test_data_frame_parts_are_the_same_bytes_as_chunked_frames(chunk):
    data = bytes(range(256)) * 2100  # 8.2 chunks of 64 KiB, 2.05 of 256 KiB
    parts = protocol.data_frame_parts(FrameType.STDOUT, 9, memoryview(data), chunk)
    view = memoryview(data)
    expected = b"".join(
        protocol.encode_data(FrameType.STDOUT, 9, bytes(view[i : i + chunk]))
        for i in range(0, len(data), chunk)
    )
    assert b"".join(bytes(part) for part in parts) == expected
    assert protocol.data_frame_parts(FrameType.STDOUT, 9, b"") == []
    with pytest.raises(ValueError):
        protocol.data_frame_parts(FrameType.CONTROL, 9, data)
    with pytest.raises(ValueError, match="frames carry"):
        protocol.data_frame_parts(FrameType.STDIN, 9, data, protocol.MAX_FRAME_BYTES + 1)


def test_sendmsg_all_sends_every_part_in_order_over_a_small_socket_buffer():
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # forces partial sendmsg calls
    data = bytes(range(256)) * 4000
    parts = protocol.data_frame_parts(FrameType.STDIN, 3, data, 100_000)
    received = bytearray()

    def drain() -> None:
        while chunk := b.recv(65536):
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    protocol.sendmsg_all(a, parts)
    a.close()
    reader.join()
    b.close()
    assert bytes(received) == b"".join(bytes(part) for part in parts)


def test_decoder_returns_every_frame_of_one_feed_and_keeps_the_partial_rest():
    frames = [protocol.encode_data(FrameType.STDIN, 1, bytes([i]) * 70_000) for i in range(4)]
    stream = b"".join(frames)
    decoder = FrameDecoder()
    got = decoder.feed(stream[:-5])
    assert [f.body for f in got] == [bytes([i]) * 70_000 for i in range(3)]
    assert decoder.buffered_bytes == len(frames[3]) - 5 and not decoder.at_frame_boundary
    (last,) = decoder.feed(stream[-5:])
    assert last.body == bytes([3]) * 70_000 and decoder.at_frame_boundary
