"""The exec bridge without QEMU: the real bridge on its asyncio loop, the real agent behind
a fake hybrid-vsock backend, real Unix sockets and real peer credentials in between."""

from __future__ import annotations

import json
import os
import pwd
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from secvf.errors import AgentUnavailable, CommandStartFailed, ExecRefused
from secvf.exec import ExecClient, bridge, protocol
from secvf.model.config import VMConfig
from secvf.store.bundle import RuntimeFiles
from secvf.store.events import read_events
from secvf.testing.agent import AgentProcess
from secvf.testing.vsock_backend import FakeVsockBackend
from tests.unit.running_sandbox import (
    CURRENT_USER,
    WAIT_S,
    BridgeLoop,
    sandbox_config,
    wait_for,
)

NOBODY_UID = 65534

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="connecting as another uid needs root (os.setuid)"
)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    with AgentProcess(tmp_path, default_user=CURRENT_USER, keepalive_interval_s=0.2) as running:
        yield running


@pytest.fixture
def vm() -> VMConfig:
    return sandbox_config()


@pytest.fixture
def vsock(vm: VMConfig, agent: AgentProcess) -> Iterator[FakeVsockBackend]:
    ports = {protocol.AGENT_VSOCK_PORT: agent.socket_path}
    with FakeVsockBackend(RuntimeFiles(vm.id).vsock_socket, ports) as backend:
        yield backend


@pytest.fixture
def running(vm: VMConfig) -> Iterator[BridgeLoop]:
    """The bridge's loop; the test starts the bridge (after writing an allowlist, say)."""
    loop = BridgeLoop(vm)
    yield loop
    loop.close()


def connect(loop: BridgeLoop) -> ExecClient:
    return ExecClient.connect(loop.files.exec_socket, timeout=WAIT_S)


def events(stream: str, name: str) -> list[dict[str, Any]]:
    return [e for e in read_events(stream) if e.get("event") == name]


def write_allowlist(text: str) -> None:
    path = bridge.allowlist_path()
    path.write_text(text)


def first_reply_as(uid: int, path: Path) -> dict[str, Any]:
    """Connect to ``path`` from a forked child running as ``uid``, send hello, and return
    the first message the child receives (or the error it hit), as a dict."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only os, socket and protocol calls, then _exit
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            report = _first_message(path)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            report = {"error": type(exc).__name__, "detail": str(exc)}
        os.write(write_end, json.dumps(report).encode()[:60000])
        os._exit(0)
    os.close(write_end)
    chunks = []
    with os.fdopen(read_end, "rb") as reader:
        while chunk := reader.read():
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(b"".join(chunks))


def _first_message(path: Path) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT_S)
        sock.connect(str(path))
        sock.sendall(protocol.encode_message("hello", generation=protocol.GENERATION))
        decoder = protocol.FrameDecoder()
        while not (frames := decoder.feed(sock.recv(65536))):
            pass
    msg = protocol.decode_message(frames[0])
    return {"name": msg.name, **msg.payload}


# --------------------------------------------------------------------------- joining


def test_a_command_runs_through_the_bridge_and_is_audited(running, vsock):
    running.start()
    with connect(running) as client:
        result = client.run(["echo", "through the bridge"], user=CURRENT_USER)
    assert result.stdout == b"through the bridge\n"
    assert vsock.requests == [protocol.AGENT_VSOCK_PORT]
    (record,) = events("exec", "exec")
    assert record["caller_uid"] == os.getuid() and record["vm_id"] == running.vm.id
    assert (record["op"], record["argv"], record["user"]) == (
        "exec", ["echo", "through the bridge"], CURRENT_USER)
    assert (record["outcome"], record["code"], record["signal"]) == ("exit", 0, None)


def test_audit_records_start_failures_and_disconnects(running, vsock):
    running.start()
    with connect(running) as client:
        with pytest.raises(CommandStartFailed):
            client.run(["/no/such/program"])
        session = client.start(["sleep", "300"])
        session.close()
    wait_for(lambda: len(events("exec", "exec")) == 2)
    records = events("exec", "exec")
    assert [(r["outcome"], r["argv"]) for r in records] == [
        ("start_failed", ["/no/such/program"]), ("disconnected", ["sleep", "300"])]
    assert records[0]["kind"] == "not_found"


def exec_log_lines(secvf_env: Path) -> list[bytes]:
    return [line for path in sorted((secvf_env / "logs").glob("exec*.jsonl"))
            for line in path.read_bytes().splitlines()]


def test_audit_records_stay_small_and_say_what_was_cut(running, vsock, secvf_env):
    running.start()
    argv = ["true", "x" * 100_000, *(f"arg{i}" for i in range(5000))]
    shell = ": " + "y" * 100_000
    env = {"TOKEN": "secret-value", "K" * 5000: "v"}
    with connect(running) as client:
        assert client.run(argv, env=env).exit_code == 0
        assert client.run(shell).exit_code == 0
        with pytest.raises(CommandStartFailed):
            client.run(["true"], cwd="/" + "d" * 200_000)
    by_argv, by_shell, by_cwd = events("exec", "exec")

    assert by_argv["argv"][:2] == ["true", "x" * bridge.AUDIT_FIELD_MAX_BYTES]
    assert len(by_argv["argv"]) <= bridge.AUDIT_MAX_ITEMS
    assert sum(len(a) for a in by_argv["argv"]) <= bridge.AUDIT_COMMAND_MAX_BYTES
    assert (by_argv["argv_bytes"], by_argv["argv_truncated"]) == (
        sum(len(a) for a in argv), True)
    assert by_argv["env_names"] == ["TOKEN", "K" * bridge.AUDIT_FIELD_MAX_BYTES]
    assert (by_argv["env_names_bytes"], by_argv["env_names_truncated"]) == (5005, True)
    assert by_shell["shell"] == shell[:bridge.AUDIT_COMMAND_MAX_BYTES]
    assert (by_shell["shell_bytes"], by_shell["shell_truncated"]) == (len(shell), True)
    assert by_cwd["cwd"] == "/" + "d" * (bridge.AUDIT_FIELD_MAX_BYTES - 1)
    assert (by_cwd["cwd_bytes"], by_cwd["outcome"]) == (200_001, "start_failed")

    lines = exec_log_lines(secvf_env)
    assert len(lines) == 3 and max(map(len, lines)) < 3 * bridge.AUDIT_COMMAND_MAX_BYTES
    assert b"secret-value" not in b"".join(lines)  # names only, never values


def test_audit_caps_count_utf8_bytes_and_keep_whole_characters():
    capped = bridge.capped_field("user", "é" * 1000)  # 2000 bytes
    assert capped == {"user": "é" * (bridge.AUDIT_FIELD_MAX_BYTES // 2), "user_bytes": 2000,
                      "user_truncated": True}
    assert bridge.capped_field("cwd", "/tmp") == {"cwd": "/tmp"}
    assert bridge.capped_field("tty", True) == {"tty": True}
    lone = "\ud800" * 600  # JSON may carry lone surrogates; 3 bytes each
    assert bridge.capped_field("path", lone)["path_bytes"] == 1800


def test_without_an_allowlist_only_the_owner_can_reach_the_socket(running, vsock):
    running.start()
    assert stat.S_IMODE(running.files.exec_socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(running.files.dir.stat().st_mode) == 0o700
    assert events("security", "exec_bridge_started")[0]["shared_with"] == []


def test_stopping_the_bridge_removes_its_socket(running, vsock):
    running.start()
    running.call(bridge.stop_bridge(running.vm.id))
    assert not running.files.exec_socket.exists()
    assert [e["event"] for e in read_events("security")] == [
        "exec_bridge_started", "exec_bridge_stopped"]


# --------------------------------------------------------------------------- refusals


@needs_root
def test_a_uid_outside_the_allowlist_is_refused_before_the_guest(running, vsock):
    write_allowlist("4242  # someone else: the socket opens up, uid 65534 is still out\n")
    running.start()
    assert stat.S_IMODE(running.files.exec_socket.stat().st_mode) == 0o666
    reply = first_reply_as(NOBODY_UID, running.files.exec_socket)
    assert (reply["name"], reply["code"]) == ("error", "refused"), reply
    assert str(NOBODY_UID) in reply["message"]
    assert vsock.requests == []  # not one byte went towards the guest
    (refusal,) = events("security", "exec_refused")
    assert (refusal["peer_uid"], refusal["severity"]) == (NOBODY_UID, "WARNING")


@needs_root
@pytest.mark.parametrize("entry", [str(NOBODY_UID), "nobody", "# comment\nnobody # x\n"])
def test_an_allowlisted_uid_is_joined_to_the_agent(running, vsock, entry):
    if pwd.getpwuid(NOBODY_UID).pw_name != "nobody":
        pytest.skip("uid 65534 is not called nobody here")
    write_allowlist(entry)
    running.start()
    reply = first_reply_as(NOBODY_UID, running.files.exec_socket)
    assert reply["name"] == "hello", reply
    assert vsock.requests == [protocol.AGENT_VSOCK_PORT]
    assert events("security", "exec_refused") == []


def test_read_allowlist_takes_uids_and_names_and_skips_the_unknown(tmp_path):
    path = tmp_path / "allow"
    path.write_text(f"# who may exec\n1001\n{CURRENT_USER}  # me\n\nno-such-user-xyz\n")
    assert bridge.read_allowlist(path) == {1001, os.getuid()}
    assert bridge.read_allowlist(tmp_path / "absent") == set()


def test_the_connection_cap_answers_busy_and_frees_slots(running, vsock, monkeypatch):
    assert bridge.MAX_CONNECTIONS == 16
    running.start()
    clients = [connect(running) for _ in range(bridge.MAX_CONNECTIONS)]
    try:
        monkeypatch.setattr(bridge, "BUSY_WAIT_S", 0.1)  # the refusal need not wait long
        with pytest.raises(ExecRefused) as info:
            connect(running)
        assert info.value.code == "busy"
        assert vsock.active == bridge.MAX_CONNECTIONS
        monkeypatch.setattr(bridge, "BUSY_WAIT_S", WAIT_S)  # a freed slot may take a moment
        clients.pop().close()
        with connect(running) as late:
            assert late.run(["true"]).exit_code == 0
    finally:
        for client in clients:
            client.close()


def test_an_unreachable_agent_is_agent_unavailable(vm, running, tmp_path):
    with FakeVsockBackend(RuntimeFiles(vm.id).vsock_socket, {}) as backend:  # nothing on 2222
        running.start()
        with pytest.raises(AgentUnavailable, match="not reachable") as info:
            connect(running)
    assert type(info.value) is AgentUnavailable  # not a protocol error, not ConnectFailed
    assert (backend.requests, backend.refused) == ([protocol.AGENT_VSOCK_PORT], 1)
