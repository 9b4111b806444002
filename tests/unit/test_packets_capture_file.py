"""Reading capture files (secvf.net.capture_file) written with dpkt's writers: interface
names as the VM column, timestamps, classic pcap, and truncated or corrupt files (the
packets before the damage, then an error naming the file and offset). tcpdump, when
installed, agrees the test file is a valid capture."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import dpkt
import pytest

from secvf.errors import NotFound
from secvf.net.capture_file import MAX_BLOCK_BYTES, CaptureFileError, read_capture
from tests.unit.test_packets_decode import FRAMES

T0 = 1_700_000_000.5
ORDER = ["dns", "http", "tls", "arp"]
VMS = ["web", "db", "web", "router"]


def _idb(name: str) -> dpkt.pcapng.InterfaceDescriptionBlockLE:
    return dpkt.pcapng.InterfaceDescriptionBlockLE(snaplen=65535, opts=[
        dpkt.pcapng.PcapngOptionLE(code=dpkt.pcapng.PCAPNG_OPT_IF_NAME, data=name.encode()),
        dpkt.pcapng.PcapngOptionLE(code=dpkt.pcapng.PCAPNG_OPT_ENDOFOPT)])


def write_pcapng(path: Path, names: tuple[str, ...] = ("web", "db", "router")) -> Path:
    """The ORDER frames, each on its VM's interface, one second apart."""
    with path.open("wb") as fh:
        writer = dpkt.pcapng.Writer(fh, idb=[_idb(n) for n in names])
        for i, (frame, vm) in enumerate(zip(ORDER, VMS, strict=True)):
            block = dpkt.pcapng.EnhancedPacketBlockLE(pkt_data=FRAMES[frame],
                                                      iface_id=names.index(vm))
            writer.writepkt(block, ts=T0 + i)
    return path


def write_pcap(path: Path) -> Path:
    with path.open("wb") as fh:
        writer = dpkt.pcap.Writer(fh)
        for i, frame in enumerate(ORDER):
            writer.writepkt(FRAMES[frame], ts=T0 + i)
    return path


def test_pcapng_gives_each_frame_its_interface_name_and_time(tmp_path):
    frames = list(read_capture(write_pcapng(tmp_path / "c.pcapng")))
    assert [f.interface for f in frames] == VMS
    assert [f.frame for f in frames] == [FRAMES[n] for n in ORDER]
    assert [f.ts for f in frames] == pytest.approx([T0 + i for i in range(4)])


def test_classic_pcap_has_no_interface_names(tmp_path):
    frames = list(read_capture(write_pcap(tmp_path / "c.pcap")))
    assert [f.interface for f in frames] == ["-"] * 4
    assert [f.frame for f in frames] == [FRAMES[n] for n in ORDER]
    assert frames[1].ts == pytest.approx(T0 + 1)


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump is not installed")
def test_tcpdump_reads_the_same_file(tmp_path):
    path = write_pcapng(tmp_path / "c.pcapng")
    out = subprocess.run(["tcpdump", "-nr", str(path)], capture_output=True, text=True,
                         check=True, timeout=30).stdout.splitlines()
    assert len(out) == len(ORDER) == len(list(read_capture(path)))
    assert "A? example.com." in out[0] and "ARP, Request who-has 10.0.0.9" in out[3]


def test_a_truncated_file_yields_what_came_before_then_names_the_offset(tmp_path):
    whole = write_pcapng(tmp_path / "c.pcapng").read_bytes()
    cut = tmp_path / "cut.pcapng"
    cut.write_bytes(whole[:-10])
    got = []
    with pytest.raises(CaptureFileError) as caught:
        got.extend(read_capture(cut))
    assert [f.interface for f in got] == VMS[:3]
    last_block = len(whole) - (28 + 4 * ((len(FRAMES["arp"]) + 3) // 4) + 4)
    assert caught.value.offset == last_block and caught.value.path == cut
    assert f"capture file {cut} at byte offset {last_block}: the last block is cut short" \
        == str(caught.value)


@pytest.mark.parametrize(("damage", "says"), [
    (lambda b, at: b[:at + 4] + struct.pack("<I", 7) + b[at + 8:], "invalid block length 7"),
    (lambda b, at: b[:at + 4] + struct.pack("<I", MAX_BLOCK_BYTES + 4) + b[at + 8:],
     "invalid block length"),
    (lambda b, at: b[:at + 8] + struct.pack("<I", 9) + b[at + 12:],
     "a packet on interface 9"),
    (lambda b, at: b[:at + 20] + struct.pack("<I", 5000) + b[at + 24:], "a packet of 5000"),
    (lambda b, at: _set_u32(b, at + struct.unpack_from("<I", b, at + 4)[0] - 4, 1),
     "does not match its trailer"),
])
def test_a_corrupt_block_is_an_error_at_its_offset(tmp_path, damage, says):
    whole = write_pcapng(tmp_path / "c.pcapng").read_bytes()
    first_packet = _offset_of_packet(whole, 1)
    bad = tmp_path / "bad.pcapng"
    bad.write_bytes(damage(whole, first_packet))
    got = []
    with pytest.raises(CaptureFileError, match=says) as caught:
        got.extend(read_capture(bad))
    assert len(got) == 1 and caught.value.offset in (first_packet, first_packet + 4)


def _set_u32(data: bytes, at: int, value: int) -> bytes:
    return data[:at] + struct.pack("<I", value) + data[at + 4:]


def _offset_of_packet(data: bytes, index: int) -> int:
    """Where the index-th (0-based) Enhanced Packet Block starts."""
    at, seen = 0, -1
    while True:
        block_type, length = struct.unpack_from("<II", data, at)
        if block_type == 6:
            seen += 1
            if seen == index:
                return at
        at += length


@pytest.mark.parametrize(("content", "says"), [
    (b"", "empty file"),
    (b"GIF89a" + b"\x00" * 40, "not a pcapng or pcap file (it starts with 47494638)"),
    (b"\xd4\xc3\xb2\xa1\x02\x00", "the pcap file header is cut short"),
])
def test_files_that_are_not_captures(tmp_path, content, says):
    path = tmp_path / "x.pcap"
    path.write_bytes(content)
    with pytest.raises(CaptureFileError, match=re.escape(says)):
        list(read_capture(path))


def test_a_non_ethernet_capture_is_refused(tmp_path):
    path = tmp_path / "raw.pcap"
    with path.open("wb") as fh:
        dpkt.pcap.Writer(fh, linktype=dpkt.pcap.DLT_RAW).writepkt(b"\x45" + b"\x00" * 19)
    with pytest.raises(CaptureFileError, match="link type .* is not Ethernet"):
        list(read_capture(path))


def test_a_missing_file_is_not_found(tmp_path):
    with pytest.raises(NotFound, match="no capture file"):
        list(read_capture(tmp_path / "nope.pcapng"))
