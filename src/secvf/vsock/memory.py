"""Guest memory as the vhost-user frontend shares it: regions, translation, bounds checks.

QEMU sends a table of up to 8 regions (SET_MEM_TABLE), each with a file descriptor::

    guest_phys_addr  first guest physical address (GPA) of the region
    memory_size      bytes in the region
    userspace_addr   where QEMU mapped it in its own address space (a QEMU VA)
    mmap_offset      offset of the region inside the file descriptor

Two address spaces use this table: ring addresses from SET_VRING_ADDR are QEMU VAs, and
descriptor addresses written by the guest are GPAs. Each region is mapped from file
offset 0 to ``mmap_offset + memory_size`` because mmap offsets must be page aligned.

Every translation checks that the whole range lies inside guest memory; a range that
does not raises :class:`GuestMemoryError` (a :class:`QueueViolation`, since only the guest
supplies GPAs). A GPA range may cross from one region into the next adjacent region, so
translations return a list of segments.
"""

from __future__ import annotations

import itertools
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass

from secvf.vsock.errors import QueueViolation, VhostUserError

#: SET_MEM_TABLE carries at most this many regions (VHOST_MEMORY_BASELINE_NREGIONS).
MAX_REGIONS = 8

#: One translated piece of a guest range: (mapping, offset in the mapping, length).
Segment = tuple[mmap.mmap, int, int]


class GuestMemoryError(QueueViolation):
    """A guest-supplied address range is not (entirely) inside guest memory."""


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """One entry of the frontend's memory table."""

    guest_phys_addr: int  # first GPA of the region
    size: int  # bytes in the region
    userspace_addr: int  # the frontend's VA of the region's first byte
    mmap_offset: int  # offset of the region in its file descriptor

    @property
    def gpa_end(self) -> int:
        """One past the last GPA of the region."""
        return self.guest_phys_addr + self.size


class GuestMemory:
    """The mapped memory table of one vhost-user session.

    Example::

        memory = GuestMemory.map_fds(regions, fds)   # takes ownership of the fds
        mapping, offset = memory.va_to_offset(ring_va, ring_bytes)
        segments = memory.gpa_segments(desc_addr, desc_len)
    """

    def __init__(self, regions: Sequence[tuple[MemoryRegion, mmap.mmap]]) -> None:
        self._regions = sorted(regions, key=lambda item: item[0].guest_phys_addr)

    @classmethod
    def map_fds(cls, regions: Sequence[MemoryRegion], fds: Sequence[int]) -> GuestMemory:
        """Map each region's fd; the fds are closed whether or not mapping succeeds.

        Raises:
            VhostUserError: the table is invalid or a region cannot be mapped.
        """
        try:
            _check_table(regions, fds)
            mapped = [
                (region, _map_region(region, fd)) for region, fd in zip(regions, fds, strict=True)
            ]
        finally:
            for fd in fds:
                os.close(fd)
        return cls(mapped)

    @property
    def regions(self) -> list[MemoryRegion]:
        """The regions in GPA order."""
        return [region for region, _ in self._regions]

    def close(self) -> None:
        """Unmap every region."""
        for _, mapping in self._regions:
            mapping.close()
        self._regions = []

    def va_to_offset(self, va: int, length: int) -> tuple[mmap.mmap, int]:
        """Translate a frontend VA range that must lie inside one region.

        Raises:
            VhostUserError: the range is not inside one region.
        """
        for region, mapping in self._regions:
            start = region.userspace_addr
            if start <= va and va + length <= start + region.size:
                return mapping, region.mmap_offset + (va - start)
        raise VhostUserError(f"ring address {va:#x}+{length} is outside the memory table")

    def va_to_gpa(self, va: int) -> int:
        """The guest-physical address of frontend VA ``va`` (-1 outside every region)."""
        for region, _ in self._regions:
            if region.userspace_addr <= va < region.userspace_addr + region.size:
                return region.guest_phys_addr + (va - region.userspace_addr)
        return -1

    def gpa_segments(self, gpa: int, length: int) -> list[Segment]:
        """Translate a guest range into segments, crossing adjacent regions if needed.

        Raises:
            GuestMemoryError: some byte of the range is not guest memory.
        """
        segments: list[Segment] = []
        cursor, remaining = gpa, length
        while remaining > 0:
            region, mapping = self._region_at(cursor, gpa, length)
            chunk = min(remaining, region.gpa_end - cursor)
            segments.append((mapping, region.mmap_offset + cursor - region.guest_phys_addr, chunk))
            cursor += chunk
            remaining -= chunk
        if not segments:
            self._region_at(gpa, gpa, length)  # a zero-length buffer still needs a valid address
        return segments

    def _region_at(self, gpa: int, start: int, length: int) -> tuple[MemoryRegion, mmap.mmap]:
        for region, mapping in self._regions:
            if region.guest_phys_addr <= gpa < region.gpa_end:
                return region, mapping
        raise GuestMemoryError(f"guest buffer {start:#x}+{length} is outside guest memory")


def _check_table(regions: Sequence[MemoryRegion], fds: Sequence[int]) -> None:
    if not 1 <= len(regions) <= MAX_REGIONS:
        raise VhostUserError(f"memory table has {len(regions)} regions (1..{MAX_REGIONS})")
    if len(fds) != len(regions):
        raise VhostUserError(f"memory table has {len(regions)} regions but {len(fds)} fds")
    ordered = sorted(regions, key=lambda region: region.guest_phys_addr)
    for before, after in itertools.pairwise(ordered):
        if after.guest_phys_addr < before.gpa_end:
            raise VhostUserError("memory table regions overlap")
    for region in regions:
        if (
            region.size == 0
            or region.gpa_end > 2**64
            or region.userspace_addr + region.size > 2**64
        ):
            raise VhostUserError(f"memory region {region} is empty or wraps around")


def _map_region(region: MemoryRegion, fd: int) -> mmap.mmap:
    length = region.mmap_offset + region.size
    try:
        return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError, OverflowError) as exc:
        raise VhostUserError(f"cannot map memory region {region}: {exc}") from exc


def read_segments(segments: Sequence[Segment], limit: int, skip: int = 0) -> bytes:
    """Gather at most ``limit`` bytes from ``segments``, after skipping ``skip`` bytes."""
    parts: list[bytes] = []
    for mapping, offset, length in segments:
        if limit <= 0:
            break
        if skip >= length:
            skip -= length
            continue
        offset, length, skip = offset + skip, length - skip, 0
        take = min(length, limit)
        parts.append(mapping[offset : offset + take])
        limit -= take
    return b"".join(parts)


def write_segments(segments: Sequence[Segment], data: bytes) -> int:
    """Scatter ``data`` into ``segments``; returns the bytes written (may be fewer)."""
    written = 0
    for mapping, offset, length in segments:
        if written == len(data):
            break
        take = min(length, len(data) - written)
        mapping[offset : offset + take] = data[written : written + take]
        written += take
    return written
