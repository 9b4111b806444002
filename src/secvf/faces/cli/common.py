"""What the commands share that needs neither click nor (until it prints through it) rich.

Output: the rich consoles of stdout and stderr (:class:`LazyConsole`), markup escaping
and tables, ``--json`` (:func:`print_json`, :func:`error_json`), notes and one-line
errors (:func:`note`, :func:`report_error`); the library's warnings on stderr
(:func:`show_library_warnings`); durations in seconds (:func:`parse_seconds`).
``secvf vm exec`` runs with this module and without click (:mod:`.lean_exec`);
:mod:`.app` holds what needs click.

Text from users, guests and the file system (names, paths, messages) goes through
rich markup only escaped (:func:`escape`): ``[plan]`` stays ``[plan]``.
When stdout is not a terminal, nothing is cut or wrapped to fit a width.

rich is imported only when something is printed through it (:class:`LazyConsole`,
:func:`escape`, :func:`new_table`): ``secvf --help`` and a ``vm exec`` that only
streams the command's output never load it, and a note or an error that rich would
print unchanged is written without it (:meth:`LazyConsole.print_line`).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from typing import TYPE_CHECKING, Any

from secvf.errors import LaunchFailed, SecVFError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.status import Status
    from rich.table import Table

#: Width for output that is not a terminal: wide enough that no line is cut or wrapped.
UNLIMITED_WIDTH = 1 << 20

#: The longest timeout a ``SECONDS`` option takes (a year).
MAX_SECONDS = 365 * 24 * 3600.0



class LazyConsole:
    """stdout's or stderr's rich :class:`~rich.console.Console`, made on first use.

    It soft-wraps, and when its file is not a terminal it is :data:`UNLIMITED_WIDTH`
    wide. :meth:`print`, :meth:`status`, :attr:`is_terminal` and :attr:`width` are the
    console's; :attr:`console` is the console itself.
    """

    def __init__(self, *, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        """The console (made, and rich imported, now if not yet)."""
        if self._console is None:
            from rich.console import Console

            # emoji=False: rich would turn ":smile:" in a name or message into an emoji
            console = Console(stderr=self._stderr, soft_wrap=True, emoji=False)
            if not console.is_terminal:
                console.width = UNLIMITED_WIDTH
            self._console = console
        return self._console

    def print(self, *objects: Any, **options: Any) -> None:
        """Print as :meth:`rich.console.Console.print` does."""
        self.console.print(*objects, **options)

    def print_line(self, text: str) -> None:
        """Print ``text`` as it is (no markup, no highlighting) and a newline.

        The same as ``print(text, markup=False, highlight=False)``, written without rich
        while rich is not loaded yet (so no live display of it can be showing) and the
        text is one that rich would print unchanged: printable (no tab, newline or control
        character, which rich expands or strips).
        """
        if "rich.console" in sys.modules or not text.isprintable():
            self.print(text, markup=False, highlight=False)
            return
        stream = sys.stderr if self._stderr else sys.stdout
        if stream is not None:  # rich prints nothing without the stream either
            stream.write(text + "\n")
            stream.flush()

    def status(self, text: str) -> Status:
        """A spinner with ``text`` (markup) until stopped: :meth:`rich.console.Console.status`."""
        return self.console.status(text)

    @property
    def is_terminal(self) -> bool:
        """True if the console writes to a terminal."""
        return self.console.is_terminal

    @property
    def width(self) -> int:
        """The console's width in characters."""
        return self.console.width

    @width.setter
    def width(self, value: int) -> None:
        self.console.width = value


out = LazyConsole(stderr=False)
err = LazyConsole(stderr=True)


def escape(text: str) -> str:
    """``text`` with rich markup escaped (:func:`rich.markup.escape`): ``[plan]`` stays
    ``[plan]`` when printed."""
    from rich.markup import escape as escape_markup

    return escape_markup(text)


def new_table(*headers: str, title: str | None = None) -> Table:
    """A rich table with these column ``headers`` (and ``title``), for :data:`out`."""
    from rich.table import Table

    return Table(*headers, title=title)


def print_json(data: object, *, one_line: bool = False) -> None:
    """Print ``data`` as JSON on stdout (``one_line``: compact, a JSON Lines record, for
    output a script reads as it comes).

    As ``click.echo`` prints it: the JSON is ASCII (nothing for click to strip or
    re-encode), and without a stdout (closed when SecVF started) nothing is printed.
    """
    if sys.stdout is not None:
        sys.stdout.write(json.dumps(data, indent=None if one_line else 2, default=str) + "\n")
        sys.stdout.flush()


def failure_json(kind: str, message: str, exit_code: int) -> dict[str, Any]:
    """The ``--json`` form of a failed command: ``{"error": {type, message, exit_code}}``."""
    return {"error": {"type": kind, "message": message, "exit_code": exit_code}}


def error_json(exc: SecVFError) -> dict[str, Any]:
    """The ``--json`` form of a command that failed with ``exc`` (:func:`failure_json`)."""
    return failure_json(type(exc).__name__, str(exc), int(exc.exit_code))


def report_error(exc: SecVFError, *, as_json: bool) -> None:
    """Report ``exc``: its one-line error on stderr (plus QEMU's command line and output
    for a launch failure) and, for a command given ``--json``, :func:`error_json` on
    stdout first."""
    if as_json:
        print_json(error_json(exc))
    err.print_line(f"secvf: error: {exc}")
    if isinstance(exc, LaunchFailed):
        if exc.argv:
            err.print_line("command line: " + " ".join(exc.argv))
        if exc.output.strip():
            err.print_line("output:\n" + exc.output.strip()[-3000:])


def note(message: str) -> None:
    """Tell the user something on stderr that is neither output nor an error."""
    err.print_line(f"secvf: note: {message}")


class _WarningFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"secvf: {record.levelname.lower()}: {record.getMessage()}"


_warnings = logging.StreamHandler(sys.stderr)
_warnings.setLevel(logging.WARNING)
_warnings.setFormatter(_WarningFormatter())


def show_library_warnings() -> None:
    """Print the library's warnings (and errors) on stderr, ``secvf: warning: …``; once,
    also when a command runs twice in a process."""
    library_log = logging.getLogger("secvf")
    if _warnings not in library_log.handlers:
        library_log.addHandler(_warnings)


def parse_seconds(value: Any, *, zero_ok: bool) -> float:
    """``value`` as a duration in seconds: a finite number, not negative, at most
    :data:`MAX_SECONDS`; 0 only if ``zero_ok``.

    Raises:
        ValueError: anything else, with a message saying what is allowed.
    """
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number of seconds") from None
    low_ok = seconds >= 0 if zero_ok else seconds > 0
    if not (math.isfinite(seconds) and low_ok and seconds <= MAX_SECONDS):
        lowest = "0 or more" if zero_ok else "more than 0"
        raise ValueError(f"{value!r}: expected {lowest} seconds, at most {MAX_SECONDS:.0f}")
    return seconds
