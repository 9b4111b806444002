"""The device side of a split virtqueue, hardened against a hostile driver.

Ring layout (virtio 1.2, section 2.7), all little endian, ``size`` a power of two::

    descriptor table  size x {le64 addr, le32 len, le16 flags, le16 next}   align 16
    available ring    le16 flags, le16 idx, size x le16 ring[]               align 2
    used ring         le16 flags, le16 idx, size x {le32 id, le32 len}       align 4

The driver publishes chain heads in the available ring and bumps ``avail.idx``; the
device walks each chain, then writes ``{id, len}`` into the used ring and bumps
``used.idx``. Indices are free-running u16 counters.

Everything the driver wrote is untrusted. A chain is accepted only if its head and every
``next`` are below ``size``, it has at most ``size`` descriptors (so a loop is caught),
it uses no INDIRECT descriptors (not negotiated), its device-writable descriptors come
after its readable ones, and every buffer lies inside guest memory. ``avail.idx`` may not
run more than ``size`` entries ahead. Any failure raises :class:`QueueViolation` and
marks the queue broken: it is never processed again until the frontend restarts it.

Lifecycle. A queue object is one *started* ring. :meth:`SplitVirtqueue.stop` (GET_VRING_BASE,
SET_VRING_ENABLE(0), a new memory table, the end of the session) is final: from then on the
object refuses to read or write guest memory, so a caller that still holds it cannot touch
ring memory that the frontend - or a rebooted guest - has taken back. Such an attempt is
logged and traced as ``late``.

Notification suppression is ignored on purpose: honouring VRING_AVAIL_F_NO_INTERRUPT
safely needs a store-load fence that pure Python cannot issue, so callers signal the
call eventfd after every batch. Plain stores keep their order on x86-64 (TSO), which is
what makes "write the used element, then the used index" safe here; this module is
x86-64 only.

The two indices the driver and the device share while both run, ``avail.idx`` and
``used.idx``, are read and written through :class:`RingIndex`: one 2-byte load or store
each. ``struct.pack_into`` zeroes its target before it packs, so a ``used.idx`` written
with it reads 0 for a moment at every update (``0x00FF`` -> ``0x0000`` -> ``0x0100``). A
driver that reads that 0 takes the stale used entries of the previous lap for new ones:
it frees buffers still in flight and reports "id N is not a head" (issue 17;
``docs/vsock.md`` has the evidence). Ring *entries* may still be packed with ``struct``:
the driver reads them only after the index that publishes them.
"""

from __future__ import annotations

import logging
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from secvf.vsock.errors import QueueViolation, VhostUserError
from secvf.vsock.memory import GuestMemory, Segment, read_segments, write_segments
from secvf.vsock.trace import NO_TRACE, VringTrace

#: Largest queue size the virtio spec allows for split rings.
MAX_QUEUE_SIZE = 32768

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4

_DESCRIPTOR = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
_U16_MASK = 0xFFFF

log = logging.getLogger(__name__)


class RingIndex:
    """A le16 ring index in guest memory, read and written in one 2-byte access.

    Holds a view of the mapping until :meth:`release` (the mapping cannot be closed
    before that).

    Raises:
        VhostUserError: the index is not 2-byte aligned (the spec aligns both rings).
    """

    def __init__(self, mapping: mmap.mmap, offset: int) -> None:
        if offset % 2:
            raise VhostUserError(f"ring index at mapping offset {offset:#x} is not 2-byte aligned")
        with memoryview(mapping) as whole:
            self._view = whole[offset : offset + 2].cast("H")  # native order: x86-64 only

    def read(self) -> int:
        """The index as memory holds it now."""
        value: int = self._view[0]
        return value

    def write(self, value: int) -> None:
        """Store ``value`` (masked to 16 bits) in one store."""
        self._view[0] = value & _U16_MASK

    def release(self) -> None:
        """Drop the view of the mapping (later reads and writes raise ValueError)."""
        self._view.release()


@dataclass(frozen=True, slots=True)
class Descriptor:
    """One entry of the descriptor table, as the driver wrote it."""

    addr: int  # guest physical address of the buffer
    length: int  # buffer length in bytes
    flags: int  # DESC_F_* bits
    next: int  # index of the next descriptor when DESC_F_NEXT is set


@dataclass(frozen=True, slots=True)
class RingAddresses:
    """Frontend VAs of the three ring parts (from SET_VRING_ADDR)."""

    desc: int  # descriptor table
    avail: int  # available ring
    used: int  # used ring


def walk_chain(read: Callable[[int], Descriptor], head: int, size: int) -> list[Descriptor]:
    """Follow the chain starting at ``head`` and return its descriptors in order.

    Raises:
        QueueViolation: an index is out of range, the chain is longer than the queue
            (a loop), a descriptor is INDIRECT, or a readable one follows a writable one.
    """
    chain: list[Descriptor] = []
    index = head
    while True:
        if index >= size:
            raise QueueViolation(f"descriptor index {index} is outside a queue of {size}")
        if len(chain) == size:
            raise QueueViolation(f"descriptor chain from head {head} is longer than the queue")
        desc = read(index)
        if desc.flags & DESC_F_INDIRECT:
            raise QueueViolation("indirect descriptor used but not negotiated")
        if chain and chain[-1].flags & DESC_F_WRITE and not desc.flags & DESC_F_WRITE:
            raise QueueViolation("device-readable descriptor after a device-writable one")
        chain.append(desc)
        if not desc.flags & DESC_F_NEXT:
            return chain
        index = desc.next


@dataclass(slots=True)
class DescriptorChain:
    """A validated chain, translated into host memory segments."""

    head: int  # index of the first descriptor; identifies the chain in the used ring
    readable: list[Segment] = field(default_factory=list)  # driver-written buffers
    writable: list[Segment] = field(default_factory=list)  # buffers the device fills

    @property
    def readable_bytes(self) -> int:
        """Total length of the readable buffers."""
        return sum(length for _, _, length in self.readable)

    @property
    def writable_bytes(self) -> int:
        """Total length of the writable buffers."""
        return sum(length for _, _, length in self.writable)

    def read(self, limit: int, skip: int = 0) -> bytes:
        """Gather at most ``limit`` readable bytes, starting ``skip`` bytes in."""
        return read_segments(self.readable, limit, skip)

    def write(self, data: bytes) -> int:
        """Scatter ``data`` over the writable buffers; returns the bytes written."""
        return write_segments(self.writable, data)


class SplitVirtqueue:
    """The device side of one split virtqueue over mapped guest memory.

    Example::

        queue = SplitVirtqueue(memory, 128, addresses, next_avail=0)
        while (chain := queue.pop()) is not None:
            queue.add_used(chain.head, chain.write(packet))
        if queue.take_used_added():
            signal_call_eventfd()

    Raises (from every method that touches the ring):
        QueueViolation: the driver corrupted the ring; :attr:`broken` is then True.
    """

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        addresses: RingAddresses,
        next_avail: int,
        *,
        generation: int = 0,
        trace: VringTrace = NO_TRACE,
    ) -> None:
        """Bind the rings at ``addresses``; ``generation`` names this ring in the ``trace``.

        Raises:
            VhostUserError: the size is invalid or a ring is not inside one memory region.
        """
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise VhostUserError(f"queue size {size} is not a power of two up to 32768")
        self.size = size
        self.generation = generation
        self._memory = memory
        self._trace = trace
        self._desc = memory.va_to_offset(addresses.desc, 16 * size)
        self._avail = memory.va_to_offset(addresses.avail, 4 + 2 * size)
        self._used = memory.va_to_offset(addresses.used, 4 + 8 * size)
        self._used_gpa = memory.va_to_gpa(addresses.used)
        self._avail_idx = RingIndex(self._avail[0], self._avail[1] + 2)
        self._used_idx = RingIndex(self._used[0], self._used[1] + 2)
        self.next_avail = next_avail & _U16_MASK
        self.next_used = self._used_idx.read()
        self.broken = False
        self.stopped = False
        self._used_added = False
        if trace.enabled:
            trace.event(
                "ring",
                gen=generation,
                size=size,
                base=self.next_avail,
                desc=f"{memory.va_to_gpa(addresses.desc):#x}",
                avail=f"{memory.va_to_gpa(addresses.avail):#x}",
                used=f"{self._used_gpa:#x}",
                **self.memory_indices(),
            )

    def __repr__(self) -> str:
        return (
            f"<SplitVirtqueue size={self.size} next_avail={self.next_avail} "
            f"next_used={self.next_used} broken={self.broken} stopped={self.stopped}>"
        )

    def stop(self) -> None:
        """Stop the ring for good: later calls neither read nor write guest memory (and the
        mapping may be closed)."""
        if not self.stopped:
            self.stopped = True
            self._avail_idx.release()
            self._used_idx.release()

    def _refuse_late(self, what: str) -> bool:
        """Whether the ring is stopped; if so, log and trace the refused ``what``."""
        if not self.stopped:
            return False
        log.error("gen %d: %s on a stopped ring refused", self.generation, what)
        if self._trace.enabled:
            self._trace.event("late", gen=self.generation, what=what)
        return True

    def pop(self) -> DescriptorChain | None:
        """Take the next available chain, or None when the driver has published none (or the
        ring is broken or stopped)."""
        if self.broken or self._refuse_late("pop"):
            return None
        try:
            avail_idx = self._avail_idx.read()
            pending = (avail_idx - self.next_avail) & _U16_MASK
            if pending == 0:
                return None
            if pending > self.size:
                raise QueueViolation(f"avail.idx {avail_idx} ran {pending} entries ahead")
            slot = 4 + 2 * (self.next_avail % self.size)
            head = self._read_u16(self._avail, slot)
            chain = self._translate(head, walk_chain(self._descriptor, head, self.size))
        except QueueViolation:
            self.broken = True
            raise
        if self._trace.enabled:
            self._trace.event("pop", gen=self.generation, avail=self.next_avail, head=head)
        self.next_avail = (self.next_avail + 1) & _U16_MASK
        return chain

    def undo_pop(self) -> None:
        """Give the last popped chain back, so the next :meth:`pop` returns it again."""
        if self._refuse_late("undo_pop"):
            return
        self.next_avail = (self.next_avail - 1) & _U16_MASK
        if self._trace.enabled:
            self._trace.event("unpop", gen=self.generation, avail=self.next_avail)

    def add_used(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver, saying ``written`` bytes were filled.

        On a stopped ring nothing is written (the chain belongs to a ring the frontend has
        taken back; see the module docstring)."""
        if self._refuse_late("add_used"):
            return
        mapping, offset = self._used
        if self._trace.enabled:
            self._trace.event(
                "used",
                gen=self.generation,
                ring=f"{self._used_gpa:#x}",
                idx=self.next_used,
                head=head,
                len=written,
                mem_idx=self._used_idx.read(),
            )
        _USED_ELEM.pack_into(mapping, offset + 4 + 8 * (self.next_used % self.size), head, written)
        self.next_used = (self.next_used + 1) & _U16_MASK
        self._used_idx.write(self.next_used)  # x86 TSO: seen after the element
        self._used_added = True

    def foreign_used_idx(self) -> int | None:
        """``used.idx`` as memory holds it, if that is not what this device last wrote.

        Only the device writes ``used.idx``; a different value means another writer touched
        the ring (the trace records it as ``foreign``). A stopped ring has none."""
        if self.stopped:
            return None
        value = self._used_idx.read()
        return None if value == self.next_used else value

    def memory_indices(self) -> dict[str, int]:
        """``avail.idx`` and ``used.idx`` as the ring memory holds them now (for traces)."""
        return {
            "avail_idx": self._avail_idx.read(),
            "used_idx": self._used_idx.read(),
        }

    def take_used_added(self) -> bool:
        """Return whether chains were used since the last call, and reset the flag."""
        added, self._used_added = self._used_added, False
        return added

    def _descriptor(self, index: int) -> Descriptor:
        mapping, offset = self._desc
        return Descriptor(*_DESCRIPTOR.unpack_from(mapping, offset + 16 * index))

    def _translate(self, head: int, descriptors: list[Descriptor]) -> DescriptorChain:
        chain = DescriptorChain(head)
        for desc in descriptors:
            segments = self._memory.gpa_segments(desc.addr, desc.length)
            (chain.writable if desc.flags & DESC_F_WRITE else chain.readable).extend(segments)
        return chain

    @staticmethod
    def _read_u16(location: tuple[mmap.mmap, int], offset: int) -> int:
        mapping, base = location
        value: int = _U16.unpack_from(mapping, base + offset)[0]
        return value
