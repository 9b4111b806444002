"""The TUI's other areas against the fake API: the exec pane, networks, analyses, logs,
the audit, the serial log; and snapshots of the main screens at 80x24 with the clock
frozen (``tests/unit/tui_snapshots/*.txt``; ``SECVF_UPDATE_SNAPSHOTS=1`` rewrites them)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

pytest.importorskip("textual")

from secvf import api  # noqa: E402
from secvf.faces.tui import data  # noqa: E402
from secvf.faces.tui.app import SecVFApp  # noqa: E402
from secvf.faces.tui.exec_pane import ExecScreen  # noqa: E402
from tests.unit.tui_fakes import FakeAPI, anyio_backend, screen_text, until  # noqa: E402,F401

pytestmark = pytest.mark.anyio
SIZE = (80, 24)
SNAPSHOTS = Path(__file__).parent / "tui_snapshots"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeAPI:
    monkeypatch.setattr(data, "clock", lambda: 1000.0)  # uptimes stand still
    return FakeAPI().install(monkeypatch)


def fleet(fake: FakeAPI) -> None:
    """A generic VM, a crashed one, a paused malware-analysis VM, a running sandbox."""
    fake.add("web", state="running", snapshots=["clean"])
    fake.add("old", state="crashed")
    fake.add("mal", kind="malware-analysis", state="paused", memory_mib=2048)
    fake.add("sbx", kind="ai-sandbox", state="running", exec_socket="/run/s/secvf-exec-1.sock",
             channels=[{"path": "/machine/peripheral/vsock0", "type": "vhost-user-vsock-pci",
                        "channel": "vsock"}],
             devices=[{"path": "/machine/peripheral/vsock0", "type": "vhost-user-vsock-pci",
                       "channel": "vsock"},
                      {"path": "/machine/peripheral/disk0", "type": "virtio-blk-pci",
                       "channel": None}])


async def check_snapshot(pilot: object, name: str) -> None:
    """The screen, once its footer shows its keys, against the stored one."""
    app = pilot.app  # type: ignore[attr-defined]
    await until(pilot, lambda: "? Help" in screen_text(app).splitlines()[-1], "the footer")
    text = screen_text(app)
    path = SNAPSHOTS / f"{name}.txt"
    if os.environ.get("SECVF_UPDATE_SNAPSHOTS") or not path.exists():
        path.write_text(text)
    assert text == path.read_text(), f"screen {name} changed; see {path}"


async def test_exec_pane_shows_output_and_exit_code(fake: FakeAPI) -> None:
    fleet(fake)
    fake.exec_events = [api.Stdout(b"hello "), api.Stdout(b"world\n\x1b[31mred"),
                        api.Stderr(b"oops\n"),
                        api.Exited(exit_code=3, signal=None, timed_out=False, cancelled=False,
                                   duration_ms=12)]
    app = SecVFApp(watch=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        table = app.query_one("#sandbox-table")
        await until(pilot, lambda: "sbx" in table.rows, "the sandbox listed")  # type: ignore[attr-defined]
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, ExecScreen), "the exec pane")
        await pilot.press(*"echo hi", "enter")
        await until(pilot, lambda: "exit 3 in 12 ms" in screen_text(app), "the exit line")
        text = screen_text(app)
        assert "hello world" in text  # a line cut between chunks comes out whole
        assert "?[31mred" in text  # the escape is shown, not obeyed
        assert "oops" in text
        assert fake.called("connect_exec") == [(("sbx",), {})]


async def test_a_stopped_sandbox_has_no_exec_pane(fake: FakeAPI) -> None:
    fake.add("sbx", kind="ai-sandbox")
    app = SecVFApp(watch=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        table = app.query_one("#sandbox-table")
        await until(pilot, lambda: "sbx" in table.rows, "the sandbox listed")  # type: ignore[attr-defined]
        await pilot.press("e")
        await until(pilot, lambda: bool(app._notifications), "a note")
        assert "start it first" in list(app._notifications)[0].message
        assert not isinstance(app.screen, ExecScreen)


async def test_networks_show_counters_and_drops(fake: FakeAPI) -> None:
    fake.networks = [{"name": "lab", "subnet": "10.0.100.0/24", "isolate_guests": False,
                      "ipam": True, "vms": ["web"], "switch": "running", "ports": 1}]
    fake.network_shows["lab"] = {
        "name": "lab", "subnet": "10.0.100.0/24", "switch": "running", "switch_pid": 77,
        "drops": {"mac_spoof": 4, "rate": 0},
        "nics": [{"vm": "web", "nic": 0, "port": "p", "mac": "52:54:00:00:00:01",
                  "address": "10.0.100.2", "router": False, "vm_running": True,
                  "attached": True, "learned": True,
                  "counters": {"rx": 10, "rx_bytes": 600, "tx": 12, "tx_bytes": 900,
                               "drops": {"mac_spoof": 4}}}]}
    app = SecVFApp(watch=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("3")
        await until(pilot, lambda: "mac_spoof=4" in screen_text(app), "the drops")
        text = screen_text(app)
        assert "rx 10 tx 12" in text and "switch running (pid 77)" in text


async def test_analyses_show_the_report_summary(fake: FakeAPI) -> None:
    fake.analyses = [{"id": "a1b2c3d4e5f6a7b8", "running": False, "state": "done",
                      "verdict": "finished", "sample_name": "evil.sh", "network": "none",
                      "started_at": "2026-01-01T10:00:00Z"}]
    fake.reports["a1b2c3d4e5f6a7b8"] = {
        "schema_version": 1, "sample": {"name": "evil.sh", "sha256": "ab" * 32,
                                        "file_type": "script (/bin/sh)"},
        "verdict": "finished", "run": {"outcome": "exited", "exit_code": 0},
        "process_count": 5, "files": {"written": ["/tmp/x"]}, "network": None}
    app = SecVFApp(watch=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("4")
        await until(pilot, lambda: "processes: 5" in screen_text(app), "the summary")
        assert "verdict: finished" in screen_text(app)


async def test_logs_filter_by_vm(fake: FakeAPI) -> None:
    fake.logs = [{"time": "2026-01-01T10:00:00.000Z", "severity": "INFO",
                  "event": "vm_started", "vm": "web", "accel": "tcg"},
                 {"time": "2026-01-01T10:00:01.000Z", "severity": "CRITICAL",
                  "event": "mac_spoof", "vm": "db", "network": "lab"}]
    app = SecVFApp(watch=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("5")
        await until(pilot, lambda: "mac_spoof" in screen_text(app), "the records")
        await pilot.press("slash", *"vm=web", "enter")
        await until(pilot, lambda: "mac_spoof" not in screen_text(app), "filtered")
        assert "vm_started" in screen_text(app)
        assert fake.called("query_logs")[-1][1]["vm"] == "web"


async def test_serial_log_is_cleaned(fake: FakeAPI) -> None:
    fleet(fake)
    app = SecVFApp(watch=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "web" in app.query_one("#vm-table").rows,  # type: ignore[attr-defined]
                    "listed")
        await pilot.press("l")
        await until(pilot, lambda: "line two" in screen_text(app), "the log")
        assert "boot?[2Jline one" in screen_text(app)


async def test_audit_shows_findings(fake: FakeAPI) -> None:
    fake.audit_result = {"vms": [{"name": "mal", "kind": "malware-analysis", "state": "running",
                                  "source": "live", "channel_devices": [{"channel": "vsock"}],
                                  "exec_socket": None, "shares": [], "network": "none",
                                  "findings": ["vsock device on a malware-analysis VM"],
                                  "disk_chain": []}],
                         "stray": [], "finding_count": 1}
    app = SecVFApp(watch=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("6")
        await until(pilot, lambda: "1 finding(s)" in screen_text(app), "the findings")
        await check_snapshot(pilot, "audit")


async def test_the_areas_first_reads_run_on_the_tuis_own_threads(
        fake: FakeAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    """The areas start reading when they mount, before the app does: those reads must
    already run on the app's worker pool, not the loop's small default one."""
    threads: list[str] = []
    monkeypatch.setattr(api, "audit", lambda: threads.append(
        threading.current_thread().name) or fake.audit_result)
    app = SecVFApp(watch=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: bool(threads), "the first audit")
    assert threads[0].startswith("secvf-tui"), threads


async def test_snapshot_vms(fake: FakeAPI) -> None:
    fleet(fake)
    app = SecVFApp(watch=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: len(app.query_one("#vm-table").rows) == 4,  # type: ignore[attr-defined]
                    "listed")
        await check_snapshot(pilot, "vms")


async def test_snapshot_details_of_a_sandbox(fake: FakeAPI) -> None:
    fleet(fake)
    app = SecVFApp(watch=False)
    async with app.run_test(size=SIZE) as pilot:
        table = app.query_one("#vm-table")
        await until(pilot, lambda: len(table.rows) == 4, "listed")  # type: ignore[attr-defined]
        table.table.move_cursor(row=table.table.get_row_index("sbx"))  # type: ignore[attr-defined]
        await pilot.press("enter")
        await until(pilot, lambda: "live device tree" in screen_text(app), "the details")
        await check_snapshot(pilot, "details-sandbox")
