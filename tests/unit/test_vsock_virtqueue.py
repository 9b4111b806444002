"""Split virtqueue and guest memory: every guest-written index and address is checked."""

import mmap
import os
import struct
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secvf.vsock.errors import QueueViolation, VhostUserError
from secvf.vsock.memory import GuestMemory, GuestMemoryError, MemoryRegion
from secvf.vsock.testing import RAM_HOLE, DriverQueue, GuestRam
from secvf.vsock.virtqueue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    Descriptor,
    RingAddresses,
    RingIndex,
    SplitVirtqueue,
    walk_chain,
)

descriptors = st.builds(
    Descriptor,
    addr=st.integers(0, 2**64 - 1),
    length=st.integers(0, 2**32 - 1),
    flags=st.integers(0, 2**16 - 1),
    next=st.integers(0, 2**16 - 1),
)


@given(
    size=st.sampled_from([1, 2, 4, 8, 16]),
    table=st.lists(descriptors, min_size=16, max_size=16),
    head=st.integers(0, 2**16 - 1),
)
def test_walk_chain_returns_a_valid_chain_or_raises_queue_violation(size, table, head):
    try:
        chain = walk_chain(lambda i: table[i], head, size)
    except QueueViolation:
        return
    # the chain is exactly what following `next` from `head` gives, and never loops
    assert chain[0] == table[head]
    assert all(b == table[a.next] for a, b in zip(chain, chain[1:], strict=False))
    assert len(chain) <= size
    assert all(not d.flags & DESC_F_INDIRECT for d in chain)
    assert all(d.flags & DESC_F_NEXT for d in chain[:-1])
    assert not chain[-1].flags & DESC_F_NEXT
    assert all(d.next < size for d in chain[:-1])
    writable = [bool(d.flags & DESC_F_WRITE) for d in chain]
    assert writable == sorted(writable)  # readable ones first


def test_walk_chain_rejects_a_loop():
    table = [Descriptor(0, 1, DESC_F_NEXT, 1), Descriptor(0, 1, DESC_F_NEXT, 0)]
    with pytest.raises(QueueViolation, match="longer than the queue"):
        walk_chain(lambda i: table[i], 0, 2)


def test_walk_chain_rejects_an_index_outside_the_queue():
    with pytest.raises(QueueViolation, match="outside a queue of 4"):
        walk_chain(lambda i: Descriptor(0, 1, DESC_F_NEXT, 4), 0, 4)


def _memory(ram: GuestRam) -> GuestMemory:
    return GuestMemory.map_fds(ram.regions, [os.dup(ram.fd) for _ in ram.regions])


@pytest.fixture
def ram():
    ram = GuestRam()
    yield ram
    ram.close()


def test_gpa_translation_across_regions_with_mmap_offset(ram):
    memory = _memory(ram)
    ram.write(0x100000, b"high")
    ram.write(0x1000, b"low")
    [(mapping, offset, length)] = memory.gpa_segments(0x100000, 4)
    assert mapping[offset : offset + length] == b"high"
    [(mapping, offset, _)] = memory.gpa_segments(0x1000, 3)
    assert mapping[offset : offset + 3] == b"low"
    with pytest.raises(GuestMemoryError):
        memory.gpa_segments(RAM_HOLE[0] - 2, 4)  # runs into the hole
    with pytest.raises(GuestMemoryError):
        memory.gpa_segments(ram.size - 2, 4)  # runs off the end
    with pytest.raises(GuestMemoryError):
        memory.gpa_segments(2**64 - 1, 0)
    memory.close()


def test_gpa_range_may_cross_adjacent_regions():
    fd = os.memfd_create("t")
    os.ftruncate(fd, 0x4000)
    regions = [MemoryRegion(0, 0x2000, 0x10000, 0), MemoryRegion(0x2000, 0x2000, 0x90000, 0x2000)]
    memory = GuestMemory.map_fds(regions, [fd, os.dup(fd)])
    segments = memory.gpa_segments(0x1FFE, 4)
    assert [length for _, _, length in segments] == [2, 2]
    memory.close()


def test_memory_table_is_validated():
    fd = os.memfd_create("t")
    os.ftruncate(fd, 0x1000)
    with pytest.raises(VhostUserError, match="overlap"):
        GuestMemory.map_fds(
            [MemoryRegion(0, 0x1000, 0, 0), MemoryRegion(0x800, 0x800, 0x5000, 0)],
            [fd, os.dup(fd)],
        )
    fd = os.memfd_create("t")
    with pytest.raises(VhostUserError, match="cannot map"):
        GuestMemory.map_fds([MemoryRegion(0, 0x1000, 0, 0)], [fd])  # fd is empty


def _queue(ram: GuestRam, size: int = 8) -> tuple[DriverQueue, SplitVirtqueue]:
    driver = DriverQueue(ram, size)
    addresses = RingAddresses(ram.va(driver.desc), ram.va(driver.avail), ram.va(driver.used))
    return driver, SplitVirtqueue(_memory(ram), size, addresses, next_avail=0)


def test_pop_scatter_gather_and_used_ring(ram):
    driver, queue = _queue(ram)
    ram.write(0x200000, b"abc")
    ram.write(0x200100, b"defg")
    head = driver.add_chain([(0x200000, 3, False), (0x200100, 4, False), (0x200200, 5, True)])
    chain = queue.pop()
    assert chain.head == head
    assert chain.read(100) == b"abcdefg"
    assert chain.read(3, skip=2) == b"cde"
    assert chain.write(b"0123456789") == 5
    assert ram.read(0x200200, 5) == b"01234"
    assert queue.pop() is None
    queue.add_used(chain.head, 5)
    assert queue.take_used_added() is True
    assert queue.take_used_added() is False
    assert driver.take_used() == [(head, 5)]


def test_undo_pop_returns_the_same_chain(ram):
    driver, queue = _queue(ram)
    head = driver.add_chain([(0x200000, 8, True)])
    assert queue.pop().head == head
    queue.undo_pop()
    assert queue.pop().head == head


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: d.publish(200), "outside a queue"),
        (lambda d: (d.set_descriptor(0, 0x200000, 4, DESC_F_NEXT, 9), d.publish(0)), "outside"),
        (lambda d: (d.set_descriptor(0, RAM_HOLE[0], 4, 0, 0), d.publish(0)), "outside guest"),
        (lambda d: (d.set_descriptor(0, 2**40, 4, 0, 0), d.publish(0)), "outside guest"),
        (lambda d: (d.set_descriptor(0, 0x200000, 2**32 - 1, 0, 0), d.publish(0)), "outside"),
        (lambda d: (d.set_descriptor(0, 0x200000, 4, DESC_F_INDIRECT, 0), d.publish(0)), "indir"),
        (
            lambda d: (
                d.set_descriptor(0, 0x200000, 4, DESC_F_NEXT | DESC_F_WRITE, 1),
                d.set_descriptor(1, 0x200000, 4, 0, 0),
                d.publish(0),
            ),
            "readable descriptor after",
        ),
    ],
)
def test_hostile_ring_marks_queue_broken(ram, corrupt, message):
    driver, queue = _queue(ram)
    corrupt(driver)
    with pytest.raises(QueueViolation, match=message):
        queue.pop()
    assert queue.broken
    assert queue.pop() is None  # never processed again


def test_avail_index_running_too_far_ahead_is_a_violation(ram):
    driver, queue = _queue(ram)
    ram.write(driver.avail + 2, struct.pack("<H", 9))  # 9 entries in a queue of 8
    with pytest.raises(QueueViolation, match="ahead"):
        queue.pop()


def test_ring_outside_memory_is_refused(ram):
    memory = _memory(ram)
    with pytest.raises(VhostUserError, match="outside the memory table"):
        SplitVirtqueue(memory, 8, RingAddresses(0x1234, 0x1234, 0x1234), 0)
    with pytest.raises(VhostUserError, match="power of two"):
        SplitVirtqueue(memory, 6, RingAddresses(ram.va(0x100000), ram.va(0), ram.va(0)), 0)


def _in_child(work) -> int:
    """Fork a child that runs ``work()`` and exits; return its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            work()
        finally:
            os._exit(0)
    return pid


def _read_for(index: RingIndex, seconds: float) -> list[int]:
    values, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        values += [index.read() for _ in range(1000)]
    return values


def test_a_ring_index_is_never_seen_half_written():
    """Issue 17: ``used.idx`` written with ``struct.pack_into`` was zeroed before each store
    (0x00FF -> 0x0000 -> 0x0100), and a guest that read the 0 took stale used entries
    for new ones."""
    mapping = mmap.mmap(-1, 4096)
    writer = RingIndex(mapping, 2)
    writer.write(0x00FF)

    def flip() -> None:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            for _ in range(1000):
                writer.write(0x0100)
                writer.write(0x00FF)

    pid = _in_child(flip)
    try:
        seen = set(_read_for(RingIndex(mapping, 2), 0.5))
    finally:
        os.waitpid(pid, 0)
    assert seen == {0x00FF, 0x0100}  # both seen (the two ran together), nothing else


def test_add_used_stores_used_idx_whole_for_a_concurrent_reader(ram):
    """add_used moving used.idx across a 256 boundary again and again, read by another
    process: only the two values it stores are ever seen."""
    driver, queue = _queue(ram)
    used_idx = RingIndex(*_memory(ram).va_to_offset(ram.va(driver.used) + 2, 2))
    queue.next_used = 0x00FE
    queue.add_used(0, 0)

    def cross() -> None:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            for before in (0x00FE, 0x00FF) * 500:
                queue.next_used = before
                queue.add_used(0, 0)

    pid = _in_child(cross)
    try:
        seen = set(_read_for(used_idx, 0.5))
    finally:
        os.waitpid(pid, 0)
    assert seen == {0x00FF, 0x0100}


def test_a_stopped_queue_lets_its_memory_be_unmapped(ram):
    memory = _memory(ram)
    driver = DriverQueue(ram, 8)
    addresses = RingAddresses(ram.va(driver.desc), ram.va(driver.avail), ram.va(driver.used))
    queue = SplitVirtqueue(memory, 8, addresses, next_avail=0)
    queue.stop()
    memory.close()  # raises BufferError if the queue still held a view of the mapping
    assert queue.pop() is None
    assert queue.foreign_used_idx() is None


def test_a_misaligned_ring_index_is_refused():
    with pytest.raises(VhostUserError, match="not 2-byte aligned"):
        RingIndex(mmap.mmap(-1, 4096), 3)
