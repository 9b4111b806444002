"""The exec pane: run a command in a running sandbox and watch its stdout and stderr
arrive, then its exit status; Esc (or Ctrl-C) cancels it in the guest."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, RichLog
from textual.worker import get_current_worker

from secvf import api
from secvf.faces.tui import data

if TYPE_CHECKING:
    from secvf.faces.tui.app import SecVFApp

#: Lines of output the pane keeps.
OUTPUT_LINES = 5000


def exit_text(event: Any) -> Text:
    """The closing line of a command: its exit code or signal, timeout, cancel, time."""
    if event.signal is not None:
        how = f"killed by signal {event.signal}"
    else:
        how = f"exit {event.exit_code}"
    if event.timed_out:
        how += " (timed out)"
    if event.cancelled:
        how += " (cancelled)"
    ok = event.exit_code == 0
    return Text(f"── {how} in {event.duration_ms} ms", style="bold green" if ok else "bold red")


class ExecScreen(Screen[None]):
    """A command line over an output pane for sandbox ``name``."""

    BINDINGS = [Binding("escape", "cancel_or_back", "Cancel/back"),
                Binding("ctrl+c", "cancel_or_back", "Cancel", show=False),
                Binding("ctrl+l", "clear", "Clear")]

    def __init__(self, name: str) -> None:
        super().__init__()
        self.vm_name = name
        self.session: Any = None  # the running ExecSession
        self.history: list[str] = []

    @property
    def tui(self) -> SecVFApp:
        """The app (typed)."""
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        """The output and the command line."""
        yield Header(show_clock=False)
        yield RichLog(max_lines=OUTPUT_LINES, wrap=True, markup=False, id="output")
        yield Input(placeholder="command (run with /bin/sh -c as user agent); Enter runs",
                    id="command")
        yield Footer()

    def on_mount(self) -> None:
        """Focus the command line."""
        self.sub_title = f"exec in {self.vm_name}"
        self.query_one(Input).focus()

    @property
    def running(self) -> bool:
        """Whether a command runs."""
        return self.session is not None

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """Enter: run the command."""
        command = event.value.strip()
        if not command:
            return
        if self.running:
            self.tui.notify("a command is running; Esc cancels it", timeout=3)
            return
        event.input.value = ""
        self.history.append(command)
        self.query_one(RichLog).write(Text(f"$ {command}", style="bold"))
        self.tui.call_api(lambda: self._run(command), group="exec",
                          failed=lambda _exc: self._ended())

    def _run(self, command: str) -> None:
        worker = get_current_worker()
        log = self.query_one(RichLog)
        streams = {api.Stdout: data.LineSplitter(), api.Stderr: data.LineSplitter()}

        def show(kind: type, lines: list[str]) -> None:
            for line in lines:
                self.tui.call_from_thread(
                    log.write, Text(line, style="red" if kind is api.Stderr else ""))
        with api.connect_exec(self.vm_name) as client, client.start(command) as session:
            self.session = session
            for event in session:
                if worker.is_cancelled:
                    break
                if isinstance(event, (api.Stdout, api.Stderr)):
                    show(type(event), streams[type(event)].feed(event.data))
                elif isinstance(event, api.Exited):
                    for kind, splitter in streams.items():
                        show(kind, splitter.flush())
                    self.tui.call_from_thread(log.write, exit_text(event))
        self.tui.call_from_thread(self._ended)

    def _ended(self) -> None:
        self.session = None

    def action_cancel_or_back(self) -> None:
        """Cancel the running command in the guest, or leave the pane."""
        session = self.session
        if session is None:
            self.tui.pop_screen()
            return
        self.query_one(RichLog).write(Text("cancelling…", style="italic"))
        self.tui.call_api(session.cancel, group="exec-cancel")

    def action_clear(self) -> None:
        """Clear the output."""
        self.query_one(RichLog).clear()

    def on_unmount(self) -> None:
        """Leaving (or quitting) while a command runs closes its connection: the guest
        kills the command, and the worker thread is free to end."""
        if self.session is not None:
            self.session.close()
