"""Making a restored guest its own machine, on real VMs (one booted at a time):

* ``ExecClient.restore`` on a running SecVF sandbox: the host's time, reseeded RNG,
  hostname, MAC (and DHCP again), an empty ``/tmp``, the workspace share;
* the template flow by hand on plain QEMU: a sandbox guest booted *without* vsock and
  virtio-fs devices is paused (as a save and restore would leave it), the devices are
  hot-plugged, the agent answers at once and ``restore`` mounts the hot-plugged share;
* the restore watch of a channel-less ``base`` guest puts the clock back after a QMP
  ``stop`` / ``cont`` pause (guest time stands still under TCG, the RTC does not).

The plain-QEMU guests are started here and killed by pid at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from secvf.exec import ExecClient
from secvf.image import ImageInfo
from secvf.machine.shares import virtiofsd_path
from secvf.runtime.control import wait_for_ready
from secvf.workflows.vm_exec import exec_socket_for
from tests.helpers import run_cli
from tests.integration.conftest import VMFactory

pytestmark = pytest.mark.vm

BOOT_TIMEOUT_S = 300.0
ANSWER_TIMEOUT_S = 120.0
NEW_MAC = "52:54:00:5e:c0:01"


def _guest(client: ExecClient, script: str) -> str:
    result = client.run(["sh", "-c", script], user="root", timeout=ANSWER_TIMEOUT_S)
    assert result.exit_code == 0, result
    return result.stdout.decode()


def _guest_clock_offset(client: ExecClient) -> float:
    """Guest clock - host clock (the host's midpoint around one exec)."""
    before = time.time()
    guest = float(_guest(client, "date +%s.%N"))
    after = time.time()
    return guest - (before + after) / 2


# ---- 1. restore on a SecVF sandbox -----------------------------------------------------------


def test_restore_makes_a_running_sandbox_its_own_machine(vm_factory: VMFactory,
                                                         vm_library: Path) -> None:
    name = vm_factory.sandbox("rst", "--memory", "512M")
    run_cli("sandbox", "start", name, check=True, timeout=BOOT_TIMEOUT_S)
    wait_for_ready(name, BOOT_TIMEOUT_S)
    serial_log = vm_library / "vms" / name / "serial.log"
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    # the watch measures the RTC's phase for up to a second after it starts; a clock set
    # in that second is taken into its measurement (the test sets it far back below)
    while "restore watch armed" not in serial_log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the restore watch never armed"
        time.sleep(0.1)
    serial = serial_log.read_text(errors="replace")
    # the ready marker comes only once the agent listens (a template is saved right after it)
    assert serial.index("listening on vsock port 2222") < serial.index("SECVF-READY")
    with ExecClient.connect(exec_socket_for(name), timeout=30) as client:
        assert "restore" in client.capabilities
        before = _guest(client, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo;"
                                "cat /sys/class/net/eth0/address")
        urandom_before, mac_before = before.split()
        # what a guest restored from old saved state looks like: its clock far behind,
        # and files in /tmp
        _guest(client, f"date -s @{int(time.time()) - 3600} >/dev/null; touch /tmp/a /tmp/.b;"
                       "mkdir -p /tmp/d/e; echo x >/tmp/d/e/f; ln -s /etc /tmp/etc-link")
        result = client.restore(hostname="rst-restored", mac=NEW_MAC, clean_tmp=True,
                                shares=[("workspace", "/workspace", False)])
        print(f"restore: {result}")
        assert result.ok, result.errors
        assert result.clock_offset_s is not None and 3590 < result.clock_offset_s < 3610
        assert abs(result.clock_skew_s) < 1.0
        assert result.reseeded
        assert (result.hostname, result.mac) == ("rst-restored", NEW_MAC)
        assert mac_before != NEW_MAC and result.dhcp_restarted  # the VM has NAT: udhcpc
        assert result.tmp_entries_removed >= 4
        assert [tuple(s) for s in result.mounted] == [("workspace", "/workspace", False)]

        after = _guest(client, "hostname; grep -c 'rst-restored' /etc/hosts;"
                               "cat /sys/class/net/eth0/address; ls -A /tmp | wc -l; ls -d /etc;"
                               "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo;"
                               "ip -6 addr show dev eth0 scope link | grep -c 5054:ff:fe5e:c001")
        hostname, hosts, mac, tmp, etc, urandom_after, link_local = after.split()
        assert (hostname, hosts, mac, tmp, etc) == ("rst-restored", "1", NEW_MAC, "0", "/etc")
        assert urandom_after != urandom_before
        assert link_local == "1"  # the IPv6 link-local address follows the new MAC
        # the restarted DHCP client gets a lease for the new MAC; the network keeps working
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while "udhcpc -i eth0" not in _guest(client, "ps -eo args") or client.run(
                ["busybox", "ping", "-c", "1", "-W", "2", "10.0.2.2"], user="root").exit_code:
            assert time.monotonic() < deadline, "no network after the MAC change"
            time.sleep(0.5)
        assert abs(_guest_clock_offset(client)) < 1.0
        info = client.info()
        assert info.hostname == "rst-restored"
    # the exec channel still works on a new connection after the restore
    with ExecClient.connect(exec_socket_for(name), timeout=30) as client:
        assert _guest(client, "hostname").strip() == "rst-restored"


# ---- plain QEMU guests of our own --------------------------------------------------------------


class PlainGuest:
    """An image booted by plain QEMU with its serial port on a Unix socket (a root shell
    with ``autologin``), QMP, and two spare PCIe root ports; killed by pid at the end."""

    def __init__(self, image: ImageInfo, workdir: Path, *, console: str = "output-only") -> None:
        self.dir = workdir
        self.overlay = workdir / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                        str(image.rootfs), str(self.overlay)], check=True)
        self.qmp_path, self.serial_path = workdir / "qmp.sock", workdir / "serial.sock"
        append = (f"{image.cmdline} secvf_hostname=plain secvf_nics=52:54:00:12:34:56+dhcp "
                  f"secvf_console={console} secvf_time={time.time_ns() + 600_000_000}")
        argv = [
            "qemu-system-x86_64", "-machine", "q35,memory-backend=mem", "-accel", "tcg",
            "-cpu", "max", "-m", "512", "-nodefaults", "-no-user-config", "-display", "none",
            "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append,
            "-drive", f"file={self.overlay},if=none,id=root,format=qcow2",
            "-device", "virtio-blk-pci,drive=root",
            "-object", "rng-random,id=rng0,filename=/dev/urandom",
            "-device", "virtio-rng-pci,rng=rng0",
            "-netdev", "user,id=net0",
            "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56",
            "-device", "pcie-root-port,id=rp0,chassis=1,slot=1",
            "-device", "pcie-root-port,id=rp1,chassis=2,slot=2",
            "-chardev", f"socket,id=ser0,path={self.serial_path},server=on,wait=off",
            "-serial", "chardev:ser0",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=(workdir / "qemu.log").open("wb"))
        self.helpers: list[subprocess.Popen[bytes]] = []
        deadline = time.monotonic() + 30
        while not (self.qmp_path.exists() and self.serial_path.exists()):
            assert self.proc.poll() is None, (workdir / "qemu.log").read_text()
            assert time.monotonic() < deadline, "QEMU made no sockets"
            time.sleep(0.05)
        self.serial = socket.socket(socket.AF_UNIX)
        self.serial.connect(str(self.serial_path))
        self.seen = b""  # console output not consumed by expect() yet
        self.transcript = b""  # all console output so far
        self.qmp_sock = socket.socket(socket.AF_UNIX)
        self.qmp_sock.settimeout(30)
        self.qmp_sock.connect(str(self.qmp_path))
        self.qmp_file = self.qmp_sock.makefile("rw")
        assert "QMP" in json.loads(self.qmp_file.readline())
        self.qmp("qmp_capabilities")

    def qmp(self, command: str, **arguments: object) -> object:
        self.qmp_file.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self.qmp_file.flush()
        while "event" in (reply := json.loads(self.qmp_file.readline())):
            pass
        assert "return" in reply, f"QMP {command}: {reply}"
        return reply["return"]

    def expect(self, pattern: bytes, timeout: float = ANSWER_TIMEOUT_S) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        while (match := re.search(pattern, self.seen)) is None:
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} on the console; got {self.seen[-1500:]!r}"
            if select.select([self.serial], [], [], left)[0]:
                chunk = self.serial.recv(65536)
                assert chunk, f"the console closed; got {self.seen[-1500:]!r}"
                self.seen += chunk
                self.transcript += chunk
        self.seen = self.seen[match.end():]
        return match

    def shell(self, command: str) -> str:
        """Run ``command`` at the console's root shell; return what it printed."""
        self.serial.sendall(f"echo '<<'BEGIN'>>'; {command}; echo '<<'DONE'>>'\r".encode())
        found = self.expect(rb"(?s)<<BEGIN>>\r?\n(.*?)<<DONE>>")
        return found.group(1).decode(errors="replace").replace("\r", "")

    def clock_offset(self) -> float:
        """Guest clock - host clock, read on the console (the best of three)."""
        best: tuple[float, float] | None = None
        for _ in range(3):
            before = time.time()
            guest = float(self.shell("date +%s.%N"))
            after = time.time()
            if best is None or after - before < best[1]:
                best = (guest - (before + after) / 2, after - before)
        assert best is not None
        return best[0]

    def log_text(self) -> str:
        """Everything the console printed so far."""
        return self.transcript.decode(errors="replace")

    def wait_for_line(self, text: str, timeout: float = ANSWER_TIMEOUT_S) -> str:
        """The first console line containing ``text`` (reading on until it comes)."""
        deadline = time.monotonic() + timeout
        while True:
            complete = self.log_text().rpartition("\n")[0]  # whole lines only
            found = [line for line in complete.splitlines() if text in line]
            if found:
                return found[0]
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} on the console: {self.log_text()[-2000:]}"
            if select.select([self.serial], [], [], min(left, 0.5))[0]:
                chunk = self.serial.recv(65536)
                assert chunk, "the console closed"
                self.seen += chunk
                self.transcript += chunk

    def start_helper(self, argv: list[str], ready: Path) -> None:
        """Start a host helper (vsock backend, virtiofsd) and wait for its socket."""
        self.helpers.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL,
                                             stderr=(self.dir / "helpers.log").open("ab")))
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert self.helpers[-1].poll() is None, (self.dir / "helpers.log").read_text()
            assert time.monotonic() < deadline, f"{argv[0]} made no socket"
            time.sleep(0.02)

    def hot_plug(self, chardev: str, socket_path: Path, **device: object) -> None:
        self.qmp("chardev-add", id=chardev, backend={"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": str(socket_path)}}, "server": False}})
        self.qmp("device_add", chardev=chardev, **device)

    def kill(self) -> None:
        for proc in [self.proc, *self.helpers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        self.serial.close()
        self.qmp_sock.close()


@contextlib.contextmanager
def plain_guest(image: ImageInfo, **options: str) -> Iterator[PlainGuest]:
    workdir = Path(tempfile.mkdtemp(prefix="svrst", dir="/tmp"))  # short: socket paths
    guest = PlainGuest(image, workdir, **options)
    try:
        yield guest
    finally:
        guest.kill()
        shutil.rmtree(workdir, ignore_errors=True)


# ---- 2. the template flow by hand: channel devices hot-plugged after a pause ----------------


def test_a_guest_booted_without_channels_answers_once_they_are_hot_plugged(
        built_images: dict[str, ImageInfo]) -> None:
    with plain_guest(built_images["sandbox"]) as guest:
        guest.expect(rb"SECVF-READY", BOOT_TIMEOUT_S)
        log = guest.log_text()
        assert log.index("listening on vsock port 2222") < log.index("SECVF-READY")
        # as a save right after the marker and a restore later leave it: paused, then on
        guest.qmp("stop")
        time.sleep(3)
        guest.qmp("cont")
        share = guest.dir / "share"
        share.mkdir()
        (share / "from-host.txt").write_text("hello from the host\n")
        guest.start_helper([sys.executable, "-m", "secvf.vsock",
                            "--vhost-user-socket", str(guest.dir / "vu.sock"),
                            "--uds-path", str(guest.dir / "vsock.sock"), "--guest-cid", "3"],
                           guest.dir / "vu.sock")
        guest.start_helper([virtiofsd_path(), f"--socket-path={guest.dir / 'fs.sock'}",
                            "-o", f"source={share}", "-o", "cache=none"], guest.dir / "fs.sock")
        guest.hot_plug("vsock0", guest.dir / "vu.sock", driver="vhost-user-vsock-pci",
                       id="vsock0dev", bus="rp0")
        guest.hot_plug("fs0", guest.dir / "fs.sock", driver="vhost-user-fs-pci", id="fs0dev",
                       tag="hotws", bus="rp1")
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while True:  # the agent listened all along; only the device was missing
            try:
                client = ExecClient.connect_hybrid(guest.dir / "vsock.sock", timeout=5)
                break
            except Exception:
                assert time.monotonic() < deadline, "the agent never answered on the new device"
                time.sleep(0.05)
        with client:
            # sent at once: the hot-plugged virtio-fs tag may not be there yet (restore waits)
            result = client.restore(hostname="plain-restored", clean_tmp=True,
                                    shares=[("hotws", "/workspace", False)])
            print(f"restore: {result}")
            assert result.reseeded and result.hostname == "plain-restored"
            assert result.clock_offset_s is not None and result.clock_offset_s > 2.5
            assert [tuple(s) for s in result.mounted] == [("hotws", "/workspace", False)]
            out = _guest(client, "cat /workspace/from-host.txt; grep ' /workspace ' /proc/mounts;"
                                 "stat -c '%U %a' /workspace; echo back > /workspace/from-guest")
            assert out.splitlines()[0] == "hello from the host"
            assert "hotws /workspace virtiofs rw" in out
            assert (share / "from-guest").read_text() == "back\n"
            assert abs(_guest_clock_offset(client)) < 1.0


# ---- 3. the restore watch of a guest without any channel ----------------------------------------


def test_the_restore_watch_puts_the_clock_back_after_a_pause(
        built_images: dict[str, ImageInfo]) -> None:
    with plain_guest(built_images["base"], console="autologin") as guest:
        guest.expect(rb"SECVF-READY", BOOT_TIMEOUT_S)
        guest.serial.sendall(b"\r")
        guest.expect(rb"root@plain:~# ")
        guest.shell("stty -echo")
        armed_line = guest.wait_for_line("restore watch armed")  # not waited for by init
        print(armed_line)
        assert "kernel RNG reseeded from /dev/hwrng" in armed_line
        armed = guest.clock_offset()
        print(f"guest clock - host clock after boot: {armed:+.3f} s")
        assert abs(armed) < 1.0  # init's estimate, checked against the RTC by the watch
        guest.qmp("stop")
        time.sleep(5)
        guest.qmp("cont")
        line = guest.wait_for_line("(restored or paused)")
        print(line)
        stepped = re.search(r"stepped \+([0-9.]+) s", line)
        assert stepped is not None and 4.5 < float(stepped.group(1)) < 6.5
        assert "kernel RNG reseeded from /dev/hwrng" in line
        after = guest.clock_offset()
        print(f"guest clock - host clock after the pause: {after:+.3f} s")
        assert abs(after) < 1.0
        assert abs(after - armed) < 0.25  # as close to the host as before the pause
