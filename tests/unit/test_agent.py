"""The real guest agent, run on the host with --unix, driven through the real client."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from secvf.exec import (
    CommandStartFailed,
    ExecClient,
    Exited,
    FileTransferError,
    StdinError,
    Stdout,
    protocol,
)
from secvf.testing.agent import AgentProcess
from tests.helpers import alive
from tests.unit.running_sandbox import CURRENT_USER, needs_root


@pytest.fixture
def client(agent):
    with ExecClient.connect(agent.socket_path, timeout=5, silence_timeout_s=5) as connected:
        yield connected


def _gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- exit status


def test_exit_code_zero_and_nonzero(client):
    assert client.run(["true"]).exit_code == 0
    result = client.run("exit 3")
    assert (result.exit_code, result.signal, result.shell_exit_code) == (3, None, 3)


def test_death_by_signal_is_reported_as_signal(client):
    result = client.run("kill -KILL $$")
    assert result.exit_code is None
    assert result.signal == signal.SIGKILL
    assert result.shell_exit_code == 128 + 9


def test_stdout_and_stderr_stay_separate(client):
    result = client.run("echo out1; echo err1 >&2; echo out2; echo err2 >&2")
    assert result.stdout == b"out1\nout2\n"
    assert result.stderr == b"err1\nerr2\n"


def test_ten_megabytes_of_output_arrive_intact(client, tmp_path):
    payload = os.urandom(10 * 1024 * 1024)
    source = tmp_path / "payload.bin"
    source.write_bytes(payload)
    result = client.run(["cat", str(source)])
    assert not result.stdout_truncated
    assert _sha256(result.stdout) == _sha256(payload)


def test_output_over_the_cap_is_truncated_and_flagged(client):
    seen = bytearray()
    result = client.run("head -c 300000 /dev/zero", max_output_bytes=1000, on_stdout=seen.extend)
    assert len(result.stdout) == 1000
    assert result.stdout_truncated and not result.stderr_truncated
    assert len(seen) == 300000  # callbacks still see every byte


# --------------------------------------------------------------------------- stdin


def test_stdin_round_trip_with_eof(client):
    data = os.urandom(3 * 1024 * 1024)
    result = client.run(["cat"], stdin=data)
    assert result.exit_code == 0
    assert _sha256(result.stdout) == _sha256(data)


def test_streaming_session_event_order(client):
    session = client.start(["wc", "-c"], stdin=True)
    session.write_stdin(b"12345")
    session.close_stdin()
    events = list(session)
    assert events[-1] == session.exited
    assert isinstance(events[-1], Exited) and events[-1].exit_code == 0
    assert b"".join(e.data for e in events if isinstance(e, Stdout)).strip() == b"5"
    assert client.run(["true"]).exit_code == 0  # the connection is reusable afterwards


def test_stdin_write_to_closed_pipe_is_a_non_terminal_event(client):
    session = client.start("exec 0<&-; sleep 0.5; echo still-here", stdin=True)
    time.sleep(0.2)
    session.write_stdin(b"nobody reads this\n")
    events = list(session)
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "StdinError" and kinds[-1] == "Exited"
    assert isinstance(events[0], StdinError) and events[0].errno_name == "EPIPE"
    assert b"still-here" in b"".join(e.data for e in events if isinstance(e, Stdout))


def test_large_stdin_into_a_command_that_stops_reading_keeps_the_connection_usable(client):
    """The agent splices big STDIN frames into the pipe; what the command no longer takes
    is dropped from the socket and the next frames are read as frames."""
    result = client.run(["head", "-c", "1000"], stdin=os.urandom(4 * 1024 * 1024))
    assert result.exit_code == 0 and len(result.stdout) == 1000
    assert client.run(["echo", "next"]).stdout == b"next\n"


def test_large_stdin_reaches_a_terminal_whole(client):
    """A terminal's master is not a pipe, so the rest of a big frame is received and
    written instead of spliced."""
    data = bytes(range(256)) * 1200  # 300 KiB: more than one STDIN frame
    script = "stty raw -echo; echo ready; head -c 307200 | sha256sum"
    session = client.start(script, tty=True, stdin=True, timeout=30)
    events = iter(session)
    output = b""
    while b"ready" not in output:  # raw first, or the line discipline would cook the bytes
        event = next(events)
        output += event.data if isinstance(event, Stdout) else b""
    session.write_stdin(data)
    rest = list(events)
    output += b"".join(e.data for e in rest if isinstance(e, Stdout))
    assert hashlib.sha256(data).hexdigest().encode() in output
    assert rest[-1] == session.exited


# --------------------------------------------------------------------------- env, cwd


def test_environment_is_clean_plus_requested(client):
    os.environ["SECVF_TEST_LEAK"] = "host-only"
    try:
        result = client.run(["env"], env={"GREETING": "hi there"})
    finally:
        del os.environ["SECVF_TEST_LEAK"]
    env = dict(line.split("=", 1) for line in result.stdout.decode().splitlines())
    assert env["GREETING"] == "hi there"
    assert env["USER"] == env["LOGNAME"] == CURRENT_USER
    assert env["LANG"] == "C.UTF-8"
    assert env["PATH"].startswith("/usr/local/sbin:")
    assert "SECVF_TEST_LEAK" not in env and "TERM" not in env


def test_cwd_is_used_and_defaults_to_home(client, tmp_path):
    assert client.run("pwd", cwd=str(tmp_path)).stdout.decode().strip() == str(tmp_path)
    home = pwd.getpwuid(os.geteuid()).pw_dir
    expected = "/workspace" if os.path.isdir("/workspace") else home
    assert client.run("pwd").stdout.decode().strip() == expected


@needs_root
def test_root_agent_runs_commands_as_nobody(client):
    result = client.run("id -u; id -g; echo $HOME $USER", user="nobody", cwd="/")
    nobody = pwd.getpwnam("nobody")
    assert result.stdout.decode().split() == [
        str(nobody.pw_uid),
        str(nobody.pw_gid),
        nobody.pw_dir,
        "nobody",
    ]


@needs_root
def test_user_cannot_start_in_a_directory_it_cannot_enter(client):
    private = tempfile.mkdtemp()
    os.chmod(private, 0o700)
    try:
        with pytest.raises(CommandStartFailed) as info:
            client.run(["true"], user="nobody", cwd=private)
    finally:
        os.rmdir(private)
    assert (info.value.kind, info.value.errno_name, info.value.exit_code) == (
        "bad_cwd",
        "EACCES",
        126,
    )


# --------------------------------------------------------------------------- start failures


def test_command_not_found(client):
    with pytest.raises(CommandStartFailed) as info:
        client.run(["/nonexistent/program"])
    assert (info.value.kind, info.value.errno_name, info.value.exit_code) == (
        "not_found",
        "ENOENT",
        127,
    )
    assert "cannot execute '/nonexistent/program'" in str(info.value)


def test_permission_denied_on_non_executable(client, tmp_path):
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    with pytest.raises(CommandStartFailed) as info:
        client.run([str(script)])
    assert (info.value.kind, info.value.exit_code) == ("permission_denied", 126)


def test_bad_cwd(client):
    with pytest.raises(CommandStartFailed) as info:
        client.run(["true"], cwd="/nonexistent/dir")
    assert (info.value.kind, info.value.stage) == ("bad_cwd", "chdir")


def test_unknown_user(client):
    with pytest.raises(CommandStartFailed) as info:
        client.run(["true"], user="no-such-user-secvf")
    assert info.value.kind == "unknown_user"


def test_start_failure_leaves_connection_usable(client):
    with pytest.raises(CommandStartFailed):
        client.run(["/nonexistent/program"])
    assert client.run("echo ok").stdout == b"ok\n"


# --------------------------------------------------------------------------- tty


def test_tty_mode_has_a_terminal_of_the_requested_size(client):
    result = client.run("tty; stty size; echo $TERM", tty=True, rows=33, cols=101)
    lines = result.stdout.decode().splitlines()
    assert lines[0].startswith("/dev/pts/")
    assert lines[1:] == ["33 101", "xterm-256color"]


def test_tty_resize_is_seen_and_signalled(client):
    script = 'trap "stty size; exit 0" WINCH; echo ready; while :; do sleep 0.05; done'
    session = client.start(script, tty=True, rows=24, cols=80, timeout=20)
    output = bytearray()
    for event in session:
        if isinstance(event, Stdout):
            output += event.data
            if b"ready" in output and b"ready" in event.data:
                session.resize(50, 132)
    assert b"50 132" in output
    assert session.exited is not None and session.exited.exit_code == 0


# --------------------------------------------------------------------------- killing


def test_timeout_kills_whole_group_including_background_child(client):
    result = client.run("sleep 300 & echo $!; wait", timeout=0.5)
    assert result.timed_out and result.shell_exit_code == 124
    child = int(result.stdout.split()[0])
    assert _gone(child)


def test_timeout_escalates_to_sigkill_for_children_ignoring_term(client):
    result = client.run("trap '' TERM; sleep 300 & echo $!; wait", timeout=0.3)
    child = int(result.stdout.split()[0])
    assert result.timed_out
    assert _gone(child, within_s=protocol.KILL_GRACE_S + 3)


def test_cancel_kills_the_command(client):
    session = client.start("sleep 300", timeout=60)
    session.cancel()
    exited = [e for e in session if isinstance(e, Exited)][0]
    assert exited.cancelled and not exited.timed_out
    assert exited.signal == signal.SIGTERM


@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_a_client_that_stops_reading_cannot_hold_off_the_timeout_or_a_cancel(client, how,
                                                                             tmp_path):
    # nothing of the output is read, so the agent's send of it blocks: the command's
    # thread must still end the command
    pidfile = tmp_path / "pid"
    session = client.start(f"echo $$ > {pidfile}.new && mv {pidfile}.new {pidfile}; exec yes",
                           timeout=1 if how == "timeout" else 60)
    deadline = time.monotonic() + 10
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    pid = int(pidfile.read_text())
    time.sleep(0.5)  # the client's socket buffer fills: the send blocks
    if how == "cancel":
        session.cancel()
    assert _gone(pid, within_s=8), "the command outlived its end while the client was idle"
    exited = [e for e in session if isinstance(e, Exited)][0]  # reads what piled up
    assert (exited.timed_out, exited.cancelled) == (how == "timeout", how == "cancel")


def test_signal_reaches_the_process_group(client):
    session = client.start("sleep 300")
    session.send_signal(signal.SIGINT)
    exited = [e for e in session if isinstance(e, Exited)][0]
    assert exited.signal == signal.SIGINT


def _ignore_sigint_and_sigquit() -> None:
    for signum in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_IGN)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGQUIT])
def test_commands_get_default_signals_though_the_agent_inherited_them_ignored(tmp_path, signum):
    # init starts the agent with `&`, and a shell's background jobs ignore SIGINT and SIGQUIT
    options = {"preexec_fn": _ignore_sigint_and_sigquit}
    with AgentProcess(tmp_path, default_user=CURRENT_USER, popen_options=options) as agent, \
            ExecClient.connect(agent.socket_path, timeout=5) as client:
        session = client.start(["sleep", "100"], timeout=60)
        session.send_signal(signum)
        exited = [e for e in session if isinstance(e, Exited)][0]
        assert (exited.signal, exited.timed_out) == (signum, False)
        os.kill(agent.proc.pid, signum)  # the agent itself still ignores them
        assert client.run(["true"]).exit_code == 0


def test_client_disconnect_kills_the_command(agent):
    client = ExecClient.connect(agent.socket_path, timeout=5)
    session = client.start("sleep 300 & echo $!; wait")
    first = next(e for e in session if isinstance(e, Stdout))
    child = int(first.data.split()[0])
    client.close()
    assert _gone(session.pid) and _gone(child)


def test_leftover_background_processes_are_cleaned_at_normal_exit(client):
    result = client.run("sleep 300 >/dev/null 2>&1 & echo $!")
    assert result.exit_code == 0
    assert _gone(int(result.stdout.split()[0]))


# --------------------------------------------------------------------------- keepalive, flow


def test_silent_command_survives_thanks_to_keepalives(agent):
    with ExecClient.connect(agent.socket_path, timeout=5, silence_timeout_s=1.0) as client:
        assert client.run("sleep 2.5; echo done").stdout == b"done\n"


def test_agent_stops_reading_output_the_client_does_not_read(client, agent):
    session = client.start("head -c 60000000 /dev/zero")
    time.sleep(1.5)
    status = Path(f"/proc/{agent.proc.pid}/status").read_text()
    rss_kib = int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS")).split()[1])
    assert rss_kib < 48 * 1024  # far below the 60 MB the command wants to write
    total = sum(len(e.data) for e in session if isinstance(e, Stdout))
    assert total == 60000000


def test_sixteen_concurrent_execs(agent, tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    script = (
        f'touch {barrier}/"$N"; '
        f'while [ "$(ls {barrier} | wc -l)" -lt 16 ]; do sleep 0.05; done; echo "$N"'
    )

    def one(n: int) -> bytes:
        with ExecClient.connect(agent.socket_path, timeout=10, silence_timeout_s=20) as c:
            return c.run(script, env={"N": str(n)}, timeout=30).stdout

    with ThreadPoolExecutor(16) as pool:
        outputs = list(pool.map(one, range(16)))
    assert outputs == [f"{n}\n".encode() for n in range(16)]


# --------------------------------------------------------------------------- files


def test_upload_and_download_twenty_megabytes(client, tmp_path):
    payload = os.urandom(20 * 1024 * 1024)
    local = tmp_path / "up.bin"
    local.write_bytes(payload)
    local.chmod(0o751)
    remote = tmp_path / "guest" / "copy.bin"
    remote.parent.mkdir()
    done = client.put_file(local, str(remote))
    assert (done.size, done.mode) == (len(payload), 0o751)
    assert stat.S_IMODE(remote.stat().st_mode) == 0o751
    back = tmp_path / "down.bin"
    got = client.get_file(str(remote), back)
    assert got.size == len(payload)
    assert _sha256(back.read_bytes()) == _sha256(payload)
    assert stat.S_IMODE(back.stat().st_mode) == 0o751


def test_upload_mode_override_and_relative_path(client, tmp_path):
    local = tmp_path / "x.txt"
    local.write_bytes(b"hello")
    client.put_file(local, str(tmp_path / "y.txt"), mode=0o600)
    assert stat.S_IMODE((tmp_path / "y.txt").stat().st_mode) == 0o600


def test_download_missing_file(client, tmp_path):
    target = tmp_path / "never"
    with pytest.raises(FileTransferError) as info:
        client.get_file("/nonexistent/file", target)
    assert info.value.kind == "not_found" and info.value.errno_name == "ENOENT"
    assert not target.exists() and list(tmp_path.glob(".never*")) == []


def test_download_and_upload_of_a_directory(client, tmp_path):
    with pytest.raises(FileTransferError) as down:
        client.get_file(str(tmp_path), tmp_path / "x")
    local = tmp_path / "f"
    local.write_bytes(b"1")
    with pytest.raises(FileTransferError) as up:
        client.put_file(local, str(tmp_path))
    assert down.value.kind == up.value.kind == "is_a_directory"
    assert client.ping() > 0  # still usable


def test_download_refuses_non_regular_files(client, tmp_path):
    with pytest.raises(FileTransferError) as info:
        client.get_file("/dev/zero", tmp_path / "zero")
    assert info.value.kind == "not_regular_file"


def test_upload_into_missing_directory(client, tmp_path):
    local = tmp_path / "f"
    local.write_bytes(b"1")
    with pytest.raises(FileTransferError) as info:
        client.put_file(local, "/nonexistent/dir/f")
    assert info.value.kind == "not_found"


@needs_root
def test_upload_as_user_is_owned_by_and_checked_as_that_user(client, tmp_path):
    shared = Path(tempfile.mkdtemp())
    shared.chmod(0o1777)
    local = tmp_path / "f"
    local.write_bytes(b"data")
    try:
        client.put_file(local, str(shared / "f"), user="nobody")
        assert (shared / "f").stat().st_uid == pwd.getpwnam("nobody").pw_uid
        with pytest.raises(FileTransferError) as info:
            client.put_file(local, "/root/secvf-should-not-exist", user="nobody")
        assert info.value.kind == "permission_denied"
        assert not Path("/root/secvf-should-not-exist").exists()
        with pytest.raises(FileTransferError) as read_denied:
            client.get_file("/etc/shadow", tmp_path / "shadow", user="nobody")
        assert read_denied.value.kind == "permission_denied"
    finally:
        shutil.rmtree(shared)


# --------------------------------------------------------------------------- info, robustness


def test_ping_and_info(client):
    assert 0 < client.ping() < 5
    info = client.info()
    assert info.agent_version and info.generation == protocol.GENERATION
    assert info.hostname == socket.gethostname()
    assert info.default_user == CURRENT_USER
    assert "root" in info.users


def _raw_exchange(path: Path, data: bytes) -> list[protocol.Frame]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return protocol.FrameDecoder().feed(received)


def test_garbage_gets_an_error_frame_and_the_agent_serves_others(agent):
    frames = _raw_exchange(agent.socket_path, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [f.type for f in frames] == [protocol.FrameType.ERROR]
    assert protocol.decode_message(frames[0])["code"] == "bad_frame"
    with ExecClient.connect(agent.socket_path, timeout=5) as client:
        assert client.run("echo alive").stdout == b"alive\n"


def test_oversized_frame_from_host_is_refused_before_reading_it(agent):
    hello = protocol.encode_message("hello", generation=1)
    huge = protocol.HEADER.pack(
        protocol.MAGIC, protocol.FrameType.STDIN, 0, 1, protocol.MAX_FRAME_BYTES + 1
    )
    frames = _raw_exchange(agent.socket_path, hello + huge)
    codes = [
        protocol.decode_message(f)["code"] for f in frames if f.type is protocol.FrameType.ERROR
    ]
    assert codes == ["frame_too_large"]


def test_unknown_message_from_host_is_a_protocol_error(agent):
    hello = protocol.encode_message("hello", generation=1)
    bogus = protocol.encode_frame(protocol.FrameType.CONTROL, 0, b'{"v":1,"t":"bogus","p":{}}')
    frames = _raw_exchange(agent.socket_path, hello + bogus)
    assert protocol.decode_message(frames[-1])["code"] == "unknown_message"


def test_exec_without_hello_is_refused(agent):
    request = protocol.encode_message("exec", 1, argv=["true"])
    frames = _raw_exchange(agent.socket_path, request)
    assert protocol.decode_message(frames[-1])["code"] == "bad_message"


# --------------------------------------------------------------------------- unprivileged agent


@pytest.fixture
def nobody_agent():
    workdir = Path(tempfile.mkdtemp())
    workdir.chmod(0o777)
    nobody = pwd.getpwnam("nobody").pw_uid
    options = {"user": nobody, "group": pwd.getpwnam("nobody").pw_gid}
    try:
        with AgentProcess(workdir, default_user="nobody", popen_options=options) as running:
            yield running
    finally:
        shutil.rmtree(workdir)


@needs_root
def test_unprivileged_agent_refuses_to_switch_user_cleanly(nobody_agent):
    with ExecClient.connect(nobody_agent.socket_path, timeout=5) as client:
        assert client.run("id -un").stdout == b"nobody\n"
        with pytest.raises(CommandStartFailed) as info:
            client.run(["id"], user="root")
        assert (info.value.kind, info.value.stage) == ("permission_denied", "switch_user")
        assert client.run("echo fine").stdout == b"fine\n"


def test_concurrent_stdin_writer_and_reader_do_not_deadlock(client):
    data = os.urandom(8 * 1024 * 1024)
    done = threading.Event()

    def watchdog() -> None:
        if not done.wait(60):
            client.close()

    threading.Thread(target=watchdog, daemon=True).start()
    result = client.run(["cat"], stdin=data)
    done.set()
    assert len(result.stdout) == len(data)
