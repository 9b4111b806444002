"""Tiny bootable media for firmware-only guests (no guest image, no ISO tools needed).

:func:`bootable_iso` writes an ISO 9660 image with an El Torito no-emulation boot image,
:func:`boot_sector` an MBR; both hold 16-bit code that writes a marker line to the
first serial port (COM1, where SecVF's serial log is) and halts. So a test can tell from
the serial log what SeaBIOS booted, and in which run.
"""

from __future__ import annotations

import struct
from pathlib import Path

SECTOR = 2048  # an ISO 9660 logical block
COM1 = 0x3F8

#: Where the parts of :func:`bootable_iso`'s image are (sector numbers).
PVD, BOOT_RECORD, TERMINATOR, L_TABLE, M_TABLE, ROOT_DIR, CATALOG, BOOT_IMAGE = range(16, 24)


def boot_code(marker: bytes) -> bytes:
    """Real-mode code that writes ``marker`` to COM1, then halts for good."""
    code = b"\xba" + struct.pack("<H", COM1)  # mov dx, COM1
    for byte in marker:
        code += bytes([0xB0, byte, 0xEE])  # mov al, byte; out dx, al
    return code + b"\xfa\xf4\xeb\xfd"  # cli; hlt; jmp back to the hlt


def boot_sector(marker: bytes) -> bytes:
    """A 512-byte MBR that SeaBIOS boots (it has the 0x55AA signature)."""
    code = boot_code(marker)
    assert len(code) <= 446, "the marker does not fit in an MBR"
    return code.ljust(510, b"\0") + b"\x55\xaa"


def bootable_iso(path: Path, marker: bytes) -> Path:
    """Write an El Torito bootable ISO whose boot image prints ``marker``; return ``path``."""
    sectors = [bytes(SECTOR)] * 16
    sectors += [_pvd(BOOT_IMAGE + 1), _boot_record(), _descriptor(255, b""),
                _path_table("<"), _path_table(">"), _root_directory(), _boot_catalog(),
                boot_code(marker).ljust(SECTOR, b"\0")]
    path.write_bytes(b"".join(s.ljust(SECTOR, b"\0") for s in sectors))
    return path


def _both16(value: int) -> bytes:
    return struct.pack("<H", value) + struct.pack(">H", value)


def _both32(value: int) -> bytes:
    return struct.pack("<I", value) + struct.pack(">I", value)


def _descriptor(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + b"CD001\x01" + body


def _directory_record(name: bytes) -> bytes:
    record = (b"\x22\x00" + _both32(ROOT_DIR) + _both32(SECTOR) + bytes(7)
              + b"\x02\x00\x00" + _both16(1) + b"\x01" + name)
    assert len(record) == 34
    return record


def _pvd(total_sectors: int) -> bytes:
    body = (b"\x00" + b" " * 32 + b"SECVF_TEST".ljust(32) + bytes(8) + _both32(total_sectors)
            + bytes(32) + _both16(1) + _both16(1) + _both16(SECTOR) + _both32(10)
            + struct.pack("<I", L_TABLE) + bytes(4) + struct.pack(">I", M_TABLE) + bytes(4)
            + _directory_record(b"\x00"))
    assert len(body) == 190 - 7  # the root directory record ends at byte 190
    return _descriptor(1, body).ljust(881, b" ") + b"\x01"


def _boot_record() -> bytes:
    body = b"EL TORITO SPECIFICATION".ljust(32, b"\0") + bytes(32) + struct.pack("<I", CATALOG)
    return _descriptor(0, body)


def _path_table(endian: str) -> bytes:
    return b"\x01\x00" + struct.pack(f"{endian}I", ROOT_DIR) + struct.pack(f"{endian}H", 1) \
        + b"\x00\x00"


def _root_directory() -> bytes:
    return _directory_record(b"\x00") + _directory_record(b"\x01")


def _boot_catalog() -> bytes:
    validation = bytearray(b"\x01\x00\x00\x00" + b"SECVF".ljust(24, b"\0") + b"\0\0\x55\xaa")
    checksum = -sum(struct.unpack("<16H", bytes(validation))) & 0xFFFF
    validation[28:30] = struct.pack("<H", checksum)
    default = b"\x88\x00" + struct.pack("<H", 0) + b"\x00\x00" + struct.pack("<H", 4) \
        + struct.pack("<I", BOOT_IMAGE)
    return bytes(validation) + default
