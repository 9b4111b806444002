"""The Networks area: every isolated network; for the selected one its NICs with live
counters and drops by reason (re-read every :data:`COUNTERS_S` while the area is shown:
the switch keeps counters, it sends no events), a capture to start and stop, and the
packet view of its ring with the filter language and presets."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Static
from textual.worker import get_current_worker

from secvf import api
from secvf.faces.tui import data

if TYPE_CHECKING:
    from secvf.faces.tui.app import SecVFApp

#: Seconds between reads of the shown network's counters.
COUNTERS_S = 2.0
#: Packets the packet view decodes from the ring at most.
PACKET_LIMIT = 1000


def network_text(shown: dict[str, Any], capture: dict[str, Any] | None) -> Text:
    """The selected network: switch, NICs and counters, drops, the capture."""
    text = Text()
    text.append(f"{shown['name']}  {shown.get('subnet')}  switch {shown['switch']}",
                style="bold")
    if shown.get("switch_pid"):
        text.append(f" (pid {shown['switch_pid']})")
    text.append(f"\ndrops: {data.drop_text(shown.get('drops') or {})}\n")
    for nic in shown.get("nics", []):
        c = nic["counters"]
        state = "up" if nic["attached"] else ("vm running" if nic["vm_running"] else "down")
        text.append(f"  {nic['vm']:<16} {nic['mac']} {nic.get('address') or '-':<16} {state:<10}"
                    f" rx {c['rx']} tx {c['tx']}  learned {'yes' if nic['learned'] else 'no'}"
                    f"  drops {data.drop_text(c.get('drops') or {})}\n",
                    style="" if nic["attached"] else "dim")
    if not shown.get("nics"):
        text.append("  no NICs on it\n", style="dim")
    if capture is not None:
        text.append(f"capture: {capture['frames']} frames, {capture['bytes']} bytes → "
                    f"{', '.join(capture['files']) or '…'} ({capture['ended']})\n",
                    style="bold yellow")
    return text


class NetworksPane(Vertical):
    """The Networks area."""

    BINDINGS = [Binding("c", "capture", "Capture on/off"),
                Binding("v", "packets", "Packets"),
                Binding("ctrl+r", "reload", "Reload", show=False)]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.shown: str | None = None
        self.capturing: dict[str, dict[str, Any]] = {}  # network -> last progress
        self.stop_capture: set[str] = set()

    @property
    def tui(self) -> SecVFApp:
        """The app (typed)."""
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        """The network table and the selected network."""
        table: DataTable[Any] = DataTable(cursor_type="row")
        table.add_columns("NAME", "SUBNET", "SWITCH", "PORTS", "VMS")
        yield table
        yield Static("", classes="detail", id="network-detail")
        yield Static("c capture on/off · v packets (ring, filters)", classes="hint",
                     markup=False)

    def on_mount(self) -> None:
        """List the networks; counters tick while the area is visible."""
        self.action_reload()
        self.set_interval(COUNTERS_S, self.refresh_counters)

    def action_reload(self) -> None:
        """Read the networks again."""
        self.tui.call_api(api.list_networks, done=self.show_networks, group="networks",
                          exclusive=True)

    def show_networks(self, rows: list[dict[str, Any]]) -> None:
        """Fill the table."""
        table = self.query_one(DataTable)
        table.clear()
        for row in rows:
            if row.get("error"):
                table.add_row(*data.plain(row["name"], Text("unreadable", style="bold red"), "",
                                          "", data.clean(row["error"])[:60]), key=row["name"])
                continue
            table.add_row(*data.plain(row["name"], row["subnet"], row["switch"], row["ports"],
                                      ", ".join(row["vms"]) or "-"), key=row["name"])
        if not rows:
            self.query_one("#network-detail", Static).update(
                "no isolated networks (secvf net create NAME)")

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        """Show the highlighted network."""
        self.shown = None if event.row_key.value is None else str(event.row_key.value)
        self.refresh_counters()

    def refresh_counters(self) -> None:
        """Re-read the shown network (only while this area is on screen)."""
        if self.shown is None or not self.is_on_screen:
            return
        name = self.shown
        self.tui.call_api(partial(api.show_network, name), group="network-show",
                          exclusive=True,
                          done=lambda shown: self.query_one("#network-detail", Static).update(
                              network_text(shown, self.capturing.get(name))))

    @property
    def is_on_screen(self) -> bool:
        """Whether this area is the one shown."""
        return self.display and self.screen is self.tui.screen and self.region.area > 0

    def action_capture(self) -> None:
        """Start a capture of the shown network to a pcapng file, or stop it."""
        name = self.shown
        if name is None:
            return
        if name in self.capturing:
            self.stop_capture.add(name)
            return
        self.capturing[name] = {"frames": 0, "bytes": 0, "files": [], "ended": "starting"}
        self.stop_capture.discard(name)

        def progress(p: Any) -> None:
            self.capturing[name] = {"frames": p.frames, "bytes": p.bytes,
                                    "files": list(p.files), "ended": p.ended}

        def capture() -> Any:
            worker = get_current_worker()
            return api.capture_network(api.CaptureRequest(network=name), progress,
                                       lambda: name in self.stop_capture or worker.is_cancelled)

        def ended(result: Any) -> None:
            self.capturing.pop(name, None)
            self.tui.notify(f"capture of {name}: {result.frames} frames in "
                            f"{', '.join(result.files)}", timeout=6)
        self.tui.call_api(capture, done=ended, group=f"capture-{name}",
                          failed=lambda _exc: self.capturing.pop(name, None))

    def action_packets(self) -> None:
        """The packet view of the shown network's ring."""
        if self.shown is not None:
            self.tui.push_screen(PacketsScreen(self.shown))


class PacketsScreen(Screen[None]):
    """The last frames of a network (its always-on ring), decoded and filtered with the
    display-filter language (``tcp.port == 80``) or a preset (``p`` lists them)."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back"),
                Binding("slash", "filter", "Filter", key_display="/"),
                Binding("p", "presets", "Presets")]

    def __init__(self, network: str) -> None:
        super().__init__()
        self.network = network

    @property
    def tui(self) -> SecVFApp:
        """The app (typed)."""
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        """Filter line, packet table."""
        yield Header(show_clock=False)
        yield Input(placeholder="display filter, or preset:NAME; Enter applies", id="filter")
        table: DataTable[Any] = DataTable(cursor_type="row")
        table.add_columns("TIME", "VM", "SRC", "DST", "PROTO", "LEN", "INFO")
        yield table
        yield Footer()

    def on_mount(self) -> None:
        """Unfiltered first."""
        self.sub_title = f"packets of {self.network} (ring)"
        self.load(None)

    def load(self, text: str | None) -> None:
        """Decode the ring with filter ``text`` (``preset:NAME`` picks a preset)."""
        preset = text[7:] if text and text.startswith("preset:") else None
        expr = None if preset else text

        def read() -> list[Any]:
            return list(api.read_packets(self.network, filter=expr, preset=preset,
                                         limit=PACKET_LIMIT))
        self.tui.call_api(read, done=self.show, label=f"decoding {self.network}'s ring")

    def show(self, packets: list[Any]) -> None:
        """Fill the table."""
        from datetime import datetime

        table = self.query_one(DataTable)
        table.clear()
        for packet in packets:
            table.add_row(*data.plain(
                datetime.fromtimestamp(packet.ts).strftime("%H:%M:%S.%f")[:-3], packet.vm,
                packet.src, packet.dst, packet.protocol, packet.length,
                data.clean(packet.info)[:80]))
        self.tui.notify(f"{len(packets)} packets", timeout=2)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """Apply the filter."""
        self.load(event.value.strip() or None)
        self.query_one(DataTable).focus()

    def action_filter(self) -> None:
        """``/``: type a filter."""
        self.query_one(Input).focus()

    def action_presets(self) -> None:
        """List the presets (name: what it catches)."""
        def shown(presets: list[dict[str, str]]) -> None:
            from secvf.faces.tui.widgets import HelpScreen

            self.tui.push_screen(HelpScreen(
                [(f"preset:{p['name']}", f"{p['expression']} — {p.get('catches', '')}")
                 for p in presets]))
        self.tui.call_api(api.packet_presets, done=shown)
