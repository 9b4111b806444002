"""`secvf vm exec` and the exec client against the real agent in a booted sandbox."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from secvf.exec import ExecClient, Started, Stdout
from secvf.workflows.vm_exec import exec_socket_for
from tests.helpers import run_cli

pytestmark = pytest.mark.vm


@pytest.fixture
def client(fleet: dict):
    with ExecClient.connect(exec_socket_for("sbx")) as c:
        yield c


def guest(*argv: str) -> str:
    with ExecClient.connect(exec_socket_for("sbx")) as c:
        result = c.run(list(argv), user="root")
    assert result.exit_code == 0, result
    return result.stdout.decode()


def pid_alive_in_guest(pid: int) -> bool:
    return guest("sh", "-c", f"kill -0 {pid} 2>/dev/null && echo yes || echo no").strip() == "yes"


@pytest.mark.parametrize(("script", "code"), [("exit 0", 0), ("exit 3", 3),
                                              ("kill -9 $$", 137), ("kill -TERM $$", 143)])
def test_exit_status_through_the_cli(fleet: dict, script: str, code: int) -> None:
    assert run_cli("vm", "exec", "sbx", "-c", script).returncode == code


def test_not_found_and_timeout_exit_codes(fleet: dict) -> None:
    assert run_cli("vm", "exec", "sbx", "--", "no-such-command").returncode == 127
    assert run_cli("vm", "exec", "sbx", "--timeout", "1", "--", "sleep", "30").returncode == 124


def test_stdout_and_stderr_stay_separate(fleet: dict) -> None:
    proc = run_cli("vm", "exec", "sbx", "-c", "echo out; echo err >&2; echo out2")
    assert proc.stdout == "out\nout2\n" and proc.stderr == "err\n"


def test_ten_megabytes_of_output_arrive_intact(client: ExecClient) -> None:
    guest("sh", "-c", "head -c 10000000 /dev/urandom > /tmp/blob")
    expected = guest("sha256sum", "/tmp/blob").split()[0]
    result = client.run(["cat", "/tmp/blob"], max_output_bytes=20_000_000)
    assert len(result.stdout) == 10_000_000 and not result.stdout_truncated
    assert hashlib.sha256(result.stdout).hexdigest() == expected


def test_stdin_round_trip_with_eof(client: ExecClient) -> None:
    data = os.urandom(300_000)
    result = client.run(["sha256sum"], stdin=data)
    assert result.stdout.decode().split()[0] == hashlib.sha256(data).hexdigest()


def test_stdin_through_the_cli(fleet: dict) -> None:
    proc = run_cli("vm", "exec", "sbx", "-i", "--", "wc", "-c", input_bytes=b"x" * 12345)
    assert proc.returncode == 0 and proc.stdout.strip() == b"12345"


def test_env_cwd_and_user(client: ExecClient) -> None:
    result = client.run(["sh", "-c", 'echo "$FOO|$(pwd)|$(id -un)|$HOME"'],
                        env={"FOO": "bar baz"}, cwd="/tmp")
    assert result.stdout.decode() == "bar baz|/tmp|agent|/home/agent\n"
    as_root = client.run(["id", "-u"], user="root")
    assert as_root.stdout == b"0\n"
    default_cwd = client.run(["pwd"])
    assert default_cwd.stdout == b"/workspace\n"


def test_pty_and_resize(client: ExecClient) -> None:
    result = client.run(["sh", "-c", "tty; stty size"], tty=True, rows=30, cols=100)
    lines = result.stdout.decode().split()
    assert lines[0].startswith("/dev/pts/") and lines[1:] == ["30", "100"]
    session = client.start(["sh", "-c", "sleep 1.5; stty size"], tty=True, rows=24, cols=80)
    session.resize(40, 120)
    out = b"".join(e.data for e in session if isinstance(e, Stdout))
    assert out.split() == [b"40", b"120"]


def test_timeout_kills_the_whole_process_group(client: ExecClient) -> None:
    result = client.run(["sh", "-c", "sleep 300 & echo $!; wait"], timeout=2)
    assert result.timed_out
    child = int(result.stdout.split()[0])
    assert not pid_alive_in_guest(child)


def test_client_disconnect_kills_the_command(fleet: dict) -> None:
    c = ExecClient.connect(exec_socket_for("sbx"))
    session = c.start(["sh", "-c", "echo $$; sleep 300"])
    pid = None
    for event in session:
        if isinstance(event, Stdout):
            pid = int(event.data.split()[0])
            break
        assert isinstance(event, Started)
    c.close()
    assert pid is not None
    deadline = time.monotonic() + 10
    while pid_alive_in_guest(pid):
        assert time.monotonic() < deadline, "command survived its client"
        time.sleep(0.3)


def test_sixteen_concurrent_execs(fleet: dict) -> None:
    results: dict[int, bytes] = {}

    def one(i: int) -> None:
        with ExecClient.connect(exec_socket_for("sbx")) as c:
            results[i] = c.run(["sh", "-c", f"sleep 1; echo {i}"]).stdout

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: f"{i}\n".encode() for i in range(16)}


def test_twenty_megabyte_upload_and_download(client: ExecClient, tmp_path: Path) -> None:
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom(20 * 1024 * 1024))
    src.chmod(0o640)
    sent = client.put_file(src, "/tmp/up.bin")
    assert sent.size == src.stat().st_size and sent.mode == 0o640
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert guest("sha256sum", "/tmp/up.bin").split()[0] == digest
    back = tmp_path / "down.bin"
    got = client.get_file("/tmp/up.bin", back)
    assert got.size == sent.size and hashlib.sha256(back.read_bytes()).hexdigest() == digest
    assert back.stat().st_mode & 0o777 == 0o640


def test_exec_audit_log_records_who_ran_what(fleet: dict) -> None:
    from secvf.store import events as seclog

    run_cli("vm", "exec", "sbx", "--", "echo", "audited-marker", check=True)
    records = [e for e in seclog.read_events("exec") if e.get("argv") == ["echo",
                                                                             "audited-marker"]]
    assert records, "no exec audit record"
    rec = records[-1]
    assert rec["vm"] == "sbx" and rec["caller_uid"] == os.getuid() and rec["code"] == 0
    assert rec["outcome"] == "exit" and rec["duration_ms"] >= 0


def test_sdk_binds_to_a_vm_by_name(fleet: dict) -> None:
    import asyncio

    from secvf.errors import NoExecChannel
    from secvf.sdk import AsyncSandbox, Sandbox

    box = Sandbox.from_vm("sbx")
    assert box.run(["sh", "-c", "echo $((6 * 7))"]).stdout == b"42\n"

    async def many() -> list[bytes]:
        abox = AsyncSandbox.from_vm("sbx")
        results = await asyncio.gather(*(abox.run(["echo", str(i)]) for i in range(4)))
        return [r.stdout for r in results]

    assert asyncio.run(many()) == [f"{i}\n".encode() for i in range(4)]
    with pytest.raises(NoExecChannel, match="no exec channel by design"):
        Sandbox.from_vm("gen")


def test_seventeenth_session_is_refused_as_busy(fleet: dict) -> None:
    from secvf.errors import ExecRefused

    clients = [ExecClient.connect(exec_socket_for("sbx")) for _ in range(16)]
    try:
        sessions = [c.start(["sleep", "30"]) for c in clients]
        with pytest.raises(ExecRefused, match="busy"):
            ExecClient.connect(exec_socket_for("sbx"))
        assert all(s.pid for s in sessions)
    finally:
        for c in clients:
            c.close()
