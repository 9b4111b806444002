"""``secvf tui`` over real VMs, driven by Textual's headless pilot: start a VM from the
table and watch its state change (through the security log's events), stop it; run a
command in a running sandbox from the exec pane and see its output and exit code."""

from __future__ import annotations

import pytest

pytest.importorskip("textual")

from secvf.faces.tui.app import SecVFApp  # noqa: E402
from secvf.faces.tui.exec_pane import ExecScreen  # noqa: E402
from tests.integration.conftest import VMFactory  # noqa: E402
from tests.unit.tui_fakes import anyio_backend, screen_text, until  # noqa: E402,F401

pytestmark = [pytest.mark.vm, pytest.mark.anyio]
#: Pilot pauses (0.02 s each) a real start, stop or exec may take under TCG at most.
BOOT_PAUSES = 9000


async def test_start_stop_and_exec_from_the_tui(vm_factory: VMFactory,
                                               fleet: dict[str, dict]) -> None:
    name = vm_factory.vm("tuivm", "--memory", "512M")
    app = SecVFApp()
    async with app.run_test(size=(100, 30)) as pilot:
        table = app.query_one("#vm-table")
        await until(pilot, lambda: name in table.rows, "the VM listed")  # type: ignore[attr-defined]
        assert table.rows[name].state == "stopped"  # type: ignore[attr-defined]
        table.table.move_cursor(row=table.table.get_row_index(name))  # type: ignore[attr-defined]
        await pilot.press("s")
        await until(pilot, lambda: table.rows[name].state == "running",  # type: ignore[attr-defined]
                    "the VM running", BOOT_PAUSES)
        await pilot.press("t")  # a graceful stop (forced after 30 s); the table follows it
        await until(pilot, lambda: table.rows[name].state == "stopped",  # type: ignore[attr-defined]
                    "the VM stopped", BOOT_PAUSES)
        assert not app._notifications or all(
            n.severity != "error" for n in app._notifications)

        await pilot.press("2")
        sandboxes = app.query_one("#sandbox-table")
        await until(pilot, lambda: "sbx" in sandboxes.rows, "the sandbox listed")  # type: ignore[attr-defined]
        sandboxes.table.move_cursor(row=sandboxes.table.get_row_index("sbx"))  # type: ignore[attr-defined]
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, ExecScreen), "the exec pane")
        await pilot.press(*"echo tui-$((6*7)); echo err >&2; exit 4", "enter")
        await until(pilot, lambda: "exit 4 in" in screen_text(app), "the exit line",
                    BOOT_PAUSES)
        text = screen_text(app)
        assert "tui-42" in text and "err" in text
