"""The VMs area: a live table of every VM, filtered by typing after ``/``, with the
single-key actions of k9s-style tools (start, stop, pause, delete, snapshot, console,
serial log) and Enter for a VM's details."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import DataTable, Input, Static

from secvf import api
from secvf.faces.tui import data
from secvf.faces.tui.data import STATE_STYLES, VMRow
from secvf.faces.tui.widgets import ConfirmScreen, PromptScreen

if TYPE_CHECKING:
    from secvf.faces.tui.app import SecVFApp

COLUMNS = ("NAME", "KIND", "STATE", "ACCEL", "CPU/RAM", "UPTIME", "CHANNELS")
#: How long a graceful stop from the TUI waits before it forces (as ``vm stop``).
STOP_TIMEOUT_S = 30.0


def state_cell(state: str) -> Text:
    """A state, styled (colour is dropped under NO_COLOR; bold/dim stay)."""
    return Text(state, style=STATE_STYLES.get(state, ""))


class VMTable(Vertical):
    """A filterable table of VM rows keyed by name, shared by the VMs and Sandboxes
    areas; ``load`` reads every row, ``load_one`` one (both in worker threads)."""

    def __init__(self, *, load: Callable[[], list[VMRow]], id: str | None = None) -> None:
        super().__init__(id=id)
        self.load = load
        self.rows: dict[str, VMRow] = {}
        self.filter_text = ""

    @property
    def tui(self) -> SecVFApp:
        """The app (typed)."""
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        """The filter line (hidden until ``/``) and the table."""
        yield Input(placeholder="filter: words in name, kind, state, channels",
                    classes="filter", id=f"{self.id}-filter")
        table: DataTable[Any] = DataTable(cursor_type="row", zebra_stripes=True)
        table.add_columns(*COLUMNS)
        yield table

    def on_mount(self) -> None:
        """First load, and the uptime clock (local: no API call)."""
        self.reload()
        self.set_interval(1.0, self.tick)

    @property
    def table(self) -> DataTable[Any]:
        """The table widget."""
        return self.query_one(DataTable)

    def reload(self) -> None:
        """Read every row again (worker thread)."""
        self.tui.call_api(self.load, done=self.show_rows, group=f"{self.id}-load",
                          exclusive=True)

    def reload_names(self, names: list[str]) -> None:
        """Read the rows of ``names`` again (worker thread)."""
        def load() -> list[tuple[str, VMRow | None]]:
            return [(name, data.row_for(name)) for name in names]
        self.tui.call_api(load, done=self.update_rows)

    def show_rows(self, rows: list[VMRow]) -> None:
        """Replace every row."""
        self.rows = {row.name: row for row in rows}
        self.render_rows()

    def update_rows(self, updates: list[tuple[str, VMRow | None]]) -> None:
        """Replace some rows (None: that VM is gone)."""
        for name, row in updates:
            if row is None:
                self.rows.pop(name, None)
            elif self.accepts(row):
                self.rows[name] = row
        self.render_rows()

    def accepts(self, row: VMRow) -> bool:
        """Whether this table lists ``row`` (the Sandboxes table: only sandboxes)."""
        return True

    def render_rows(self) -> None:
        """Draw the rows that pass the filter, keeping the cursor on the same VM."""
        table = self.table
        current = self.selected_name()
        shown = [row for name, row in sorted(self.rows.items())
                 if row.matches(self.filter_text)]
        table.clear()
        now = data.clock()
        for row in shown:
            cells = list(row.cells(now))
            table.add_row(*data.plain(cells[0], cells[1], state_cell(row.state), *cells[3:]),
                          key=row.name)
        if current in {row.name for row in shown}:
            table.move_cursor(row=table.get_row_index(current))

    def tick(self) -> None:
        """Count the uptime of live VMs on, once a second."""
        table = self.table
        now = data.clock()
        for name, row in self.rows.items():
            if row.state in ("running", "paused", "stopping") and name in table.rows:
                table.update_cell(name, table.ordered_columns[5].key,
                                  Text(data.uptime(row.uptime_now(now))))

    def selected_name(self) -> str | None:
        """The VM under the cursor."""
        table = self.table
        if table.row_count == 0:
            return None
        try:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        except Exception:  # noqa: BLE001 - no valid cursor
            return None
        return None if key.value is None else str(key.value)

    def selected(self) -> VMRow | None:
        """The row under the cursor."""
        name = self.selected_name()
        return None if name is None else self.rows.get(name)

    # ---- filtering ----------------------------------------------------------------

    def open_filter(self) -> None:
        """``/``: show the filter line and type into it."""
        box = self.query_one(Input)
        box.add_class("shown")
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        """Filter as you type."""
        self.filter_text = event.value
        self.render_rows()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """Enter: back to the table, the filter kept."""
        if not event.value:
            event.input.remove_class("shown")
        self.table.focus()

    def clear_filter(self) -> None:
        """Drop the filter."""
        box = self.query_one(Input)
        box.value = ""
        box.remove_class("shown")
        self.filter_text = ""
        self.render_rows()
        self.table.focus()

    def vms_changed(self, names: list[str] | None) -> None:
        """A change event: re-read those rows (or all)."""
        if names is None:
            self.reload()
        else:
            self.reload_names(names)


class VMActions(Vertical):
    """The keys and actions on the selected VM, shared by the VMs and Sandboxes areas."""

    BINDINGS = [
        Binding("enter", "details", "Details"),
        Binding("slash", "filter", "Filter", key_display="/"),
        Binding("s", "start", "Start"),
        Binding("t", "stop", "Stop"),
        Binding("T", "stop(True)", "Force stop", show=False),
        Binding("p", "pause", "Pause/resume"),
        Binding("d", "delete", "Delete"),
        Binding("n", "snapshot", "Snapshot", show=False),
        Binding("r", "revert", "Revert", show=False),
        Binding("c", "console", "Console"),
        Binding("l", "serial_log", "Log", show=False),
        Binding("ctrl+r", "reload", "Reload", show=False),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    @property
    def tui(self) -> SecVFApp:
        """The app (typed)."""
        return self.app  # type: ignore[return-value]

    @property
    def vm_table(self) -> VMTable:
        """The table of this area."""
        return self.query_one(VMTable)

    def vms_changed(self, names: list[str] | None) -> None:
        """Pass a change on to the table."""
        self.vm_table.vms_changed(names)

    def target(self) -> VMRow | None:
        """The selected VM, or a note that there is none."""
        row = self.vm_table.selected()
        if row is None:
            self.tui.notify("no VM selected", severity="warning", timeout=3)
        return row

    def refresh_vm(self, name: str) -> Callable[[Any], None]:
        """A ``done`` that re-reads VM ``name``'s row."""
        return lambda _result: self.vm_table.reload_names([name])

    def action_filter(self) -> None:
        """``/``."""
        self.vm_table.open_filter()

    def action_clear_filter(self) -> None:
        """Esc in the table: drop the filter, or cancel a long action."""
        if self.vm_table.filter_text:
            self.vm_table.clear_filter()
        else:
            self.tui.action_cancel_action()

    def action_reload(self) -> None:
        """Ctrl-R: read every VM again."""
        self.vm_table.reload()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter on a row: its details."""
        event.stop()
        self.action_details()

    def action_details(self) -> None:
        """Enter: the selected VM's details."""
        from secvf.faces.tui.details import DetailsScreen

        if (row := self.target()) is not None:
            self.tui.push_screen(DetailsScreen(row.name))

    def action_start(self) -> None:
        """Start the selected VM; Esc while it starts: stop it again once it runs."""
        if (row := self.target()) is None:
            return
        cancelled: list[bool] = []

        def start() -> Any:
            result = self.start_call(row)()
            if cancelled:
                api.stop_vm(row.name, force=True)
                return None
            return result
        self.tui.call_api(start, done=self.refresh_vm(row.name), label=f"starting {row.name}",
                          cancel=lambda: cancelled.append(True),
                          failed=self.refresh_vm(row.name))

    def start_call(self, row: VMRow) -> Callable[[], Any]:
        """What starting ``row`` calls (a sandbox waits for its agent)."""
        return partial(api.start_vm, row.name)

    def action_stop(self, force: bool = False) -> None:
        """Stop the selected VM (``T``: forced); Esc during a graceful stop forces it."""
        if (row := self.target()) is None:
            return
        self.stop(row.name, force=force)

    def stop(self, name: str, *, force: bool) -> None:
        """Stop VM ``name``, showing the time left before the stop is forced."""
        def listen(event: Any) -> None:
            if isinstance(event, api.StopWaiting):
                self.tui.report_progress(f"{event.left_s:.0f} s until forced",
                                         event.timeout_s - event.left_s, event.timeout_s)

        def stop() -> Any:
            return api.stop_vm(name, force=force, timeout=STOP_TIMEOUT_S, progress=listen)
        verb = "force-stopping" if force else "stopping"
        self.tui.call_api(stop, done=self.refresh_vm(name), label=f"{verb} {name}",
                          cancel=None if force else partial(api.stop_vm, name, force=True),
                          failed=self.refresh_vm(name))

    def action_pause(self) -> None:
        """Pause a running VM, resume a paused one."""
        if (row := self.target()) is None:
            return
        call = api.resume_vm if row.state == "paused" else api.pause_vm
        self.tui.call_api(partial(call, row.name), done=self.refresh_vm(row.name))

    def action_delete(self) -> None:
        """Delete the selected VM, after a confirmation naming what goes with it."""
        if (row := self.target()) is None:
            return
        self.tui.call_api(partial(self.losses, row), done=partial(self.confirm_delete, row))

    def losses(self, row: VMRow) -> list[str]:
        """What deleting ``row`` loses (worker thread: it reads the snapshots)."""
        lost = ["its disk and everything written to it since it was created",
                "its serial and run logs"]
        snaps = row.status.get("snapshots") or []
        if snaps:
            lost.append(f"{len(snaps)} snapshot(s): {', '.join(snaps)}")
        if row.state in ("running", "paused", "starting"):
            lost.insert(0, f"the running guest ({row.state}): it is force-stopped first, "
                           "unsaved work in it is lost")
        return lost

    def confirm_delete(self, row: VMRow, lost: list[str]) -> None:
        """Ask, then delete."""
        def answered(yes: bool | None) -> None:
            if yes:
                self.tui.call_api(self.delete_call(row), label=f"deleting {row.name}",
                                  done=lambda _r: self.vm_table.update_rows([(row.name, None)]))
        self.tui.push_screen(ConfirmScreen(f"Delete VM {row.name}?", lost), answered)

    def delete_call(self, row: VMRow) -> Callable[[], Any]:
        """What deleting ``row`` calls."""
        return partial(api.delete_vm, row.name, force=True)

    def action_snapshot(self) -> None:
        """Take a snapshot of the selected VM (asks for its name)."""
        if (row := self.target()) is None:
            return

        def named(snapshot: str | None) -> None:
            if snapshot:
                self.tui.call_api(partial(api.create_snapshot, row.name, snapshot),
                                  label=f"snapshot {snapshot} of {row.name}",
                                  done=lambda info: self.tui.notify(
                                      f"snapshot {info.name} of {row.name} taken"))
        self.tui.push_screen(PromptScreen(f"Snapshot name for {row.name}:"), named)

    def action_revert(self) -> None:
        """Revert the selected VM to a snapshot (asks which, then confirms)."""
        if (row := self.target()) is None:
            return
        snaps = row.status.get("snapshots") or []
        if not snaps:
            self.tui.notify(f"VM {row.name} has no snapshots (n takes one)", timeout=4)
            return

        def named(snapshot: str | None) -> None:
            if not snapshot:
                return
            lost = [f"the current state of {row.name}: its disk since {snapshot!r}"
                    + (" and its running guest" if row.state == "running" else "")]
            self.tui.push_screen(ConfirmScreen(f"Revert {row.name} to {snapshot}?", lost,
                                               verb="Revert"),
                                 partial(self.revert, row.name, snapshot))
        self.tui.push_screen(PromptScreen(f"Revert {row.name} to (one of: {', '.join(snaps)}):",
                                          value=snaps[-1]), named)

    def revert(self, name: str, snapshot: str, yes: bool | None = True) -> None:
        """Revert VM ``name`` to ``snapshot`` (once confirmed: ``yes``)."""
        if not yes:
            return
        self.tui.call_api(partial(api.revert_snapshot, name, snapshot),
                          label=f"reverting {name} to {snapshot}", done=self.refresh_vm(name))

    def action_console(self) -> None:
        """Hand the terminal to the serial console (Ctrl-] comes back); a malware-analysis
        VM's console is output-only, so its log is shown instead."""
        if (row := self.target()) is None:
            return
        if row.kind == "malware-analysis":
            self.action_serial_log()
            return
        if row.state != "running":
            self.tui.notify(f"VM {row.name} is {row.state}; start it first (s)",
                            severity="warning", timeout=4)
            return
        self.tui.suspend_for(partial(api.attach_console, row.name))

    def action_serial_log(self) -> None:
        """The serial log of the selected VM, followed while its run lasts."""
        from secvf.faces.tui.details import SerialLogScreen

        if (row := self.target()) is not None:
            self.tui.push_screen(SerialLogScreen(row.name))


class VMsPane(VMActions):
    """The VMs area."""

    def compose(self) -> ComposeResult:
        """The table and a line of hints."""
        yield VMTable(load=data.all_rows, id="vm-table")
        yield Static("enter details · T force stop · n snapshot · r revert · l serial log · "
                     "? all keys", classes="hint", markup=False)
