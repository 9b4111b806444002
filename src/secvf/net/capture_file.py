"""Reading capture files: pcapng (what SecVF's switch writes) and classic pcap.

:func:`read_capture` yields :class:`CapturedFrame` tuples ``(ts, interface, frame)``,
the same shape a live capture or the switch's ring gives, so everything above
(decoding, filters, ``secvf packets``) takes any source of them.

Why not dpkt's readers: ``dpkt.pcapng.Reader`` reads only the first Interface
Description Block, so it has neither each packet's interface id nor the interfaces'
names (``if_name``, which the switch sets to the VM's name: the VM column), applies the
first interface's timestamp resolution to every packet, and trusts block lengths (a
length under 12 makes it read the rest of the file as one block). Capture files are
evidence from hostile guests, so this reader is small and bounded instead:

* every block length is checked: a multiple of 4, at least 12 bytes, at most
  :data:`MAX_BLOCK_BYTES`, and equal to the copy at the block's end;
* a packet's captured length must fit in its block; options are walked only inside
  their block, and an interface name is cut at :data:`MAX_NAME_BYTES`;
* at most :data:`MAX_INTERFACES` interfaces per section, and a packet must name one
  that was described;
* memory stays at one block whatever the file's size (frames are yielded as read), so
  the file's total size is not capped: ``--limit`` stops reading early.

A file that breaks a rule raises :class:`CaptureFileError` naming the file and the
byte offset, *after* every packet before that offset was yielded: an analyst still
sees the capture up to the damage (a capture cut short by a crash, say).

Supported: pcapng sections in either byte order (several sections in one file too),
Enhanced, Simple and (obsolete) Packet Blocks, ``if_tsresol`` and ``if_tsoffset``;
classic pcap with micro- or nanosecond timestamps in either byte order. Only Ethernet
(link type 1) interfaces can be decoded: another link type is an error, said at once.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple, NoReturn

from secvf.errors import ConfigError, NotFound

#: The largest block accepted (the switch's frames are at most 9,000 bytes; other
#: tools' snap lengths reach 262,144).
MAX_BLOCK_BYTES = 1 << 20
#: Interfaces one pcapng section may describe.
MAX_INTERFACES = 4096
#: Bytes of an interface name (``if_name``) kept.
MAX_NAME_BYTES = 256
#: The interface name shown for a classic pcap file, which has no interface names.
NO_INTERFACE = "-"

LINKTYPE_ETHERNET = 1

_SHB, _IDB, _PB, _SPB, _EPB = 0x0A0D0D0A, 0x00000001, 0x00000002, 0x00000003, 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_OPT_END, _OPT_IF_NAME, _OPT_IF_TSRESOL, _OPT_IF_TSOFFSET = 0, 2, 9, 14
_PCAP_MAGICS = {b"\xd4\xc3\xb2\xa1": ("<", 1e-6), b"\xa1\xb2\xc3\xd4": (">", 1e-6),
                b"\x4d\x3c\xb2\xa1": ("<", 1e-9), b"\xa1\xb2\x3c\x4d": (">", 1e-9)}


class CapturedFrame(NamedTuple):
    """One frame from a capture: when, on which interface, and its bytes."""

    ts: float  # seconds since the epoch
    interface: str  # the interface's name (a VM's name on a SecVF switch), or "-"
    frame: bytes  # the bytes captured (the whole frame unless the capture was cut)


class CaptureFileError(ConfigError):
    """A capture file that is not pcapng or pcap, or is cut short or corrupt at
    ``offset`` (``None``: the file could not be read at all)."""

    def __init__(self, path: Path, offset: int | None, problem: str) -> None:
        self.path = path  # the capture file
        self.offset = offset  # byte offset of the damaged block or record
        where = f" at byte offset {offset}" if offset is not None else ""
        super().__init__(f"capture file {path}{where}: {problem}")


class _Interface(NamedTuple):
    name: str
    ts_unit: float  # seconds per timestamp tick
    ts_offset: int  # seconds added to every timestamp


def read_capture(path: Path) -> Iterator[CapturedFrame]:
    """Yield every frame in the pcapng or pcap file ``path``, in file order.

    Raises:
        NotFound: there is no such file.
        CaptureFileError: it cannot be read, is neither format, has a non-Ethernet
            interface, or is truncated or corrupt (raised after the frames before the
            damage were yielded).
    """
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        raise NotFound(f"no capture file {path}") from None
    except OSError as exc:
        raise CaptureFileError(path, None, exc.strerror or str(exc)) from exc
    with fh:
        try:
            yield from _read(fh, path)
        except OSError as exc:
            raise CaptureFileError(path, fh.tell(), exc.strerror or str(exc)) from exc


def _read(fh: BinaryIO, path: Path) -> Iterator[CapturedFrame]:
    magic = fh.read(4)
    if magic in _PCAP_MAGICS:
        yield from _read_pcap(fh, path, *_PCAP_MAGICS[magic])
    elif magic == struct.pack("<I", _SHB):
        yield from _PcapngReader(fh, path).frames()
    else:
        raise CaptureFileError(path, 0 if magic else None,
                               "empty file" if not magic else "not a pcapng or pcap file "
                               f"(it starts with {magic.hex()})")


def _read_pcap(fh: BinaryIO, path: Path, order: str, ts_unit: float
               ) -> Iterator[CapturedFrame]:
    header = fh.read(20)
    if len(header) < 20:
        raise CaptureFileError(path, 0, "the pcap file header is cut short")
    linktype = struct.unpack(order + "HHiIII", header)[5] & 0x0FFFFFFF
    _check_linktype(path, 0, linktype)
    record = struct.Struct(order + "IIII")
    while True:
        offset = fh.tell()
        head = fh.read(record.size)
        if not head:
            return
        if len(head) < record.size:
            raise CaptureFileError(path, offset, "the last record's header is cut short")
        seconds, fraction, captured, _wire = record.unpack(head)
        if captured > MAX_BLOCK_BYTES:
            raise CaptureFileError(path, offset, f"a record of {captured} bytes "
                                   f"(more than {MAX_BLOCK_BYTES}): corrupt")
        frame = fh.read(captured)
        if len(frame) < captured:
            raise CaptureFileError(path, offset, f"the last record is cut short "
                                   f"({len(frame)} of {captured} bytes)")
        yield CapturedFrame(seconds + fraction * ts_unit, NO_INTERFACE, frame)


def _check_linktype(path: Path, offset: int, linktype: int) -> None:
    if linktype != LINKTYPE_ETHERNET:
        raise CaptureFileError(path, offset, f"link type {linktype} is not Ethernet "
                               f"({LINKTYPE_ETHERNET}); SecVF decodes Ethernet frames only")


class _PcapngReader:
    """One pass over a pcapng file, section by section (the file's first 4 bytes
    are read already)."""

    def __init__(self, fh: BinaryIO, path: Path) -> None:
        self._fh = fh
        self._path = path
        self._order = "<"
        self._interfaces: list[_Interface] = []

    def frames(self) -> Iterator[CapturedFrame]:
        """Yield each packet block's frame; raises CaptureFileError at the first damage."""
        offset, block_type = 0, _SHB
        while True:
            body = self._block(offset, block_type)
            if block_type == _IDB:
                self._add_interface(offset, body)
            elif block_type in (_EPB, _PB, _SPB):
                yield self._packet(offset, block_type, body)
            offset = self._fh.tell()
            head = self._fh.read(4)
            if not head:
                return
            if len(head) < 4:
                self._fail(offset, "the last block's header is cut short")
            block_type = struct.unpack("<I", head)[0]
            if block_type != _SHB:
                block_type = struct.unpack(self._order + "I", head)[0]

    def _fail(self, offset: int, problem: str) -> NoReturn:
        raise CaptureFileError(self._path, offset, problem)

    def _block(self, offset: int, block_type: int) -> bytes:
        """Read the rest of the block at ``offset`` (its type read) and return its body."""
        if block_type == _SHB:
            head = self._read(offset, 8)
            if struct.unpack("<I", head[4:])[0] == _BYTE_ORDER_MAGIC:
                self._order = "<"
            elif struct.unpack(">I", head[4:])[0] == _BYTE_ORDER_MAGIC:
                self._order = ">"
            else:
                self._fail(offset, "a section header without the byte-order magic")
            self._interfaces = []
            length = struct.unpack(self._order + "I", head[:4])[0]
            self._check_length(offset, length, minimum=28)
            rest = head[4:] + self._read(offset, length - 16)
        else:
            length = struct.unpack(self._order + "I", self._read(offset, 4))[0]
            self._check_length(offset, length)
            rest = self._read(offset, length - 12)
        trailer = struct.unpack(self._order + "I", self._read(offset, 4))[0]
        if trailer != length:
            self._fail(offset, f"block length {length} does not match its trailer {trailer}")
        return rest

    def _check_length(self, offset: int, length: int, minimum: int = 12) -> None:
        if length < minimum or length % 4 or length > MAX_BLOCK_BYTES:
            self._fail(offset, f"invalid block length {length} (a multiple of 4, "
                       f"{minimum} to {MAX_BLOCK_BYTES})")

    def _read(self, offset: int, size: int) -> bytes:
        data = self._fh.read(size)
        if len(data) < size:
            self._fail(offset, "the last block is cut short")
        return data

    def _add_interface(self, offset: int, body: bytes) -> None:
        if len(body) < 8:
            self._fail(offset, "an interface description block is too short")
        if len(self._interfaces) >= MAX_INTERFACES:
            self._fail(offset, f"more than {MAX_INTERFACES} interfaces in one section")
        linktype = struct.unpack(self._order + "H", body[:2])[0]
        _check_linktype(self._path, offset, linktype)
        name, ts_unit, ts_offset = f"if{len(self._interfaces)}", 1e-6, 0
        for code, value in self._options(body[8:]):
            if code == _OPT_IF_NAME:
                name = value[:MAX_NAME_BYTES].decode("utf-8", "replace").rstrip("\0")
            elif code == _OPT_IF_TSRESOL and value:
                exponent = value[0] & 0x7F
                ts_unit = 2.0 ** -exponent if value[0] & 0x80 else 10.0 ** -exponent
            elif code == _OPT_IF_TSOFFSET and len(value) == 8:
                ts_offset = struct.unpack(self._order + "q", value)[0]
        self._interfaces.append(_Interface(name, ts_unit, ts_offset))

    def _options(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        """The (code, value) options in ``data``; a malformed tail is ignored (options
        only name things: a bad one does not make the packets unreadable)."""
        pos = 0
        while pos + 4 <= len(data):
            code, size = struct.unpack_from(self._order + "HH", data, pos)
            if code == _OPT_END or pos + 4 + size > len(data):
                return
            yield code, data[pos + 4:pos + 4 + size]
            pos += 4 + (size + 3) // 4 * 4

    def _packet(self, offset: int, block_type: int, body: bytes) -> CapturedFrame:
        if block_type == _SPB:
            if len(body) < 4:
                self._fail(offset, "a simple packet block is too short")
            iface, ts_ticks, start = 0, 0, 4
            captured = min(struct.unpack(self._order + "I", body[:4])[0], len(body) - 4)
        else:
            if len(body) < 20:
                self._fail(offset, "a packet block is too short")
            fmt = "IIIII" if block_type == _EPB else "HHIIII"
            fields = struct.unpack_from(self._order + fmt, body)
            iface = fields[0]
            high, low, captured = fields[-4:-1]
            ts_ticks, start = high << 32 | low, 20
            if captured > len(body) - 20:
                self._fail(offset, f"a packet of {captured} bytes in a block with room "
                           f"for {len(body) - 20}")
        if iface >= len(self._interfaces):
            self._fail(offset, f"a packet on interface {iface}, which no interface "
                       "description block before it describes")
        described = self._interfaces[iface]
        ts = described.ts_offset + ts_ticks * described.ts_unit
        return CapturedFrame(ts, described.name, body[start:start + captured])
