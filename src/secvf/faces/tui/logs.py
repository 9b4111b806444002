"""The Logs area: the security, exec and MCP logs with severity, VM and event filters,
and follow mode (new records as they are written; the view keeps the last
:data:`LOG_LINES`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Input, RichLog, Static
from textual.worker import get_current_worker

from secvf import api
from secvf.faces.tui import data

if TYPE_CHECKING:
    from secvf.faces.tui.app import SecVFApp

#: Records the view keeps; also how many it reads back when a filter changes.
LOG_LINES = 1000

SEVERITY_STYLES = {"INFO": "", "WARNING": "yellow", "ERROR": "bold red",
                   "CRITICAL": "bold red reverse"}

#: Fields every record has (shown in the line's head, not repeated in its tail).
COMMON = {"time", "severity", "event", "vm", "vm_id", "pid", "uid", "seq", "prev", "hash"}


def record_line(record: dict[str, Any]) -> Text:
    """One record as one line: time, severity, event, VM, then its own fields."""
    severity = str(record.get("severity", "INFO"))
    text = Text(f"{str(record.get('time', ''))[:23]} ", style="dim")
    text.append(f"{severity:<8} ", style=SEVERITY_STYLES.get(severity, ""))
    text.append(f"{record.get('event')} ", style="bold")
    if record.get("vm"):
        text.append(f"vm={record['vm']} ")
    rest = " ".join(f"{k}={v}" for k, v in record.items() if k not in COMMON)
    text.append(data.clean(rest)[:400])
    return text


def parse_filter(text: str) -> dict[str, str]:
    """``vm=web event=vm_started`` (either may be missing) as keyword arguments;
    a bare word is a VM name."""
    out: dict[str, str] = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if not sep:
            key, value = "vm", word
        if key in ("vm", "event") and value:
            out[key] = value
    return out


class LogsPane(Vertical):
    """The Logs area."""

    BINDINGS = [Binding("w", "stream", "Next stream"),
                Binding("v", "severity", "Min severity"),
                Binding("f", "follow", "Follow on/off"),
                Binding("slash", "filter", "vm=/event=", key_display="/")]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.stream = api.LOG_STREAMS[0]
        self.severity = api.LOG_SEVERITIES[0]
        self.filters: dict[str, str] = {}
        self.following = True
        self.generation = 0

    @property
    def tui(self) -> SecVFApp:
        """The app (typed)."""
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        """What is shown, the filter line, the log."""
        yield Static("", id="logs-state", markup=False)
        yield Input(placeholder="vm=NAME event=NAME (Enter applies)", classes="filter",
                    id="logs-filter")
        yield RichLog(max_lines=LOG_LINES, wrap=False, markup=False, id="log-view")

    def on_mount(self) -> None:
        """Read (and follow) the security log."""
        self.restart()

    def describe(self) -> str:
        """The state line."""
        filters = " ".join(f"{k}={v}" for k, v in self.filters.items()) or "no filter"
        follow = "following" if self.following else "not following"
        return (f"{self.stream} · {self.severity}+ · {filters} · {follow}  "
                "(w stream, v severity, / filter, f follow)")

    def restart(self) -> None:
        """Read the newest records that match, then (following) the new ones."""
        self.generation += 1
        self.tui.workers.cancel_group(self.tui, "logs")
        self.query_one(RichLog).clear()
        self.query_one("#logs-state", Static).update(self.describe())
        generation = self.generation
        self.tui.call_api(lambda: self._read(generation), group="logs")

    def _read(self, generation: int) -> None:
        worker = get_current_worker()
        vm, event = self.filters.get("vm"), self.filters.get("event")
        records = api.query_logs(self.stream, limit=LOG_LINES, severity=self.severity,
                                 vm=vm, event=event)
        self.tui.call_from_thread(self._write, generation, records)
        if not self.following:
            return
        for record in api.watch_logs(self.stream, stop=lambda: worker.is_cancelled,
                                     severity=self.severity, vm=vm, event=event):
            self.tui.call_from_thread(self._write, generation, [record])

    def _write(self, generation: int, records: list[dict[str, Any]]) -> None:
        if generation != self.generation:
            return  # a filter changed meanwhile
        log = self.query_one(RichLog)
        for record in records:
            log.write(record_line(record))

    def action_stream(self) -> None:
        """The next stream (security → exec → mcp)."""
        streams = api.LOG_STREAMS
        self.stream = streams[(streams.index(self.stream) + 1) % len(streams)]
        self.restart()

    def action_severity(self) -> None:
        """The next minimum severity."""
        levels = api.LOG_SEVERITIES
        self.severity = levels[(levels.index(self.severity) + 1) % len(levels)]
        self.restart()

    def action_follow(self) -> None:
        """Follow new records, or show what is there and stop."""
        self.following = not self.following
        self.restart()

    def action_filter(self) -> None:
        """``/``: type ``vm=`` and ``event=`` filters."""
        box = self.query_one(Input)
        box.add_class("shown")
        box.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """Apply the filters."""
        self.filters = parse_filter(event.value)
        if not event.value:
            event.input.remove_class("shown")
        self.query_one(RichLog).focus()
        self.restart()
