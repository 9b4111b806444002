"""The pcapng writer's files, read back by tcpdump and by dpkt."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import dpkt
import pytest

from secvf.net.frame import BROADCAST
from secvf.net.pcapng import IDB_TYPE, PcapngWriter
from tests.unit.net_helpers import eth, mac_bytes

TS_NS = 1_700_000_000_123_456_789
ARP = 0x0806


def write_sample(path: Path) -> PcapngWriter:
    with path.open("wb") as fh:
        writer = PcapngWriter(fh)
        web = writer.add_interface("web", "port a0000001-0")
        db = writer.add_interface("db")
        writer.write(TS_NS, web, eth(BROADCAST, mac_bytes(1), b"\0" * 28, ARP))
        writer.write(TS_NS + 1000, db, eth(mac_bytes(1), mac_bytes(2), b"\0" * 27, ARP))
        writer.write(TS_NS + 2000, web, eth(mac_bytes(2), mac_bytes(1), b"z" * 1500))
    return writer


def block_types(data: bytes) -> list[int]:
    types, offset = [], 0
    while offset < len(data):
        kind, length = struct.unpack_from("<II", data, offset)
        assert length % 4 == 0 and data[offset + length - 4:offset + length] == \
            struct.pack("<I", length)
        types.append(kind)
        offset += length
    return types


def test_blocks_are_framed_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "c.pcapng"
    writer = write_sample(path)
    data = path.read_bytes()
    assert writer.bytes_written == len(data)
    assert block_types(data) == [0x0A0D0D0A, IDB_TYPE, IDB_TYPE, 6, 6, 6]
    with pytest.raises(ValueError, match="unknown interface"):
        writer.write(0, 2, b"")


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump is not installed")
def test_tcpdump_reads_the_frames(tmp_path: Path) -> None:
    path = tmp_path / "c.pcapng"
    write_sample(path)
    out = subprocess.run(["tcpdump", "-r", str(path), "-nn", "-e", "-tt"],
                         capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert "EN10MB" in out.stderr and len(lines) == 3
    assert lines[0].startswith("1700000000.123456 52:54:00:00:00:01 > ff:ff:ff:ff:ff:ff")
    assert "ARP" in lines[0] and "length 1514" in lines[2]


def test_dpkt_parses_it_back(tmp_path: Path) -> None:
    path = tmp_path / "c.pcapng"
    write_sample(path)
    with path.open("rb") as fh:
        packets = list(dpkt.pcapng.Reader(fh))
    assert [len(frame) for _, frame in packets] == [42, 41, 1514]
    assert packets[0][0] == pytest.approx(TS_NS / 1e9)
    assert dpkt.ethernet.Ethernet(packets[2][1]).src == mac_bytes(1)
