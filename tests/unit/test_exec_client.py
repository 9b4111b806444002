"""The host exec client against hostile agents, the hybrid handshake, peer ERROR frames,
and the exit-code table."""

from __future__ import annotations

import json
import os
import pwd
import socket
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from secvf.errors import (
    ExitCode,
    FileTransferError,
    NoExecChannel,
    NotFound,
    SecVFError,
    StateError,
)
from secvf.exec import (
    AgentUnavailable,
    CommandStartFailed,
    ConnectFailed,
    ExecClient,
    ExecRefused,
    ExecResult,
    ProtocolError,
    exit_code_for,
    protocol,
)
from secvf.testing.agent import AgentProcess, HostileAgent, Misbehaviour
from secvf.testing.vsock_backend import FakeVsockBackend
from tests.helpers import run_cli

CURRENT_USER = pwd.getpwuid(os.geteuid()).pw_name


@pytest.fixture
def hostile(tmp_path, request):
    with HostileAgent(tmp_path / "hostile.sock", request.param, flood_bytes=48 << 20) as fake:
        yield fake


def _connect(fake: HostileAgent, **options) -> ExecClient:
    options.setdefault("timeout", 2)
    options.setdefault("silence_timeout_s", 1.0)
    return ExecClient.connect(fake.path, **options)


def _elapsed(fn) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - returned for inspection
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


# --------------------------------------------------------------------------- connecting


def test_missing_socket_is_connect_failed(tmp_path):
    with pytest.raises(ConnectFailed) as info:
        ExecClient.connect(tmp_path / "absent.sock", timeout=1)
    assert info.value.path == tmp_path / "absent.sock"
    assert info.value.exit_code == 125


@pytest.mark.parametrize("hostile", [Misbehaviour.SILENT], indirect=True)
def test_agent_that_never_says_hello(hostile):
    error, took = _elapsed(lambda: _connect(hostile, timeout=0.5))
    assert isinstance(error, AgentUnavailable)
    assert took < 5


@pytest.mark.parametrize("hostile", [Misbehaviour.REFUSE], indirect=True)
def test_refusal_frame_becomes_exec_refused(hostile):
    with pytest.raises(ExecRefused) as info:
        _connect(hostile)
    assert info.value.code == "refused" and "1234" in info.value.detail


@pytest.mark.parametrize("hostile", [Misbehaviour.GARBAGE], indirect=True)
def test_garbage_hello_is_a_protocol_error(hostile):
    with pytest.raises(ProtocolError) as info:
        _connect(hostile)
    assert info.value.code == "bad_frame"


class OneReply:
    """A socket that answers the client's hello with fixed bytes, then closes."""

    def __init__(self, path: Path, reply: bytes) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, args=(reply,), daemon=True)
        self.thread.start()

    def _serve(self, reply: bytes) -> None:
        conn, _ = self.listener.accept()
        with conn:
            decoder = protocol.FrameDecoder()
            while not decoder.feed(conn.recv(65536)):
                pass
            conn.sendall(reply)
        self.listener.close()


def test_agent_unavailable_from_the_bridge_is_agent_unavailable(tmp_path):
    # the code as a plain string: the bridge has always sent exactly these bytes
    frame = protocol.encode_error_frame("agent_unavailable", "the guest agent is not reachable")
    peer = OneReply(tmp_path / "bridge.sock", frame)
    with pytest.raises(AgentUnavailable) as info:
        ExecClient.connect(peer.path, timeout=5)
    assert "not reachable" in str(info.value)
    assert not isinstance(info.value, ProtocolError | ConnectFailed)


@pytest.mark.parametrize("code", ["refused", "busy"])
def test_refused_and_busy_are_exec_refused(tmp_path, code):
    peer = OneReply(tmp_path / "bridge.sock", protocol.encode_error_frame(code, "no"))
    with pytest.raises(ExecRefused) as info:
        ExecClient.connect(peer.path, timeout=5)
    assert info.value.code is protocol.ErrorCode(code)


def test_an_error_code_this_side_does_not_know_is_a_protocol_error(tmp_path):
    body = json.dumps({"v": 1, "t": "error", "p": {"code": "x" * 5000, "message": "?"}})
    frame = protocol.encode_frame(protocol.FrameType.ERROR, 0, body.encode())
    peer = OneReply(tmp_path / "agent.sock", frame)
    with pytest.raises(ProtocolError) as info:
        ExecClient.connect(peer.path, timeout=5)
    assert info.value.code == "x" * 64  # kept, but shortened


# --------------------------------------------------------------------------- hostile exec


@pytest.mark.parametrize(
    "hostile, error, code",
    [
        (Misbehaviour.OVERSIZED_FRAME, ProtocolError, "frame_too_large"),
        (Misbehaviour.UNKNOWN_MESSAGE, ProtocolError, "unknown_message"),
        (Misbehaviour.WRONG_STREAM, ProtocolError, "protocol_violation"),
        (Misbehaviour.TRUNCATED_FRAME, AgentUnavailable, None),
    ],
    indirect=["hostile"],
)
def test_malformed_agent_output_gives_a_clear_error_without_hanging(hostile, error, code):
    client = _connect(hostile)
    failure, took = _elapsed(lambda: client.run(["true"]))
    assert isinstance(failure, error), failure
    assert code is None or failure.code == code
    assert took < 5
    assert client.state == "closed"  # a broken connection is never reused


@pytest.mark.parametrize("hostile", [Misbehaviour.STALL_AFTER_START], indirect=True)
def test_agent_that_goes_silent_is_reported_not_responding(hostile):
    client = _connect(hostile, silence_timeout_s=0.5)
    failure, took = _elapsed(lambda: client.run(["sleep", "100"]))
    assert isinstance(failure, AgentUnavailable)
    assert "not responding" in str(failure)
    assert 0.4 < took < 3


@pytest.mark.parametrize("hostile", [Misbehaviour.TRICKLE], indirect=True)
def test_trickling_bytes_do_not_reset_the_silence_deadline(hostile):
    client = _connect(hostile, silence_timeout_s=0.7)
    failure, took = _elapsed(lambda: client.run(["true"]))
    assert isinstance(failure, AgentUnavailable)
    assert took < 2.5  # a full frame would take 18 x 0.2 s


@pytest.mark.parametrize("hostile", [Misbehaviour.KEEPALIVE_FOREVER], indirect=True)
def test_agent_ignoring_the_timeout_hits_the_host_deadline(hostile):
    client = _connect(hostile, deadline_margin_s=0.3)
    failure, took = _elapsed(lambda: client.run(["sleep", "100"], timeout=0.2))
    assert isinstance(failure, AgentUnavailable)
    assert "did not end the command" in str(failure)
    assert took < 5


@pytest.mark.parametrize("hostile", [Misbehaviour.ENDLESS_OUTPUT], indirect=True)
def test_endless_output_is_capped_and_bounded_by_the_host_deadline(hostile):
    client = _connect(hostile, deadline_margin_s=0.5)
    tracemalloc.start()
    try:
        failure, _ = _elapsed(lambda: client.run(["yes"], timeout=0.5, max_output_bytes=1 << 20))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(failure, AgentUnavailable)
    assert hostile.bytes_sent > 4 << 20  # it really flooded us
    assert peak < 16 << 20


@pytest.mark.parametrize("hostile", [Misbehaviour.FLOOD], indirect=True)
def test_flood_faster_than_the_client_reads_keeps_memory_bounded(hostile):
    client = _connect(hostile, silence_timeout_s=10)
    seen = 0

    def slow_reader(chunk: bytes) -> None:
        nonlocal seen
        seen += len(chunk)
        if seen < 2 << 20:
            time.sleep(0.01)

    tracemalloc.start()
    try:
        result = client.run(["flood"], max_output_bytes=1 << 20, on_stdout=slow_reader)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == 48 << 20
    assert len(result.stdout) == 1 << 20 and result.stdout_truncated
    assert peak < 16 << 20


# --------------------------------------------------------------------------- client state


@pytest.fixture
def agent(tmp_path):
    with AgentProcess(tmp_path, default_user=CURRENT_USER, keepalive_interval_s=0.2) as running:
        yield running


def test_one_operation_at_a_time_per_connection(agent):
    with ExecClient.connect(agent.socket_path, timeout=5) as client:
        session = client.start("sleep 0.2")
        with pytest.raises(StateError):
            client.run(["true"])
        list(session)
        assert client.run(["true"]).exit_code == 0


def test_abandoning_a_session_closes_the_connection(agent):
    client = ExecClient.connect(agent.socket_path, timeout=5)
    with client.start("sleep 300") as session:
        pid = session.pid
    assert client.state == "closed"
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}") or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_download_size_cap(agent, tmp_path):
    big = tmp_path / "big"
    big.write_bytes(b"x" * 100_000)
    with ExecClient.connect(agent.socket_path, timeout=5) as client:
        with pytest.raises(FileTransferError) as info:
            client.get_file(str(big), tmp_path / "copy", max_bytes=1000)
        assert client.state == "closed"  # the rest of the file is not waited for
    assert info.value.kind == "too_large"
    assert not (tmp_path / "copy").exists()


def test_start_failure_and_file_error_kinds_are_enum_members(agent, tmp_path):
    with ExecClient.connect(agent.socket_path, timeout=5) as client:
        with pytest.raises(CommandStartFailed) as started:
            client.run(["/nonexistent/program"])
        with pytest.raises(FileTransferError) as missing:
            client.get_file(str(tmp_path / "absent"), tmp_path / "copy")
        assert client.run(["true"]).exit_code == 0  # neither failure broke the connection
    assert started.value.kind is protocol.StartFailureKind.NOT_FOUND
    assert missing.value.kind is protocol.FileErrorKind.NOT_FOUND


# --------------------------------------------------------------------------- hybrid vsock


def test_connect_hybrid_does_the_connect_handshake(agent, tmp_path):
    with FakeVsockBackend(tmp_path / "vsock.sock", {2222: agent.socket_path}) as backend:
        with ExecClient.connect_hybrid(backend.path, 2222, timeout=5) as client:
            assert client.run("echo via-vsock").stdout == b"via-vsock\n"
    assert backend.requests == [2222]


def test_connect_hybrid_rejected_port(agent, tmp_path):
    with FakeVsockBackend(tmp_path / "vsock.sock", {2222: agent.socket_path}) as backend:
        with pytest.raises(ConnectFailed, match="not OK"):
            ExecClient.connect_hybrid(backend.path, 2223, timeout=5)
    assert (backend.requests, backend.refused) == ([2223], 1)


# --------------------------------------------------------------------------- exit codes


def _result(**overrides) -> ExecResult:
    fields = dict(
        exit_code=0,
        signal=None,
        timed_out=False,
        cancelled=False,
        duration_ms=1,
        stdout=b"",
        stderr=b"",
        stdout_truncated=False,
        stderr_truncated=False,
    )
    fields.update(overrides)
    return ExecResult(**fields)


@pytest.mark.parametrize(
    "outcome, code",
    [
        (_result(exit_code=0), 0),
        (_result(exit_code=3), 3),
        (_result(exit_code=None, signal=9), 137),
        (_result(exit_code=None, signal=15, timed_out=True), 124),
        (CommandStartFailed("not_found", "x", 2, "ENOENT", "exec"), 127),
        (CommandStartFailed("permission_denied", "x", 13, "EACCES", "exec"), 126),
        (CommandStartFailed("bad_cwd", "x", 2, "ENOENT", "chdir"), 126),
        (CommandStartFailed("kind_from_a_newer_agent", "x", None, None, "exec"), 126),
        (AgentUnavailable("gone"), 125),
        (ProtocolError("bad"), 125),
        (ExecRefused("busy", "full"), 125),
        (NoExecChannel("generic VM"), 125),
        (NotFound("no VM named 'x'"), 125),
        (RuntimeError("bug"), 125),
    ],
)
def test_exit_code_mapping(outcome, code):
    assert exit_code_for(outcome) == code


def test_the_exit_code_table():
    assert {c.name: c.value for c in ExitCode} == {
        "ERROR": 1,
        "USAGE": 2,
        "TIMEOUT": 124,
        "SECVF_ERROR": 125,
        "CANNOT_EXECUTE": 126,
        "NOT_FOUND": 127,
        "SIGNAL_BASE": 128,
    }
    assert SecVFError.exit_code == NotFound("x").exit_code == ExitCode.ERROR
    assert AgentUnavailable("x").exit_code == NoExecChannel("x").exit_code == 125


def test_the_cli_uses_the_table_for_errors_and_usage():
    error = run_cli("vm", "status", "no-such-vm")
    assert (error.returncode, error.stderr.startswith("secvf: error: ")) == (ExitCode.ERROR, True)
    usage = run_cli("vm", "no-such-command")
    assert (usage.returncode, "Usage:" in usage.stderr) == (ExitCode.USAGE, True)
