"""The monitor log parser (secvf.analysis.monitor_log) on real strace output, generated
here at runtime by tracing a small Python program that forks, execs, writes, renames and
deletes files, makes a thread, kills a child and talks to 127.0.0.1; plus hand-written
lines for the cases strace won't produce on demand, and Hypothesis-fuzzed garbage.

strace is a required system package (scripts/install-system-deps.sh): these tests fail,
they do not skip, when it is missing."""

# ruff: noqa: E501 — verbatim strace lines are long

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secvf.analysis.monitor_log import (
    MAX_PROCESSES,
    MAX_TIMELINE,
    decode_c_string,
    parse_monitor_log,
    read_monitor_log,
    split_args,
)

PROGRAM = r'''
import os, socket, struct, sys, threading
d = sys.argv[1]
with open(os.path.join(d, "dropped.bin"), "wb") as f:
    f.write(b"MZ")
os.rename(os.path.join(d, "dropped.bin"), os.path.join(d, "moved.bin"))
os.mkdir(os.path.join(d, "sub"))
os.chmod(os.path.join(d, "moved.bin"), 0o755)
os.unlink(os.path.join(d, "moved.bin"))
t = threading.Thread(target=lambda: None); t.start(); t.join()
pid = os.fork()
if pid == 0:
    os.execv("/bin/true", ["true", "child-arg"])
os.waitpid(pid, 0)
pid = os.fork()
if pid == 0:
    os.kill(os.getpid(), 9)
os.waitpid(pid, 0)
listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen(1)
port = listener.getsockname()[1]
conn = socket.create_connection(("127.0.0.1", port))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
q = (struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
     + b"\x04evil\x07example\x03com\x00" + struct.pack(">HH", 16, 1))
u.sendto(q, ("127.0.0.1", 53))
u.sendto(b"beacon", ("127.0.0.1", 4444))
print(port)
'''


def _strace() -> str:
    tool = shutil.which("strace")
    assert tool, "strace is required for these tests: run scripts/install-system-deps.sh"
    return tool


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, int]:
    """(the work dir, the monitor log text, the listener's port) of one traced run."""
    work = tmp_path_factory.mktemp("traced")
    out = work / "strace.txt"
    python = os.path.realpath(sys.executable)
    proc = subprocess.run([_strace(), "-f", "-tt", "-s", "256", "-e",
                           "trace=process,file,network", "-o", str(out), "--",
                           python, "-S", "-c", PROGRAM, str(work)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    port = int(proc.stdout.split()[-1])
    lines = ['# secvf detonator test',
             json.dumps({"event": "hello", "format": 1, "detonator": "test", "time": 1.0}),
             json.dumps({"event": "medium", "path": "/media/sample",
                         "files": [{"name": "prog.py", "size": 10}], "time": 1.1}),
             json.dumps({"event": "start", "pid": 1, "argv": [python, "-c", "..."],
                         "user": "analyst", "cwd": str(work), "timeout_s": 60,
                         "time": 1.2})]
    text = "\n".join(lines[:1] + ["E " + x for x in lines[1:]]) + "\n"
    text += "".join("S " + line + "\n" for line in out.read_text().splitlines())
    text += "E " + json.dumps({"event": "exit", "code": 0, "signal": None, "time": 2.0}) + "\n"
    text += 'E {"event":"done","time":2.1}\n'
    return work, text, port


def _walk(nodes: list[dict]) -> list[dict]:
    out, stack = [], list(nodes)
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node["children"])
    return out


def test_real_strace_process_tree(traced):
    work, text, _ = traced
    report = parse_monitor_log(text.encode()).to_json()
    assert report["monitor"]["garbage_lines"] == 0
    assert report["monitor"]["complete"] and report["monitor"]["format"] == 1
    roots = report["processes"]
    assert len(roots) == 1
    root = roots[0]
    assert root["argv"][-1] == str(work) and root["exit_code"] == 0 and root["threads"] >= 1
    children = root["children"]
    assert [c["argv"] for c in children if c["argv"]] == [["true", "child-arg"]]
    assert children[0]["exe"] == "/bin/true" and children[0]["exit_code"] == 0
    assert children[1]["signal"] == "SIGKILL" and children[1]["exit_code"] is None
    assert all(c["ppid"] == root["pid"] for c in children)
    # the thread is not a process
    assert report["process_count"] == 3 == len(_walk(roots))


def test_real_strace_files(traced):
    work, text, _ = traced
    files = parse_monitor_log(text.encode()).to_json()["files"]
    assert f"{work}/dropped.bin" in [w["path"] for w in files["written"]]
    assert files["renamed"] == [{"from": f"{work}/dropped.bin", "to": f"{work}/moved.bin",
                                 "pid": files["renamed"][0]["pid"]}]
    assert [d["path"] for d in files["deleted"]] == [f"{work}/moved.bin"]
    assert [d["path"] for d in files["created_dirs"]] == [f"{work}/sub"]
    assert files["chmod"][0]["path"] == f"{work}/moved.bin"
    assert files["chmod"][0]["mode"] == "0755"
    assert files["read_opens"] > 0


def test_real_strace_network(traced):
    _, text, port = traced
    net = parse_monitor_log(text.encode()).to_json()["network_syscalls"]
    endpoints = {(e["address"], e["port"], e["proto"], e["syscall"]) for e in net["endpoints"]}
    assert ("127.0.0.1", port, "tcp", "connect") in endpoints
    assert ("127.0.0.1", 53, "udp", "sendto") in endpoints
    assert ("127.0.0.1", 4444, "udp", "sendto") in endpoints
    assert net["dns_servers"] == ["127.0.0.1:53"]
    assert net["dns_queries"] == [{"name": "evil.example.com", "type": "TXT"}]
    assert net["listening"][0]["address"] == "127.0.0.1"
    assert net["sockets"] >= 3


def test_real_strace_timeline_order(traced):
    _, text, _ = traced
    log = parse_monitor_log(text.encode())
    kinds = [e["kind"] for e in log.timeline]
    expected = ["event:hello", "event:medium", "event:start", "execve", "file_create",
                "file_rename", "file_mkdir", "file_chmod", "file_delete", "fork", "execve",
                "exit", "fork", "killed", "bind", "listen", "connect", "dns", "sendto",
                "exit", "event:exit", "event:done"]
    it = iter(kinds)
    assert all(k in it for k in expected), kinds  # a subsequence, in this order
    times = [e["t"] for e in log.timeline if e["t"] is not None]
    assert times[0] == 0.0 and times == sorted(times)
    run = log.run_facts()
    assert run["outcome"] == "exited" and run["exit_code"] == 0 and run["user"] == "analyst"


def _s(lines: str) -> bytes:
    return "".join(f"S {line.strip()}\n" for line in lines.strip().splitlines()).encode()


def test_unfinished_and_resumed_halves_are_joined():
    log = parse_monitor_log(_s("""
        100  10:00:00.000001 vfork( <unfinished ...>
        101  10:00:00.000002 execve("/tmp/x", ["x", "a b"], 0x1 /* 3 vars */ <unfinished ...>
        100  10:00:00.000003 <... vfork resumed>) = 101
        101  10:00:00.000004 <... execve resumed>) = 0
        101  10:00:00.000005 connect(3, {sa_family=AF_INET6, sin6_port=htons(443), sin6_flowinfo=htonl(0), inet_pton(AF_INET6, "2001:db8::1", &sin6_addr), sin6_scope_id=0}, 28 <unfinished ...>
        101  10:00:00.000006 <... connect resumed>) = -1 ECONNREFUSED (Connection refused)
        101  10:00:00.000007 +++ exited with 3 +++
        100  10:00:00.000008 --- SIGCHLD {si_signo=SIGCHLD, si_code=CLD_EXITED, si_pid=101} ---
        100  10:00:00.000009 +++ exited with 0 +++
    """))
    tree = log.process_tree()
    assert tree[0]["pid"] == 100 and tree[0]["children"][0]["argv"] == ["x", "a b"]
    assert tree[0]["children"][0]["exit_code"] == 3
    execs = [e for e in log.timeline if e["kind"] == "execve"]
    assert execs[0]["time"] == "10:00:00.000002"  # the first half's time
    conn = [e for e in log.timeline if e["kind"] == "connect"][0]
    assert conn["detail"] == "[2001:db8::1]:443 = ECONNREFUSED" and conn["ok"] is False
    assert log.unmatched_unfinished == 0


def test_medium_write_attempt_from_strace_and_event():
    data = b'E {"event":"medium","path":"/media/sample","files":["a.out"],"time":1}\n'
    data += _s("""
        7  10:00:00.000001 openat(AT_FDCWD, "/media/sample/a.out", O_WRONLY|O_TRUNC) = -1 EROFS (Read-only file system)
        7  10:00:00.000002 openat(AT_FDCWD, "/media/sample/a.out", O_RDONLY) = 3
    """)
    data += b'E {"event":"write_medium_denied","path":"/media/sample/x","pid":7,"time":2}\n'
    run = parse_monitor_log(data).run_facts()
    assert run["medium_write_attempts"] == [
        {"path": "/media/sample/a.out", "pid": 7, "source": "strace"},
        {"path": "/media/sample/x", "pid": 7, "source": "event"}]


@pytest.mark.parametrize(("events", "outcome"), [
    ('{"event":"timeout","after_s":60,"time":5}\n{"event":"exit","code":null,'
     '"signal":"SIGKILL","time":6}', "timeout"),
    ('{"event":"monitor_died","code":1,"signal":null,"time":5}', "monitor_died"),
    ('{"event":"exit","code":null,"signal":"SIGSEGV","time":5}', "killed"),
    ('{"event":"pid_limit","limit":64,"time":4}', "unknown"),
])
def test_run_outcomes(events, outcome):
    data = "".join(f"E {e}\n" for e in events.splitlines()).encode()
    run = parse_monitor_log(data).run_facts()
    assert run["outcome"] == outcome
    assert run["pid_limit_hit"] == ("pid_limit" in events)


def test_garbage_truncation_and_unknown_events():
    data = (b"\x00\xffboot noise\n"
            b"S not strace at all\n"
            b"E [1, 2]\n"
            b"E {\"event\": \"surprise\", \"x\": NaN}\n"
            b"E {\"event\": \"error\", \"message\": \"no sample\"}\n"
            b"T truncated after 8388608 bytes\n\n\r\n")
    log = parse_monitor_log(data)
    mon = log.to_json()["monitor"]
    assert mon["garbage_lines"] == 3 and mon["truncated"] and not mon["complete"]
    assert mon["garbage_samples"][0].startswith("\\x00")
    assert mon["other_events"] == [{"event": "surprise", "x": None}]
    assert log.run_facts()["detonator_errors"] == ["no sample"]
    json.dumps(log.to_json(), allow_nan=False)


def test_read_monitor_log_cuts_at_a_line_boundary(tmp_path):
    path = tmp_path / "monitor.log"
    path.write_bytes(b'E {"event":"hello","format":1,"time":1}\n' * 100)
    log = read_monitor_log(path, max_bytes=1000)
    assert log.truncated and log.garbage_lines == 0 and log.event_lines == 1000 // 40


def test_fork_chain_and_process_cap_stay_bounded():
    lines = [f"S {p}  10:00:00.{p:06d} clone(child_stack=NULL, flags=SIGCHLD) = {p + 1}"
             for p in range(1, MAX_PROCESSES + 500)]
    log = parse_monitor_log("\n".join(lines))
    report = log.to_json()
    assert len(log.processes) == MAX_PROCESSES
    assert report["process_count"] > MAX_PROCESSES
    assert len(report["timeline"]) == MAX_TIMELINE and report["timeline_truncated"]
    json.dumps(report)  # no recursion error: the tree's depth is capped


def test_pid_reuse_makes_no_cycle():
    log = parse_monitor_log(_s("""
        5  10:00:00.000001 fork() = 6
        6  10:00:00.000002 +++ exited with 0 +++
        6  10:00:00.000003 fork() = 5
        5  10:00:00.000004 fork() = 6
    """))
    assert all(p.parent is None or p.parent < p.index for p in log.processes)
    json.dumps(log.to_json())


def test_string_and_argument_helpers():
    assert decode_c_string(r'"a\nb\x41\101\"\\"...') == (b'a\nbAA"\\', True)
    assert decode_c_string("0x1234") is None
    args, tail = split_args('3, "a, b)", [1, {x=2}], 16) = 0')
    assert args == ["3", '"a, b)"', "[1, {x=2}]", "16"] and tail == " = 0"
    assert split_args('"cut here')[1] is None


strace_like = st.builds(
    lambda pid, body: f"S {pid}  12:34:56.123456 {body}",
    st.integers(0, 2**40),
    st.one_of(st.text(max_size=200),
              st.sampled_from(['execve("/x", ["a"', "clone(flags=CLONE_THREAD) = 5",
                               "<... openat resumed>) = 3", "+++ killed by SIGSEGV +++",
                               'connect(3, {sa_family=AF_UNIX, sun_path="/x"}, 110) = 0',
                               "sendmmsg(3, [{msg_hdr={msg_iov=[{iov_base=\"\\x12\\x34\"",
                               "openat(AT_FDCWD, \"a\", O_CREAT <unfinished ...>"]).map(
                  lambda s: s)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.text(max_size=300), strace_like,
                          st.builds(lambda t: "E " + t, st.text(max_size=100))), max_size=40))
def test_random_lines_never_raise(lines):
    log = parse_monitor_log(lines)
    json.dumps(log.to_json(), allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000))
def test_random_bytes_never_raise(data):
    log = parse_monitor_log(data)
    json.dumps(log.to_json(), allow_nan=False)


@settings(max_examples=150, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_real_strace_never_raises(traced, data):
    _, text, _ = traced
    lines = text.splitlines()
    for _ in range(5):
        i = data.draw(st.integers(0, len(lines) - 1))
        cut = data.draw(st.integers(0, len(lines[i])))
        lines[i] = lines[i][:cut] + data.draw(st.text(max_size=20))
    json.dumps(parse_monitor_log(lines).to_json(), allow_nan=False)
