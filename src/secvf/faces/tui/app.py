"""The application: its areas (one tab each), its keys, and how it calls the API.

Every API call runs in a worker thread (:meth:`SecVFApp.call_api`), never on the event
loop; an error becomes a one-line notification with the error's own message. A long
action shows in the :class:`~.widgets.ActionBar` and Esc cancels it in the way the
action says. What changes the VM table arrives as security events
(``api.watch_vm_changes``); a slow resync (every :data:`RESYNC_S`) catches a VM whose
supervisor was killed and wrote none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import Footer, Header, TabbedContent, TabPane
from textual.worker import Worker, get_current_worker

from secvf import api
from secvf.faces.tui.analyses import AnalysesPane
from secvf.faces.tui.audit import AuditPane
from secvf.faces.tui.data import error_line, names_changed
from secvf.faces.tui.logs import LogsPane
from secvf.faces.tui.networks import NetworksPane
from secvf.faces.tui.sandboxes import SandboxesPane
from secvf.faces.tui.vms import VMsPane
from secvf.faces.tui.widgets import ActionBar, HelpScreen

T = TypeVar("T")

#: Seconds between full re-reads of the VM list (events do the rest).
RESYNC_S = 15.0

#: Threads API calls and watches run in.
WORKER_THREADS = 32

#: The areas: tab id, title, key.
AREAS = (("vms", "VMs", "1"), ("sandboxes", "Sandboxes", "2"), ("networks", "Networks", "3"),
         ("analyses", "Analyses", "4"), ("logs", "Logs", "5"), ("audit", "Audit", "6"))

CSS = """
Screen { layers: base overlay; }
TabbedContent { height: 1fr; }
TabPane { padding: 0; }
DataTable { height: 1fr; }
.filter { height: 1; border: none; padding: 0 1; display: none; }
.filter.shown { display: block; }
.detail { height: auto; max-height: 45%; border-top: solid $accent; padding: 0 1; }
.hint { color: $text-muted; height: 1; padding: 0 1; }
ModalScreen { align: center middle; }
#dialog { width: 72; max-width: 95%; height: auto; max-height: 90%;
          border: thick $error; background: $surface; padding: 1 2; }
#dialog Input { margin-top: 1; }
#question { text-style: bold; margin-bottom: 1; }
#buttons { height: auto; margin-top: 1; align: center middle; }
#buttons Button { margin: 0 1; }
"""


class VMsChanged(Message):
    """Some VMs changed (``names``) or the list itself did (``names`` is None)."""

    def __init__(self, names: list[str] | None) -> None:
        super().__init__()
        self.names = names


class SecVFApp(App[None]):
    """``secvf tui``: VMs, sandboxes, networks, analyses, logs and the audit, over the API.

    ``watch=False`` starts no event watcher and no resync (tests drive changes
    themselves by posting :class:`VMsChanged`)."""

    TITLE = "SecVF"
    ENABLE_COMMAND_PALETTE = False
    CSS = CSS
    BINDINGS = [
        *(Binding(key, f"area('{tab}')", title, show=False) for tab, title, key in AREAS),
        Binding("question_mark", "help", "Help"),
        Binding("ctrl+t", "toggle_theme", "Light/dark", show=False),
        Binding("q", "quit", "Quit"),
        Binding("escape", "cancel_action", "Cancel", show=False),
    ]

    def __init__(self, *, watch: bool = True) -> None:
        super().__init__()
        self.watch_changes = watch
        self.action_bar = ActionBar()

    def compose(self) -> ComposeResult:
        """Header, one tab per area, the action bar and the footer."""
        yield Header(show_clock=False)
        panes = {"vms": VMsPane, "sandboxes": SandboxesPane, "networks": NetworksPane,
                 "analyses": AnalysesPane, "logs": LogsPane, "audit": AuditPane}
        with TabbedContent(id="areas", initial="vms"):
            for tab, title, key in AREAS:
                with TabPane(f"{key} {title}", id=tab):
                    yield panes[tab](id=f"{tab}-pane")
        yield self.action_bar
        yield Footer()

    def on_load(self) -> None:
        """Before any widget mounts, give worker threads a pool of their own.

        Worker threads come from the loop's default executor, which on a 2-core host has
        6 threads; the watches (changes, logs, a serial log, an exec, a capture) hold one
        each for as long as they run, so the pool is made big enough that they never
        starve the short calls. It is set here, not when the app mounts: the areas mount
        first and start their first reads then."""
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="secvf-tui"))

    def on_mount(self) -> None:
        """Focus the VM table; start watching for VM changes."""
        self.focus_area("vms")
        if self.watch_changes:
            self.run_worker(self._watch_changes, thread=True, group="watch",
                            exit_on_error=False)
            self.set_interval(RESYNC_S, lambda: self.post_message(VMsChanged(None)))

    # ---- calling the API -------------------------------------------------------------

    def call_api(self, fn: Callable[[], T], *, done: Callable[[T], None] | None = None,
                 label: str | None = None, cancel: Callable[[], object] | None = None,
                 group: str = "api", exclusive: bool = False,
                 failed: Callable[[BaseException], object] | None = None) -> Worker[None]:
        """Run ``fn`` in a worker thread; then ``done(result)`` on the event loop. A
        SecVFError (or any other error) becomes a one-line notification, and then
        ``failed(error)``. ``label``: a long action, shown in the action bar until it
        ends; ``cancel`` is what Esc does meanwhile (run in another worker thread)."""
        if label is not None:
            self.action_bar.begin(label, cancel)

        def work() -> None:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - every error is shown as one line
                self.call_from_thread(self._failed, exc, failed)
            else:
                if done is not None and not get_current_worker().is_cancelled:
                    self.call_from_thread(done, result)
            finally:
                if label is not None:
                    self.call_from_thread(self.action_bar.end)

        return self.run_worker(work, thread=True, group=group, exclusive=exclusive,
                               exit_on_error=False)

    def _failed(self, exc: BaseException,
                failed: Callable[[BaseException], object] | None) -> None:
        self.show_error(exc)
        if failed is not None:
            failed(exc)

    def show_error(self, exc: BaseException) -> None:
        """One line, the error's own message."""
        self.notify(error_line(exc), title="error", severity="error", timeout=8)

    def report_progress(self, detail: str, done: float | None = None,
                        total: float | None = None) -> None:
        """From a worker thread: the running action's progress line."""
        self.call_from_thread(self.action_bar.report, detail, done, total)

    def action_cancel_action(self) -> None:
        """Esc: cancel the long action under way, if it can be."""
        bar = self.action_bar
        if not bar.busy:
            return
        if bar.cancel is None:
            self.notify(f"{bar.label_text} cannot be cancelled; it goes on", timeout=4)
            return
        cancel, bar.cancel = bar.cancel, None
        bar.report("cancelling…")
        self.call_api(cancel, group="cancel")

    # ---- what changes ----------------------------------------------------------------

    def _watch_changes(self) -> None:
        worker = get_current_worker()
        try:
            for record in api.watch_vm_changes(stop=lambda: worker.is_cancelled):
                changed = names_changed(record)
                self.call_from_thread(self.post_message,
                                      VMsChanged(None if changed is None else list(changed)))
        except Exception as exc:  # noqa: BLE001 - the table still resyncs
            self.call_from_thread(self.show_error, exc)

    def on_vms_changed(self, message: VMsChanged) -> None:
        """Hand a change to every area and screen that shows VMs."""
        for widget in (self.query_one(VMsPane), self.query_one(SandboxesPane)):
            widget.vms_changed(message.names)
        if hasattr(self.screen, "vms_changed"):
            self.screen.vms_changed(message.names)

    # ---- keys ------------------------------------------------------------------------

    def action_area(self, tab: str) -> None:
        """Show area ``tab``."""
        self.query_one("#areas", TabbedContent).active = tab
        self.focus_area(tab)

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        """A tab clicked or switched with the arrows: focus what is in it."""
        if event.pane.id:
            self.focus_area(event.pane.id)

    def focus_area(self, tab: str) -> None:
        """Focus the main widget of area ``tab`` (its table or log), so its keys work."""
        for widget in self.query_one(f"#{tab}-pane").query("DataTable, RichLog"):
            if widget.display:
                widget.focus()
                return

    def action_toggle_theme(self) -> None:
        """Ctrl-T: the light or the dark theme."""
        self.theme = "textual-light" if self.theme == "textual-dark" else "textual-dark"

    def action_help(self) -> None:
        """``?``: the keys of what is shown, then the app's."""
        self.push_screen(HelpScreen(self.key_rows()))

    def key_rows(self) -> list[tuple[str, str]]:
        """(key, what) for the focused area and the app."""
        rows: list[tuple[str, str]] = []
        seen: set[str] = set()
        if self.screen is self.screen_stack[0]:
            pane = self._active_pane()
            if pane is not None:
                rows += _bindings(pane.BINDINGS, seen)
        else:
            rows += _bindings(self.screen.BINDINGS, seen)
        rows += _bindings(self.BINDINGS, seen)
        return rows

    def _active_pane(self) -> Any:
        tab = self.query_one("#areas", TabbedContent).active
        return self.query_one(f"#{tab}-pane") if tab else None

    def suspend_for(self, what: Callable[[], None]) -> None:
        """Hand the terminal to ``what`` (a console) and take it back; its error, if
        any, becomes a notification afterwards."""
        error: BaseException | None = None
        try:
            with self.suspend():
                try:
                    what()
                except KeyboardInterrupt:
                    pass
                except Exception as exc:  # noqa: BLE001 - shown once the app is back
                    error = exc
        except Exception as exc:  # noqa: BLE001 - SuspendNotSupported (headless)
            error = exc
        if error is not None:
            self.show_error(error)


def _bindings(bindings: Iterable[Any], seen: set[str]) -> list[tuple[str, str]]:
    rows = []
    for item in bindings:
        binding = item if isinstance(item, Binding) else Binding(*item)
        if binding.key in seen or not binding.description:
            continue
        seen.add(binding.key)
        key = binding.key_display or binding.key.replace("question_mark", "?")
        rows.append((key, binding.description))
    return rows


def run() -> None:
    """Run the TUI in this terminal until the user quits."""
    SecVFApp().run()
