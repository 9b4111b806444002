"""Switch benchmark: frames/s through the isolated-network switch, beside a direct path.

Synthetic load on this host, no VM: a generator process bound at VM A's QEMU path sends
frames from A's pinned MAC to B's as fast as blocking ``sendto`` allows (so it is paced
by whoever reads), and a receiver process bound at B's QEMU path counts them. The real
watchdog + switch run on a private ``NETDIR`` started with ``ensure_switch``, rate limits
off (``frames_per_s``/``broadcast_per_s`` 0), ``net.unix.max_dgram_qlen`` raised to 512.

Rows: 64-byte and 1514-byte frames, capture off, and with one capture client (a process
running ``open_capture`` and writing pcapng to ``/dev/shm``). The frames/s column is the
switch's own ``tx`` counter for B over the steady part of the run (the first
:data:`WARMUP_S` are skipped); switch CPU comes from ``stats`` ``cpu_s`` over the same
window. Baseline, same run: the same generator and receiver with the generator sending
straight to the receiver's socket (what the switch would cost nothing). Every process
shares the host's cores, so saturated rows are a lower bound of the switch's capacity.

``--pcapng-only`` measures the pcapng writers instead (ours against ``dpkt.pcapng``).

    .venv/bin/python bench/switch.py [--seconds S] [--pcapng-only]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import benchlib as bl

from secvf.net import launcher
from secvf.net.capture import Frame, Interfaces, open_capture
from secvf.net.config import NetPaths
from secvf.net.control import query
from secvf.net.pcapng import PcapngWriter

WARMUP_S = 0.7
SIZES = (64, 1514)
GOALS = {False: 100_000, True: 50_000}  # frames/s on one core, capture off / on (issue 12)
MAC_A, MAC_B = bytes.fromhex("525400000001"), bytes.fromhex("525400000002")
PCAPNG_FRAMES = 200_000
IDLE_S = 1.0  # a capture client stops after this long without a frame


def frame(size: int) -> bytes:
    """A unicast A → B frame of ``size`` bytes."""
    return MAC_B + MAC_A + b"\x08\x00" + b"\xab" * (size - 14)


# ---- the worker processes (this file run with --role) -------------------------------


def bound(path: str) -> socket.socket:
    """A datagram socket bound at ``path`` (a stale file there is replaced)."""
    Path(path).unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    return sock


def generate(local: str, remote: str, size: int, seconds: float) -> None:
    """Send ``size``-byte frames from ``local`` to ``remote`` for ``seconds``."""
    sock = bound(local)
    data, sendto, sent = frame(size), sock.sendto, 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(256):
            try:
                sendto(data, remote)
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.01)
        sent += 256
    print(json.dumps({"sent": sent}), flush=True)


def receive(local: str, seconds: float) -> None:
    """Count frames arriving at ``local``; report count and the steady-window rate."""
    sock = bound(local)
    sock.settimeout(seconds + 5)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    buf = bytearray(65536)
    count = window = 0
    sock.recv_into(buf)
    start = time.monotonic()
    steady_from, steady_to = start + WARMUP_S, start + seconds - 0.2
    sock.settimeout(0.5)
    try:
        while True:
            sock.recv_into(buf)
            count += 1
            now_ok = steady_from <= time.monotonic() < steady_to if count & 63 == 0 else False
            window += 64 if now_ok else 0
    except TimeoutError:
        pass
    span = max(steady_to - steady_from, 1e-9)
    print(json.dumps({"received": count + 1, "rate": window / span}), flush=True)


def capture(netdir: str, out: str) -> None:
    """Capture every port to pcapng at ``out`` until no frame came for a second."""
    frames = dropped = 0
    with open(out, "wb", buffering=1 << 20) as fh, open_capture(Path(netdir)) as stream:
        writer, ids = PcapngWriter(fh), {}
        add_interfaces(writer, ids, stream.interfaces)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        read, write = stream.read, writer.write
        while True:
            try:
                item = read(IDLE_S)
            except TimeoutError:
                break
            if isinstance(item, Frame):
                write(item.ts_ns, ids[item.interface], item.data)
                frames += 1
            elif isinstance(item, Interfaces):
                add_interfaces(writer, ids, item)
            elif item is not None:
                dropped = item.total
    print(json.dumps({"frames": frames, "dropped": dropped}), flush=True)


def add_interfaces(writer: PcapngWriter, ids: dict[int, int], item: Interfaces) -> None:
    """Give every new capture interface a pcapng interface id."""
    for i in item.interfaces:
        if i.index not in ids:
            ids[i.index] = writer.add_interface(i.vm, f"port {i.port}")


# ---- the runs -----------------------------------------------------------------------


@dataclass
class Result:
    """One condition's numbers."""

    rate: float  # frames/s forwarded (switch) or received (baseline)
    cpu_pct: float = 0.0  # switch CPU, % of one core
    us_per_frame: float = 0.0  # switch CPU per forwarded frame
    note: str = ""


def worker(*args: str) -> subprocess.Popen[str]:
    """This file as a worker process."""
    return bl.popen_owned([sys.executable, __file__, "--role", *args],
                          stdout=subprocess.PIPE, text=True)


def ready(proc: subprocess.Popen[str]) -> None:
    """Wait for a worker's ``ready`` line."""
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"


def report(proc: subprocess.Popen[str]) -> dict:
    """A worker's final JSON line."""
    out, _ = proc.communicate(timeout=60)
    return json.loads(out.strip().splitlines()[-1])


def port(paths: NetPaths, n: int, mac: bytes) -> dict:
    name = f"b000000{n}-0"
    return {"port": name, "vm": f"bench{n}", "vm_id": f"b000000{n}-0000-4000-8000-0000000000"
            "00", "nic": 0, "mac": mac.hex(":"), "router": False,
            "qemu_path": str(paths.qemu_path(name)), "switch_path": str(paths.switch_path(name)),
            "pid": os.getpid()}


def through_switch(netdir: Path, size: int, seconds: float, with_capture: bool) -> Result:
    """One run through the switch."""
    paths = NetPaths(netdir)
    a, b = port(paths, 1, MAC_A), port(paths, 2, MAC_B)
    receiver = worker("recv", b["qemu_path"], str(seconds))
    ready(receiver)
    cap_out = f"/dev/shm/svb-cap-{os.getpid()}.pcapng"
    cap = worker("capture", str(netdir), cap_out) if with_capture else None
    if cap is not None:
        ready(cap)
    gen = worker("gen", a["qemu_path"], a["switch_path"], str(size), str(seconds))
    time.sleep(WARMUP_S)
    s0, t0 = query(netdir, {"op": "stats"}), time.monotonic()
    time.sleep(seconds - WARMUP_S - 0.3)
    s1, t1 = query(netdir, {"op": "stats"}), time.monotonic()
    report(gen)
    got = report(receiver)
    note = f"receiver got {got['received']:,}"
    if cap is not None:
        c = report(cap)
        Path(cap_out).unlink(missing_ok=True)
        note += f"; capture wrote {c['frames']:,} frames, {c['dropped']:,} dropped"
    tx = _tx(s1, b["port"]) - _tx(s0, b["port"])
    cpu = s1["cpu_s"] - s0["cpu_s"]
    drops = {k: v for k, v in s1["drops"].items() if v}
    if drops:
        note += f"; switch drops {drops}"
    span = t1 - t0
    return Result(tx / span, 100 * cpu / span, 1e6 * cpu / max(tx, 1), note)


def _tx(stats: dict, name: str) -> int:
    return next(p["tx"] for p in stats["ports"] if p["port"] == name)


def direct(root: Path, size: int, seconds: float) -> Result:
    """The baseline: generator straight to receiver."""
    rx, tx = str(root / "direct.rx"), str(root / "direct.tx")
    receiver = worker("recv", rx, str(seconds))
    ready(receiver)
    gen = worker("gen", tx, rx, str(size), str(seconds))
    report(gen)
    got = report(receiver)
    for path in (rx, tx):
        Path(path).unlink(missing_ok=True)
    return Result(got["rate"], note=f"receiver got {got['received']:,}")


def pcapng_speed() -> tuple[float, float]:
    """µs per 64-byte frame written: (ours, dpkt's)."""
    import dpkt

    data, ts = frame(64), time.time_ns()
    ours = PcapngWriter(io.BytesIO())
    ours.add_interface("a", "b")
    begin = time.perf_counter()
    for i in range(PCAPNG_FRAMES):
        ours.write(ts + i, 0, data)
    mine = (time.perf_counter() - begin) / PCAPNG_FRAMES * 1e6
    theirs = dpkt.pcapng.Writer(io.BytesIO(), snaplen=65535, linktype=dpkt.pcap.DLT_EN10MB)
    begin = time.perf_counter()
    for i in range(PCAPNG_FRAMES):
        theirs.writepkt(data, ts=(ts + i) / 1e9)
    return mine, (time.perf_counter() - begin) / PCAPNG_FRAMES * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per run (default 4)")
    parser.add_argument("--pcapng-only", action="store_true")
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        role, *rest = args.role
        {"gen": lambda: generate(rest[0], rest[1], int(rest[2]), float(rest[3])),
         "recv": lambda: receive(rest[0], float(rest[1])),
         "capture": lambda: capture(rest[0], rest[1])}[role]()
        return
    if args.pcapng_only:
        mine, theirs = pcapng_speed()
        print(f"pcapng, {PCAPNG_FRAMES} frames of 64 B to BytesIO: secvf.net.pcapng "
              f"{mine:.2f} µs/frame, dpkt.pcapng.Writer {theirs:.2f} µs/frame")
        return
    run(args.seconds)


def run(seconds: float) -> None:
    """Every condition, then the table."""
    rep = bl.Report("Switch: frames/s through secvf.net.switch vs direct AF_UNIX datagrams",
                    f"bench/switch.py --seconds {seconds:g}")
    root = Path(tempfile.mkdtemp(prefix="svb-net-", dir="/tmp"))
    netdir = root / "net"
    (root / "logs").mkdir()
    qlen = launcher.raise_dgram_qlen()
    config = {"network": "bench", "network_id": "b0000000-0000-4000-8000-000000000000",
              "isolate_guests": False, "frames_per_s": 0, "broadcast_per_s": 0,
              "min_frame": 14, "max_frame": 9000, "ring_frames": 1000,
              "logs_dir": str(root / "logs")}
    try:
        launcher.ensure_switch(netdir, config)
        paths = NetPaths(netdir)
        for n, mac in ((1, MAC_A), (2, MAC_B)):
            launcher.write_port(netdir, port(paths, n, mac))
        for size in SIZES:
            bl.log(f"{size} B: direct")
            base = direct(root, size, seconds)
            for with_capture in (False, True):
                bl.log(f"{size} B: switch, capture {'on' if with_capture else 'off'}")
                res = through_switch(netdir, size, seconds, with_capture)
                add_row(rep, size, with_capture, res, base)
    finally:
        for n in (1, 2):
            launcher.release_port(netdir, f"b000000{n}-0")
        time.sleep(2.5)  # the watchdog stops the switch once no port is left
        shutil.rmtree(root, ignore_errors=True)
    rep.facts.update({
        "accelerator": "none: no VM is started",
        "net.unix.max_dgram_qlen": str(qlen),
        "switch config": "frames_per_s 0, broadcast_per_s 0 (limits off), ring 1000 frames",
        "processes": "generator, receiver, switch (+ watchdog, + capture client) share "
                     f"{os.cpu_count()} cores",
    })
    rep.notes += [
        "frames/s: the switch's tx counter for the receiving port over the steady window; "
        "baseline: the receiver's own count over the same kind of window.",
        "switch CPU: stats cpu_s (process_time of the switch) over the window; "
        "µs/frame = CPU / forwarded frames; 'one core' = 1 s / (µs/frame), the rate a "
        "saturated switch core would reach (a run below 100% switch CPU is bound by the "
        "generator and receiver sharing the host).",
        f"goal (issue 12): >= {GOALS[False]:,} frames/s capture off, >= {GOALS[True]:,} "
        "with capture on, on one core.",
    ]
    rep.print()


def add_row(rep: bl.Report, size: int, with_capture: bool, res: Result, base: Result) -> None:
    """One table row."""
    goal = GOALS[with_capture]
    capacity = 1e6 / res.us_per_frame if res.us_per_frame else 0.0
    verdict = "met" if res.rate >= goal else \
        "met by capacity (host-bound run)" if capacity >= goal else "MISSED"
    rep.add(bl.Row(
        f"{size} B, capture {'on (pcapng to /dev/shm)' if with_capture else 'off'}",
        f"{res.rate:,.0f} frames/s", "direct dgram, no switch", f"{base.rate:,.0f} frames/s",
        f"{res.rate / base.rate:.2f}× of direct" if base.rate else "n/a",
        f"switch CPU {res.cpu_pct:.0f}% of a core, {res.us_per_frame:.1f} µs/frame "
        f"(one core: ~{capacity:,.0f} frames/s); goal {goal:,}: {verdict}; {res.note}"))


if __name__ == "__main__":
    main()
