"""The host exec client against hostile agents, the hybrid handshake, and exit-code mapping."""

from __future__ import annotations

import os
import pwd
import socket
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from secvf.errors import StateError
from secvf.exec import (
    AgentUnavailable,
    CommandStartFailed,
    ConnectFailed,
    ExecClient,
    ExecRefused,
    ExecResult,
    ProtocolError,
    exit_code_for,
)
from secvf.exec.errors import FileTransferError
from secvf.testing.agent import AgentProcess, HostileAgent, Misbehaviour

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
    assert info.value.kind == "too_large"
    assert not (tmp_path / "copy").exists()


# --------------------------------------------------------------------------- hybrid vsock


class HybridFront:
    """A minimal hybrid-vsock front: answers CONNECT <port> with OK, then splices."""

    def __init__(self, path: Path, target: Path, reply: bytes = b"OK 1073741824\n") -> None:
        self.path, self.target, self.reply = path, target, reply
        self.requests: list[bytes] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        line = b""
        while not line.endswith(b"\n"):
            line += conn.recv(1)
        self.requests.append(line)
        conn.sendall(self.reply)
        if not self.reply.startswith(b"OK"):
            conn.close()
            return
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(str(self.target))
        for a, b in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def test_connect_hybrid_does_the_connect_handshake(agent, tmp_path):
    front = HybridFront(tmp_path / "vsock.sock", agent.socket_path)
    with ExecClient.connect_hybrid(front.path, 2222, timeout=5) as client:
        assert client.run("echo via-vsock").stdout == b"via-vsock\n"
    assert front.requests == [b"CONNECT 2222\n"]


def test_connect_hybrid_rejected_port(agent, tmp_path):
    front = HybridFront(tmp_path / "vsock.sock", agent.socket_path, reply=b"FAILED\n")
    with pytest.raises(ConnectFailed, match="not OK"):
        ExecClient.connect_hybrid(front.path, 2222, timeout=5)


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
        (AgentUnavailable("gone"), 125),
        (ProtocolError("bad"), 125),
        (RuntimeError("bug"), 125),
    ],
)
def test_exit_code_mapping(outcome, code):
    assert exit_code_for(outcome) == code
