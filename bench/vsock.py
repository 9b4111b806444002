"""vsock benchmark: a running sandbox's hybrid vsock socket vs TCP over QEMU user networking.

SecVF side: ``secvf sandbox create/start``, then ``bench/guest_servers.py`` is uploaded and
started in the guest with ``secvf vm exec`` (AF_VSOCK echo/sink/source on ports
5000/5001/5002), and the host talks to it through ``<runtime dir>/vsock-<UUID>.sock``
(``CONNECT <port>\\n`` → ``OK <n>\\n`` → raw bytes).

Baseline, same run: the sandbox disk with the agent file swapped for the same servers in
TCP mode (see ``baseline_image.tcp_server_disk``), booted by plain QEMU with user
networking and ``hostfwd`` ports, reached at ``127.0.0.1:<port>``.

The two guests run one after the other, never at the same time.
``--runs N`` is the number of 64-byte echo round trips (default 1000).

    .venv/bin/python bench/vsock.py [--runs N]
"""

from __future__ import annotations

import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import baseline_image
import benchlib as bl

from secvf.image import build_image
from secvf.store.bundle import RuntimeFiles
from secvf.store.library import get_vm

ECHO, SINK, SOURCE = 5000, 5001, 5002
BULK_BYTES = 64 << 20
PARALLEL = 8
PARALLEL_BYTES = 8 << 20
CONNECTS = 50
SERVERS = Path(__file__).with_name("guest_servers.py")
Dialer = Callable[[int], socket.socket]


@dataclass
class Results:
    """Everything measured against one guest."""

    connect_ok: list[float]  # CONNECT → OK (vsock) / connect() (tcp)
    connect_first_byte: list[float]  # connect + 1-byte echo
    echo_rtt: list[float]
    to_guest_mbs: float
    from_guest_mbs: float
    parallel_to_guest_mbs: float
    parallel_from_guest_mbs: float
    wall_s: float
    cpu_s: dict[str, float]


def vsock_dialer(uds: Path) -> Dialer:
    """Open a raw byte stream to guest ``port`` through the hybrid vsock socket."""

    def dial(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(str(uds))
        sock.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n"):
            chunk = sock.recv(1)
            if not chunk:
                sock.close()
                raise ConnectionRefusedError(f"vsock port {port}: closed before OK")
            line += chunk
        if not line.startswith(b"OK "):
            raise ConnectionError(f"vsock port {port}: {line!r}")
        return sock

    return dial


def tcp_dialer(ports: dict[int, int]) -> Dialer:
    """Open a TCP connection to guest ``port`` through its hostfwd port."""

    def dial(port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", ports[port]), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    return dial


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed early")
        buf += chunk
    return bytes(buf)


def wait_echo(dial: Dialer, timeout: float) -> None:
    """Until a 1-byte echo on port 5000 works (the guest servers are up)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with dial(ECHO) as s:
                s.settimeout(5)
                s.sendall(b"x")
                if recv_exact(s, 1) == b"x":
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def send_to_sink(dial: Dialer, nbytes: int) -> None:
    """Send ``nbytes`` to the sink and check its count."""
    block = bytes(256 * 1024)
    with dial(SINK) as s:
        left = nbytes
        while left:
            s.sendall(block[: min(left, len(block))])
            left -= min(left, len(block))
        s.shutdown(socket.SHUT_WR)
        got = struct.unpack(">Q", recv_exact(s, 8))[0]
    if got != nbytes:
        raise RuntimeError(f"sink counted {got} bytes, sent {nbytes}")


def read_from_source(dial: Dialer, nbytes: int) -> None:
    """Ask the source for ``nbytes`` and read them all."""
    with dial(SOURCE) as s:
        s.sendall(struct.pack(">Q", nbytes))
        got = 0
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got += len(chunk)
    if got != nbytes:
        raise RuntimeError(f"source sent {got} bytes, asked {nbytes}")


def mbs(nbytes: int, seconds: float) -> float:
    """MB/s (10^6 bytes)."""
    return nbytes / seconds / 1e6


def parallel(dial: Dialer, op: Callable[[Dialer, int], None], each: int) -> float:
    """Aggregate MB/s of PARALLEL concurrent connections moving ``each`` bytes each."""
    errors: list[BaseException] = []

    def one() -> None:
        try:
            op(dial, each)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(PARALLEL)]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return mbs(each * PARALLEL, time.perf_counter() - begin)


def measure(dial: Dialer, echo_runs: int, cpu_pids: dict[str, int]) -> Results:
    """Run every measurement against one guest; account CPU of ``cpu_pids``."""
    cpu0 = {k: bl.cpu_seconds(p) for k, p in cpu_pids.items()}
    wall0 = time.perf_counter()
    connect_ok, first_byte = [], []
    for _ in range(CONNECTS):
        begin = time.perf_counter()
        s = dial(ECHO)
        connect_ok.append(time.perf_counter() - begin)
        s.sendall(b"x")
        recv_exact(s, 1)
        first_byte.append(time.perf_counter() - begin)
        s.close()
    rtts = []
    with dial(ECHO) as s:
        msg = bytes(64)
        for _ in range(echo_runs):
            begin = time.perf_counter()
            s.sendall(msg)
            recv_exact(s, len(msg))
            rtts.append(time.perf_counter() - begin)
    to_guest = mbs(BULK_BYTES, bl.timed(lambda: send_to_sink(dial, BULK_BYTES)))
    from_guest = mbs(BULK_BYTES, bl.timed(lambda: read_from_source(dial, BULK_BYTES)))
    par_to = parallel(dial, send_to_sink, PARALLEL_BYTES)
    par_from = parallel(dial, read_from_source, PARALLEL_BYTES)
    wall = time.perf_counter() - wall0
    cpu = {k: bl.cpu_seconds(p) - cpu0[k] for k, p in cpu_pids.items()}
    return Results(connect_ok, first_byte, rtts, to_guest, from_guest, par_to, par_from, wall, cpu)


def upload_guest_servers(name: str) -> None:
    """Put ``guest_servers.py`` at ``/tmp/guest_servers.py`` in running sandbox ``name``
    (readable by every guest account: its modes can be run with ``secvf vm exec``)."""
    bl.secvf(
        "vm",
        "exec",
        name,
        "-i",
        "--",
        "sh",
        "-c",
        "cat > /tmp/guest_servers.py",
        input_bytes=SERVERS.read_bytes(),
    )


def start_guest_servers(name: str) -> tuple[Dialer, Path]:
    """Upload ``guest_servers.py`` into running sandbox ``name``, start it on AF_VSOCK
    (echo/sink/source) and wait until it answers; return its dialer and the hybrid socket.

    The file stays at ``/tmp/guest_servers.py`` in the guest (see
    :func:`upload_guest_servers`)."""
    upload_guest_servers(name)
    # The agent kills what is left in the command's session when it exits, so wait until
    # the servers (in a session of their own) are listening before letting `sh` exit.
    bl.secvf(
        "vm",
        "exec",
        name,
        "-c",
        "setsid python3 /tmp/guest_servers.py vsock "
        "</dev/null >/tmp/guest_servers.log 2>&1 & for i in $(seq 300); do "
        "grep -q listening /tmp/guest_servers.log && exit 0; sleep 0.1; done; exit 1",
    )
    _, config = get_vm(name)
    uds = RuntimeFiles(config.id).vsock_socket
    dial = vsock_dialer(uds)
    wait_echo(dial, 60)
    return dial, uds


def run_secvf(echo_runs: int) -> tuple[Results, Path]:
    """Sandbox via the CLI, servers started with ``secvf vm exec``, measured over vsock."""
    name = "vsockbench"
    bl.secvf("sandbox", "create", name, "--accel", bl.ACCEL)
    bl.secvf("sandbox", "start", name)
    dial, uds = start_guest_servers(name)
    procs = bl.vm_processes(name)
    pids = {"vsock backend": procs["vsock"][0], "QEMU": procs["qemu"][0]}
    results = measure(dial, echo_runs, pids)
    bl.secvf("vm", "stop", name, "--force")
    return results, uds


def run_baseline(workdir: Path, echo_runs: int) -> tuple[Results, str]:
    """The same guest with TCP servers, plain QEMU + hostfwd."""
    sandbox = build_image("sandbox")
    disk = baseline_image.tcp_server_disk(sandbox, SERVERS, progress=bl.log)
    append = f"{sandbox.cmdline} {bl.NAT_NIC_PARAM} secvf_hostname=baseline"
    with bl.PlainVM(
        workdir,
        sandbox.kernel,
        sandbox.initrd,
        disk.rootfs,
        append=append,
        forwards=(ECHO, SINK, SOURCE),
        name="tcpsrv",
    ) as vm:
        vm.wait_line("SECVF-READY", 120)
        dial = tcp_dialer(vm.ports)
        wait_echo(dial, 60)
        return measure(dial, echo_runs, {"QEMU": vm.proc.pid}), disk.short


def ms(values: list[float], pct: float) -> float:
    """Percentile in milliseconds."""
    return bl.percentile(values, pct) * 1000


def add_rows(rep: bl.Report, sec: Results, base: Results, echo_runs: int) -> None:
    """The result rows."""
    tcp = "TCP via slirp hostfwd"
    for label, pct in (("p50", 50), ("p99", 99)):
        rep.add(
            bl.Row(
                f"connect + 1-byte echo {label} (n={CONNECTS})",
                f"{ms(sec.connect_first_byte, pct):.2f} ms",
                tcp,
                f"{ms(base.connect_first_byte, pct):.2f} ms",
                bl.ratio(ms(sec.connect_first_byte, pct), ms(base.connect_first_byte, pct)),
            )
        )
    rep.add(
        bl.Row(
            f"CONNECT→OK p50/p99 (n={CONNECTS})",
            f"{ms(sec.connect_ok, 50):.2f} / {ms(sec.connect_ok, 99):.2f} ms",
            tcp,
            f"{ms(base.connect_ok, 50):.2f} / {ms(base.connect_ok, 99):.2f} ms",
            "",
            "TCP connect() completes at slirp before the guest accepts: not comparable",
        )
    )
    for label, pct in (("p50", 50), ("p99", 99)):
        rep.add(
            bl.Row(
                f"echo RTT 64 B {label} (n={echo_runs})",
                f"{ms(sec.echo_rtt, pct):.3f} ms",
                tcp,
                f"{ms(base.echo_rtt, pct):.3f} ms",
                bl.ratio(ms(sec.echo_rtt, pct), ms(base.echo_rtt, pct)),
            )
        )
    for label, s, b in (
        ("bulk host→guest, 64 MiB", sec.to_guest_mbs, base.to_guest_mbs),
        ("bulk guest→host, 64 MiB", sec.from_guest_mbs, base.from_guest_mbs),
        (
            f"{PARALLEL} connections host→guest, {PARALLEL}×8 MiB",
            sec.parallel_to_guest_mbs,
            base.parallel_to_guest_mbs,
        ),
        (
            f"{PARALLEL} connections guest→host, {PARALLEL}×8 MiB",
            sec.parallel_from_guest_mbs,
            base.parallel_from_guest_mbs,
        ),
    ):
        rep.add(
            bl.Row(
                label, f"{s:.1f} MB/s", tcp, f"{b:.1f} MB/s", bl.ratio(s, b, higher_is_better=True)
            )
        )
    sec_host = sum(sec.cpu_s.values())
    rep.add(
        bl.Row(
            "host CPU for the whole run above",
            f"{sec_host:.2f} s over {sec.wall_s:.1f} s wall (backend "
            f"{sec.cpu_s['vsock backend']:.2f} s, QEMU {sec.cpu_s['QEMU']:.2f} s)",
            "QEMU (slirp runs inside QEMU)",
            f"{base.cpu_s['QEMU']:.2f} s over {base.wall_s:.1f} s wall",
            "",
            "the guest's CPU is inside QEMU's number in both columns",
        )
    )
    rep.add(
        bl.Row(
            "vsock backend CPU per MiB moved",
            f"{sec.cpu_s['vsock backend'] * 1000 / (2 * 64 + 2 * PARALLEL * 8):.1f} ms",
            "-",
            "-",
        )
    )
    rep.notes += [
        "Ratios: '× faster'/'× higher' = SecVF better. The guests ran one after the other.",
        "Baseline guest: the sandbox disk with its agent file replaced by the same servers in "
        "TCP mode (debugfs), booted by plain QEMU (-netdev user,hostfwd=...), same kernel/init.",
    ]


def main() -> None:
    args = bl.parse_args(__doc__.splitlines()[0], 1000)
    rep = bl.Report(
        "vsock: hybrid vsock socket vs TCP over QEMU user networking (hostfwd)",
        f"bench/vsock.py --runs {args.runs}",
    )
    with bl.private_secvf() as root:
        sandbox = build_image("sandbox")
        bl.log("SecVF: sandbox + guest servers over vsock")
        sec, uds = run_secvf(args.runs)
        bl.log("baseline: same guest, TCP servers, plain QEMU + hostfwd")
        base, disk_key = run_baseline(Path(tempfile.mkdtemp(dir=root)), args.runs)
    rep.facts |= {
        "guest": f"1 vCPU, {bl.GUEST_MEMORY_MIB} MiB, -cpu max, kernel {sandbox.kernel_version}",
        "images": f"sandbox {sandbox.short_hash}; baseline disk tcpsrv-{disk_key} "
        "(sandbox + servers in place of the agent)",
        "vsock socket": f"{uds.parent}/vsock-<UUID>.sock (private runtime dir)",
    }
    add_rows(rep, sec, base, args.runs)
    rep.print()


if __name__ == "__main__":
    main()
