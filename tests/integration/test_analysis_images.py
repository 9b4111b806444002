"""Boot the ``analysis`` and ``fakenet`` images under plain QEMU and detonate samples.

The analysis guest has no NIC and no channel: an empty cdrom drive (``ide-cd`` on a PIIX
IDE controller: the cloud kernel has no AHCI driver for q35's own), the console on the
first serial port and the monitor log on the second. Each case inserts a medium over
QMP once the guest is ready and reads the monitor log back with the host's parser.
Two guests run at once (the host has two cores); each detonates one sample.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from secvf.analysis.medium import build_sample_medium, manifest
from secvf.analysis.monitor_log import parse_monitor_log
from secvf.image import READY_MARKER, ImageInfo, build_image

pytestmark = pytest.mark.vm

READY_TIMEOUT_S = 120
DONE_TIMEOUT_S = 120
DONE_MARKER = "SECVF-DETONATION-DONE"

HOSTILE = """#!/bin/sh
ls /dev/vsock /dev/virtio-ports
echo dropped > "$HOME/dropped.txt"
echo x > /media/sample/written
bomb() { bomb & bomb & wait; }
bomb 2>/dev/null &
sleep 1000
"""
BENIGN = """#!/bin/sh
echo "args: $*" > /tmp/out
exit 3
"""


@pytest.fixture(scope="module")
def analysis_image() -> ImageInfo:
    from tests.integration.conftest import vm_host_problem

    problem = vm_host_problem()
    if problem is not None:
        pytest.skip(problem)
    return build_image("analysis")


@dataclass
class Guest:
    """One plain-QEMU guest of the test and its files."""

    proc: subprocess.Popen[bytes]
    console: Path
    monitor: Path
    qmp: Path
    overlay: Path
    started: float

    def wait_for(self, marker: str, timeout: float) -> float:
        """Seconds from QEMU's start until ``marker`` is a console line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.console.read_text(errors="replace") if self.console.exists() else ""
            if marker in text.splitlines():
                return time.monotonic() - self.started
            assert self.proc.poll() is None, f"QEMU exited ({self.proc.returncode}):\n{text}"
            time.sleep(0.05)
        raise AssertionError(f"no {marker!r} within {timeout} s:\n{self.console.read_text()}")

    def qmp_execute(self, command: str, arguments: dict | None = None) -> dict:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.qmp))
            stream = sock.makefile("rw")
            assert "QMP" in json.loads(stream.readline())
            reply: dict = {}
            for cmd, args in (("qmp_capabilities", None), (command, arguments)):
                stream.write(json.dumps({"execute": cmd, **({"arguments": args} if args else {})})
                             + "\n")
                stream.flush()
                reply = json.loads(stream.readline())
                while "event" in reply:
                    reply = json.loads(stream.readline())
            return reply


@contextmanager
def analysis_guest(image: ImageInfo, work: Path) -> Iterator[Guest]:
    work.mkdir(parents=True, exist_ok=True)
    overlay = work / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                    str(image.rootfs), str(overlay)], check=True)
    qmp = Path(f"/tmp/secvf-antest-{os.getpid()}-{work.name}.qmp")
    console, monitor = work / "console.log", work / "monitor.log"
    argv = [
        "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "512",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", f"{image.cmdline} secvf_hostname=antest",
        "-drive", f"file={overlay},if=none,id=root,format=qcow2",
        "-device", "virtio-blk-pci,drive=root",
        "-device", "virtio-rng-pci",
        "-device", "piix3-ide,id=pide",
        "-drive", "if=none,id=cd0,media=cdrom,readonly=on",
        "-device", "ide-cd,drive=cd0,id=cd0dev,bus=pide.0",
        "-chardev", f"file,id=con,path={console}", "-serial", "chardev:con",
        "-chardev", f"file,id=mon,path={monitor}", "-serial", "chardev:mon",
        "-qmp", f"unix:{qmp},server=on,wait=off",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield Guest(proc, console, monitor, qmp, overlay, time.monotonic())
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        qmp.unlink(missing_ok=True)


@dataclass
class Detonation:
    ready_s: float
    done_s: float
    console: str
    monitor: bytes
    overlay: Path


def detonate(image: ImageInfo, work: Path, script: str, meta: dict) -> Detonation:
    sample = work / "sample.sh"
    work.mkdir(parents=True, exist_ok=True)
    sample.write_text(script)
    iso = build_sample_medium(sample, meta, work / "medium.iso")
    with analysis_guest(image, work) as guest:
        ready = guest.wait_for(READY_MARKER, READY_TIMEOUT_S)
        inserted = time.monotonic()
        reply = guest.qmp_execute("blockdev-change-medium", {
            "id": "cd0dev", "filename": str(iso), "format": "raw",
            "read-only-mode": "read-only"})
        assert reply == {"return": {}}, reply
        guest.wait_for(DONE_MARKER, DONE_TIMEOUT_S)
        done = time.monotonic() - inserted
        guest.qmp_execute("quit")
        guest.proc.wait(10)
        return Detonation(ready, done, guest.console.read_text(errors="replace"),
                          guest.monitor.read_bytes(), guest.overlay)


@pytest.fixture(scope="module")
def detonations(analysis_image: ImageInfo,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, Detonation]:
    """Two samples detonated at once, one guest each."""
    root = tmp_path_factory.mktemp("detonations")
    cases = {
        "hostile": (HOSTILE, manifest("hostile.sh", timeout_s=20, pid_limit=24)),
        "benign": (BENIGN, manifest("benign.sh", args=["one", "two words"], user="root",
                                    timeout_s=60)),
    }
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(detonate, analysis_image, root / name, script, meta)
                   for name, (script, meta) in cases.items()}
        results = {name: f.result() for name, f in futures.items()}
    for name, result in results.items():
        print(f"{name}: boot to ready {result.ready_s:.1f} s, "
              f"medium to done {result.done_s:.1f} s")
    return results


def _events(log: bytes) -> list[dict]:
    return [json.loads(line[2:]) for line in log.decode().splitlines() if line.startswith("E ")]


def test_benign_sample_runs_to_its_exit_with_the_whole_event_sequence(
        detonations: dict[str, Detonation]) -> None:
    run = detonations["benign"]
    events = _events(run.monitor)
    assert [e["event"] for e in events] == ["hello", "medium", "start", "exit", "done"]
    assert run.monitor.startswith(b"# secvf detonator 1\n")
    assert events[0]["format"] == 1 and events[0]["strace"].startswith("strace -- version")
    assert {"name": "benign.sh", "size": len(BENIGN)} in events[1]["files"]
    assert events[2]["argv"] == ["/media/sample/benign.sh", "one", "two words"]
    assert (events[2]["user"], events[2]["cwd"]) == ("root", "/root")
    assert events[3] == {**events[3], "code": 3, "signal": None}

    parsed = parse_monitor_log(run.monitor)
    assert parsed.complete and not parsed.garbage_lines, parsed.garbage_samples
    assert parsed.strace_lines > 10
    assert b'execve("/media/sample/benign.sh"' in run.monitor
    assert DONE_MARKER in run.console.splitlines()


def test_hostile_sample_meets_a_read_only_medium_the_pid_limit_and_the_timeout(
        detonations: dict[str, Detonation]) -> None:
    run = detonations["hostile"]
    names = [e["event"] for e in _events(run.monitor)]
    assert names[:3] == ["hello", "medium", "start"]
    assert "write_medium_denied" in names and "pid_limit" in names
    assert names[-3:] == ["timeout", "exit", "done"], names
    exit_event = _events(run.monitor)[names.index("exit")]
    assert exit_event["signal"] == "SIGKILL"
    text = run.monitor.decode()
    assert 'openat(AT_FDCWD, "/media/sample/written"' in text and "EROFS" in text
    assert "+++ killed by SIGKILL +++" in text  # strace outlived the sample's cgroup kill
    # no channel devices in the guest: ls fails on both
    assert '"/dev/vsock"' in text and '"/dev/virtio-ports"' in text
    assert not any('"/dev/vsock"' in line and line.endswith(") = 0")
                   for line in text.splitlines())
    parsed = parse_monitor_log(run.monitor)
    assert parsed.complete and not parsed.garbage_lines, parsed.garbage_samples
    assert DONE_MARKER in run.console.splitlines()


def test_the_disk_is_consistent_after_the_detonation_and_holds_the_dropped_file(
        detonations: dict[str, Detonation], tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(detonations["hostile"].overlay),
                    str(raw)], check=True)
    header = subprocess.run(["dumpe2fs", "-h", str(raw)], capture_output=True, text=True,
                            check=True).stdout
    features = next(line for line in header.splitlines() if line.startswith("Filesystem features"))
    assert "needs_recovery" not in features
    dropped = subprocess.run(["debugfs", "-R", "cat /home/analyst/dropped.txt", str(raw)],
                             capture_output=True, text=True, check=True).stdout
    assert dropped == "dropped\n"


# ---- fakenet ---------------------------------------------------------------------------
# One boot on QEMU user networking: the guest holds the "router" address 10.0.2.15/24
# (no gateway) and the host reaches its DNS and HTTP through hostfwd, which costs one
# guest instead of two on a switch.

def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _dns_query(port: int, name: str) -> str:
    labels = b"".join(bytes([len(p)]) + p for p in name.encode().split(b"."))
    query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + labels + b"\x00\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(15)
        sock.sendto(query, ("127.0.0.1", port))
        reply = sock.recv(512)
    assert reply[:2] == b"\x12\x34" and reply[3] & 0x0F == 0, reply  # same id, NOERROR
    return socket.inet_ntoa(reply[-4:])


def test_fakenet_answers_every_name_with_itself_and_serves_http(
        tmp_path: Path, analysis_image: ImageInfo) -> None:
    import urllib.request

    image = build_image("fakenet")
    overlay, console = tmp_path / "overlay.qcow2", tmp_path / "console.log"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                    str(image.rootfs), str(overlay)], check=True)
    http, dns = _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_DGRAM)
    mac = "52:54:00:12:34:56"
    argv = [
        "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "512",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", f"{image.cmdline} secvf_hostname=fakenet secvf_nics={mac}+10.0.2.15/24",
        "-drive", f"file={overlay},if=none,id=root,format=qcow2",
        "-device", "virtio-blk-pci,drive=root", "-device", "virtio-rng-pci",
        "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{http}-10.0.2.15:80,"
                   f"hostfwd=udp:127.0.0.1:{dns}-10.0.2.15:53",
        "-device", f"virtio-net-pci,netdev=n0,mac={mac}",
        "-serial", f"file:{console}",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    guest = Guest(proc, console, tmp_path / "none", tmp_path / "none", overlay, time.monotonic())
    try:
        print(f"fakenet: boot to ready {guest.wait_for(READY_MARKER, READY_TIMEOUT_S):.1f} s")
        assert _dns_query(dns, f"x{os.getpid()}.example-{int(time.time())}.test") == "10.0.2.15"
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/payload.exe", timeout=30) as reply:
            assert reply.status == 200
            assert reply.headers["Server"] == "INetSim HTTP Server"
            assert reply.read(2) == b"MZ"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = console.read_text(errors="replace")
            if "GET /payload.exe" in text and "query[A] x" in text:
                break
            time.sleep(0.1)
        lines = text.splitlines()
        assert any(line.startswith("fakenet: ") and "query[A] x" in line for line in lines)
        assert any(line.startswith("fakenet: ") and "recv: GET /payload.exe" in line
                   for line in lines)
    finally:
        proc.kill()
        proc.wait()
