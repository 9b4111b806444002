"""The real switch process (started by the real watchdog) with fake QEMU peers."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator

import pytest

from secvf.net import launcher
from secvf.net.capture import Frame, Interfaces, open_capture, read_ring
from secvf.net.control import MAX_REQUEST_BYTES
from secvf.net.frame import BROADCAST
from tests.unit.net_helpers import (
    FakeQemu,
    LiveNetwork,
    eth,
    live_network,
    mac_bytes,
    port_object,
    wait_until,
)


@pytest.fixture
def net() -> Iterator[LiveNetwork]:
    with live_network(frames_per_s=0, broadcast_per_s=0, ring_frames=50) as running:
        yield running


def control_socket(net: LiveNetwork) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(2)
    sock.connect(str(net.paths.control))
    return sock


def test_two_peers_talk_and_stats_count_it(net: LiveNetwork) -> None:
    a, b = net.add(1), net.add(2)
    a.send(eth(BROADCAST, mac_bytes(1), b"who-has"))
    assert b.recv() == eth(BROADCAST, mac_bytes(1), b"who-has")
    b.send(eth(mac_bytes(1), mac_bytes(2), b"is-at"))
    assert a.recv() == eth(mac_bytes(1), mac_bytes(2), b"is-at")
    stats = net.query("stats")
    assert stats["ok"] and stats["network"] == "lab" and stats["cpu_s"] > 0
    assert [(p["vm"], p["rx"], p["tx"], p["learned"]) for p in stats["ports"]] == [
        ("vm1", 1, 1, True), ("vm2", 1, 1, True)]
    assert stats["ring"] == {"frames": 2, "capacity": 50}
    assert net.query("ping")["pid"] == stats["pid"]
    assert [e["event"] for e in net.events()] == ["switch_started"]


def test_socket_files_are_private(net: LiveNetwork) -> None:
    net.add(1)
    assert os.stat(net.paths.control).st_mode & 0o777 == 0o600
    # a port's socket takes datagrams from any uid (a jailed QEMU runs as its VM's): only
    # jails show p/, and the switch accepts a port's frames only from its QEMU's socket
    assert os.stat(net.paths.switch_path(net.peers[1].port["port"])).st_mode & 0o777 == 0o622
    assert os.stat(net.netdir).st_mode & 0o777 == 0o700


def test_foreign_sender_is_dropped_counted_and_reported_once(net: LiveNetwork) -> None:
    a, b = net.add(1), net.add(2)
    evil = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    for _ in range(5):
        evil.sendto(eth(BROADCAST, mac_bytes(1)), a.port["switch_path"])
    a.send(eth(BROADCAST, mac_bytes(1)))
    assert b.recv() is not None and b.drain() == []
    assert net.port_stats(1)["drops"]["foreign_sender"] == 5
    events = net.events("foreign_sender")
    assert len(events) == 1 and events[0]["severity"] == "CRITICAL" and events[0]["vm"] == "vm1"


def test_frames_of_every_size_are_judged_whole(net: LiveNetwork) -> None:
    a, b = net.add(1), net.add(2)
    for size in (0, 1, 13, 9001, 65535):
        a.send(eth(BROADCAST, mac_bytes(1), b"x" * size)[:size] if size < 14
               else eth(BROADCAST, mac_bytes(1), b"x" * (size - 14)))
    a.send(eth(BROADCAST, mac_bytes(1), b"x" * (9000 - 14)))
    assert len(b.recv() or b"") == 9000
    drops = net.port_stats(1)["drops"]
    assert (drops["runt"], drops["oversize"]) == (3, 2)
    assert len(net.events("frame_size_dropped")) == 1


def test_garbage_on_the_control_socket_gets_errors_and_forwarding_goes_on(
        net: LiveNetwork) -> None:
    a, b = net.add(1), net.add(2)
    with control_socket(net) as sock:
        for junk in (b"\xff\xfe", b"[1, 2]", b'{"op": ["x"]}', b'{"op": "nope"}',
                     b"[" * 50_000):
            sock.send(junk)
            reply = json.loads(sock.recv(65536))
            assert reply["ok"] is False and reply["error"]
    with control_socket(net) as sock:
        sock.send(b" " * (MAX_REQUEST_BYTES + 10))
        assert "larger than" in json.loads(sock.recv(65536))["error"]
        assert sock.recv(10) == b""  # and disconnected
    a.send(eth(BROADCAST, mac_bytes(1)))
    assert b.recv() is not None


def test_capture_streams_accepted_frames_and_new_interfaces(net: LiveNetwork) -> None:
    a, b = net.add(1), net.add(2)
    with open_capture(net.netdir) as stream:
        assert [i.vm for i in stream.interfaces.interfaces] == ["vm1", "vm2"]
        a.send(eth(BROADCAST, mac_bytes(1), b"one"))
        a.send(eth(BROADCAST, mac_bytes(9), b"spoofed: not captured"))
        b.send(eth(mac_bytes(1), mac_bytes(2), b"two"))
        items = [stream.read(2), stream.read(2)]
        frames = [i for i in items if isinstance(i, Frame)]
        index = {i.index: i.vm for i in stream.interfaces.interfaces}
        assert [(index[f.interface], f.data[14:]) for f in frames] == [("vm1", b"one"),
                                                                     ("vm2", b"two")]
        assert abs(frames[0].ts_ns - time.time_ns()) < 5e9
        net.add(3)
        update = stream.read(2)
        assert isinstance(update, Interfaces)
        assert [i.vm for i in update.interfaces] == ["vm1", "vm2", "vm3"]
    wait_until(lambda: net.query("stats")["capture"]["clients"] == 0, what="client gone")


def test_capture_of_chosen_ports_only(net: LiveNetwork) -> None:
    a, b = net.add(1), net.add(2)
    with open_capture(net.netdir, ports=[b.port["port"]]) as stream:
        assert [i.vm for i in stream.interfaces.interfaces] == ["vm2"]
        a.send(eth(BROADCAST, mac_bytes(1), b"a"))
        b.send(eth(BROADCAST, mac_bytes(2), b"b"))
        frame = stream.read(2)
        assert isinstance(frame, Frame) and frame.data[14:] == b"b"


def test_ring_holds_the_last_frames_oldest_first(net: LiveNetwork) -> None:
    a, b = net.add(1), net.add(2)
    for i in range(60):
        a.send(eth(BROADCAST, mac_bytes(1), b"%03d" % i))
    wait_until(lambda: net.port_stats(2)["tx"] == 60, what="60 frames forwarded")
    interfaces, frames = read_ring(net.netdir)
    assert [i.vm for i in interfaces] == ["vm1", "vm2"]
    assert [f.data[14:17] for f in frames] == [b"%03d" % i for i in range(10, 60)]
    assert {f.interface for f in frames} == {interfaces[0].index}
    assert len(b.drain()) == 60


def test_a_capture_client_that_never_reads_only_loses_its_own_frames(
        net: LiveNetwork) -> None:
    a, b = net.add(1), net.add(2)
    with control_socket(net) as sleepy:
        sleepy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sleepy.send(b'{"op": "capture", "ports": null}')
        assert json.loads(sleepy.recv(65536))["ok"]
        received = 0
        for i in range(3000):
            a.send(eth(mac_bytes(2), mac_bytes(1), b"x" * 8000))
            if i % 20 == 19:
                received += len(b.drain(0.01))
        received += len(b.drain())
        stats = net.query("stats")
        assert received == 3000 == net.port_stats(2)["tx"]
        assert stats["capture"]["clients"] == 1 and stats["capture"]["dropped"] > 0
        first = sleepy.recv(65536)
        assert first[:1] in (b"F", b"{")
        messages = [first]
        sleepy.settimeout(1.5)  # the switch flushes owed reports every 0.5 s
        try:
            while True:
                messages.append(sleepy.recv(65536))
        except TimeoutError:
            pass
        reports = [json.loads(m) for m in messages if m[:1] == b"{"]
        assert reports and reports[-1] == {"op": "dropped",
                                           "total": stats["capture"]["dropped"]}


def test_reload_adds_and_removes_ports(net: LiveNetwork) -> None:
    a, b = net.add(1), net.add(2)
    c = net.add(3)
    a.send(eth(BROADCAST, mac_bytes(1)))
    assert b.recv() is not None and c.recv() is not None
    net.remove(3)
    assert not net.paths.switch_path(c.port["port"]).exists()
    a.send(eth(BROADCAST, mac_bytes(1)))
    assert b.recv() is not None
    assert [p["vm"] for p in net.query("stats")["ports"]] == ["vm1", "vm2"]


def test_a_corrupt_port_file_is_skipped_and_the_others_work(net: LiveNetwork) -> None:
    a = net.add(1)
    (net.paths.ports / "deadbeef-0.json").write_text("{not json")
    bad = port_object(net.paths, 4) | {"switch_path": "/tmp/elsewhere.s"}
    (net.paths.port_file(bad["port"])).write_text(json.dumps(bad))
    b = net.add(2)
    a.send(eth(BROADCAST, mac_bytes(1)))
    assert b.recv() is not None
    assert [p["vm"] for p in net.query("stats")["ports"]] == ["vm1", "vm2"]
    log = net.paths.log.read_text()
    assert "deadbeef-0.json: not JSON" in log and "switch_path must be" in log


def test_a_peer_that_is_gone_counts_tx_error(net: LiveNetwork) -> None:
    a = net.add(1)
    gone = FakeQemu(port_object(net.paths, 2))
    net.peers[2] = gone
    launcher.write_port(net.netdir, gone.port)
    gone.close()
    a.send(eth(BROADCAST, mac_bytes(1)))
    wait_until(lambda: net.port_stats(2)["drops"]["tx_error"] == 1, what="tx_error")
