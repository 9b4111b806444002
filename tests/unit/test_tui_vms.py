"""The TUI's VMs area against a fake API (tests/unit/tui_fakes.py), driven by Textual's
headless pilot: hundreds of VMs, filtering, a VM that crashes while shown, an API error
as a notification, the confirmation modal, a stop's progress and its cancel."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("textual")

from secvf.errors import LaunchFailed  # noqa: E402
from secvf.faces.tui.app import SecVFApp  # noqa: E402
from secvf.faces.tui.details import DetailsScreen  # noqa: E402
from secvf.faces.tui.vms import VMTable  # noqa: E402
from secvf.faces.tui.widgets import ConfirmScreen  # noqa: E402
from tests.unit.tui_fakes import FakeAPI, anyio_backend, screen_text, until  # noqa: E402,F401

pytestmark = pytest.mark.anyio
SIZE = (80, 24)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeAPI:
    return FakeAPI().install(monkeypatch)


def table_of(app: SecVFApp) -> VMTable:
    return app.query_one("#vm-table", VMTable)


async def test_hundreds_of_vms_are_listed_and_filtered(fake: FakeAPI) -> None:
    for i in range(300):
        fake.add(f"vm{i:03d}", kind="ai-sandbox" if i % 3 == 0 else "generic",
                 state="running" if i % 2 else "stopped")
    app = SecVFApp(watch=False)
    async with app.run_test(size=SIZE) as pilot:
        table = table_of(app)
        await until(pilot, lambda: table.table.row_count == 300, "300 rows")
        await pilot.press("slash", *"sandbox running")
        # i % 3 == 0 and odd i: i % 6 == 3 -> 50 of 300
        await until(pilot, lambda: table.table.row_count == 50, "50 rows after the filter")
        assert all(table.rows[str(key.value)].kind == "ai-sandbox"
                   for key in table.table.rows)
        await pilot.press("enter", "escape")  # back to the table, then drop the filter
        await until(pilot, lambda: table.table.row_count == 300, "the filter dropped")


async def test_a_vm_that_crashes_while_shown_shows_as_crashed(fake: FakeAPI) -> None:
    fake.add("web", state="running")
    app = SecVFApp(watch=True)  # changes arrive through api.watch_vm_changes
    async with app.run_test(size=SIZE) as pilot:
        table = table_of(app)
        await until(pilot, lambda: "web" in table.rows, "the VM listed")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, DetailsScreen)
                    and "running" in screen_text(app), "the details")
        fake.change("web", "vm_crashed", state="crashed", uptime_s=None, last_run={
            "state": "crashed", "reason": "QEMU exited with status 1", "ended_at": "now",
            "accel": "tcg", "transitions": []})
        await until(pilot, lambda: "QEMU exited with status 1" in screen_text(app),
                    "the crash in the details")
        assert "crashed" in screen_text(app)
        await pilot.press("escape")
        await until(pilot, lambda: table.rows["web"].state == "crashed", "the row crashed")


async def test_an_api_error_is_one_notification_and_the_app_goes_on(fake: FakeAPI) -> None:
    fake.add("web")
    fake.errors["start_vm"] = LaunchFailed("QEMU", ["qemu-system-x86_64", "-nodefaults"],
                                           "warning: x\ncould not open disk.qcow2\n", 1)
    app = SecVFApp(watch=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "web" in table_of(app).rows, "the VM listed")
        await pilot.press("s")
        await until(pilot, lambda: bool(app._notifications), "a notification")
        [note] = list(app._notifications)
        assert note.message == "QEMU failed to start (exit 1): could not open disk.qcow2"
        assert note.severity == "error"
        assert "Traceback" not in screen_text(app)
        assert app.is_running
        assert table_of(app).rows["web"].state == "stopped"


async def test_delete_asks_first_and_cancel_keeps_the_vm(fake: FakeAPI) -> None:
    fake.add("web", state="running", snapshots=["clean", "before-update"])
    app = SecVFApp(watch=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "web" in table_of(app).rows, "the VM listed")
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the modal")
        text = screen_text(app)
        assert "Delete VM web?" in text
        assert "clean, before-update" in text  # names what will be lost
        assert "force-stopped first" in text
        await pilot.press("n")
        await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), "closed")
        await pilot.press("enter")  # Enter alone on the modal would have chosen Cancel
        assert fake.called("delete_vm") == []
        assert "web" in table_of(app).rows


async def test_delete_confirmed_deletes_and_removes_the_row(fake: FakeAPI) -> None:
    fake.add("web")
    fake.add("db")
    app = SecVFApp(watch=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: len(table_of(app).rows) == 2, "two VMs")
        table_of(app).table.move_cursor(row=table_of(app).table.get_row_index("web"))
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the modal")
        await pilot.press("y")
        await until(pilot, lambda: "web" not in table_of(app).rows, "the row gone")
        assert fake.called("delete_vm") == [(("web",), {"force": True})]
        assert set(table_of(app).rows) == {"db"}


async def test_a_stop_shows_its_progress_and_esc_forces_it(fake: FakeAPI) -> None:
    fake.add("web", state="running")
    fake.gates["stop_vm"] = gate = threading.Event()
    app = SecVFApp(watch=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "web" in table_of(app).rows, "the VM listed")
        await pilot.press("t")
        await until(pilot, lambda: "until forced" in screen_text(app), "the countdown")
        assert "stopping web" in screen_text(app)
        await pilot.press("escape")
        await until(pilot, lambda: len(fake.called("stop_vm")) == 2, "a forced stop")
        assert [kw["force"] for _, kw in fake.called("stop_vm")] == [False, True]
        gate.set()
        await until(pilot, lambda: table_of(app).rows["web"].state == "stopped", "stopped")
        await until(pilot, lambda: not app.action_bar.busy, "the bar gone")


async def test_pause_and_resume_follow_the_state(fake: FakeAPI) -> None:
    fake.add("web", state="running")
    app = SecVFApp(watch=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "web" in table_of(app).rows, "the VM listed")
        await pilot.press("p")
        await until(pilot, lambda: table_of(app).rows["web"].state == "paused", "paused")
        await pilot.press("p")
        await until(pilot, lambda: table_of(app).rows["web"].state == "running", "resumed")
        assert [c for c, _, _ in fake.calls if c.endswith("_vm")] == ["pause_vm", "resume_vm"]


async def test_help_lists_the_keys_of_the_area(fake: FakeAPI) -> None:
    app = SecVFApp(watch=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        await until(pilot, lambda: "Keys (Esc closes)" in screen_text(app), "the help")
        text = screen_text(app)
        assert "Force stop" in text and "Snapshot" in text
