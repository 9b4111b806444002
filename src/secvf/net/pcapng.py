"""A minimal pcapng writer: one section, Ethernet interfaces, enhanced packet blocks.

Layout (all little-endian, every block padded to 4 bytes and framed by its total
length at both ends): a Section Header Block; one Interface Description Block per
interface (link type 1 = Ethernet, ``if_name``, ``if_description``, ``if_tsresol`` = 9
so timestamps are nanoseconds); one Enhanced Packet Block per frame.

Why not ``dpkt.pcapng.Writer`` (installed, 1.9.8): it builds each block as a dpkt
object and packs it field by field. Measured on this host (``bench/switch.py
--pcapng-only``, 200,000 frames of 64 bytes to a BytesIO, 2026-12-01): dpkt 3.70
µs/frame, this writer 0.35 µs/frame (10× less). The capture client writes every
frame the switch accepts, so the writer is on the capture hot path; one precomputed
:class:`struct.Struct` per frame keeps it cheap. It is also standard-library only,
like the rest of the package.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

SHB_TYPE = 0x0A0D0D0A
IDB_TYPE = 0x00000001
EPB_TYPE = 0x00000006
BYTE_ORDER_MAGIC = 0x1A2B3C4D
LINKTYPE_ETHERNET = 1
SNAPLEN = 0  # no limit
OPT_END = 0
OPT_COMMENT = 1
IF_NAME = 2
IF_DESCRIPTION = 3
IF_TSRESOL = 9
TSRESOL_NS = 9  # 10^-9 s
SHB_USERAPPL = 4

_EPB_HEAD = struct.Struct("<IIIIIII")  # type, length, interface, ts high, ts low, cap, orig
_U32 = struct.Struct("<I")
_OPTION = struct.Struct("<HH")
_PADDING = (b"", b"\0\0\0", b"\0\0", b"\0")  # by length % 4
_EPB_FIXED_BYTES = _EPB_HEAD.size + _U32.size


def _option(code: int, value: bytes) -> bytes:
    return _OPTION.pack(code, len(value)) + value + _PADDING[len(value) % 4]


def _block(block_type: int, body: bytes) -> bytes:
    length = 12 + len(body)
    return _U32.pack(block_type) + _U32.pack(length) + body + _U32.pack(length)


class PcapngWriter:
    """Writes a pcapng stream to ``fileobj`` (binary, opened for writing).

    Example::

        with open("cap.pcapng", "wb") as fh:
            writer = PcapngWriter(fh)
            eth0 = writer.add_interface("a1b2c3d4-0", "VM web, NIC 0")
            writer.write(time.time_ns(), eth0, frame)
    """

    def __init__(self, fileobj: BinaryIO, application: str = "secvf") -> None:
        self._out = fileobj
        self._interfaces = 0
        self.bytes_written = 0  # every byte written so far, headers included
        options = _option(SHB_USERAPPL, application.encode()) + _OPTION.pack(OPT_END, 0)
        body = (_U32.pack(BYTE_ORDER_MAGIC) + struct.pack("<HHq", 1, 0, -1) + options)
        self._emit(_block(SHB_TYPE, body))

    def __repr__(self) -> str:
        return f"PcapngWriter(interfaces={self._interfaces}, bytes={self.bytes_written})"

    def _emit(self, data: bytes) -> int:
        self._out.write(data)
        self.bytes_written += len(data)
        return len(data)

    def add_interface(self, name: str, description: str = "") -> int:
        """Add an Ethernet interface; return its id for :meth:`write` (0, 1, ...)."""
        options = _option(IF_NAME, name.encode())
        if description:
            options += _option(IF_DESCRIPTION, description.encode())
        options += _option(IF_TSRESOL, bytes([TSRESOL_NS])) + _OPTION.pack(OPT_END, 0)
        body = struct.pack("<HHI", LINKTYPE_ETHERNET, 0, SNAPLEN) + options
        self._emit(_block(IDB_TYPE, body))
        self._interfaces += 1
        return self._interfaces - 1

    def write(self, ts_ns: int, interface: int, frame: bytes) -> int:
        """Write one frame captured at ``ts_ns`` (ns since the epoch) on ``interface``;
        return the bytes written.

        Raises:
            ValueError: ``interface`` was not returned by :meth:`add_interface`.
        """
        if not 0 <= interface < self._interfaces:
            raise ValueError(f"unknown interface {interface} (have {self._interfaces})")
        size = len(frame)
        padding = _PADDING[size & 3]
        length = _EPB_FIXED_BYTES + size + len(padding)
        data = b"".join((_EPB_HEAD.pack(EPB_TYPE, length, interface, ts_ns >> 32,
                                        ts_ns & 0xFFFFFFFF, size, size),
                         frame, padding, _U32.pack(length)))
        self._out.write(data)
        self.bytes_written += length
        return length
