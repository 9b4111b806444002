"""``secvf packets`` end to end: the workflow over a capture file and any frame source,
the real CLI (table, JSON Lines, presets, errors), and docs/packets.md naming every
field, protocol word and preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secvf.errors import InvalidFilter, NotFound
from secvf.net.capture_file import CaptureFileError
from secvf.net.filters import FIELDS, PRESETS, PROTOCOLS
from secvf.net.filters.fields import ALIASES
from secvf.workflows import packets
from tests.helpers import run_cli
from tests.unit.test_packets_capture_file import ORDER, VMS, write_pcapng
from tests.unit.test_packets_decode import FRAMES

DOCS = Path(__file__).resolve().parents[2] / "docs" / "packets.md"


@pytest.fixture
def capture(tmp_path: Path) -> Path:
    return write_pcapng(tmp_path / "lab.pcapng")


def test_the_workflow_decodes_filters_and_limits_a_file(capture):
    assert [p.protocol for p in packets.read_file(capture)] == ["DNS", "HTTP", "TLS", "ARP"]
    web = packets.read_file(capture, filter='vm == "web"')
    assert [p.protocol for p in web] == ["DNS", "TLS"]
    both = packets.read_file(capture, preset="tls-sni", filter="vm == web")
    assert [p.tls_sni for p in both] == ["secret.example.org"]
    assert len(list(packets.read_file(capture, limit=2))) == 2


def test_any_iterable_of_frames_is_a_source():
    source = [(1.0 + i, vm, FRAMES[name]) for i, (name, vm) in enumerate(zip(ORDER, VMS,
                                                                            strict=True))]
    assert [p.vm for p in packets.read_packets(source, filter="tcp")] == ["db", "web"]


def test_a_bad_filter_or_preset_fails_before_anything_is_read():
    def never():
        raise AssertionError("the source was read")
        yield

    with pytest.raises(InvalidFilter):
        packets.read_packets(never(), filter="tcp.port ==")
    with pytest.raises(NotFound, match="no packet preset 'nope'.*dns-txt"):
        packets.read_packets(never(), preset="nope")


def test_a_corrupt_file_shows_the_packets_before_the_damage(capture, tmp_path):
    cut = tmp_path / "cut.pcapng"
    cut.write_bytes(capture.read_bytes()[:-10])
    shown = []
    with pytest.raises(CaptureFileError):
        shown.extend(p.protocol for p in packets.read_file(cut))
    assert shown == ["DNS", "HTTP", "TLS"]


def test_presets_are_listed_with_their_texts():
    listed = packets.presets()
    assert [p["name"] for p in listed] == [p.name for p in PRESETS]
    assert set(listed[0]) == {"name", "section", "expression", "catches", "cannot"}


# ---- the real CLI ---------------------------------------------------------------------------


def test_cli_prints_one_line_per_packet_with_vm_and_info(capture):
    lines = run_cli("packets", str(capture), check=True).stdout.splitlines()
    assert lines[0].split() == ["TIME", "VM", "SRC", "DST", "PROTO", "LEN", "INFO"]
    assert len(lines) == 5
    assert " web " in lines[1] and "query A example.com" in lines[1]
    assert " db " in lines[2] and "GET example.com /index.html?q=1" in lines[2]
    assert "ClientHello SNI=secret.example.org" in lines[3]
    assert " router " in lines[4] and "who-has 10.0.0.9? tell 10.0.0.1" in lines[4]


def test_cli_json_lines_filter_preset_and_limit(capture):
    out = run_cli("packets", str(capture), "--json", "--filter", "tcp", check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["protocol"] for r in rows] == ["HTTP", "TLS"]
    assert rows[0]["http_host"] == "example.com" and rows[0]["vm"] == "db"
    limited = run_cli("packets", str(capture), "--json", "--preset", "dns", "--limit", "1",
                      check=True).stdout.splitlines()
    assert len(limited) == 1 and json.loads(limited[0])["dns_names"] == ["example.com"]


def test_cli_preset_list_by_section(capture):
    out = run_cli("packets", "--preset", "list", check=True).stdout
    assert out.index("C2 detection") < out.index("Lateral movement")
    assert "tls-no-sni" in out and "catches:" in out and "cannot:" in out
    listed = json.loads(run_cli("packets", "--preset", "list", "--json", check=True).stdout)
    assert len(listed) == len(PRESETS)


def test_cli_errors_are_one_line_with_the_position(capture, tmp_path):
    bad = run_cli("packets", str(capture), "--filter", "tcp.port contains 1")
    assert bad.returncode == 1 and bad.stdout == ""
    assert "secvf: error: tcp.port is an integer field" in bad.stderr
    assert "(at character 10)" in bad.stderr and "Traceback" not in bad.stderr
    missing = run_cli("packets", str(tmp_path / "none.pcapng"))
    assert missing.returncode == 1 and "no capture file" in missing.stderr
    cut = tmp_path / "cut.pcapng"
    cut.write_bytes(capture.read_bytes()[:-10])
    damaged = run_cli("packets", str(cut))
    assert damaged.returncode == 1 and len(damaged.stdout.splitlines()) == 4
    assert "at byte offset" in damaged.stderr and "cut short" in damaged.stderr
    assert run_cli("packets").returncode == 2


# ---- the reference ------------------------------------------------------------------------


def test_docs_name_every_field_alias_protocol_and_preset():
    text = DOCS.read_text()
    names = [*FIELDS, *ALIASES, *PROTOCOLS, *(p.name for p in PRESETS)]
    assert [n for n in names if f"`{n}`" not in text] == []
    assert [p.expression for p in PRESETS if p.expression.replace("|", "\\|") not in text] == []
