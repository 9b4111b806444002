"""``ExecClient.restore`` against a scripted agent: what it sends, the typed result, the
typed failures, and a hostile agent's answers."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable

import pytest

from secvf.errors import ExecError, ProtocolError, StateError
from secvf.exec import (
    ExecClient,
    RestoreFailed,
    RestoreIssue,
    RestoreResult,
    RestoreShare,
    protocol,
)
from secvf.exec.channel import FrameChannel

Reply = Callable[[protocol.Message], list[bytes]]


class ScriptedAgent:
    """The agent end of a socket pair: records each message and answers with ``reply``."""

    def __init__(self, sock: socket.socket, reply: Reply) -> None:
        self.sock, self.reply = sock, reply
        self.received: list[protocol.Message] = []
        self.received_at: list[int] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        decoder = protocol.FrameDecoder()
        while data := self.sock.recv(1 << 20):
            for frame in decoder.feed(data):
                msg = protocol.decode_message(frame)
                if msg.name == "ping":
                    self.sock.sendall(protocol.encode_message("pong"))
                    continue
                self.received.append(msg)
                self.received_at.append(time.time_ns())
                for out in self.reply(msg):
                    self.sock.sendall(out)


def _client(reply: Reply, capabilities: tuple[str, ...] = ("exec", "restore"),
            generation: int = protocol.GENERATION) -> tuple[ExecClient, ScriptedAgent]:
    host, guest = socket.socketpair()
    agent = ScriptedAgent(guest, reply)
    hello = protocol.Message("hello", {"generation": generation, "software": "scripted",
                                       "capabilities": list(capabilities)}, generation)
    return ExecClient(FrameChannel(host, 5.0), hello), agent


def _restored(**fields: object) -> Reply:
    def reply(msg: protocol.Message) -> list[bytes]:
        return [protocol.encode_message("restored", **{"guest_time_ns": time.time_ns(), **fields})]
    return reply


def test_restore_sends_the_request_and_returns_a_typed_result():
    client, agent = _client(_restored(
        clock_offset_ns=12_500_000_000, reseeded=True, hostname="sbx-1", mac="52:54:00:aa:bb:cc",
        dhcp_restarted=True, tmp_entries_removed=3,
        mounted=[{"tag": "workspace", "path": "/workspace", "read_only": False}]))
    before = time.time_ns()
    result = client.restore(hostname="sbx-1", mac="52:54:00:AA:BB:CC",
                            shares=[("workspace", "/workspace", False),
                                    RestoreShare("ro0", "/data/ref", True)])
    (msg,) = agent.received
    assert msg.name == "restore" and msg.stream_id == 0
    assert before <= msg["time_ns"] <= agent.received_at[0]
    assert len(bytes.fromhex(msg["entropy"])) == 64
    assert msg["mac"] == "52:54:00:aa:bb:cc" and msg["clean_tmp"] is True
    assert msg["shares"] == [{"tag": "workspace", "path": "/workspace", "read_only": False},
                             {"tag": "ro0", "path": "/data/ref", "read_only": True}]
    assert result == RestoreResult(
        clock_offset_s=12.5, clock_skew_s=result.clock_skew_s, reseeded=True, hostname="sbx-1",
        mac="52:54:00:aa:bb:cc", dhcp_restarted=True,
        mounted=(RestoreShare("workspace", "/workspace", False),), tmp_entries_removed=3,
        errors=())
    assert result.ok and abs(result.clock_skew_s) < 1
    assert client.ping() >= 0  # the connection is free again


def test_two_restores_send_different_entropy():
    client, agent = _client(_restored())
    client.restore()
    client.restore(entropy=b"\x01" * 32)
    first, second = (m["entropy"] for m in agent.received)
    assert first != second and second == "01" * 32


def test_item_errors_raise_incomplete_with_the_result_unless_unchecked():
    errors = [{"item": "share:ro0", "message": "cannot mount"}, {"item": "dhcp", "message": "x"}]
    client, _ = _client(_restored(errors=errors, reseeded=True))
    with pytest.raises(RestoreFailed) as err:
        client.restore()
    assert err.value.kind == RestoreFailed.INCOMPLETE
    assert "share:ro0: cannot mount" in str(err.value)
    assert isinstance(err.value.result, RestoreResult) and err.value.result.reseeded
    result = client.restore(check=False)
    assert result.errors == (RestoreIssue("share:ro0", "cannot mount"), RestoreIssue("dhcp", "x"))
    assert not result.ok


def test_restore_failed_is_raised_typed():
    def refuse(msg: protocol.Message) -> list[bytes]:
        return [protocol.encode_message("restore_failed", kind="invalid_request", field="mac",
                                        message="restore.mac: bad")]
    client, _ = _client(refuse)
    with pytest.raises(RestoreFailed) as err:
        client.restore()
    assert (err.value.kind, err.value.field) == ("invalid_request", "mac")
    assert isinstance(err.value, ExecError) and err.value.exit_code == 125
    client.ping()  # a refusal leaves the connection usable


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"hostname": "no_underscores"}, "hostname"),
    ({"mac": "52:54:00:12:34"}, "mac"),
    ({"shares": [("workspace", "/etc", False)]}, "shares[0].path"),
    ({"shares": [("bad tag", "/workspace", False)]}, "shares[0].tag"),
    ({"entropy": b"short"}, "entropy"),
])
def test_bad_arguments_are_refused_before_anything_is_sent(kwargs, field):
    client, agent = _client(_restored())
    with pytest.raises(RestoreFailed) as err:
        client.restore(**kwargs)
    assert (err.value.kind, err.value.field) == ("invalid_request", field)
    assert agent.received == []
    client.ping()


@pytest.mark.parametrize(("capabilities", "generation"), [(("exec",), 2), (("exec", "restore"), 1)])
def test_an_agent_without_restore_is_refused_locally(capabilities, generation):
    client, agent = _client(_restored(), capabilities, generation)
    with pytest.raises(RestoreFailed) as err:
        client.restore()
    assert err.value.kind == "unsupported" and "rebuild the image" in str(err.value)
    assert agent.received == []


def test_keepalives_before_the_answer_are_skipped():
    def slow(msg: protocol.Message) -> list[bytes]:
        if msg.name != "restore":
            return []
        return [protocol.encode_message("keepalive"), protocol.encode_message("keepalive"),
                *_restored(hostname="h")(msg)]
    client, _ = _client(slow)
    assert client.restore().hostname == "h"


@pytest.mark.parametrize("answer", [
    lambda: protocol.encode_message("pong"),
    lambda: protocol.encode_message("started", 3, pid=1),
    lambda: protocol.encode_data(protocol.FrameType.STDOUT, 0, b"x"),
])
def test_anything_else_is_a_protocol_error_and_closes_the_client(answer):
    client, _ = _client(lambda msg: [answer()])
    with pytest.raises(ProtocolError):
        client.restore()
    with pytest.raises(StateError):
        client.ping()


def test_a_hostile_agents_long_strings_are_cut():
    long, item = "x" * 100_000, "y" * 600
    client, _ = _client(_restored(hostname=long, errors=[{"item": item, "message": item}] * 200,
                                  mounted=[{"tag": item, "path": item, "read_only": True}] * 200))
    result = client.restore(check=False)
    assert len(result.hostname) == 500 and len(result.errors) == 64 and len(result.mounted) == 64
    assert all(len(e.item) <= 500 and len(e.message) <= 500 for e in result.errors)


def test_an_agent_that_never_answers_hits_the_deadline():
    client, _ = _client(lambda msg: [])
    started = time.monotonic()
    with pytest.raises(ExecError):
        client.restore(timeout=0.5)
    assert time.monotonic() - started < 5


def test_the_request_is_valid_json_within_the_frame_limit_at_the_maximum():
    shares = [(f"t{i}", f"/d{i}/" + "p" * 200, True) for i in range(protocol.RESTORE_MAX_SHARES)]
    client, agent = _client(_restored())
    client.restore(hostname="h" * 63, shares=shares, entropy=b"\xff" * 512)
    assert len(json.dumps(agent.received[0].payload)) < protocol.MAX_FRAME_BYTES
