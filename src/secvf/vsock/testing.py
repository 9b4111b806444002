"""A fake QEMU + guest driver for testing the vsock backend without a VM.

:class:`FakeGuest` plays both parts a real VM plays:

- the vhost-user *frontend* (QEMU): it connects to the backend's vhost-user socket and sends
  the same message sequence QEMU 7.2 sends, passing a memfd "guest RAM" and kick/call
  eventfds with SCM_RIGHTS;
- the virtio *driver* (the guest kernel): it lays out split rings in that RAM, posts rx
  buffers (single 3776-byte descriptors, like Linux 6.1), sends tx packets as a header
  descriptor plus a payload descriptor, kicks, and reads what the backend returned.

The RAM mimics QEMU's q35 layout: two regions with a hole between them (GPA 0xA0000 to
0xC0000), the second one at a non-zero mmap offset. It can also write arbitrary (hostile)
descriptors. :class:`BackendProcess` runs ``python -m secvf.vsock`` as a real process.

Example::

    with BackendProcess(tmp_path, guest_cid=3) as backend, FakeGuest(backend.vhost_user_socket,
                                                                        guest_cid=3) as guest:
        guest.start()
        client = socket.socket(socket.AF_UNIX); client.connect(str(backend.uds_path))
        client.sendall(b"CONNECT 2222\\n")
        request = guest.expect(Op.REQUEST)
        guest.send(Op.RESPONSE, src_port=2222, dst_port=request.header.src_port)
        assert client.recv(64).startswith(b"OK ")
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from secvf.vsock.device import (
    FLAG_NEED_REPLY,
    FLAG_VERSION,
    OFFERED_FEATURES,
    OFFERED_PROTOCOL_FEATURES,
    Request,
)
from secvf.vsock.memory import MemoryRegion
from secvf.vsock.packet import HEADER_BYTES, HOST_CID, Op, PacketHeader, SocketType
from secvf.vsock.virtqueue import DESC_F_NEXT, DESC_F_WRITE

#: Where the fake QEMU pretends guest RAM is mapped in its address space.
FAKE_VA_BASE = 0x7F00_0000_0000
#: The hole between the two RAM regions (like the VGA window on q35).
RAM_HOLE = (0xA0000, 0xC0000)
#: Size of one rx buffer, as the Linux 6.1 driver posts them.
RX_BUFFER_BYTES = 3776
#: Bytes of fake RAM reused round-robin for tx packets.
TX_ARENA_BYTES = 2 * 1024 * 1024
#: buf_alloc the fake guest advertises unless a test says otherwise.
GUEST_BUF_ALLOC_BYTES = 256 * 1024

_HEADER = struct.Struct("<III")
_DESCRIPTOR = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


@dataclass(frozen=True)
class ReceivedPacket:
    """A packet the backend put into an rx buffer."""

    header: PacketHeader
    payload: bytes


class TxQueueFull(RuntimeError):
    """The device stopped consuming the fake guest's tx queue."""


class GuestRam:
    """memfd-backed fake guest RAM with a q35-like two-region layout."""

    def __init__(self, size: int = 4 * 1024 * 1024) -> None:
        self.size = size
        self.fd = os.memfd_create("secvf-fake-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.mm = mmap.mmap(self.fd, size)
        low, high = RAM_HOLE
        self.regions = [
            MemoryRegion(0, low, FAKE_VA_BASE, 0),
            MemoryRegion(high, size - high, FAKE_VA_BASE + high, high),
        ]
        self._next_free = 0x100000

    def alloc(self, size: int, align: int = 16) -> int:
        """Reserve ``size`` bytes in the high region; returns their GPA."""
        gpa = (self._next_free + align - 1) // align * align
        if gpa + size > self.size:
            raise MemoryError("fake guest RAM is full")
        self._next_free = gpa + size
        return gpa

    def write(self, gpa: int, data: bytes) -> None:
        """Store ``data`` at ``gpa`` (GPA equals file offset in this layout)."""
        self.mm[gpa : gpa + len(data)] = data

    def read(self, gpa: int, size: int) -> bytes:
        """Load ``size`` bytes from ``gpa``."""
        return self.mm[gpa : gpa + size]

    @staticmethod
    def va(gpa: int) -> int:
        """The fake QEMU virtual address of ``gpa``."""
        return FAKE_VA_BASE + gpa

    def close(self) -> None:
        """Unmap and close the memfd."""
        self.mm.close()
        os.close(self.fd)


class DriverQueue:
    """The driver side of one split virtqueue in :class:`GuestRam`."""

    def __init__(self, ram: GuestRam, size: int) -> None:
        self.ram = ram
        self.size = size
        self.desc = ram.alloc(16 * size, 16)
        self.avail = ram.alloc(4 + 2 * size, 2)
        self.used = ram.alloc(4 + 8 * size, 4)
        self.avail_idx = 0
        self.last_used = 0
        self._free = list(range(size))
        self._chains: dict[int, list[int]] = {}

    @property
    def free_count(self) -> int:
        """Descriptors not in any published chain."""
        return len(self._free)

    def set_descriptor(self, index: int, addr: int, length: int, flags: int, next_: int) -> None:
        """Write descriptor ``index`` verbatim (hostile tests use this directly)."""
        self.ram.write(self.desc + 16 * index, _DESCRIPTOR.pack(addr, length, flags, next_))

    def publish(self, head: int) -> None:
        """Put ``head`` in the available ring and bump ``avail.idx``."""
        slot = self.avail + 4 + 2 * (self.avail_idx % self.size)
        self.ram.write(slot, _U16.pack(head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.write(self.avail + 2, _U16.pack(self.avail_idx))

    def add_chain(self, buffers: Sequence[tuple[int, int, bool]]) -> int:
        """Chain ``(gpa, length, device_writable)`` buffers, publish the chain, return its head."""
        indices = [self._free.pop(0) for _ in buffers]
        for position, (index, (gpa, length, writable)) in enumerate(
            zip(indices, buffers, strict=True)
        ):
            last = position == len(buffers) - 1
            flags = (0 if last else DESC_F_NEXT) | (DESC_F_WRITE if writable else 0)
            self.set_descriptor(index, gpa, length, flags, 0 if last else indices[position + 1])
        self._chains[indices[0]] = indices
        self.publish(indices[0])
        return indices[0]

    def take_used(self) -> list[tuple[int, int]]:
        """Return the new ``(head, written)`` used entries and free their descriptors."""
        used_idx = _U16.unpack(self.ram.read(self.used + 2, 2))[0]
        entries = []
        while self.last_used != used_idx:
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            head, written = _USED_ELEM.unpack(self.ram.read(slot, 8))
            entries.append((head, written))
            self._free.extend(self._chains.pop(head, []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return entries


class FakeGuest:
    """Plays QEMU and the guest driver against a backend's vhost-user socket."""

    def __init__(
        self,
        vhost_user_socket: Path,
        guest_cid: int,
        *,
        queue_size: int = 128,
        ram_size: int = 8 * 1024 * 1024,
    ) -> None:
        self.guest_cid = guest_cid
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(str(vhost_user_socket))
        self.ram = GuestRam(ram_size)
        self.rx = DriverQueue(self.ram, queue_size)
        self.tx = DriverQueue(self.ram, queue_size)
        self.kick = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.call = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.inbox: list[ReceivedPacket] = []
        self.auto_refill = True  # repost rx buffers as soon as packets are read from them
        self._rx_buffers: dict[int, int] = {}  # chain head -> buffer GPA
        self._tx_done: list[tuple[int, int]] = []  # used tx entries not yet waited for
        self._tx_arena = self.ram.alloc(TX_ARENA_BYTES)
        self._tx_cursor = 0

    def __enter__(self) -> FakeGuest:
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()

    # -- vhost-user frontend ---------------------------------------------------------------

    def request(
        self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *, reply: bool = False
    ) -> bytes | None:
        """Send one vhost-user message; wait for the reply or ack when ``reply`` is set."""
        flags = FLAG_VERSION | (FLAG_NEED_REPLY if reply else 0)
        data = _HEADER.pack(request, flags, len(payload)) + payload
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        self.sock.sendmsg([data], ancillary if fds else [])
        if not reply:
            return None
        header = _receive_exact(self.sock, _HEADER.size)
        answered, _flags, size = _HEADER.unpack(header)
        if answered != request:
            raise AssertionError(f"reply to {answered}, expected {request}")
        return _receive_exact(self.sock, size)

    def ask(self, request: int, payload: bytes = b"") -> bytes:
        """Send a GET_* request and return its reply payload."""
        self.sock.sendmsg([_HEADER.pack(request, FLAG_VERSION, len(payload)) + payload])
        _answered, _flags, size = _HEADER.unpack(_receive_exact(self.sock, _HEADER.size))
        return _receive_exact(self.sock, size)

    def start(self, *, rx_buffers: int = 64) -> None:
        """Run QEMU 7.2's init and driver-start sequence, then post ``rx_buffers`` buffers."""
        features = struct.unpack("<Q", self.ask(Request.GET_FEATURES))[0]
        assert features == OFFERED_FEATURES, hex(features)
        protocol = struct.unpack("<Q", self.ask(Request.GET_PROTOCOL_FEATURES))[0]
        assert protocol == OFFERED_PROTOCOL_FEATURES, hex(protocol)
        self.request(Request.SET_PROTOCOL_FEATURES, struct.pack("<Q", protocol))
        self.ask(Request.GET_QUEUE_NUM)
        self.request(Request.SET_OWNER)
        config = self.ask(Request.GET_CONFIG, struct.pack("<III", 0, 8, 0) + bytes(8))
        assert struct.unpack_from("<Q", config, 12)[0] == self.guest_cid
        self.request(Request.SET_FEATURES, struct.pack("<Q", features))
        self.set_mem_table()
        self.start_queues()
        self.post_rx_buffers(rx_buffers)

    def set_mem_table(self) -> None:
        """Send SET_MEM_TABLE with both regions (the memfd twice) and wait for the ack."""
        payload = struct.pack("<II", len(self.ram.regions), 0)
        for region in self.ram.regions:
            payload += struct.pack(
                "<QQQQ",
                region.guest_phys_addr,
                region.size,
                region.userspace_addr,
                region.mmap_offset,
            )
        fds = [self.ram.fd] * len(self.ram.regions)
        assert self.request(Request.SET_MEM_TABLE, payload, fds, reply=True) == bytes(8)

    def start_queues(self, bases: Sequence[int] = (0, 0)) -> None:
        """SET_VRING_NUM/BASE/ADDR/KICK/CALL for rx and tx, then enable both."""
        self.set_rings(bases, with_call=True)
        for index in range(2):
            self.request(Request.SET_VRING_ENABLE, struct.pack("<II", index, 1), reply=True)

    def set_rings(self, bases: Sequence[int] = (0, 0), *, with_call: bool) -> None:
        """SET_VRING_NUM/BASE/ADDR/KICK (and CALL if ``with_call``) for rx and tx; the rings
        do not run before SET_VRING_ENABLE."""
        for index, queue in enumerate((self.rx, self.tx)):
            self.request(Request.SET_VRING_NUM, struct.pack("<II", index, queue.size))
            self.request(Request.SET_VRING_BASE, struct.pack("<II", index, bases[index]))
            addresses = struct.pack(
                "<IIQQQQ",
                index,
                0,
                self.ram.va(queue.desc),
                self.ram.va(queue.used),
                self.ram.va(queue.avail),
                0,
            )
            self.request(Request.SET_VRING_ADDR, addresses)
            self.request(Request.SET_VRING_KICK, struct.pack("<Q", index), [self.kick[index]])
            if with_call:
                self.request(Request.SET_VRING_CALL, struct.pack("<Q", index), [self.call[index]])

    def stop_queues(self) -> list[int]:
        """GET_VRING_BASE for both rings (what QEMU does on reset); returns the indices."""
        bases = []
        for index in range(2):
            reply = self.ask(Request.GET_VRING_BASE, struct.pack("<II", index, 0))
            bases.append(struct.unpack("<II", reply)[1])
        return bases

    def reset_driver(self) -> None:
        """Stop the rings, then start fresh rings at index 0 (a guest reboot)."""
        self.stop_queues()
        self.rx = DriverQueue(self.ram, self.rx.size)
        self.tx = DriverQueue(self.ram, self.tx.size)
        self._rx_buffers.clear()
        self.set_mem_table()
        self.start_queues()

    # -- guest driver ----------------------------------------------------------------------

    def post_rx_buffers(self, count: int, size: int = RX_BUFFER_BYTES) -> None:
        """Give the device ``count`` new empty rx buffers and kick."""
        self._post_rx([self.ram.alloc(size) for _ in range(count)], size)

    def _post_rx(self, gpas: Sequence[int], size: int = RX_BUFFER_BYTES) -> None:
        for gpa in gpas:
            head = self.rx.add_chain([(gpa, size, True)])
            self._rx_buffers[head] = gpa
        self.kick_queue(0)

    def kick_queue(self, index: int) -> None:
        """Notify the device about queue ``index``."""
        os.eventfd_write(self.kick[index], 1)

    def send(
        self,
        op: Op,
        *,
        src_port: int,
        dst_port: int,
        payload: bytes = b"",
        flags: int = 0,
        buf_alloc: int = GUEST_BUF_ALLOC_BYTES,
        fwd_cnt: int = 0,
        length: int | None = None,
        kick: bool = True,
    ) -> None:
        """Send one packet as a header descriptor plus (if any) a payload descriptor.

        ``length`` overrides the header's ``len``; ``kick=False`` only publishes the chain.
        """
        header = PacketHeader(
            src_cid=self.guest_cid,
            dst_cid=HOST_CID,
            src_port=src_port,
            dst_port=dst_port,
            len=len(payload) if length is None else length,
            type=SocketType.STREAM,
            op=op,
            flags=flags,
            buf_alloc=buf_alloc,
            fwd_cnt=fwd_cnt,
        )
        self.send_raw(header.pack(), payload, kick=kick)

    def send_raw(self, header: bytes, payload: bytes = b"", *, kick: bool = True) -> None:
        """Put arbitrary header and payload bytes on the tx queue (and kick)."""
        header_gpa = self._tx_scratch(header)
        buffers = [(header_gpa, len(header), False)]
        if payload:
            payload_gpa = self._tx_scratch(payload)
            buffers.append((payload_gpa, len(payload), False))
        self._reserve_tx_descriptors(len(buffers))
        self.tx.add_chain(buffers)
        if kick:
            self.kick_queue(1)

    def _reserve_tx_descriptors(self, count: int, timeout: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        while self.tx.free_count < count:
            if time.monotonic() >= deadline:
                raise TxQueueFull(f"the device has not consumed tx chains for {timeout}s")
            _wait_eventfd(self.call[1], deadline)
            self._tx_done += self.tx.take_used()

    def _tx_scratch(self, data: bytes) -> int:
        """Copy ``data`` into the tx arena (reused round-robin); returns its GPA."""
        if self._tx_cursor + len(data) > TX_ARENA_BYTES:
            self._tx_cursor = 0
        gpa = self._tx_arena + self._tx_cursor
        self.ram.write(gpa, data)
        self._tx_cursor += (len(data) + 15) // 16 * 16
        return gpa

    def wait_tx_used(self, count: int, timeout: float = 2.0) -> list[tuple[int, int]]:
        """Wait until the device has returned ``count`` tx chains; returns them."""
        entries, self._tx_done = self._tx_done + self.tx.take_used(), []
        deadline = time.monotonic() + timeout
        while len(entries) < count and time.monotonic() < deadline:
            _wait_eventfd(self.call[1], deadline)
            entries += self.tx.take_used()
        return entries

    def poll(self, timeout: float) -> list[ReceivedPacket]:
        """Collect rx packets for up to ``timeout`` s (returns early once any arrive)."""
        deadline = time.monotonic() + timeout
        while True:
            _wait_eventfd(self.call[0], deadline)
            used = self.rx.take_used()
            if used or time.monotonic() >= deadline:
                break
        packets, buffers = [], []
        for head, written in used:
            buffers.append(self._rx_buffers.pop(head))
            data = self.ram.read(buffers[-1], written)
            header = PacketHeader.unpack(data)
            packets.append(ReceivedPacket(header, data[HEADER_BYTES : HEADER_BYTES + header.len]))
        if buffers and self.auto_refill:
            self._post_rx(buffers)
        return packets

    def expect(self, op: Op, timeout: float = 3.0, *, port: int | None = None) -> ReceivedPacket:
        """Return the next received packet with ``op`` (and guest ``port``), keeping others.

        Raises:
            AssertionError: no such packet arrived within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            for packet in self.inbox:
                if packet.header.op == op and port in (None, packet.header.dst_port):
                    self.inbox.remove(packet)
                    return packet
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {op.name} within {timeout}s; inbox: {self.inbox}")
            self.inbox += self.poll(remaining)

    def drain(self, timeout: float = 0.3) -> list[ReceivedPacket]:
        """Return the inbox plus everything arriving within ``timeout``."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            self.inbox += self.poll(remaining)
        packets, self.inbox = self.inbox, []
        return packets

    def close(self) -> None:
        """Disconnect (the backend then exits) and release everything."""
        self.sock.close()
        for fd in self.kick + self.call:
            os.close(fd)
        self.ram.close()


class BackendProcess:
    """``python -m secvf.vsock`` in a child process, ready once the context is entered.

    Security events go to the event log in ``directory/home/logs`` (what
    ``$SECVF_HOME/logs`` is when a test points ``SECVF_HOME`` at ``directory/home``).
    """

    def __init__(self, directory: Path, guest_cid: int, *extra_args: str) -> None:
        self.directory = directory
        self.vhost_user_socket = directory / "vu.sock"
        self.uds_path = directory / "vsock.sock"
        self.stderr_path = directory / "backend.log"
        self.log_dir = directory / "home" / "logs"
        self.guest_cid = guest_cid
        self._extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> BackendProcess:
        read_end, write_end = os.pipe()
        argv = [
            sys.executable,
            "-m",
            "secvf.vsock",
            "--vhost-user-socket",
            str(self.vhost_user_socket),
            "--uds-path",
            str(self.uds_path),
            "--guest-cid",
            str(self.guest_cid),
            "--ready-fd",
            str(write_end),
            "--vm-name",
            "fake-vm",
            "--log-dir",
            str(self.log_dir),
            *self._extra_args,
        ]
        self.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(argv, stderr=stderr, pass_fds=[write_end])
        os.close(write_end)
        with os.fdopen(read_end, "rb") as ready:
            line = ready.readline()
        if line != b"READY\n":
            self.__exit__(None, None, None)
            raise RuntimeError(f"backend did not start: {self.log()}")
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(5)

    def wait(self, timeout: float = 5.0) -> int:
        """Wait for the process to exit and return its status."""
        assert self.process is not None
        return self.process.wait(timeout)

    def log(self) -> str:
        """The backend's stderr so far."""
        return self.stderr_path.read_text(errors="replace")


def _wait_eventfd(fd: int, deadline: float) -> None:
    remaining = max(0.0, deadline - time.monotonic())
    readable, _, _ = select.select([fd], [], [], remaining)
    if readable:
        os.eventfd_read(fd)


def _receive_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("backend closed the vhost-user connection")
        data += chunk
    return data
