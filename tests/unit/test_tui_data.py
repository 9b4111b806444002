"""The TUI's pure helpers: guest text cleaned, lines whole, rows and filters, change
events, log filters."""

from __future__ import annotations

import pytest

pytest.importorskip("textual")

from rich.text import Text  # noqa: E402

from secvf.errors import NotFound  # noqa: E402
from secvf.faces.tui import data  # noqa: E402
from secvf.faces.tui.logs import parse_filter  # noqa: E402
from tests.unit.tui_fakes import status  # noqa: E402


def test_clean_shows_controls_instead_of_obeying_them() -> None:
    assert data.clean("a\x1b[2Jb\x07c\r\nd\te\x9bf") == "a?[2Jb?c\nd\te?f"


def test_line_splitter_keeps_lines_whole() -> None:
    lines = data.LineSplitter()
    assert lines.feed(b"one\ntw") == ["one"]
    assert lines.feed(b"o\nthr") == ["two"]
    assert lines.flush() == ["thr"]
    assert lines.flush() == []


def test_uptime_text() -> None:
    assert [data.uptime(s) for s in (None, 5, 65, 3700, 90000)] == [
        "-", "5s", "1m05s", "1h01m", "1d01h"]


def test_row_filter_needs_every_word() -> None:
    row = data.VMRow.from_status(status("sbx", kind="ai-sandbox", state="running",
                                        channels=[{"path": "p", "type": "t",
                                                   "channel": "vsock"}]))
    assert row.matches("SBX vsock") and row.matches("")
    assert not row.matches("sbx stopped")


def test_error_line_is_one_line() -> None:
    assert data.error_line(NotFound("no VM\n  named 'x'")) == "no VM named 'x'"
    assert data.error_line(ValueError("bad")) == "ValueError: bad"


def test_names_changed() -> None:
    assert data.names_changed({"event": "vm_started", "vm": "web"}) == ["web"]
    assert data.names_changed({"event": "vm_created", "vm": "web"}) is None
    assert data.names_changed({"event": "vm_stopped", "vm": None}) is None


def test_cells_are_never_markup() -> None:
    [cell] = data.plain("[red]x[/]")
    assert isinstance(cell, Text) and cell.plain == "[red]x[/]"


def test_channel_proof_of_a_running_generic_vm() -> None:
    proof = data.channel_proof(status("web", state="running", devices=[{"path": "p",
                                                                       "type": "virtio-blk"}]))
    assert proof.startswith("no channel: 1 live devices")
    bad = data.channel_proof(status("web", state="running",
                                    channels=[{"type": "vhost-user-vsock-pci"}]))
    assert bad.startswith("FINDING")


def test_log_filter_words() -> None:
    assert parse_filter("web event=vm_started junk=1") == {"vm": "web", "event": "vm_started"}
