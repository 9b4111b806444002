"""The vhost-user protocol for a vsock device: messages, features, vring setup.

Primer
------
QEMU (the *frontend*) connects to the backend's Unix socket and drives the device with
messages: a 12-byte header ``{u32 request, u32 flags, u32 size}`` then ``size`` payload
bytes, file descriptors attached with SCM_RIGHTS. Flags: bits 0-1 the version (1), bit 2
REPLY (set on answers), bit 3 NEED_REPLY.

Features offered: ``VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES``; no EVENT_IDX,
no INDIRECT_DESC (see :mod:`virtqueue`). Protocol features: MQ, REPLY_ACK, CONFIG. QEMU
7.2 requires CONFIG for vhost-user-vsock: the guest CID reaches the guest only through
GET_CONFIG (8 bytes, le64 ``guest_cid``). With REPLY_ACK, a message that has no reply of
its own and carries NEED_REPLY is answered with a u64 status (0 = success).

Only the rx (0) and tx (1) vrings come to the backend; QEMU keeps the event queue. A ring
runs once it has a size, addresses (frontend VAs), a kick fd, guest memory, and - as
protocol features are negotiated - SET_VRING_ENABLE(1). GET_VRING_BASE stops a ring and
returns its next available index. When a ring restarts from a base other than where it
stopped, the driver was reset (guest reboot): :attr:`reset_pending` tells the backend to
forget all connections. A stop/resume (VM pause) restarts from the same index and keeps
them.

The kick/call/err payload is a u64: bits 0-7 the ring index, bit 8 "no fd". The call fd
may be replaced at any time; the backend always signals it (never honours NO_INTERRUPT).

Every message handler runs in the backend's event loop.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from secvf.vsock.errors import VhostUserError
from secvf.vsock.memory import GuestMemory, MemoryRegion
from secvf.vsock.trace import NO_TRACE, VringTrace
from secvf.vsock.virtqueue import RingAddresses, SplitVirtqueue

log = logging.getLogger(__name__)

RX_QUEUE = 0
TX_QUEUE = 1
NUM_QUEUES = 2

VIRTIO_F_VERSION_1 = 1 << 32
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
OFFERED_FEATURES = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES

PROTOCOL_F_MQ = 1 << 0
PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_F_CONFIG = 1 << 9
OFFERED_PROTOCOL_FEATURES = PROTOCOL_F_MQ | PROTOCOL_F_REPLY_ACK | PROTOCOL_F_CONFIG

FLAG_VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

#: No message this backend understands is longer (GET_CONFIG: 12 + 256 bytes).
MAX_MESSAGE_PAYLOAD_BYTES = 4096
#: More fds than any single message carries (SET_MEM_TABLE: 8).
MAX_MESSAGE_FDS = 8
#: QEMU sends whole messages; a partial one that stalls this long is an error.
MESSAGE_READ_TIMEOUT_S = 5.0

_HEADER = struct.Struct("<III")
_U64 = struct.Struct("<Q")
_VRING_STATE = struct.Struct("<II")
_VRING_ADDR = struct.Struct("<IIQQQQ")
_MEM_TABLE_HEAD = struct.Struct("<II")
_MEM_REGION = struct.Struct("<QQQQ")
_CONFIG_HEAD = struct.Struct("<III")
_FD_INDEX_MASK = 0xFF
_FD_NONE = 0x100


class Request(IntEnum):
    """vhost-user frontend requests this backend knows by name."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    GET_CONFIG = 24
    SET_CONFIG = 25


_REQUESTS_WITH_REPLY = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.GET_VRING_BASE,
        Request.GET_CONFIG,
    }
)


@dataclass(slots=True)
class Message:
    """One frontend message; :meth:`VhostUserVsockDevice.handle` consumes ``fds``."""

    request: int  # a Request value (unknown values are possible)
    flags: int  # FLAG_* bits
    payload: bytes  # the message body
    fds: list[int]  # descriptors that came with it


def receive_message(sock: socket.socket) -> Message | None:
    """Read one message; None when the frontend closed the connection.

    Raises:
        VhostUserError: the message is truncated, oversized, or its fds were cut off.
    """
    header, ancdata, msg_flags, _ = sock.recvmsg(
        _HEADER.size, socket.CMSG_SPACE(MAX_MESSAGE_FDS * 4)
    )
    fds = _fds_from(ancdata)
    if not header:
        _close_all(fds)
        return None
    try:
        if msg_flags & socket.MSG_CTRUNC:
            raise VhostUserError("message carried more file descriptors than allowed")
        header += _receive_exact(sock, _HEADER.size - len(header))
        request, flags, size = _HEADER.unpack(header)
        if size > MAX_MESSAGE_PAYLOAD_BYTES:
            raise VhostUserError(f"message {request} has a {size}-byte payload")
        return Message(request, flags, _receive_exact(sock, size), fds)
    except BaseException:
        _close_all(fds)
        raise


def encode_reply(request: int, payload: bytes) -> bytes:
    """Frame ``payload`` as the reply to ``request``."""
    return _HEADER.pack(request, FLAG_VERSION | FLAG_REPLY, len(payload)) + payload


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", data[:usable]))
    return fds


def _receive_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except TimeoutError as exc:
            raise VhostUserError("frontend stalled in the middle of a message") from exc
        if not chunk:
            raise VhostUserError("frontend closed the connection in the middle of a message")
        data += chunk
    return bytes(data)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _unpack(layout: struct.Struct, payload: bytes) -> tuple[int, ...]:
    if len(payload) < layout.size:
        raise VhostUserError(f"payload of {len(payload)} bytes, expected {layout.size}")
    return layout.unpack_from(payload)


@dataclass(slots=True)
class VringConfig:
    """What the frontend told the backend about one vring."""

    size: int = 0  # SET_VRING_NUM
    base: int = 0  # SET_VRING_BASE: the next available index to process
    addresses: RingAddresses | None = None  # SET_VRING_ADDR (frontend VAs)
    kick_fd: int | None = None  # SET_VRING_KICK: the driver notifies us here
    call_fd: int | None = None  # SET_VRING_CALL: we notify the driver here
    err_fd: int | None = None  # SET_VRING_ERR: kept only to be closed
    enabled: bool = False  # SET_VRING_ENABLE
    stopped_at: int | None = None  # next available index when GET_VRING_BASE stopped it


class VhostUserVsockDevice:
    """vhost-user state of one vsock device: features, memory, and the rx/tx rings.

    Example (what :mod:`secvf.vsock.backend` does)::

        device = VhostUserVsockDevice(guest_cid=3)
        while (message := receive_message(sock)) is not None:
            if (reply := device.handle(message)) is not None:
                sock.sendall(reply)
            for index, queue in device.running_queues().items(): ...
    """

    def __init__(self, guest_cid: int, trace: VringTrace = NO_TRACE) -> None:
        self.guest_cid = guest_cid
        self.trace = trace
        self._generations = 0  # SplitVirtqueues built so far (numbers them in the trace)
        self.features = 0  # acked by SET_FEATURES
        self.protocol_features = 0  # acked by SET_PROTOCOL_FEATURES
        self.memory: GuestMemory | None = None
        self.vrings = [VringConfig() for _ in range(NUM_QUEUES)]
        self.queues: list[SplitVirtqueue | None] = [None] * NUM_QUEUES
        self.reset_pending = False  # the driver was reset: connections must be dropped
        self._handlers: dict[int, Callable[[Message], bytes | None]] = {
            Request.GET_FEATURES: lambda _m: _U64.pack(OFFERED_FEATURES),
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: lambda _m: None,
            Request.RESET_OWNER: self._reset_owner,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.GET_PROTOCOL_FEATURES: lambda _m: _U64.pack(OFFERED_PROTOCOL_FEATURES),
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.GET_QUEUE_NUM: lambda _m: _U64.pack(NUM_QUEUES),
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_CONFIG: self._get_config,
        }

    def __repr__(self) -> str:
        running = [i for i, q in enumerate(self.queues) if q is not None]
        return f"<VhostUserVsockDevice cid={self.guest_cid} running={running}>"

    def handle(self, message: Message) -> bytes | None:
        """Apply one message; returns the framed reply to send, if any.

        A message that cannot be honoured is logged and, when the frontend asked for an
        ack, answered with a failure status.

        Raises:
            VhostUserError: a request that needs an answer of its own (GET_*) cannot be
                answered; the session cannot continue.
        """
        handler = self._handlers.get(message.request)
        name = _request_name(message.request)
        log.debug("<- %s %s fds=%s", name, message.payload.hex(), message.fds)
        if self.trace.enabled:
            self.trace.event(
                "msg",
                req=name,
                flags=f"{message.flags:#x}",
                payload=message.payload.hex() or "-",
                fds=len(message.fds),
            )
        try:
            if handler is None:
                raise VhostUserError(f"unsupported request {name}")
            reply = handler(message)
            status = 0
        except VhostUserError as exc:
            log.error("vhost-user %s failed: %s", name, exc)
            if message.request in _REQUESTS_WITH_REPLY:
                raise
            reply, status = None, 1
        finally:
            _close_all(message.fds)  # handlers take the fds they keep out of the list
            message.fds.clear()
        if reply is not None:
            return encode_reply(message.request, reply)
        if message.flags & FLAG_NEED_REPLY and self.protocol_features & PROTOCOL_F_REPLY_ACK:
            return encode_reply(message.request, _U64.pack(status))
        return None

    def running_queues(self) -> dict[int, SplitVirtqueue]:
        """Rings that are started, enabled and not broken, by index."""
        return {
            i: q
            for i, q in enumerate(self.queues)
            if q is not None and not q.broken and not q.stopped
        }

    def kick_fd(self, index: int) -> int | None:
        """The kick eventfd of ring ``index``, if any."""
        return self.vrings[index].kick_fd

    def signal(self, index: int) -> None:
        """Notify the driver that ring ``index`` has new used entries."""
        fd = self.vrings[index].call_fd
        if self.trace.enabled:
            self.trace.event("call", vq=index, fd=-1 if fd is None else fd)
        if fd is None:
            return
        try:
            os.eventfd_write(fd, 1)
        except OSError as exc:
            log.warning("signalling vring %d failed: %s", index, exc)

    def close(self) -> None:
        """Release memory and every fd the frontend gave us."""
        for index in range(NUM_QUEUES):
            self._stop(index, "close")
            vring = self.vrings[index]
            for fd in (vring.kick_fd, vring.call_fd, vring.err_fd):
                if fd is not None:
                    os.close(fd)
        self.vrings = [VringConfig() for _ in range(NUM_QUEUES)]
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    # -- handlers --------------------------------------------------------------------------

    def _set_features(self, message: Message) -> None:
        (features,) = _unpack(_U64, message.payload)
        if features & ~OFFERED_FEATURES:
            raise VhostUserError(f"features {features:#x} were not offered")
        self.features = features

    def _set_protocol_features(self, message: Message) -> None:
        (features,) = _unpack(_U64, message.payload)
        if features & ~OFFERED_PROTOCOL_FEATURES:
            raise VhostUserError(f"protocol features {features:#x} were not offered")
        self.protocol_features = features

    def _reset_owner(self, _message: Message) -> None:
        self.close()
        self.reset_pending = True

    def _set_mem_table(self, message: Message) -> None:
        count, _padding = _unpack(_MEM_TABLE_HEAD, message.payload)
        body = message.payload[_MEM_TABLE_HEAD.size :]
        if len(body) < count * _MEM_REGION.size:
            raise VhostUserError(f"memory table announces {count} regions but is short")
        regions = [
            MemoryRegion(*_MEM_REGION.unpack_from(body, i * _MEM_REGION.size)) for i in range(count)
        ]
        fds, message.fds = message.fds, []
        memory = GuestMemory.map_fds(regions, fds)
        log.info("guest memory: %s", ", ".join(_describe(r) for r in memory.regions))
        old, self.memory = self.memory, memory
        for index, queue in enumerate(self.queues):
            if queue is not None:
                self.vrings[index].base = queue.next_avail
                self._stop(index, "mem_table")
                self._try_start(index)
        if old is not None:
            old.close()

    def _set_vring_num(self, message: Message) -> None:
        index, size = _unpack(_VRING_STATE, message.payload)
        self._vring(index).size = size

    def _set_vring_addr(self, message: Message) -> None:
        index, _flags, desc, used, avail, _log = _unpack(_VRING_ADDR, message.payload)
        self._vring(index).addresses = RingAddresses(desc=desc, avail=avail, used=used)

    def _set_vring_base(self, message: Message) -> None:
        index, base = _unpack(_VRING_STATE, message.payload)
        self._vring(index).base = base

    def _get_vring_base(self, message: Message) -> bytes:
        index, _ = _unpack(_VRING_STATE, message.payload)
        vring = self._vring(index)
        queue = self.queues[index]
        next_avail = queue.next_avail if queue is not None else vring.base
        self._stop(index, "get_vring_base")
        vring.stopped_at = vring.base = next_avail
        if vring.kick_fd is not None:
            os.close(vring.kick_fd)
            vring.kick_fd = None
        log.info("vring %d stopped at %d", index, next_avail)
        return _VRING_STATE.pack(index, next_avail)

    def _set_vring_kick(self, message: Message) -> None:
        index, fd = self._take_vring_fd(message)
        vring = self.vrings[index]
        if vring.kick_fd is not None:
            os.close(vring.kick_fd)
        vring.kick_fd = fd
        if fd is not None:
            os.set_blocking(fd, False)
        if not self.protocol_features_negotiated:
            vring.enabled = True  # without protocol features, a kick fd starts the ring
        self._try_start(index)

    def _set_vring_call(self, message: Message) -> None:
        index, fd = self._take_vring_fd(message)
        vring = self.vrings[index]
        if vring.call_fd is not None:
            os.close(vring.call_fd)
        vring.call_fd = fd

    def _set_vring_err(self, message: Message) -> None:
        index, fd = self._take_vring_fd(message)
        vring = self.vrings[index]
        if vring.err_fd is not None:
            os.close(vring.err_fd)
        vring.err_fd = fd

    def _set_vring_enable(self, message: Message) -> None:
        index, enable = _unpack(_VRING_STATE, message.payload)
        vring = self._vring(index)
        vring.enabled = bool(enable)
        if vring.enabled:
            self._try_start(index)
        elif (queue := self.queues[index]) is not None:
            vring.base = queue.next_avail
            self._stop(index, "disable")

    def _get_config(self, message: Message) -> bytes:
        offset, size, flags = _unpack(_CONFIG_HEAD, message.payload)
        if size > 256 or offset > 256:
            raise VhostUserError(f"config read of {size} bytes at {offset}")
        config = _U64.pack(self.guest_cid).ljust(offset + size, b"\0")
        return _CONFIG_HEAD.pack(offset, size, flags) + config[offset : offset + size]

    # -- helpers ---------------------------------------------------------------------------

    @property
    def protocol_features_negotiated(self) -> bool:
        """Whether the frontend acked VHOST_USER_F_PROTOCOL_FEATURES."""
        return bool(self.features & VHOST_USER_F_PROTOCOL_FEATURES)

    def _vring(self, index: int) -> VringConfig:
        if not 0 <= index < NUM_QUEUES:
            raise VhostUserError(f"vring index {index} (this device has rx=0 and tx=1)")
        return self.vrings[index]

    def _take_vring_fd(self, message: Message) -> tuple[int, int | None]:
        (value,) = _unpack(_U64, message.payload)
        index = value & _FD_INDEX_MASK
        self._vring(index)
        if value & _FD_NONE:
            return index, None
        if len(message.fds) != 1:
            raise VhostUserError(f"expected one fd for vring {index}, got {len(message.fds)}")
        return index, message.fds.pop()

    def _try_start(self, index: int) -> None:
        vring = self.vrings[index]
        if (
            self.queues[index] is not None
            or self.memory is None
            or vring.addresses is None
            or vring.kick_fd is None
            or not vring.enabled
        ):
            return
        self._generations += 1
        if self.trace.enabled:
            self.trace.event("start", vq=index, gen=self._generations)
        self.queues[index] = SplitVirtqueue(
            self.memory,
            vring.size,
            vring.addresses,
            vring.base,
            generation=self._generations,
            trace=self.trace,
        )
        if vring.stopped_at is not None and vring.stopped_at != vring.base:
            log.info(
                "vring %d restarted from %d, not %d: driver reset",
                index,
                vring.base,
                vring.stopped_at,
            )
            self.reset_pending = True
        vring.stopped_at = None
        log.info("vring %d started: size %d, base %d", index, vring.size, vring.base)

    def _stop(self, index: int, why: str) -> None:
        queue = self.queues[index]
        if queue is not None and self.trace.enabled:
            self.trace.event(
                "stop",
                vq=index,
                gen=queue.generation,
                why=why,
                next_avail=queue.next_avail,
                next_used=queue.next_used,
                **queue.memory_indices(),
            )
        if queue is not None:
            queue.stop()
        self.queues[index] = None


def _request_name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


def _describe(region: MemoryRegion) -> str:
    return (
        f"gpa {region.guest_phys_addr:#x}+{region.size:#x} "
        f"(va {region.userspace_addr:#x}, offset {region.mmap_offset:#x})"
    )
