"""The vring lifecycle: stopped rings stay untouched, and the trace that proves it (issue 17).

A ring object is one started ring. Once it is stopped (GET_VRING_BASE, SET_VRING_ENABLE(0),
a new memory table) it must never read or write guest memory again: after a guest reboot that
memory may already hold the new driver's rings. These tests pin that rule on the queue object,
on the device's message handling, and on the real backend process with ``--trace-file``, and
check :func:`secvf.vsock.trace.check_trace` against traces that break each rule.
"""

import contextlib
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from secvf.vsock.device import Message, Request, VhostUserVsockDevice
from secvf.vsock.memory import GuestMemory
from secvf.vsock.packet import Op
from secvf.vsock.testing import BackendProcess, DriverQueue, FakeGuest, GuestRam
from secvf.vsock.trace import VringTrace, check_trace, check_trace_files
from secvf.vsock.virtqueue import RingAddresses, SplitVirtqueue

CID = 42


@pytest.fixture
def ram():
    ram = GuestRam()
    yield ram
    ram.close()


def _memory(ram: GuestRam) -> GuestMemory:
    return GuestMemory.map_fds(ram.regions, [os.dup(ram.fd) for _ in ram.regions])


def _read_trace(path: Path) -> list[list[str]]:
    return [line.split()[1:] for line in path.read_text().splitlines()]


# -- the queue object ---------------------------------------------------------------------------


def test_a_stopped_ring_neither_reads_nor_writes_guest_memory(ram, tmp_path):
    trace = VringTrace(tmp_path / "t.log")
    driver = DriverQueue(ram, 8)
    addresses = RingAddresses(ram.va(driver.desc), ram.va(driver.avail), ram.va(driver.used))
    queue = SplitVirtqueue(_memory(ram), 8, addresses, 0, generation=7, trace=trace)
    first = driver.add_chain([(0x200000, 64, True)])
    chain = queue.pop()
    assert chain is not None and chain.head == first
    driver.add_chain([(0x201000, 64, True)])
    before = ram.read(driver.used, 4 + 8 * 8)

    queue.stop()
    queue.add_used(chain.head, 64)  # a late completion of a chain popped before the stop
    queue.undo_pop()
    assert queue.pop() is None  # the second chain stays with the driver

    assert ram.read(driver.used, 4 + 8 * 8) == before
    assert queue.next_avail == 1 and queue.next_used == 0
    assert driver.take_used() == []
    trace.close()
    late = [e for e in _read_trace(tmp_path / "t.log") if e[0] == "late"]
    assert late == [
        ["late", "gen=7", "what=add_used"],
        ["late", "gen=7", "what=undo_pop"],
        ["late", "gen=7", "what=pop"],
    ]


def test_trace_records_each_used_write_with_the_index_in_memory(ram, tmp_path):
    trace = VringTrace(tmp_path / "t.log")
    driver = DriverQueue(ram, 8)
    addresses = RingAddresses(ram.va(driver.desc), ram.va(driver.avail), ram.va(driver.used))
    queue = SplitVirtqueue(_memory(ram), 8, addresses, 0, generation=3, trace=trace)
    for _ in range(2):
        driver.add_chain([(0x200000, 64, True)])
        chain = queue.pop()
        assert chain is not None
        queue.add_used(chain.head, 10)
    ram.write(driver.used + 2, struct.pack("<H", 9))  # another writer moves used.idx
    assert queue.foreign_used_idx() == 9
    trace.close()
    events = _read_trace(tmp_path / "t.log")
    assert events[0][:2] == ["ring", "gen=3"]
    assert f"used={driver.used:#x}" in events[0]
    used = [e for e in events if e[0] == "used"]
    assert [e[3] for e in used] == ["idx=0", "idx=1"]
    assert [e[-1] for e in used] == ["mem_idx=0", "mem_idx=1"]
    assert all(e[2] == f"ring={driver.used:#x}" for e in used)


def test_trace_file_rotates(tmp_path):
    trace = VringTrace(tmp_path / "t.log", rotate_bytes=200)
    for n in range(20):
        trace.event("used", gen=1, idx=n)
    trace.close()
    assert (tmp_path / "t.log.1").exists()
    assert (tmp_path / "t.log").stat().st_size < 200
    assert VringTrace(None).enabled is False


# -- the device's message handling ----------------------------------------------------------------


def _message(request: int, payload: bytes = b"", fds: list[int] | None = None) -> Message:
    return Message(request, 0x1, payload, fds or [])


def _started_device(ram: GuestRam, driver: DriverQueue) -> VhostUserVsockDevice:
    device = VhostUserVsockDevice(CID)
    device.handle(_message(Request.SET_FEATURES, struct.pack("<Q", (1 << 32) | (1 << 30))))
    table = struct.pack("<II", len(ram.regions), 0) + b"".join(
        struct.pack("<QQQQ", r.guest_phys_addr, r.size, r.userspace_addr, r.mmap_offset)
        for r in ram.regions
    )
    device.handle(
        _message(Request.SET_MEM_TABLE, table, [os.dup(ram.fd) for _ in ram.regions])
    )
    device.handle(_message(Request.SET_VRING_NUM, struct.pack("<II", 0, driver.size)))
    device.handle(_message(Request.SET_VRING_BASE, struct.pack("<II", 0, 0)))
    addr = struct.pack(
        "<IIQQQQ", 0, 0, ram.va(driver.desc), ram.va(driver.used), ram.va(driver.avail), 0
    )
    device.handle(_message(Request.SET_VRING_ADDR, addr))
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    device.handle(_message(Request.SET_VRING_KICK, struct.pack("<Q", 0), [kick]))
    device.handle(_message(Request.SET_VRING_ENABLE, struct.pack("<II", 0, 1)))
    return device


@pytest.mark.parametrize(
    "stopping",
    [
        _message(Request.GET_VRING_BASE, struct.pack("<II", 0, 0)),
        _message(Request.SET_VRING_ENABLE, struct.pack("<II", 0, 0)),
    ],
    ids=["GET_VRING_BASE", "SET_VRING_ENABLE(0)"],
)
def test_the_old_ring_object_is_dead_once_the_frontend_stops_the_ring(ram, stopping):
    driver = DriverQueue(ram, 8)
    device = _started_device(ram, driver)
    old = device.running_queues()[0]
    driver.add_chain([(0x200000, 64, True)])
    chain = old.pop()
    assert chain is not None

    device.handle(stopping)

    assert old.stopped and device.running_queues() == {}
    old.add_used(chain.head, 64)  # whoever still holds it cannot write the ring
    assert driver.take_used() == []
    device.close()


def test_a_new_memory_table_stops_the_old_ring_object_and_starts_a_new_one(ram):
    driver = DriverQueue(ram, 8)
    device = _started_device(ram, driver)
    old = device.running_queues()[0]
    table = struct.pack("<II", len(ram.regions), 0) + b"".join(
        struct.pack("<QQQQ", r.guest_phys_addr, r.size, r.userspace_addr, r.mmap_offset)
        for r in ram.regions
    )
    device.handle(
        _message(Request.SET_MEM_TABLE, table, [os.dup(ram.fd) for _ in ram.regions])
    )
    new = device.running_queues()[0]
    assert new is not old and old.stopped and not new.stopped
    assert new.generation == old.generation + 1
    device.close()


# -- checking traces ------------------------------------------------------------------------------

_CLEAN = """\
1 msg req=SET_VRING_ENABLE flags=0x1 payload=0000000001000000 fds=0
2 start vq=0 gen=1
3 ring gen=1 size=128 base=0 desc=0x1000 avail=0x1800 used=0x1940 avail_idx=0 used_idx=0
4 pop gen=1 avail=0 head=0
5 used gen=1 ring=0x1940 idx=0 head=0 len=44 mem_idx=0
6 used gen=1 ring=0x1940 idx=1 head=1 len=44 mem_idx=1
7 msg req=SET_VRING_ENABLE flags=0x1 payload=0000000000000000 fds=0
8 stop vq=0 gen=1 why=disable next_avail=2 next_used=2 avail_idx=2 used_idx=2
9 msg req=GET_VRING_BASE flags=0x1 payload=0000000000000000 fds=0
10 reply req=11 payload=0000000002000000
11 start vq=0 gen=3
12 used gen=3 ring=0x1940 idx=0 head=0 len=44 mem_idx=0
"""


def test_check_trace_accepts_a_clean_lifecycle():
    result = check_trace(_CLEAN.splitlines())
    assert result.ok, result.violations
    assert (result.rings, result.stops, result.used_writes) == (2, 1, 3)


@pytest.mark.parametrize(
    ("extra", "rule"),
    [
        ("9 used gen=1 ring=0x1940 idx=2 head=2 len=44 mem_idx=2", "write to a stopped ring"),
        ("6 used gen=1 ring=0x1940 idx=2 head=2 len=44 mem_idx=7", "another writer"),
        ("6 used gen=1 ring=0x1940 idx=5 head=2 len=44 mem_idx=5", "gap"),
        ("6 foreign vq=0 gen=1 next_used=2 mem_idx=0", "foreign"),
        ("6 late gen=1 what=add_used", "late"),
    ],
)
def test_check_trace_names_each_broken_rule(extra, rule):
    lines = _CLEAN.splitlines()
    position = int(extra.split()[0])
    lines.insert(position, extra)
    result = check_trace(lines)
    assert not result.ok
    assert any(rule in v for v in result.violations), result.violations


def test_check_trace_flags_a_write_after_get_vring_base_was_answered():
    lines = [
        "1 start vq=0 gen=1",
        "2 msg req=GET_VRING_BASE flags=0x1 payload=0000000000000000 fds=0",
        "3 reply req=11 payload=0000000000000000",
        # a ring object that was (wrongly) never stopped keeps writing
        "4 used gen=1 ring=0x1940 idx=0 head=0 len=44 mem_idx=0",
    ]
    result = check_trace(lines)
    assert any("after GET_VRING_BASE" in v for v in result.violations), result.violations


# -- the real backend with --trace-file -----------------------------------------------------------


@contextlib.contextmanager
def traced_guest(tmp_path: Path) -> Iterator[tuple[Path, BackendProcess, FakeGuest]]:
    """A backend writing its trace to ``tmp_path/vsock.trace``, with a started fake guest."""
    trace = tmp_path / "vsock.trace"
    with (
        BackendProcess(tmp_path, CID, "--trace-file", str(trace)) as backend,
        FakeGuest(backend.vhost_user_socket, CID) as guest,
    ):
        guest.start()
        yield trace, backend, guest


def test_backend_trace_of_a_reboot_passes_the_lifecycle_check(tmp_path):
    with traced_guest(tmp_path) as (trace, backend, guest):
        for port in (5000, 5001):
            client, host_port = _connect(backend, guest, port)
            guest.send(Op.RW, src_port=port, dst_port=host_port, payload=b"hi")
            assert client.recv(2) == b"hi"
            client.close()
            guest.drain(0.2)
            guest.reset_driver()  # GET_VRING_BASE for both rings, then a new driver
            guest.post_rx_buffers(64)
        guest.drain(0.3)
    assert backend.wait() == 0
    result = check_trace_files([trace])
    assert result.ok, result.violations
    assert result.rings == 6 and result.stops >= 4 and result.used_writes > 0
    events = [e[0] for e in _read_trace(trace)]
    for name in ("msg", "reply", "start", "ring", "stop", "pop", "used", "call"):
        assert name in events, name
    assert events.count("reset_begin") >= 2


def test_backend_traces_a_foreign_write_to_used_idx(tmp_path):
    with traced_guest(tmp_path) as (trace, backend, guest):
        guest.ram.write(guest.rx.used + 2, struct.pack("<H", 77))  # not the device's write
        guest.kick_queue(0)  # the backend pumps again, and audits the rings first
        deadline = time.monotonic() + 5
        while "used.idx is 77 in memory" not in backend.log():
            assert time.monotonic() < deadline, backend.log()
            time.sleep(0.05)
    result = check_trace_files([trace])
    assert any(v.startswith("foreign") for v in result.violations), result.violations
    assert "used.idx is 77 in memory" in backend.log()


def _connect(backend: BackendProcess, guest: FakeGuest, port: int) -> tuple[socket.socket, int]:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(str(backend.uds_path))
    client.sendall(b"CONNECT %d\n" % port)
    request = guest.expect(Op.REQUEST, port=port)
    guest.send(Op.RESPONSE, src_port=port, dst_port=request.header.src_port)
    line = b""
    while not line.endswith(b"\n"):
        line += client.recv(1)
    assert line == b"OK %d\n" % request.header.src_port
    return client, request.header.src_port


def test_trace_file_option_defaults_to_the_environment(monkeypatch, tmp_path):
    from secvf.vsock.__main__ import _parser

    required = ["--vhost-user-socket", "a", "--uds-path", "b", "--guest-cid", "3"]
    monkeypatch.delenv("SECVF_VSOCK_TRACE", raising=False)
    assert _parser().parse_args(required).trace_file is None
    monkeypatch.setenv("SECVF_VSOCK_TRACE", str(tmp_path / "env.trace"))
    assert _parser().parse_args(required).trace_file == tmp_path / "env.trace"
    args = _parser().parse_args([*required, "--trace-file", str(tmp_path / "cli.trace")])
    assert args.trace_file == tmp_path / "cli.trace"
