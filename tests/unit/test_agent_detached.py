"""Background processes (exec ``detach``, ``ps``, ``attach``, ``kill``): the real guest
agent run on the host with --unix, driven through the real client, and its output ring."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from secvf.errors import DetachedProcessError
from secvf.exec import (
    CommandStartFailed,
    ExecClient,
    Exited,
    OutputDropped,
    Stderr,
    Stdout,
    protocol,
)
from secvf.exec.channel import MAX_PEER_TEXT_CHARS
from secvf.exec.client import MAX_LISTED_ARGS
from secvf.guest.agent import detached
from secvf.guest.agent.output_ring import OutputRing
from secvf.sdk import AsyncSandbox, Sandbox
from secvf.testing.agent import AgentProcess
from tests.helpers import alive
from tests.unit.running_sandbox import CURRENT_USER, needs_root, wait_for

OUT, ERR = protocol.FrameType.STDOUT, protocol.FrameType.STDERR


def connect(agent: AgentProcess) -> ExecClient:
    return ExecClient.connect(agent.socket_path, timeout=10, silence_timeout_s=20)


@pytest.fixture
def client(agent: AgentProcess) -> Iterator[ExecClient]:
    with connect(agent) as connected:
        yield connected


def listed(agent: AgentProcess, process_id: str) -> dict:
    with connect(agent) as c:
        (info,) = [p for p in c.list_detached() if p.id == process_id]
    return vars(info)


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS")).split()[1])


# --------------------------------------------------------------------------- lifecycle


def test_a_detached_command_outlives_its_connection_and_is_listed(agent: AgentProcess) -> None:
    with connect(agent) as c:
        started = c.start_detached(["sleep", "300"], env={"X": "1"})
    assert started.id != str(started.pid)
    assert alive(started.pid)  # the connection that started it is gone
    info = listed(agent, started.id)
    assert (info["argv"], info["user"], info["pid"], info["state"]) == (
        ("sleep", "300"), CURRENT_USER, started.pid, "running")
    assert info["exit_code"] is info["signal"] is info["duration_ms"] is None
    with connect(agent) as c:
        c.kill_detached(started.id)
    info = wait_for(lambda: (i := listed(agent, started.id))["state"] == "exited" and i)
    assert (info["exit_code"], info["signal"]) == (None, signal.SIGTERM)
    assert not alive(started.pid)


def test_ids_are_not_pids_and_never_repeat(client: ExecClient) -> None:
    starts = [client.start_detached("exit 0") for _ in range(5)]
    ids = [s.id for s in starts]
    assert len(set(ids)) == 5
    assert all(s.id != str(s.pid) for s in starts)


def test_kill_sends_the_signal_to_the_whole_group(agent: AgentProcess) -> None:
    with connect(agent) as c:
        started = c.start_detached("sleep 300 & echo $!; wait")
        with c.attach(started.id) as session:
            first = next(e for e in session if isinstance(e, Stdout))
    child = int(first.data.split()[0])
    assert alive(child) and alive(started.pid)  # leaving the attach only detached
    with connect(agent) as c:
        c.kill_detached(started.id, signal.SIGKILL)
    wait_for(lambda: not alive(child) and not alive(started.pid))
    ended = wait_for(lambda: (i := listed(agent, started.id))["state"] == "exited" and i)
    assert ended["signal"] == signal.SIGKILL


def test_same_environment_cwd_and_start_failures_as_exec(client: ExecClient,
                                                         tmp_path: Path) -> None:
    started = client.start_detached('echo "$GREETING|$(pwd)|$USER"', env={"GREETING": "hi"},
                                    cwd=str(tmp_path))
    result = client.attach(started.id).collect()
    assert result.stdout == f"hi|{tmp_path}|{CURRENT_USER}\n".encode()
    assert (result.exit_code, result.dropped_bytes) == (0, 0)
    with pytest.raises(CommandStartFailed) as info:
        client.start_detached(["/nonexistent/program"])
    assert (info.value.kind, info.value.exit_code) == ("not_found", 127)
    with pytest.raises(CommandStartFailed) as bad_cwd:
        client.start_detached(["true"], cwd="/nonexistent/dir")
    assert bad_cwd.value.kind == "bad_cwd"
    assert all(p.argv != ("/nonexistent/program",) for p in client.list_detached())


def test_start_failures_leave_no_descriptor_behind(client: ExecClient,
                                                   agent: AgentProcess) -> None:
    def open_fds() -> int:
        return len(os.listdir(f"/proc/{agent.proc.pid}/fd"))

    client.ping()
    before = open_fds()
    for _ in range(20):
        for start in (client.run, client.start_detached):
            with pytest.raises(CommandStartFailed):
                start(["true"], user="no-such-user-secvf")
    refused = protocol.encode_message("exec", 1, argv=["true"], detach=True, tty=True)
    _exchange(agent.socket_path, 3, refused)
    assert wait_for(lambda: open_fds() == before)


@needs_root
def test_other_users_start_through_the_same_path(client: ExecClient) -> None:
    started = client.start_detached("id -un; pwd", user="nobody", cwd="/")
    assert client.attach(started.id).collect().stdout == b"nobody\n/\n"
    assert [p.user for p in client.list_detached() if p.id == started.id] == ["nobody"]


def test_a_terminal_stdin_or_timeout_is_refused(agent: AgentProcess) -> None:
    for extra in ({"tty": True}, {"stdin": True}, {"timeout_s": 5}):
        request = protocol.encode_message("exec", 1, argv=["true"], detach=True, **extra)
        frames = _exchange(agent.socket_path, 3, request)
        reply = protocol.decode_message(frames[-1])
        assert (reply.name, reply["kind"]) == ("start_failed", "invalid_request"), extra


def test_a_normal_execs_background_job_is_still_cleaned_up(client: ExecClient) -> None:
    # a normal exec's cleanup is unchanged; only detach makes a listed background process
    result = client.run("sleep 300 >/dev/null 2>&1 & echo $!")
    wait_for(lambda: not alive(int(result.stdout)))
    assert client.list_detached() == []


def test_the_agent_stopping_ends_its_background_processes(tmp_path: Path) -> None:
    with AgentProcess(tmp_path, default_user=CURRENT_USER) as agent:
        with connect(agent) as c:
            plain = c.start_detached(["sleep", "300"])
            stubborn = c.start_detached("trap '' TERM; sleep 300 & wait")
        assert alive(plain.pid) and alive(stubborn.pid)
    # AgentProcess.stop sent SIGTERM: TERM to the groups, KILL for the one ignoring it
    wait_for(lambda: not alive(plain.pid) and not alive(stubborn.pid))


# --------------------------------------------------------------------------- attach


def test_attach_streams_buffered_then_live_output_with_streams_apart(
        client: ExecClient, tmp_path: Path) -> None:
    go = tmp_path / "go"
    started = client.start_detached(
        f"echo early; echo early-err >&2; while [ ! -e {go} ]; do sleep 0.05; done; "
        "echo late; exit 7")
    wait_for(lambda: any(p.buffered_bytes == 16 for p in client.list_detached()))
    session = client.attach(started.id)
    out, err = bytearray(), bytearray()
    for event in session:
        if isinstance(event, Stdout):
            out += event.data
            if out == b"early\n":
                go.touch()
        elif isinstance(event, Stderr):
            err += event.data
    assert (bytes(out), bytes(err)) == (b"early\nlate\n", b"early-err\n")
    assert session.exited is not None and session.exited.exit_code == 7
    assert client.ping() > 0  # the connection is free again


def test_several_attaches_at_once_see_the_same_output(agent: AgentProcess,
                                                      tmp_path: Path) -> None:
    go = tmp_path / "go"
    with connect(agent) as c:
        started = c.start_detached(
            f"while [ ! -e {go} ]; do sleep 0.05; done; seq 1 20000; seq 1 100 >&2")
    clients = [connect(agent) for _ in range(4)]
    sessions = [c.attach(started.id) for c in clients]
    go.touch()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda s: s.collect(), sessions))
    expected = "".join(f"{i}\n" for i in range(1, 20001)).encode()
    assert all(r.stdout == expected and r.exit_code == 0 for r in results)
    assert all(r.stderr == "".join(f"{i}\n" for i in range(1, 101)).encode() for r in results)
    for c in clients:
        c.close()


def test_attach_to_an_exited_process_sends_what_is_kept_and_its_exit(
        client: ExecClient) -> None:
    started = client.start_detached("echo bye; kill -KILL $$")
    wait_for(lambda: listed_state(client, started.id) == "exited")
    result = client.attach(started.id).collect()
    assert (result.stdout, result.signal, result.shell_exit_code) == (b"bye\n", 9, 137)
    with pytest.raises(DetachedProcessError) as info:
        client.kill_detached(started.id)
    assert (info.value.kind, info.value.process_id) == ("not_running", started.id)


def listed_state(client: ExecClient, process_id: str) -> str:
    return next(p.state for p in client.list_detached() if p.id == process_id)


def test_ps_shortens_huge_command_lines(client: ExecClient, agent: AgentProcess) -> None:
    long_one = client.start_detached(["sh", "-c", "sleep 300", "\x01" * 50_000])
    many = client.start_detached(["sh", "-c", "sleep 300", *[""] * 20_000])
    (reply,) = [f for f in _exchange(agent.socket_path, 3, protocol.encode_message("ps", 1))
                if f.stream_id == 1]
    sent = {p["id"]: p["argv"] for p in protocol.decode_message(reply)["processes"]}
    assert sent[long_one.id][:3] == ["sh", "-c", "sleep 300"]
    assert sent[long_one.id][3] == "\x01" * (detached.PS_ARGV_CHARS - 13) + "..."
    assert len(sent[many.id]) == detached.PS_ARGV_WORDS + 1 and sent[many.id][-1] == "..."
    listing = {p.id: p.argv for p in client.list_detached()}  # the client cuts words too
    assert listing[long_one.id][3] == "\x01" * MAX_PEER_TEXT_CHARS
    assert len(listing[many.id]) == MAX_LISTED_ARGS


def test_an_attach_to_a_silent_process_is_kept_alive(agent: AgentProcess) -> None:
    with ExecClient.connect(agent.socket_path, timeout=5, silence_timeout_s=1.0) as c:
        started = c.start_detached("sleep 2.5; echo done")
        assert c.attach(started.id).collect().stdout == b"done\n"


def test_unknown_ids_get_a_typed_answer(client: ExecClient) -> None:
    for call in (client.attach, client.kill_detached):
        with pytest.raises(DetachedProcessError) as info:
            call("0000dead")
        assert (info.value.kind, info.value.process_id) == ("not_found", "0000dead")
    with pytest.raises(DetachedProcessError) as bad_signal:
        client.kill_detached(client.start_detached(["sleep", "300"]).id, 0)
    assert bad_signal.value.kind == "invalid_request"
    assert client.ping() > 0


def test_a_client_killed_mid_attach_leaves_the_process_running(agent: AgentProcess,
                                                               tmp_path: Path) -> None:
    with connect(agent) as c:
        started = c.start_detached("i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done")
    script = (
        "import sys\n"
        "from secvf.exec import ExecClient, Stdout\n"
        f"c = ExecClient.connect({str(agent.socket_path)!r}, timeout=10)\n"
        f"for event in c.attach({started.id!r}):\n"
        "    if isinstance(event, Stdout):\n"
        "        print('got', flush=True)\n"
    )
    follower = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert follower.stdout is not None and follower.stdout.readline() == b"got\n"
    follower.kill()
    follower.wait()
    assert alive(started.pid)
    with connect(agent) as c:
        session = c.attach(started.id)
        seen = [int(e.data.split()[-1]) for e in _take(session, Stdout, 3)]
        session.close()
    assert alive(started.pid) and seen[-1] > seen[0]
    with connect(agent) as c:
        c.kill_detached(started.id)


def _take(session, kind: type, count: int) -> list:
    found = []
    for event in session:
        if isinstance(event, kind):
            found.append(event)
            if len(found) == count:
                break
    return found


def test_more_attachers_than_the_limit_are_refused(agent: AgentProcess) -> None:
    with connect(agent) as c:
        started = c.start_detached(["sleep", "300"])
    clients = [connect(agent) for _ in range(detached.MAX_ATTACHERS + 1)]
    sessions = [c.attach(started.id) for c in clients[:-1]]
    with pytest.raises(DetachedProcessError) as info:
        clients[-1].attach(started.id)
    assert info.value.kind == "limit_reached"
    sessions[0].close()
    wait_for(lambda: _attaches(clients[-1], started.id))
    for c in clients:
        c.close()


def _attaches(client: ExecClient, process_id: str) -> bool:
    try:
        client.attach(process_id).close()
    except DetachedProcessError:
        return False
    return True


# --------------------------------------------------------------------------- hostile cases


def test_a_flood_keeps_one_mebibyte_and_counts_the_rest(agent: AgentProcess) -> None:
    total = 40 * 1024 * 1024
    with connect(agent) as c:
        started = c.start_detached(f"head -c {total} /dev/zero; echo end >&2")
    info = wait_for(lambda: (i := listed(agent, started.id))["state"] == "exited" and i)
    assert info["buffered_bytes"] == detached.OUTPUT_BYTES
    assert info["buffered_bytes"] + info["dropped_bytes"] == total + 4
    assert rss_kib(agent.proc.pid) < 64 * 1024  # far below the 40 MiB written
    with connect(agent) as c:
        session = c.attach(started.id)
        events = list(session)
    assert events[0] == OutputDropped(info["dropped_bytes"])
    received = sum(len(e.data) for e in events if isinstance(e, Stdout | Stderr))
    assert received == detached.OUTPUT_BYTES
    assert b"".join(e.data for e in events if isinstance(e, Stderr)) == b"end\n"
    assert isinstance(events[-1], Exited) and events[-1].exit_code == 0
    assert session.dropped_bytes == info["dropped_bytes"]


def test_a_slow_attacher_is_told_what_it_missed_and_memory_stays_bounded(
        agent: AgentProcess) -> None:
    with connect(agent) as c:
        started = c.start_detached("cat /dev/zero")
    follower = connect(agent)
    session = follower.attach(started.id)
    # read nothing while the process writes far more than the buffer holds
    wait_for(lambda: listed(agent, started.id)["dropped_bytes"] > 64 * 1024 * 1024)
    assert rss_kib(agent.proc.pid) < 64 * 1024
    seen_data, dropped = False, None
    for event in session:  # what was sent before it fell behind, then the gap
        if isinstance(event, Stdout):
            seen_data = True
        elif isinstance(event, OutputDropped) and seen_data:
            dropped = event
            break
    assert dropped is not None and dropped.size > 0
    with connect(agent) as c:
        fast = c.attach(started.id)  # another attacher is not held up by the slow one
        assert next(e for e in fast if isinstance(e, Stdout)).data.count(0) > 0
        fast.close()
    follower.close()
    with connect(agent) as c:
        c.kill_detached(started.id, signal.SIGKILL)
    wait_for(lambda: not alive(started.pid))


def test_following_a_flood_keeps_host_memory_bounded(agent: AgentProcess) -> None:
    with connect(agent) as c:
        started = c.start_detached("cat /dev/zero")
    before = rss_kib(os.getpid())
    received = 0
    with connect(agent) as c, c.attach(started.id) as session:
        for event in session:
            if isinstance(event, Stdout):
                received += len(event.data)
                if received > 128 * 1024 * 1024:
                    break
    assert rss_kib(os.getpid()) - before < 32 * 1024  # nothing of the 128 MiB piles up
    with connect(agent) as c:
        c.kill_detached(started.id, signal.SIGKILL)


def test_a_thousand_detaches_meet_a_clear_limit_and_nothing_breaks(
        agent: AgentProcess) -> None:
    def one(_: int) -> str:
        with connect(agent) as c:
            try:
                return c.start_detached(["sleep", "300"]).id
            except DetachedProcessError as exc:
                assert exc.kind == "limit_reached" and "64 detached processes" in str(exc)
                return ""

    with ThreadPoolExecutor(8) as pool:
        ids = [i for i in pool.map(one, range(1000)) if i]
    assert len(ids) == detached.MAX_RUNNING
    with connect(agent) as c:
        listing = c.list_detached()
        assert sorted(p.id for p in listing) == sorted(ids)
        assert c.run("echo still serving").stdout == b"still serving\n"
        for process_id in ids:
            c.kill_detached(process_id, signal.SIGKILL)
    assert wait_for(lambda: not any(alive(p.pid) for p in listing))

    def all_exited() -> list:
        with connect(agent) as c:
            known = c.list_detached()
        return known if all(p.state == "exited" for p in known) else []

    # all 64 exited, and only the newest 32 are remembered
    remembered = wait_for(all_exited)
    assert len(remembered) == detached.MAX_EXITED
    with connect(agent) as c:
        assert c.start_detached(["true"]).id  # room again


def test_an_agent_of_an_older_generation_is_refused_locally(client: ExecClient,
                                                            agent: AgentProcess) -> None:
    client.generation = 2  # what a generation-2 agent negotiates
    with pytest.raises(DetachedProcessError) as info:
        client.start_detached(["true"])
    assert info.value.kind == DetachedProcessError.UNSUPPORTED and "rebuild" in str(info.value)
    client.generation, client.capabilities = protocol.GENERATION, frozenset({"exec"})
    calls = (client.list_detached, lambda: client.attach("x"), lambda: client.kill_detached("x"))
    for call in calls:
        with pytest.raises(DetachedProcessError) as refused:
            call()
        assert refused.value.kind == DetachedProcessError.UNSUPPORTED
    assert client.ping() > 0  # nothing was sent
    hello = _exchange(agent.socket_path, 2, protocol.encode_message("ps", 1))
    answer = protocol.decode_message(hello[0])
    assert "detach" not in answer["capabilities"] and answer["generation"] == 2
    assert protocol.decode_message(hello[-1])["code"] == "bad_message"


def _exchange(path: Path, generation: int, *frames: bytes) -> list[protocol.Frame]:
    """Hello at ``generation``, then ``frames``; every frame until one ends a stream or the
    agent closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(protocol.encode_message("hello", generation=generation))
        sock.sendall(b"".join(frames))
        decoder, received = protocol.FrameDecoder(), []
        while chunk := sock.recv(65536):
            received += decoder.feed(chunk)
            if any(f.stream_id and f.ends_stream for f in received):
                break
    return received


# --------------------------------------------------------------------------- SDK


def test_the_sdk_drives_background_processes(agent: AgentProcess) -> None:
    import asyncio

    box = Sandbox.from_socket(agent.socket_path)
    started = box.start_detached("echo from-sdk; sleep 300")
    with box.attach(started.id) as attachment:
        first = next(e for e in attachment if isinstance(e, Stdout))
    assert first.data == b"from-sdk\n" and alive(started.pid)
    assert [p.state for p in box.list_detached()] == ["running"]

    async def through_asyncio() -> int | None:
        async_box = AsyncSandbox.from_socket(agent.socket_path)
        await async_box.kill_detached(started.id, signal.SIGINT)
        attachment = await async_box.attach(started.id)
        result = await attachment.collect()
        return result.signal

    assert asyncio.run(through_asyncio()) == signal.SIGINT


# --------------------------------------------------------------------------- the ring


def test_ring_keeps_the_newest_bytes_and_counts_the_dropped() -> None:
    ring, stop = OutputRing(10, 100), threading.Event()
    ring.append(OUT, b"abcdef")
    ring.append(ERR, b"ghijkl")
    assert (ring.start, ring.end, ring.buffered) == (2, 12, 10)
    pieces, offset, skipped, eof = ring.read(0, 100, stop)
    assert (pieces, offset, skipped, eof) == ([(OUT, b"cdef"), (ERR, b"ghijkl")], 12, 2, False)
    ring.append(OUT, b"x" * 25)  # bigger than the ring: only its tail is kept
    assert (ring.start, ring.end) == (27, 37)
    ring.close()
    assert ring.read(12, 4, stop) == ([(OUT, b"xxxx")], 31, 15, False)
    assert ring.read(31, 100, stop) == ([(OUT, b"x" * 6)], 37, 0, True)


def test_ring_merges_one_stream_and_caps_its_pieces() -> None:
    ring, stop = OutputRing(1000, 4), threading.Event()
    for _ in range(3):
        ring.append(OUT, b"a")
    assert ring.read(0, 100, stop)[0] == [(OUT, b"aaa")]
    for i in range(6):
        ring.append(ERR if i % 2 == 0 else OUT, b"%d" % i)
    pieces, offset, skipped, _ = ring.read(0, 100, stop)
    assert pieces == [(OUT, b"1"), (ERR, b"2"), (OUT, b"3"), (ERR, b"4"), (OUT, b"5")][-4:]
    assert (skipped, offset, ring.start) == (5, 9, 5)


def test_ring_reader_wakes_for_output_close_or_stop() -> None:
    ring, stop = OutputRing(100, 10), threading.Event()
    results: list[tuple] = []
    reader = threading.Thread(target=lambda: results.append(ring.read(0, 100, stop)))
    reader.start()
    ring.append(OUT, b"hi")
    reader.join(30)
    assert results == [([(OUT, b"hi")], 2, 0, False)]
    reader = threading.Thread(target=lambda: results.append(ring.read(2, 100, stop)))
    reader.start()
    stop.set()
    ring.wake()
    reader.join(30)
    assert results[-1] == ([], 2, 0, False)
