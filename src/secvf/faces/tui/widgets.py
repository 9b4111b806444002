"""Widgets every area uses: the confirmation modal, the text-input modal, the help
screen, and the bar that shows a long action's progress and cancels it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.timer import Timer
from textual.widgets import Button, Input, Label, ProgressBar, Static


class ConfirmScreen(ModalScreen[bool]):
    """Ask before a destructive action; the message names what will be lost.
    ``y``/Enter on *Yes* confirms, ``n``/Escape cancels."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n", "answer(False)", "No"),
                Binding("escape", "answer(False)", "Cancel", show=False)]

    def __init__(self, title: str, lost: Iterable[str], *, verb: str = "Delete") -> None:
        super().__init__()
        self.title_text = title
        self.lost = list(lost)
        self.verb = verb

    def compose(self) -> ComposeResult:
        """The question, what will be lost, and Yes/No."""
        with Vertical(id="dialog"):
            yield Label(self.title_text, id="question", markup=False)
            yield Static("\n".join(f"• {item}" for item in self.lost) or "nothing else",
                         id="lost", markup=False)
            with Horizontal(id="buttons"):
                yield Button(f"{self.verb} (y)", variant="error", id="yes")
                yield Button("Cancel (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        """Focus *Cancel*: Enter alone never destroys anything."""
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        """Yes or No."""
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        """Close with the answer."""
        self.dismiss(yes)


class PromptScreen(ModalScreen[str | None]):
    """Ask for one line of text (a snapshot name, a filter); Escape cancels (None)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, *, value: str = "", placeholder: str = "") -> None:
        super().__init__()
        self.question = question
        self.value = value
        self.placeholder = placeholder

    def compose(self) -> ComposeResult:
        """The question and the input."""
        with Vertical(id="dialog"):
            yield Label(self.question, id="question")
            yield Input(value=self.value, placeholder=self.placeholder, id="answer")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """Enter: the text (an empty one is None)."""
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        """Escape."""
        self.dismiss(None)


class HelpScreen(ModalScreen[None]):
    """``?``: every key of the screen below and of the app, with what it does."""

    BINDINGS = [Binding("escape,q,question_mark", "app.pop_screen", "Close")]

    def __init__(self, rows: Iterable[tuple[str, str]]) -> None:
        super().__init__()
        self.rows = list(rows)

    def compose(self) -> ComposeResult:
        """A scrolling list of keys."""
        width = max((len(key) for key, _ in self.rows), default=4)
        text = "\n".join(f"{key:<{width}}  {what}" for key, what in self.rows)
        with VerticalScroll(id="dialog"):
            yield Label("Keys (Esc closes)", id="question")
            yield Static(text, markup=False, id="keys")


class ActionBar(Horizontal):
    """A long action under way: what it is, for how long, a progress bar (counting down
    when the action says how long it may take), and ``Esc`` to cancel it."""

    DEFAULT_CSS = """
    ActionBar { height: 1; display: none; }
    ActionBar.busy { display: block; }
    ActionBar > Label { width: 1fr; }
    ActionBar > ProgressBar { width: 24; }
    """

    def __init__(self) -> None:
        super().__init__(id="action-bar")
        self.label_text = ""
        self.detail = ""
        self.started = 0.0
        self.cancel: Callable[[], object] | None = None
        self._timer: Timer | None = None

    def compose(self) -> ComposeResult:
        """The label and the bar."""
        yield Label("", id="action-label", markup=False)
        yield ProgressBar(total=None, show_eta=False, show_percentage=False)

    @property
    def busy(self) -> bool:
        """Whether an action is shown."""
        return self.has_class("busy")

    def begin(self, label: str, cancel: Callable[[], object] | None) -> None:
        """Show action ``label``; ``cancel`` is what Esc does (None: it cannot be)."""
        self.label_text, self.detail, self.cancel = label, "", cancel
        self.started = time.monotonic()
        bar = self.query_one(ProgressBar)
        bar.update(total=None, progress=0)
        self.add_class("busy")
        self._render_label()
        if self._timer is None:
            self._timer = self.set_interval(1.0, self._render_label)

    def report(self, detail: str, done: float | None = None,
               total: float | None = None) -> None:
        """Progress: a line of detail, and how far (``done`` of ``total``) if known."""
        self.detail = detail
        if total:
            self.query_one(ProgressBar).update(total=total, progress=done or 0)
        self._render_label()

    def end(self) -> None:
        """The action is over."""
        self.remove_class("busy")
        self.cancel = None
        if self._timer is not None:
            self._timer.stop()
            self._timer = None

    def _render_label(self) -> None:
        elapsed = int(time.monotonic() - self.started)
        hint = "esc: cancel" if self.cancel else "cannot be cancelled"
        detail = f" — {self.detail}" if self.detail else ""
        self.query_one("#action-label", Label).update(
            f"{self.label_text}{detail} ({elapsed} s; {hint})")
