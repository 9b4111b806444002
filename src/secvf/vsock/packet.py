"""The virtio-vsock packet header and its constants (virtio spec 1.2, section 5.10).

Every packet on the rx and tx queues starts with a 44-byte little-endian header::

    le64 src_cid   le64 dst_cid   le32 src_port   le32 dst_port
    le32 len       le16 type      le16 op         le32 flags
    le32 buf_alloc le32 fwd_cnt

``len`` payload bytes follow the header in the same descriptor chain. ``buf_alloc`` and
``fwd_cnt`` ride on every packet and carry the sender's credit (see :mod:`conn`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from secvf.vsock.errors import MalformedPacket

HEADER = struct.Struct("<QQIIIHHIII")
HEADER_BYTES = HEADER.size
#: Largest payload one packet may carry (the Linux driver's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
MAX_PAYLOAD_BYTES = 64 * 1024
#: The host's CID; the guest reaches host services at this address.
HOST_CID = 2
#: Largest valid port / counter value.
U32_MASK = 0xFFFF_FFFF
#: Guest CIDs 0, 1 and 2 are reserved, and U32 max means "any".
MIN_GUEST_CID = 3

assert HEADER_BYTES == 44


class Op(IntEnum):
    """What a packet asks for."""

    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class ShutdownFlag(IntFlag):
    """Flags of a SHUTDOWN packet: which direction the sender gives up."""

    RCV = 1  # the sender will receive no more data
    SEND = 2  # the sender will send no more data


class SocketType(IntEnum):
    """The vsock socket type of a packet; only STREAM is offered to guests."""

    STREAM = 1
    SEQPACKET = 2


@dataclass(frozen=True, slots=True)
class PacketHeader:
    """One decoded packet header; field names follow the virtio specification."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def pack(self) -> bytes:
        """Return the 44-byte wire form.

        Raises:
            struct.error: a field does not fit its wire width.
        """
        return HEADER.pack(
            self.src_cid,
            self.dst_cid,
            self.src_port,
            self.dst_port,
            self.len,
            self.type,
            self.op,
            self.flags,
            self.buf_alloc,
            self.fwd_cnt,
        )

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> PacketHeader:
        """Decode the first 44 bytes of ``data``.

        Raises:
            MalformedPacket: ``data`` is shorter than a header.
        """
        if len(data) < HEADER_BYTES:
            raise MalformedPacket(f"packet of {len(data)} bytes is shorter than the header")
        return cls(*HEADER.unpack_from(data))
