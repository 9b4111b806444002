"""The HTML report (secvf.analysis.report_html): every guest-supplied string is escaped,
nothing guest-controlled lands in an attribute or a link, no script or external
resource, and hostile shapes render without raising."""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from secvf.analysis.report import ReportInputs, build_report, write_report
from secvf.analysis.report_html import render_html
from secvf.net.pcapng import PcapngWriter
from tests.unit.test_packets_decode import client_hello, dns_query, eth, ipv4, tcp, udp

EVIL = ["<script>alert(1)</script>", '"><img src=x onerror=1>', "'><svg onload=1>",
        "javascript:alert(1)", "http://evil.example/<b>"]


def hostile_report(tmp_path: Path) -> dict:
    name = EVIL[0] + EVIL[1]
    sample = tmp_path / "sample.bin"
    sample.write_bytes(b"#!/bin/sh\n")
    argv = ", ".join(f'"{e}"'.replace('"', '\\"', 0) for e in EVIL)
    monitor = tmp_path / "monitor.log"
    lines = [
        'E {"event":"start","pid":1,"argv":["<script>alert(1)</script>",'
        '"\\"><img src=x onerror=1>"],"user":"<b>u</b>","time":1}',
        f'S 5  10:00:00.000001 execve("/tmp/<script>alert(1)</script>", [{argv}], 0x1) = 0',
        'S 5  10:00:00.000002 openat(AT_FDCWD, "/tmp/\\"><img src=x onerror=1>", '
        'O_WRONLY|O_CREAT, 0666) = 3',
        'E {"event":"<script>alert(1)</script>","time":2}',
        "<script>garbage</script>",
    ]
    monitor.write_text("\n".join(lines) + "\n")
    capture = tmp_path / "net.pcapng"
    host = "x.example"
    with open(capture, "wb") as fh:
        writer = PcapngWriter(fh)
        iface = writer.add_interface('<script>vm</script>')
        frames = [eth(ipv4(udp(4000, 53, dns_query("<script>alert(1)</script>.evil")))),
                  eth(ipv4(tcp(4001, 80, b'GET /"><img src=x onerror=1> HTTP/1.1\r\n'
                                         b"Host: " + host.encode() + b"\r\n\r\n"))),
                  eth(ipv4(tcp(4002, 443, client_hello('"><img src=x onerror=1>'))))]
        for i, frame in enumerate(frames):
            writer.write(i * 1000, iface, frame)
    diff = {"created": [{"path": "/home/<script>alert(1)</script>", "kind": "file",
                         "size": 1, "mode": "0644", "uid": 0, "gid": 0, "mtime": 0,
                         "sha256": '"><img src=x onerror=1>', "before_sha256": None}],
            "modified": [{"path": '"><img src=x onerror=1>'}], "deleted": "not a list"}
    return build_report(ReportInputs(analysis_id='<script>alert("id")</script>',
                                     sample=sample, sample_name=name, monitor_log=monitor,
                                     capture=capture, disk_diff=diff))


def _assert_safe(page: str) -> None:
    low = page.lower()
    assert "<script" not in low and "<img" not in low and "<svg" not in low
    assert "href" not in low and " src=" not in low.replace("src=x", "")
    assert "http://" not in low.replace("http://evil.example/&lt;b&gt;", "")
    # every attribute in the page is one of the constant ones
    attrs = set(re.findall(r"<[a-z0-9]+((?:\s+[a-z-]+=\"[^\"]*\")*)\s*/?>", page))
    allowed = {"", ' class="bad"', ' class="muted"', ' class="note"', ' class="tree"',
               ' class="ok"', ' lang="en"', ' charset="utf-8"',
               " http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
               "style-src 'unsafe-inline'\""}
    assert attrs <= allowed, attrs - allowed
    assert "onerror=1" not in page.replace("&gt; onerror", "").replace(
        "src=x onerror=1&gt;", "")


def test_hostile_strings_are_escaped_everywhere(tmp_path):
    report = hostile_report(tmp_path)
    page = render_html(report)
    _assert_safe(page)
    for needle in ("&lt;script&gt;alert(1)&lt;/script&gt;",
                   "&quot;&gt;&lt;img src=x onerror=1&gt;"):
        assert needle in page
    # the sample name, argv, DNS name, SNI, file names and the unknown event all appear
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 5
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.evil" in page
    _, html_path = write_report(report, tmp_path / "out")
    _assert_safe(html_path.read_text())


def test_no_external_resources_or_script(tmp_path):
    page = render_html(hostile_report(tmp_path))
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")


def test_huge_strings_are_cut():
    report = {"analysis_id": "x" * 100_000, "notes": ["<" * 100_000]}
    page = render_html(report)
    assert len(page) < 60_000 and "…[cut]" in page


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["pid", "children", "argv", "name", "path", "kind",
                                       "detail", "matches", "dns", "endpoints", "x"]),
                      children, max_size=5),
    max_leaves=30)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["processes", "timeline", "network", "run", "sample",
                                        "files", "disk_diff", "yara", "monitor", "serial",
                                        "notes", "dropped_zip", "network_syscalls"]),
                       json_values, max_size=8))
def test_malformed_reports_render(report):
    _assert_safe(render_html(report))


def test_a_memory_dump_is_listed_under_the_run(tmp_path):
    report = hostile_report(tmp_path)
    assert "Memory dump" not in render_html(report)
    report["memory_dump"] = {"file": "memory.elf", "format": "elf", "bytes": 536870912,
                             "sha256": "<script>ab</script>"}
    page = render_html(report)
    assert "Memory dump" in page and "memory.elf" in page and "536870912" in page
    _assert_safe(page)
