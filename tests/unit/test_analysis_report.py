"""The capture summary (secvf.analysis.network_summary) on pcapng files written with
PcapngWriter from dpkt-built frames, sample sniffing, and a full report built from every
input (secvf.analysis.report) and written as JSON + HTML."""

# ruff: noqa: E501 — verbatim strace lines are long

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import dpkt
import pytest

from secvf.analysis import yara_scan
from secvf.analysis.network_summary import summarize_capture
from secvf.analysis.report import ReportInputs, build_report, sniff, write_report
from secvf.net.pcapng import PcapngWriter
from tests.unit.test_packets_decode import (
    GUEST,
    RESOLVER,
    client_hello,
    dns_answer,
    dns_query,
    eth,
    ipv4,
    tcp,
    udp,
)

C2 = "198.51.100.7"


def write_capture(path: Path, frames: list[bytes], vm: str = "victim") -> Path:
    with open(path, "wb") as fh:
        writer = PcapngWriter(fh)
        iface = writer.add_interface(vm)
        for i, frame in enumerate(frames):
            writer.write(1_700_000_000_000_000_000 + i * 1_000_000, iface, frame)
    return path


def lab_frames() -> list[bytes]:
    syn = dpkt.tcp.TH_SYN
    return [
        eth(ipv4(udp(40000, 53, dns_query("evil.example.com")))),
        eth(ipv4(udp(53, 40000, dns_answer("evil.example.com", C2)), src=RESOLVER,
                 dst=GUEST)),
        eth(ipv4(tcp(40001, 80, flags=syn), dst=C2)),
        eth(ipv4(tcp(40001, 80, b"GET /stage2.bin HTTP/1.1\r\nHost: evil.example.com\r\n\r\n"),
                 dst=C2)),
        eth(ipv4(tcp(80, 40001, b"HTTP/1.1 200 OK\r\n\r\n"), src=C2, dst=GUEST)),
        eth(ipv4(tcp(40002, 443, flags=syn), dst=C2)),
        eth(ipv4(tcp(40002, 443, client_hello("c2.example.net")), dst=C2)),
        eth(ipv4(tcp(40003, 4444, flags=syn), dst=C2)),
    ]


def test_capture_summary(tmp_path):
    net = summarize_capture(write_capture(tmp_path / "lab.pcapng", lab_frames()))
    assert net["packets"] == 8 and net["error"] is None and not net["truncated"]
    assert net["dns"][0]["name"] == "evil.example.com" and net["dns"][0]["type"] == "A"
    assert net["dns"][0]["answers"] == [C2] and net["dns"][0]["vm"] == "victim"
    assert [(h["method"], h["host"], h["path"]) for h in net["http"]] == [
        ("GET", "evil.example.com", "/stage2.bin")]
    assert net["tls_sni"][0]["sni"] == "c2.example.net"
    assert net["tls_sni"][0]["dst"] == f"{C2}:443"
    flows = {(f["proto"], f["dst"], f["dst_port"]): f for f in net["endpoints"]}
    assert flows[("tcp", C2, 80)]["packets"] == 3 and flows[("tcp", C2, 80)]["syn"]
    assert flows[("tcp", C2, 4444)]["packets"] == 1
    assert flows[("udp", RESOLVER, 53)]["packets"] == 2
    assert flows[("tcp", C2, 80)]["bytes"] == sum(len(f) for f in lab_frames()[2:5])
    hits = {p["name"]: p for p in net["presets"]}
    assert hits and all(p["count"] >= 1 for p in hits.values())


def test_capture_limits_and_damage(tmp_path):
    path = write_capture(tmp_path / "lab.pcapng", lab_frames())
    small = summarize_capture(path, max_packets=3, max_rows=1)
    assert small["packets"] == 3 and small["truncated"]
    path.write_bytes(path.read_bytes()[:-7])
    damaged = summarize_capture(path)
    assert damaged["error"] and damaged["packets"] == 7
    missing = summarize_capture(tmp_path / "none.pcapng")
    assert missing["error"] and missing["packets"] == 0


def _elf(machine: int) -> bytes:
    return b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack("<HH", 2, machine) + b"\0" * 40


def _pe(machine: int, magic: int) -> bytes:
    head = bytearray(0x100)
    head[:2] = b"MZ"
    head[0x3C:0x40] = (0x80).to_bytes(4, "little")
    head[0x80:0x84] = b"PE\0\0"
    head[0x84:0x86] = machine.to_bytes(2, "little")
    head[0x98:0x9A] = magic.to_bytes(2, "little")
    return bytes(head)


@pytest.mark.parametrize(("head", "fmt", "arch", "runnable"), [
    (_elf(62), "elf", "x86-64", True),
    (_elf(183), "elf", "aarch64", False),
    (_pe(0x8664, 0x20B), "pe", "x86-64", False),
    (_pe(0x14C, 0x10B), "pe", "i386", False),
    (b"#!/bin/sh\necho hi\n", "script", None, True),
    (b"PK\x03\x04rest", "zip", None, None),
    (b"\0\1\2", "other", None, None),
])
def test_sniff(head, fmt, arch, runnable):
    got = sniff(head)
    assert (got["format"], got["architecture"], got["runnable_here"]) == (fmt, arch, runnable)
    assert (got["architecture_note"] is not None) == (runnable is False)
    if fmt == "pe":
        assert got["file_type"].startswith("PE32+" if arch == "x86-64" else "PE32 ")


MONITOR = """\
E {"event":"hello","format":1,"detonator":"1.0","time":1714000000.0}
E {"event":"medium","path":"/media/sample","files":[{"name":"a.out","size":64}],"time":1714000000.1}
E {"event":"start","pid":412,"argv":["/media/sample/a.out"],"user":"analyst","cwd":"/home/analyst","timeout_s":60,"time":1714000000.2}
S 413  17:17:56.735468 execve("/media/sample/a.out", ["/media/sample/a.out"], 0x7ffd /* 12 vars */) = 0
S 413  17:17:56.736000 openat(AT_FDCWD, "/media/sample/a.out", O_RDWR) = -1 EROFS (Read-only file system)
S 413  17:17:56.739618 openat(AT_FDCWD, "drop.zip", O_WRONLY|O_CREAT|O_TRUNC, 0666) = 3
S 413  17:17:56.740000 connect(4, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.0.2.3")}, 16) = 0
S 413  17:17:56.747460 exit_group(0)     = ?
S 413  17:17:56.747643 +++ exited with 0 +++
E {"event":"exit","code":0,"signal":null,"time":1714000001.0}
E {"event":"done","time":1714000001.1}
"""


def full_inputs(tmp_path: Path, **overrides: object) -> ReportInputs:
    sample = tmp_path / "a.out"
    sample.write_bytes(_elf(183) + b"EVILMARKER")
    monitor = tmp_path / "monitor.log"
    monitor.write_text(MONITOR)
    serial = tmp_path / "serial.log"
    serial.write_text("[    0.0] Linux version 6.1\n[   9.1] Kernel panic - not syncing: x\n")
    capture = write_capture(tmp_path / "net.pcapng", lab_frames())
    dropped = tmp_path / "drop.zip"
    with zipfile.ZipFile(dropped, "w") as zf:
        zf.writestr("payload/stage2.sh", "#!/bin/sh\n")
    diff = {"created": [{"path": "/home/analyst/drop.zip", "kind": "file", "size": 120,
                         "mode": "0644", "uid": 1000, "gid": 1000, "mtime": 1.0,
                         "sha256": "ab" * 32, "before_sha256": None}],
            "modified": [], "deleted": [], "ignored": [], "truncated": False}
    values: dict[str, object] = dict(
        analysis_id="an-1", sample=sample, monitor_log=monitor, serial_log=serial,
        capture=capture, disk_diff=diff,
        dropped_files=[("/home/analyst/drop.zip", dropped)])
    values.update(overrides)
    return ReportInputs(**values)  # type: ignore[arg-type]


def test_full_report(tmp_path):
    report = build_report(full_inputs(tmp_path))
    assert report["schema_version"] == 1 and report["analysis_id"] == "an-1"
    sample = report["sample"]
    assert sample["size"] == len(_elf(183)) + 10
    assert len(sample["sha256"]) == 64 and len(sample["md5"]) == 32
    assert sample["architecture"] == "aarch64" and sample["runnable_here"] is False
    run = report["run"]
    assert run["outcome"] == "exited" and run["exit_code"] == 0 and run["kernel_panic"]
    assert run["timeout_s"] == 60 and run["user"] == "analyst"
    assert run["medium_write_attempts"] == [
        {"path": "/media/sample/a.out", "pid": 413, "source": "strace"}]
    assert report["processes"][0]["argv"] == ["/media/sample/a.out"]
    assert report["files"]["written"][0]["path"] == "/home/analyst/drop.zip"
    assert report["network_syscalls"]["dns_servers"] == ["10.0.2.3:53"]
    assert report["network"]["tls_sni"][0]["sni"] == "c2.example.net"
    assert report["disk_diff"]["created"][0]["path"] == "/home/analyst/drop.zip"
    assert report["dropped_zip"] == [{"archive": "/home/analyst/drop.zip",
                                      "name": "payload/stage2.sh", "size": 10,
                                      "compressed_size": 10, "encrypted": False}]
    assert report["yara"]["enabled"] is False and "no YARA rules" in report["yara"]["note"]
    assert report["serial"]["kernel_panic"] and report["monitor"]["complete"]
    assert any("not for this architecture" in n for n in report["notes"])
    json_path, html_path = write_report(report, tmp_path / "result")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(report))
    assert json_path.read_text().startswith('{\n  "analysis_id"')  # sorted, indent 2
    page = html_path.read_text()
    assert "c2.example.net" in page and "payload/stage2.sh" in page and "SIGKILL" not in page


def test_report_with_nothing_but_an_id(tmp_path):
    report = build_report(ReportInputs(analysis_id="empty",
                                       monitor_log=tmp_path / "missing.log"))
    assert report["network"] is None and report["disk_diff"] is None
    assert report["run"]["outcome"] == "unknown" and report["processes"] == []
    assert any("monitor log missing.log could not be read" in n for n in report["notes"])
    write_report(report, tmp_path)


@pytest.mark.skipif(yara_scan.engine() is None,
                    reason="no YARA engine (pip install yara-python, or apt install yara)")
def test_yara_over_sample_and_dropped_files(tmp_path):
    rules = tmp_path / "r.yar"
    rules.write_text('rule evil_marker : demo { strings: $a = "EVILMARKER" condition: $a }\n'
                     'rule zip_drop { strings: $z = "stage2" condition: $z }\n')
    report = build_report(full_inputs(tmp_path, yara_rules=[rules]))
    got = {(m["target"], m["rule"]) for m in report["yara"]["matches"]}
    assert got == {("sample", "evil_marker"), ("/home/analyst/drop.zip", "zip_drop")}
    assert report["yara"]["enabled"] and report["yara"]["engine"] is not None
    marker = [m for m in report["yara"]["matches"] if m["rule"] == "evil_marker"][0]
    assert marker["tags"] == ["demo"] and marker["strings"] == ["$a"]
    bad = tmp_path / "bad.yar"
    bad.write_text("rule {")
    broken = build_report(full_inputs(tmp_path, yara_rules=[bad]))
    assert not broken["yara"]["enabled"] and "compile" in broken["yara"]["note"]
