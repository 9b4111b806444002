"""A VM's details (its live device tree with the channels marked, exec socket, shares,
snapshots, last run, device errors, and for a VM that must have none the proof that it
has no channel) and its serial log, followed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, RichLog, Static
from textual.worker import get_current_worker

from secvf import api
from secvf.faces.tui import data

if TYPE_CHECKING:
    from secvf.faces.tui.app import SecVFApp

#: Lines of serial output the log view keeps (older ones scroll away).
SERIAL_LINES = 2000


def details_text(status: dict[str, Any], shares: list[dict[str, Any]],
                 snapshots: list[str]) -> Text:
    """The details of one VM as styled text."""
    text = Text()

    def line(label: str, value: object, style: str = "") -> None:
        text.append(f"{label:<13}", style="bold")
        text.append(f"{value}\n", style=style)

    line("name", f"{status['name']}  ({status['kind']}, {status['id']})")
    line("state", status["state"], data.STATE_STYLES.get(status["state"], ""))
    line("accel", f"{status.get('accel') or '-'}"
         + (f"  ({status['accel_reason']})" if status.get("accel_reason") else ""))
    line("cpus/memory", f"{status['cpus']} / {data.memory(status['memory_mib'])}")
    line("uptime", data.uptime(status.get("uptime_s")))
    line("network", status.get("network") or "none")
    line("exec socket", status.get("exec_socket") or "none",
         "bold magenta" if status.get("exec_socket") else "")
    line("shares", ", ".join(f"{s['host_path']} → {s['guest_path']} "
                             f"({'ro' if s['read_only'] else 'rw'})" for s in shares) or "none")
    line("snapshots", ", ".join(snapshots) or "none")
    if status.get("restored_from"):
        line("restored from", status["restored_from"])
    last = status.get("last_run")
    if last:
        line("last run", f"{last['state']} at {last['ended_at']}: {data.clean(last['reason'])}",
             "red" if last["state"] == "crashed" else "")
    for error in status.get("device_errors") or []:
        line("device error", data.clean(error), "bold red")
    proof = data.channel_proof(status)
    if proof:
        line("channels", proof, "bold red" if proof.startswith("FINDING") else "green")
    text.append("\nlive device tree\n", style="bold underline")
    devices = data.device_lines(status)
    if not devices:
        text.append("  (not running: no live devices)\n", style="dim")
    for entry, is_channel in devices:
        text.append(f"  {entry}\n", style="bold magenta reverse" if is_channel else "")
    return text


class DetailsScreen(Screen[None]):
    """One VM in full; re-read when an event says it changed (it may crash while shown)."""

    BINDINGS = [Binding("escape,q", "app.pop_screen", "Back"),
                Binding("l", "serial_log", "Serial log"),
                Binding("ctrl+r", "reload", "Reload")]

    def __init__(self, name: str) -> None:
        super().__init__()
        self.vm_name = name
        self.status: dict[str, Any] = {}

    @property
    def tui(self) -> SecVFApp:
        """The app (typed)."""
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        """Header, the details, footer."""
        yield Header(show_clock=False)
        with VerticalScroll():
            yield Static(f"loading {self.vm_name}…", id="details", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        """First read."""
        self.sub_title = self.vm_name
        self.action_reload()

    def action_reload(self) -> None:
        """Read the VM's status, config shares and snapshots (worker thread)."""
        def load() -> Text:
            status = api.vm_status(self.vm_name)
            config = api.get_vm(self.vm_name)
            shares = ([s.model_dump() for s in config.channels.shares]
                      if config.channels else [])
            self.status = status
            return details_text(status, shares, list(status.get("snapshots") or []))
        self.tui.call_api(load, done=self.query_one("#details", Static).update,
                          group="details", exclusive=True)

    def vms_changed(self, names: list[str] | None) -> None:
        """A change event: re-read if it may be this VM."""
        if names is None or self.vm_name in names:
            self.action_reload()

    def action_serial_log(self) -> None:
        """This VM's serial log."""
        self.tui.push_screen(SerialLogScreen(self.vm_name))


class SerialLogScreen(Screen[None]):
    """A VM's serial log: the tail, then what the guest writes (bounded, untrusted
    text cleaned of control characters)."""

    BINDINGS = [Binding("escape,q", "app.pop_screen", "Back"),
                Binding("f", "toggle_follow", "Follow on/off")]

    def __init__(self, name: str) -> None:
        super().__init__()
        self.vm_name = name
        self.follow = True

    @property
    def tui(self) -> SecVFApp:
        """The app (typed)."""
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        """The log."""
        yield Header(show_clock=False)
        yield RichLog(max_lines=SERIAL_LINES, wrap=True, markup=False, id="serial")
        yield Footer()

    def on_mount(self) -> None:
        """Start following."""
        self.sub_title = f"{self.vm_name}: serial log (following)"
        self.tui.call_api(self._follow, group=f"serial-{id(self)}")

    def _follow(self) -> None:
        worker = get_current_worker()
        log = self.query_one(RichLog)
        lines = data.LineSplitter()
        for chunk in api.watch_serial_log(self.vm_name, stop=lambda: worker.is_cancelled):
            for line in lines.feed(chunk):
                self.tui.call_from_thread(log.write, line)
        for line in lines.flush():
            self.tui.call_from_thread(log.write, line)
        self.tui.call_from_thread(self._ended)

    def _ended(self) -> None:
        self.sub_title = f"{self.vm_name}: serial log (run over)"

    def action_toggle_follow(self) -> None:
        """Keep the view at the end, or let it stay where it is."""
        self.follow = not self.follow
        self.query_one(RichLog).auto_scroll = self.follow

    def on_unmount(self) -> None:
        """Stop following."""
        self.tui.workers.cancel_group(self.tui, f"serial-{id(self)}")
