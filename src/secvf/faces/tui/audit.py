"""The Audit area: the channel inventory of every VM (what ``secvf audit`` shows), with
findings in red."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from secvf import api
from secvf.faces.tui import data

if TYPE_CHECKING:
    from secvf.faces.tui.app import SecVFApp


def audit_cells(res: dict[str, Any]) -> tuple[Any, ...]:
    """One VM's row: name, kind, state, channels, exec socket, shares, findings."""
    chans = ", ".join(sorted({str(d.get("channel")) for d in res["channel_devices"]}))
    sock = res["exec_socket"]["mode"] if res["exec_socket"] else "-"
    shares = ", ".join(f"{s['host_path']} ({s['mode']})" for s in res["shares"]) or "-"
    findings = "; ".join(res["findings"])
    return (res["name"], res["kind"], res["state"], f"{chans or 'none'} [{res['source']}]",
            sock, shares, Text(data.clean(findings), style="bold red") if findings
            else Text("none", style="green"))


class AuditPane(Vertical):
    """The Audit area (read when first shown, and on ``ctrl+r``)."""

    BINDINGS = [Binding("ctrl+r", "reload", "Re-audit")]

    @property
    def tui(self) -> SecVFApp:
        """The app (typed)."""
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        """Summary line and table."""
        yield Static("", id="audit-summary", markup=False)
        table: DataTable[Any] = DataTable(cursor_type="row")
        table.add_columns("VM", "KIND", "STATE", "CHANNELS", "EXEC SOCKET", "SHARES",
                          "FINDINGS")
        yield table
        yield Static("ctrl+r audit again", classes="hint", markup=False)

    def on_mount(self) -> None:
        """First audit."""
        self.action_reload()

    def action_reload(self) -> None:
        """Audit every VM (worker thread)."""
        self.tui.call_api(api.audit, done=self.show, group="audit", exclusive=True)

    def show(self, result: dict[str, Any]) -> None:
        """Fill the table; findings in red."""
        table = self.query_one(DataTable)
        table.clear()
        for res in result["vms"]:
            table.add_row(*data.plain(*audit_cells(res)), key=res["name"])
        summary = self.query_one("#audit-summary", Static)
        count = result["finding_count"]
        stray = "; ".join(result["stray"])
        summary.update(Text(f"{count} finding(s)" + (f": {stray}" if stray else ""),
                            style="bold red") if count
                       else Text(f"{len(result['vms'])} VM(s), no findings", style="green"))
