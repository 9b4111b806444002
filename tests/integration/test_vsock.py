"""The vsock device end to end: guest listeners, guest→host, refusals, reboot, a dead backend.

Everything goes through the product: sandboxes are created and started with the CLI, guest
programs run through ``secvf vm exec`` (the exec agent on vsock port 2222), and the host
side speaks the hybrid contract on the VM's socket ``<runtime dir>/vsock-<UUID>.sock``.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from secvf.store.bundle import RuntimeFiles
from tests.helpers import alive, run_cli

pytestmark = pytest.mark.vm

# Generous bounds that only keep a broken run from hanging (the machine is shared and slow).
IO_TIMEOUT_S = 60.0
LISTEN_TIMEOUT_S = 90.0
REBOOT_DEADLINE_S = 240.0
CRASH_DEADLINE_S = 60.0

HOST_CID = 2
ECHO_BLOB_BYTES = 20 * 1024 * 1024
PARALLEL_CONNECTIONS = 8
PARALLEL_BLOB_BYTES = 1024 * 1024

# A threaded AF_VSOCK echo server: echoes until EOF, then half-closes its side.
GUEST_ECHO_SERVER = """
import socket, sys, threading
srv = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
srv.bind((socket.VMADDR_CID_ANY, int(sys.argv[1])))
srv.listen(16)
print("listening", flush=True)
def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""

# Connects to the host (CID 2), sends a known 1 MiB payload, prints the host's reply.
GUEST_DIAL_HOST = """
import socket, sys
s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
s.settimeout(60)
s.connect((2, int(sys.argv[1])))
s.sendall(bytes(range(256)) * 4096)
s.shutdown(socket.SHUT_WR)
reply = b""
while chunk := s.recv(65536):
    reply += chunk
print(reply.decode())
"""
GUEST_DIAL_PAYLOAD = bytes(range(256)) * 4096


# ---- helpers ---------------------------------------------------------------------------------


def status(name: str) -> dict:
    return json.loads(run_cli("vm", "status", name, "--json", check=True).stdout)


def hybrid_socket(name: str) -> Path:
    return RuntimeFiles(status(name)["id"]).vsock_socket


def supervisor_log(vm_library: Path, name: str) -> str:
    return (vm_library / "vms" / name / "supervisor.log").read_text(errors="replace")


def read_line(sock: socket.socket) -> bytes:
    """Read one line byte by byte, so no payload after it is consumed."""
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return line


def hybrid_connect(path: Path, port: int) -> tuple[socket.socket, int]:
    """Open a host→guest stream: ``CONNECT <port>`` → ``OK <hostport>``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(IO_TIMEOUT_S)
    sock.connect(str(path))
    sock.sendall(f"CONNECT {port}\n".encode())
    reply = read_line(sock)
    assert reply.startswith(b"OK ") and reply.endswith(b"\n"), reply
    return sock, int(reply[3:])


def echo_round_trip(sock: socket.socket, blob: bytes) -> bytes:
    """Send ``blob`` (then EOF) from a thread while reading everything echoed back."""
    errors: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(blob)
            sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # reported by the caller's assert
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    sender.join(IO_TIMEOUT_S)
    assert not errors, errors
    return b"".join(chunks)


def echo_probe(sock: socket.socket, message: bytes) -> bytes:
    sock.sendall(message)
    got = b""
    while len(got) < len(message):
        chunk = sock.recv(len(message) - len(got))
        if not chunk:
            break
        got += chunk
    return got


def read_stdout_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n") and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            chunk = os.read(fd, 1)
            if not chunk:
                break
            line += chunk
    return line


@contextmanager
def guest_echo_listener(name: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """Run the echo server in the guest as a live ``secvf vm exec`` session.

    Ending the session (terminating the CLI) makes the agent kill the server.
    """
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "secvf",
            "vm",
            "exec",
            name,
            "--",
            "python3",
            "-c",
            GUEST_ECHO_SERVER,
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=os.environ.copy(),
    )
    try:
        line = read_stdout_line(proc, LISTEN_TIMEOUT_S)
        if line != b"listening\n":
            proc.kill()
            _, err = proc.communicate(timeout=IO_TIMEOUT_S)
            pytest.fail(f"guest echo server did not start: {line!r} {err.decode()[-2000:]}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(IO_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def scratch_sandbox(name: str) -> Iterator[dict]:
    """A sandbox of our own in the shared library (for tests that hurt it), removed after."""
    run_cli("sandbox", "create", name, "--memory", "512M", check=True)
    try:
        run_cli("sandbox", "start", name, check=True)
        yield status(name)
    except BaseException:
        log = Path(os.environ["SECVF_HOME"]) / "vms" / name / "supervisor.log"
        if log.exists():  # pytest shows this output with the failure
            print(f"---- last lines of {log}", *log.read_text().splitlines()[-80:], sep="\n")
        raise
    finally:
        run_cli("sandbox", "rm", name, "--purge", "--force")


def processes_mentioning(text: str) -> list[str]:
    # -ww: full command lines whatever $COLUMNS says
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if text in line and "ps -eo" not in line]


def child_pids(parent: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the fields after the ")" that closes comm: state, ppid, ...
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            pids.append(int(entry.name))
    return pids


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def security_events(vm_library: Path) -> list[dict]:
    return [
        json.loads(line)
        for p in sorted((vm_library / "logs").glob("security-*.jsonl"))
        for line in p.read_text().splitlines()
        if line.strip()
    ]


def wait_for_agent(name: str, deadline_s: float) -> float:
    """Poll ``vm exec NAME -- true`` until it succeeds; return the seconds it took."""
    started = time.monotonic()
    while run_cli("vm", "exec", name, "--", "true", timeout=IO_TIMEOUT_S).returncode != 0:
        assert time.monotonic() - started < deadline_s, f"agent of {name} did not come back"
        time.sleep(2)
    return time.monotonic() - started


def guest_boot_id(name: str) -> str:
    proc = run_cli("vm", "exec", name, "--", "cat", "/proc/sys/kernel/random/boot_id", check=True)
    return proc.stdout.strip()


# ---- tests -----------------------------------------------------------------------------------


def test_hybrid_socket_is_private(fleet: dict) -> None:
    path = hybrid_socket("sbx")
    assert path.is_socket()
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    # the jailed backend's (the VM's uid), in the VM's own runtime directory
    owner = fleet["sbx"]["jail"]["uid"] if fleet["sbx"].get("jail") else os.getuid()
    assert path.stat().st_uid == path.parent.stat().st_uid == owner


def test_20mb_echo_through_a_guest_listener(fleet: dict) -> None:
    blob = os.urandom(ECHO_BLOB_BYTES)
    with guest_echo_listener("sbx", 5201):
        sock, host_port = hybrid_connect(hybrid_socket("sbx"), 5201)
        with sock:
            started = time.monotonic()
            echoed = echo_round_trip(sock, blob)
            elapsed = time.monotonic() - started
    assert host_port >= 1 << 30  # FIRST_HOST_PORT
    assert len(echoed) == len(blob)
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(blob).hexdigest()
    rate = 2 * len(blob) / elapsed / 1e6
    print(f"20 MB echoed in {elapsed:.2f} s ({rate:.1f} MB/s both ways, {fleet['sbx']['accel']})")


def test_parallel_connections_each_get_their_own_data(fleet: dict) -> None:
    blobs = [bytes([i]) * 16 + os.urandom(PARALLEL_BLOB_BYTES) for i in range(PARALLEL_CONNECTIONS)]
    results: dict[int, bytes | BaseException] = {}
    host_ports: dict[int, int] = {}
    with guest_echo_listener("sbx", 5202):
        path = hybrid_socket("sbx")
        barrier = threading.Barrier(PARALLEL_CONNECTIONS)

        def client(index: int) -> None:
            try:
                sock, host_ports[index] = hybrid_connect(path, 5202)
                with sock:
                    barrier.wait(IO_TIMEOUT_S)
                    results[index] = echo_round_trip(sock, blobs[index])
            except BaseException as exc:  # reported by the assert below
                results[index] = exc

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(blobs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(4 * IO_TIMEOUT_S)
    assert len(set(host_ports.values())) == PARALLEL_CONNECTIONS
    for index, blob in enumerate(blobs):
        got = results.get(index)
        assert isinstance(got, bytes), f"connection {index}: {got!r}"
        assert len(got) == len(blob), f"connection {index}: {len(got)} of {len(blob)} bytes"
        assert got == blob, f"connection {index} got other data"


def test_guest_connects_to_a_host_listener(fleet: dict) -> None:
    port = 6201
    listener_path = Path(f"{hybrid_socket('sbx')}_{port}")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(listener_path))
    if fleet["sbx"].get("jail"):  # the jailed backend connects as the VM's uid
        os.chown(listener_path, fleet["sbx"]["jail"]["uid"], fleet["sbx"]["jail"]["gid"])
    listener.listen(1)
    listener.settimeout(IO_TIMEOUT_S)
    received: list[bytes] = []

    def serve_one() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(IO_TIMEOUT_S)
            data = b"".join(iter(lambda: conn.recv(65536), b""))
            received.append(data)
            conn.sendall(f"host got {len(data)} {hashlib.sha256(data).hexdigest()}".encode())

    server = threading.Thread(target=serve_one)
    server.start()
    try:
        proc = run_cli(
            "vm",
            "exec",
            "sbx",
            "--",
            "python3",
            "-c",
            GUEST_DIAL_HOST,
            str(port),
            timeout=2 * IO_TIMEOUT_S,
        )
        server.join(IO_TIMEOUT_S)
    finally:
        listener.close()
        listener_path.unlink(missing_ok=True)
    assert proc.returncode == 0, proc.stderr
    assert received == [GUEST_DIAL_PAYLOAD]
    expected = hashlib.sha256(GUEST_DIAL_PAYLOAD).hexdigest()
    assert proc.stdout.strip() == f"host got {len(GUEST_DIAL_PAYLOAD)} {expected}"


def test_connect_to_a_port_nobody_listens_on_is_refused(fleet: dict, vm_library: Path) -> None:
    port = 7999
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)  # only against a hang: the backend gives up after 2 s by itself
    sock.connect(str(hybrid_socket("sbx")))
    started = time.monotonic()
    with sock:
        sock.sendall(f"CONNECT {port}\n".encode())
        assert sock.recv(64) == b""
    print(f"refused CONNECT {port}: closed after {(time.monotonic() - started) * 1000:.1f} ms")
    # closed because the guest answered RST, not because the 2 s answer timeout ran out
    log_lines = [
        line for line in supervisor_log(vm_library, "sbx").splitlines() if f":{port} " in line
    ]
    assert any("guest refused the connection" in line for line in log_lines), log_lines
    assert not any("did not answer" in line for line in log_lines), log_lines
    assert run_cli("vm", "exec", "sbx", "--", "true").returncode == 0


def test_device_survives_a_guest_reboot(vm_library: Path) -> None:
    name = "vsreboot"
    with scratch_sandbox(name) as st:
        path = RuntimeFiles(st["id"]).vsock_socket
        boot_before = guest_boot_id(name)
        with guest_echo_listener(name, 5301):
            held, _ = hybrid_connect(path, 5301)
            assert echo_probe(held, b"before reboot") == b"before reboot"
            reboot = run_cli(
                "vm",
                "exec",
                name,
                "--root",
                "--",
                "sh",
                "-c",
                "echo b > /proc/sysrq-trigger",
                timeout=IO_TIMEOUT_S,
            )
            print(f"exec of the reboot ended with {reboot.returncode}")
            took = wait_for_agent(name, REBOOT_DEADLINE_S)
            print(f"agent answered again {took:.1f} s after the reboot")
            # the driver reset closed the stream the old guest had open
            with held:
                try:
                    leftover = held.recv(64)
                except ConnectionResetError:
                    leftover = b""
            assert leftover == b""
        assert guest_boot_id(name) != boot_before
        after = status(name)
        assert (after["state"], after["pid"]) == ("running", st["pid"])
        assert "closed by device reset" in supervisor_log(vm_library, name)
        with guest_echo_listener(name, 5302):
            sock, _ = hybrid_connect(path, 5302)
            with sock:
                blob = os.urandom(2 * 1024 * 1024)
                assert echo_round_trip(sock, blob) == blob
        assert run_cli("vm", "exec", name, "--", "echo", "ok").stdout == "ok\n"


def test_killing_the_backend_stops_the_vm_as_crashed(vm_library: Path) -> None:
    name = "vskill"
    with scratch_sandbox(name) as st:
        vm_id, supervisor_pid, qemu_pid = st["id"], st["pid"], st["qemu_pid"]
        files = RuntimeFiles(vm_id)
        assert files.vsock_socket.exists()
        backends = [
            pid
            for pid in child_pids(supervisor_pid)
            if "secvf.vsock" in cmdline(pid) and vm_id in cmdline(pid)
        ]
        assert len(backends) == 1, [cmdline(p) for p in child_pids(supervisor_pid)]
        os.kill(backends[0], signal.SIGKILL)

        deadline = time.monotonic() + CRASH_DEADLINE_S
        # the state turns crashed a moment before the run's record is written
        while ((current := status(name))["state"] not in ("crashed", "stopped")
               or current["last_run"] is None):
            assert time.monotonic() < deadline, f"still {current['state']}"
            time.sleep(0.5)
        assert current["state"] == "crashed"
        assert "device helper 'vsock' died" in current["last_run"]["reason"]
        died = [
            e
            for e in security_events(vm_library)
            if e.get("event") == "device_helper_died" and e.get("vm_id") == vm_id
        ]
        assert len(died) == 1 and died[0]["helper"] == "vsock", died
        assert not alive(qemu_pid)
        # the supervisor releases the run lock (state "crashed") just before it exits
        while alive(supervisor_pid):
            assert time.monotonic() < deadline, "the supervisor did not exit"
            time.sleep(0.2)
        assert processes_mentioning(vm_id) == []
        assert not files.vsock_socket.exists()
        assert not list(files.dir.glob(f"*{vm_id}*"))
