"""The Analyses area: every detonation's result (running ones first in mind: their
state updates on reload), the selected report's summary (network, processes, files),
and ``o`` to open its HTML report."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from secvf import api
from secvf.faces.tui import data

if TYPE_CHECKING:
    from pathlib import Path

    from secvf.faces.tui.app import SecVFApp

#: Seconds between re-reads while an analysis runs and the area is shown.
RUNNING_S = 3.0

VERDICT_STYLES = {"finished": "green", "timeout": "yellow", "guest-stopped": "yellow",
                  "failed": "bold red", "interrupted": "red"}


def summary_text(report: dict[str, Any]) -> Text:
    """A report's summary: sample, verdict and stages, processes, files, network."""
    text = Text()
    sample = report.get("sample") or {}
    text.append(f"{sample.get('name') or report.get('sample_name') or '?'}", style="bold")
    text.append(f"  {sample.get('file_type', '')}  sha256 "
                f"{sample.get('sha256') or report.get('sample_sha256') or '-'}\n")
    verdict = report.get("verdict") or report.get("state") or "?"
    text.append(f"verdict: {verdict}", style=VERDICT_STYLES.get(verdict, ""))
    if report.get("error"):
        text.append(f"  {data.clean(str(report['error']))}", style="red")
    stages = report.get("stages_s") or {}
    if stages:
        text.append("  stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in stages.items()))
    text.append("\n")
    run = report.get("run") or {}
    if run:
        text.append(f"run: {run.get('outcome')} exit {run.get('exit_code')}"
                    f" signal {run.get('exit_signal')}\n")
    if "process_count" in report:
        text.append(f"processes: {report['process_count']}\n")
    files = report.get("files") or {}
    if files:
        text.append("files: " + ", ".join(f"{k} {len(v) if isinstance(v, list) else v}"
                                          for k, v in files.items()) + "\n")
    net = report.get("network")
    if isinstance(net, dict):
        text.append("network: " + ", ".join(
            f"{k} {len(v) if isinstance(v, list) else v}" for k, v in net.items()
            if k in ("dns", "http", "tls", "flows", "hosts")) + "\n")
    elif "network" in report and report.get("schema_version"):
        text.append("network: none captured\n", style="dim")
    for note in (report.get("notes") or [])[:3]:
        text.append(f"note: {data.clean(str(note))}\n", style="italic")
    return text


class AnalysesPane(Vertical):
    """The Analyses area."""

    BINDINGS = [Binding("o", "open_report", "Open report"),
                Binding("ctrl+r", "reload", "Reload")]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.rows: list[dict[str, Any]] = []

    @property
    def tui(self) -> SecVFApp:
        """The app (typed)."""
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        """Table and summary."""
        table: DataTable[Any] = DataTable(cursor_type="row")
        table.add_columns("ID", "STATE", "VERDICT", "SAMPLE", "NETWORK", "STARTED")
        yield table
        yield Static("", classes="detail", id="analysis-detail")
        yield Static("o open the HTML report · ctrl+r reload", classes="hint", markup=False)

    def on_mount(self) -> None:
        """List them; follow the running ones."""
        self.action_reload()
        self.set_interval(RUNNING_S, self._follow_running)

    def _follow_running(self) -> None:
        if any(row.get("running") for row in self.rows) and self.region.area > 0:
            self.action_reload()

    def action_reload(self) -> None:
        """Read the results again."""
        self.tui.call_api(api.list_analyses, done=self.show_rows, group="analyses",
                          exclusive=True)

    def show_rows(self, rows: list[dict[str, Any]]) -> None:
        """Fill the table."""
        self.rows = rows
        table = self.query_one(DataTable)
        table.clear()
        for row in rows:
            state = "running" if row.get("running") else (row.get("state") or "?")
            verdict = row.get("verdict") or "-"
            table.add_row(*data.plain(row["id"][:12], state,
                                      Text(verdict, VERDICT_STYLES.get(verdict, "")),
                                      data.clean(row.get("sample_name") or "-"),
                                      row.get("network") or "-",
                                      (row.get("started_at") or "-")[:19]), key=row["id"])
        if not rows:
            self.query_one("#analysis-detail", Static).update(
                "no analyses yet (secvf analyze SAMPLE)")

    def selected(self) -> str | None:
        """The highlighted analysis id."""
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return None if key is None else str(key)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        """Show the highlighted report's summary."""
        if event.row_key.value is None:
            return
        self.tui.call_api(partial(api.show_analysis, str(event.row_key.value)),
                          group="analysis-show", exclusive=True,
                          done=lambda report: self.query_one(
                              "#analysis-detail", Static).update(summary_text(report)))

    def action_open_report(self) -> None:
        """Open ``report.html`` in a browser (its path is shown as well)."""
        if (analysis := self.selected()) is None:
            return

        def opened(directory: Path) -> None:
            report = directory / "report.html"
            if not report.exists():
                self.tui.notify(f"no HTML report in {directory} (yet)", severity="warning")
                return
            self.tui.open_url(report.as_uri())
            self.tui.notify(f"report: {report}", timeout=8)
        self.tui.call_api(partial(api.analysis_dir, analysis), done=opened)
