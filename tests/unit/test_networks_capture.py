"""``secvf net capture`` (the capture workflow) against the real watchdog and switch of a
network in the test's library, with fake QEMU peers (bound datagram sockets) standing in
for two VMs: what reaches the pcapng files, rotation, filters, one VM's ports, a full
disk, a restarted switch, and the ring."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dpkt
import pytest

from secvf.errors import NetworkError, NotFound
from secvf.machine.network import switch_port
from secvf.model.config import VMConfig
from secvf.net import launcher
from secvf.net.capture import Interface
from secvf.net.capture_file import CapturedFrame, read_capture
from secvf.net.control import SwitchUnavailable
from secvf.store.networks import create_network
from secvf.workflows.capture import (
    CaptureProgress,
    CaptureRequest,
    RotatingPcapng,
    capture,
    export_ring,
    ring_frames,
)
from tests.unit.net_helpers import FakeQemu, LiveNetwork, eth, wait_until
from tests.unit.test_networks_store import add_vm

WAIT_S = 10.0  # the longest any capture here may take


@dataclass
class LibraryNetwork(LiveNetwork):
    """A :class:`LiveNetwork` at a library network's own runtime directory, its switch
    and ports set up from the VMs' configs as their supervisors do it."""

    where: Path = Path("/nonexistent")
    vms: tuple[VMConfig, ...] = ()

    @property
    def netdir(self) -> Path:
        return self.where

    def join(self, n: int) -> FakeQemu:
        """VM ``n``'s NIC 0 on the switch: fake QEMU bound, port written, switch ensured."""
        config = self.vms[n]
        port = switch_port(config, 0, config.nics[0])
        launcher.ensure_switch(port.netdir, port.switch_config)
        self.peers[n] = FakeQemu({**port.record, "pid": os.getpid()})
        launcher.write_port(port.netdir, self.peers[n].port)
        return self.peers[n]

    def mac(self, n: int) -> bytes:
        return bytes.fromhex(self.vms[n].nics[0].mac.replace(":", ""))

    def send(self, src: int, dst: int, frame: bytes) -> bytes:
        """Send ``frame`` from VM ``src`` and check that VM ``dst`` got it."""
        self.peers[src].send(frame)
        assert self.peers[dst].recv(2.0) == frame
        return frame

    def frame(self, src: int, dst: int, seq: int, size: int = 64) -> bytes:
        """A unicast frame from ``src`` to ``dst`` numbered ``seq``."""
        body = f"frame {seq} from vm{src} ".encode()
        return eth(self.mac(dst), self.mac(src), body.ljust(size - 14, b"."))

    def capture_clients(self) -> int:
        try:
            return int(self.query("stats")["capture"]["clients"])
        except (SwitchUnavailable, OSError):
            return -1


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[LibraryNetwork]:
    """Network ``lab`` with VMs ``a`` and ``b`` on its running switch."""
    config = create_network("lab", subnet="10.0.100.0/24")
    vms = (add_vm("a", "isolated:lab"), add_vm("b", "isolated:lab"))
    from secvf.store.paths import network_runtime_dir

    net = LibraryNetwork(tmp_path, where=network_runtime_dir(config.id), vms=vms)
    try:
        net.join(0)
        net.join(1)
        yield net
    finally:
        net.stop()


class Running:
    """``capture(request)`` in a thread."""

    def __init__(self, request: CaptureRequest, stop: Callable[[], bool] = lambda: False
                 ) -> None:
        self.request = request
        self.reports: list[int] = []  # frames written, at each progress report
        self.result: CaptureProgress | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(stop,), daemon=True)
        self.thread.start()

    def _run(self, stop: Callable[[], bool]) -> None:
        try:
            self.result = capture(self.request, lambda s: self.reports.append(s.frames), stop)
        except BaseException as exc:  # re-raised by finish()
            self.error = exc

    def connected(self, net: LibraryNetwork) -> None:
        def ready() -> bool:
            if self.error is not None:
                raise self.error
            return net.capture_clients() == 1

        wait_until(ready, 5, "the capture client")

    def finish(self) -> CaptureProgress:
        self.thread.join(WAIT_S + 5)
        assert not self.thread.is_alive(), "capture did not end"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def frames_in(*files: str | Path) -> list[CapturedFrame]:
    return [f for path in files for f in read_capture(Path(path))]


def arp_request(net: LibraryNetwork, src: int, target: str) -> bytes:
    arp = dpkt.arp.ARP(sha=net.mac(src), spa=socket.inet_aton(f"10.0.100.{src + 2}"),
                       tha=b"\0" * 6, tpa=socket.inet_aton(target), op=dpkt.arp.ARP_OP_REQUEST)
    return bytes(dpkt.ethernet.Ethernet(dst=b"\xff" * 6, src=net.mac(src),
                                        type=dpkt.ethernet.ETH_TYPE_ARP, data=arp))


# ---- live capture -----------------------------------------------------------------------


def test_a_capture_writes_every_frame_with_the_vm_as_interface(
        lab: LibraryNetwork, tmp_path: Path) -> None:
    path = tmp_path / "lab.pcapng"
    running = Running(CaptureRequest("lab", path=path, duration_s=2.0))
    running.connected(lab)
    sent = [(lab.send(0, 1, lab.frame(0, 1, i)), "a") for i in range(5)]
    sent += [(lab.send(1, 0, lab.frame(1, 0, i, size=1514)), "b") for i in range(3)]
    sent += [(lab.send(0, 1, arp_request(lab, 0, "10.0.100.3")), "a")]
    result = running.finish()
    assert (result.network, result.ended, result.files, result.removed) == (
        "lab", "duration", [str(path)], [])
    assert (result.frames, result.seen, result.switch_dropped, result.reconnects) == (
        9, 9, 0, 0)
    assert result.bytes > sum(len(f) for f, _ in sent)
    assert running.reports[-1] == 9
    captured = frames_in(path)
    assert [(c.frame, c.interface) for c in captured] == sent
    assert all(c.ts > 0 for c in captured)
    assert [c.ts for c in captured] == sorted(c.ts for c in captured)
    wait_until(lambda: lab.capture_clients() == 0, 5, "the capture to disconnect")


def test_a_capture_stops_at_its_total_size_and_says_so(lab: LibraryNetwork,
                                                       tmp_path: Path) -> None:
    path = tmp_path / "bounded.pcapng"
    running = Running(CaptureRequest("lab", path=path, duration_s=WAIT_S,
                                     max_bytes_total=4000))
    running.connected(lab)
    for i in range(10):
        lab.send(0, 1, lab.frame(0, 1, i, size=1514))
    result = running.finish()
    assert result.ended == "size"
    assert 4000 <= result.bytes < 4000 + 1700  # the frame that crossed it, no more
    assert len(frames_in(path)) == result.frames < 10


def test_rotation_keeps_the_newest_files(lab: LibraryNetwork, tmp_path: Path) -> None:
    out = tmp_path / "captures"
    out.mkdir()
    path = out / "ring.pcapng"
    count = 14
    running = Running(CaptureRequest("lab", path=path, max_size=500, max_files=2,
                                     max_frames=count, duration_s=WAIT_S))
    running.connected(lab)
    sent = [lab.send(i % 2, 1 - i % 2, lab.frame(i % 2, 1 - i % 2, i, size=120))
            for i in range(count)]
    result = running.finish()
    assert (result.ended, result.frames) == ("count", count)
    assert len(result.files) == 2 and len(result.removed) >= 2
    every = [str(path)] + [str(out / f"ring.{n}.pcapng") for n in range(1, 99)]
    assert result.removed + result.files == every[:len(result.removed) + 2]
    assert [Path(p).exists() for p in result.removed] == [False] * len(result.removed)
    assert sorted(str(p) for p in out.iterdir()) == sorted(result.files)
    kept = frames_in(*result.files)
    assert 0 < len(kept) < count
    assert [c.frame for c in kept] == sent[-len(kept):]  # the newest, in order
    for name in result.files:  # each file stands alone, with its interfaces
        for c in read_capture(Path(name)):
            assert c.interface == ("a" if b"from vm0" in c.frame else "b")


def test_a_second_rotating_capture_to_the_same_path_goes_on(tmp_path: Path) -> None:
    first = tmp_path / "cap.pcapng"
    port = Interface(index=0, port="a1b2c3d4-0", vm="a", nic=0, mac="52:54:00:00:00:01")
    for _run in range(2):
        state = CaptureProgress("lab")
        out = RotatingPcapng(first, 200, 2, state)
        for i in range(12):
            out.write(i, out.interface(port), b"x" * 100)
        out.close()
        assert state.frames == 12 and len(state.files) == 2


def test_a_filter_keeps_only_matching_frames(lab: LibraryNetwork, tmp_path: Path) -> None:
    path = tmp_path / "arp.pcapng"
    running = Running(CaptureRequest("lab", path=path, filter="arp", max_frames=2,
                                     duration_s=WAIT_S))
    running.connected(lab)
    lab.send(0, 1, lab.frame(0, 1, 1))
    first = lab.send(1, 0, arp_request(lab, 1, "10.0.100.2"))
    lab.send(1, 0, lab.frame(1, 0, 2))
    lab.send(0, 1, lab.frame(0, 1, 3))
    second = lab.send(0, 1, arp_request(lab, 0, "10.0.100.3"))
    result = running.finish()
    assert (result.ended, result.frames, result.seen) == ("count", 2, 5)
    assert [(c.frame, c.interface) for c in frames_in(path)] == [(first, "b"), (second, "a")]


def test_a_bad_filter_is_refused_before_any_file(lab: LibraryNetwork, tmp_path: Path) -> None:
    from secvf.errors import InvalidFilter

    with pytest.raises(InvalidFilter):
        capture(CaptureRequest("lab", path=tmp_path / "x.pcapng", filter="tcp.prot == 1"))
    assert not (tmp_path / "x.pcapng").exists()


def test_a_capture_of_one_vm_has_only_its_frames(lab: LibraryNetwork, tmp_path: Path) -> None:
    path = tmp_path / "a.pcapng"
    running = Running(CaptureRequest("lab", path=path, vm="a", max_frames=3,
                                     duration_s=WAIT_S))
    running.connected(lab)
    ours = [lab.send(0, 1, lab.frame(0, 1, 1))]
    lab.send(1, 0, lab.frame(1, 0, 1))
    lab.send(1, 0, lab.frame(1, 0, 2))
    ours.append(lab.send(0, 1, lab.frame(0, 1, 2)))
    lab.send(1, 0, lab.frame(1, 0, 3))
    ours.append(lab.send(0, 1, lab.frame(0, 1, 3)))
    result = running.finish()
    assert (result.ended, result.frames, result.seen) == ("count", 3, 3)
    assert [(c.frame, c.interface) for c in frames_in(path)] == [(f, "a") for f in ours]


def test_a_vm_off_the_network_or_unknown_is_refused(lab: LibraryNetwork,
                                                    tmp_path: Path) -> None:
    add_vm("elsewhere", "nat")
    with pytest.raises(NetworkError, match="VM 'elsewhere' has no NIC on network 'lab'"):
        capture(CaptureRequest("lab", path=tmp_path / "x.pcapng", vm="elsewhere"))
    with pytest.raises(NotFound, match="nope"):
        capture(CaptureRequest("lab", path=tmp_path / "x.pcapng", vm="nope"))
    with pytest.raises(NotFound, match="no network called 'other'"):
        capture(CaptureRequest("other", path=tmp_path / "x.pcapng"))


def test_stop_ends_a_capture_into_the_default_place(lab: LibraryNetwork,
                                                    secvf_env: Path) -> None:
    result = capture(CaptureRequest("lab"), stop=lambda: True)
    assert (result.ended, result.frames) == ("interrupted", 0)
    (name,) = result.files
    assert Path(name).parent == secvf_env / "captures"
    assert Path(name).name.startswith("lab-") and name.endswith(".pcapng")
    assert frames_in(name) == []


@contextlib.contextmanager
def tiny_tmpfs(size: str = "16k") -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="svfull-", dir="/tmp"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(where)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs (root needed): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)
        where.rmdir()


def test_a_full_disk_ends_the_capture_and_the_switch_forwards_on(
        lab: LibraryNetwork) -> None:
    with tiny_tmpfs() as full:
        path = full / "cap.pcapng"
        running = Running(CaptureRequest("lab", path=path, max_frames=40, duration_s=WAIT_S))
        running.connected(lab)
        for i in range(40):
            lab.send(0, 1, lab.frame(0, 1, i, size=1400))
            if not running.thread.is_alive():
                break
        with pytest.raises(NetworkError) as info:
            running.finish()
        message = str(info.value)
        assert f"capture stopped: cannot write {path}: the disk is full" in message
        assert "the switch keeps forwarding" in message
        wait_until(lambda: lab.capture_clients() == 0, 5, "the capture to disconnect")
        again = lab.frame(0, 1, 99)
        assert lab.send(0, 1, again) == again
        assert lab.send(1, 0, lab.frame(1, 0, 99))
        assert lab.query("ping")["ok"] is True


def test_a_capture_follows_a_restarted_switch(lab: LibraryNetwork, tmp_path: Path) -> None:
    path = tmp_path / "restart.pcapng"
    running = Running(CaptureRequest("lab", path=path, max_frames=4, duration_s=WAIT_S))
    running.connected(lab)
    before = [lab.send(0, 1, lab.frame(0, 1, i)) for i in range(2)]
    wait_until(lambda: lab.query("stats")["ports"][0]["rx"] + lab.query("stats")["ports"][1][
        "rx"] == 2, 5, "the switch counting the frames")
    old = lab.query("ping")["pid"]
    os.kill(old, signal.SIGKILL)  # the switch the watchdog we started runs
    wait_until(lambda: lab.capture_clients() == 1 and lab.query("ping")["pid"] != old,
               WAIT_S, "the capture on the new switch")
    after = [lab.send(1, 0, lab.frame(1, 0, i)) for i in range(2)]
    result = running.finish()
    assert (result.ended, result.frames, result.reconnects) == ("count", 4, 1)
    assert [(c.frame, c.interface) for c in frames_in(path)] == (
        [(f, "a") for f in before] + [(f, "b") for f in after])


# ---- no switch, ring --------------------------------------------------------------------


def test_no_running_switch_is_a_network_error(tmp_path: Path) -> None:
    create_network("idle", subnet="10.0.120.0/24")
    add_vm("stopped", "isolated:idle")
    with pytest.raises(NetworkError, match="network 'idle' has no running switch"):
        capture(CaptureRequest("idle", path=tmp_path / "x.pcapng", duration_s=1))
    with pytest.raises(NetworkError, match="network 'idle' has no running switch, so no ring"):
        export_ring("idle", tmp_path / "ring.pcapng")
    with pytest.raises(NetworkError, match="no running switch"):
        list(ring_frames("idle"))


def test_a_capture_that_cannot_start_leaves_no_file(tmp_path: Path) -> None:
    create_network("idle", subnet="10.0.120.0/24")
    with pytest.raises(NetworkError):
        capture(CaptureRequest("idle", path=tmp_path / "x.pcapng", duration_s=1))
    assert not (tmp_path / "x.pcapng").exists()


def test_export_ring_writes_the_last_frames(lab: LibraryNetwork, tmp_path: Path) -> None:
    sent = [(lab.send(0, 1, lab.frame(0, 1, 1)), "a"),
            (lab.send(1, 0, lab.frame(1, 0, 2)), "b"),
            (lab.send(0, 1, arp_request(lab, 0, "10.0.100.3")), "a")]
    wait_until(lambda: lab.query("stats")["ring"]["frames"] == 3, 5, "the ring")
    path = tmp_path / "ring.pcapng"
    result = export_ring("lab", path)
    assert (result.ended, result.frames, result.seen, result.files) == (
        "ring", 3, 3, [str(path)])
    assert [(c.frame, c.interface) for c in frames_in(path)] == sent
    listed = list(ring_frames("lab"))
    assert [(vm, frame) for _, vm, frame in listed] == [(vm, f) for f, vm in sent]
    assert [ts for ts, _, _ in listed] == pytest.approx([c.ts for c in frames_in(path)],
                                                        abs=1e-6)
