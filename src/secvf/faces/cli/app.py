"""The ``secvf`` root command and what every command shares: output, errors, JSON.

Each command turns flags into one :mod:`secvf.api` call and the result (or a
:class:`~secvf.errors.SecVFError`) into output: a rich table or text for people,
``--json`` for scripts, a one-line error and the error's exit code on failure (with
``--json``, the error as JSON on stdout as well).

Text from users, guests and the file system (names, paths, messages) goes through
rich markup only escaped (:func:`escape`): ``[plan]`` stays ``[plan]``.
When stdout is not a terminal, nothing is cut or wrapped to fit a width.

rich is imported only when something is printed through it (:class:`LazyConsole`,
:func:`escape`, :func:`new_table`): ``secvf --help`` and a ``vm exec`` that only
streams the command's output never load it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn

import click

from secvf.errors import LaunchFailed, SecVFError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.status import Status
    from rich.table import Table

#: Width for output that is not a terminal: wide enough that no line is cut or wrapped.
UNLIMITED_WIDTH = 1 << 20

#: The longest timeout a ``SECONDS`` option takes (a year).
MAX_SECONDS = 365 * 24 * 3600.0

#: ``vm status`` states in which a supervisor runs the VM (any other: it is not running).
LIVE_STATES = ("starting", "running", "paused", "stopping")

#: :func:`working` says what is under way only once it has taken this long (seconds), so
#: a command that fails at once still prints just its one-line error.
WORKING_NOTE_AFTER_S = 0.5


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

            console = Console(stderr=self._stderr, soft_wrap=True)
            if not console.is_terminal:
                console.width = UNLIMITED_WIDTH
            self._console = console
        return self._console

    def print(self, *objects: Any, **options: Any) -> None:
        """Print as :meth:`rich.console.Console.print` does."""
        self.console.print(*objects, **options)

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


#: What ``--network`` takes (``vm create``, ``sandbox create|run``).
NETWORK_HELP = ("none, nat, or isolated:NAME[,router][,ip=ADDRESS] (see: secvf net); "
                "repeat for several NICs.")


def escape(text: str) -> str:
    """``text`` with rich markup escaped (:func:`rich.markup.escape`): ``[plan]`` stays
    ``[plan]`` when printed."""
    from rich.markup import escape as escape_markup

    return escape_markup(text)


def new_table(*headers: str, title: str | None = None) -> Table:
    """A rich table with these column ``headers`` (and ``title``), for :data:`out`."""
    from rich.table import Table

    return Table(*headers, title=title)


def error_json(exc: SecVFError) -> dict[str, Any]:
    """The ``--json`` form of a failed command: ``{"error": {type, message, exit_code}}``."""
    return {"error": {"type": type(exc).__name__, "message": str(exc),
                      "exit_code": int(exc.exit_code)}}


def fail(exc: SecVFError) -> NoReturn:
    """Report ``exc`` and exit with its exit code.

    stderr gets the one-line error (plus QEMU's command line and output for a launch
    failure); if the running command was given ``--json`` (its ``as_json`` parameter),
    stdout gets :func:`error_json` too.
    """
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.params.get("as_json"):
        print_json(error_json(exc))
    err.print(f"secvf: error: {exc}", markup=False, highlight=False)
    if isinstance(exc, LaunchFailed):
        if exc.argv:
            err.print("command line: " + " ".join(exc.argv), markup=False, highlight=False)
        if exc.output.strip():
            err.print("output:\n" + exc.output.strip()[-3000:], markup=False, highlight=False)
    sys.exit(exc.exit_code)


def note(message: str) -> None:
    """Tell the user something on stderr that is neither output nor an error."""
    err.print(f"secvf: note: {message}", markup=False, highlight=False)


@contextlib.contextmanager
def working(text: str) -> Iterator[None]:
    """Show on stderr that ``text`` (e.g. "saving VM 'web'…") is under way while the
    block runs: a spinner on a terminal (gone when the block ends), otherwise one
    :func:`note` if the block takes longer than :data:`WORKING_NOTE_AFTER_S`. Never
    on stdout, so ``--json`` output stays JSON."""
    if err.is_terminal:
        with err.status(escape(text)):
            yield
        return
    timer = threading.Timer(WORKING_NOTE_AFTER_S, note, args=(text,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()  # a note being printed is finished before the command goes on


def format_time(rfc3339: str) -> str:
    """An RFC 3339 time from a record as local time, ``2025-06-01 14:03:12``
    (unchanged if it does not parse)."""
    try:
        when = datetime.fromisoformat(rfc3339.replace("Z", "+00:00"))
    except ValueError:
        return rfc3339
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _reporting_errors(callback: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command's callback so its SecVF errors are reported by :func:`fail`
    while the command's context (and so its ``--json`` flag) is still current."""

    @functools.wraps(callback)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except SecVFError as exc:
            fail(exc)

    return run


class SecVFGroup(click.Group):
    """A click group whose commands report SecVF errors cleanly (see :func:`fail`).

    Every command added to it, wherever it is defined, is covered; a command's
    ``--json`` flag must be its ``as_json`` parameter for errors to be JSON as well.
    """

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        """Add ``cmd``; its SecVF errors become one-line (and ``--json``) errors."""
        if not isinstance(cmd, click.Group) and cmd.callback is not None:
            cmd.callback = _reporting_errors(cmd.callback)
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context) -> Any:
        """Run the group; a SecVF error outside any command's callback fails cleanly too."""
        try:
            return super().invoke(ctx)
        except SecVFError as exc:
            fail(exc)


class Seconds(click.ParamType[float]):
    """A duration option in seconds: a finite number, not negative, at most a year.

    ``zero_ok`` says whether 0 is meaningful for the option (``vm stop --timeout 0``:
    do not wait for the guest); where it is not, 0 is refused like a negative number.
    """

    name = "seconds"

    def __init__(self, *, zero_ok: bool = False) -> None:
        self.zero_ok = zero_ok

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        """Return ``value`` as seconds, or fail with a usage error saying what is allowed."""
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        low_ok = seconds >= 0 if self.zero_ok else seconds > 0
        if not (math.isfinite(seconds) and low_ok and seconds <= MAX_SECONDS):
            lowest = "0 or more" if self.zero_ok else "more than 0"
            self.fail(f"{value!r}: expected {lowest} seconds, at most {MAX_SECONDS:.0f}",
                      param, ctx)
        return seconds


class _WarningFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"secvf: {record.levelname.lower()}: {record.getMessage()}"


_warnings = logging.StreamHandler(sys.stderr)
_warnings.setLevel(logging.WARNING)
_warnings.setFormatter(_WarningFormatter())


def print_json(data: object, *, one_line: bool = False) -> None:
    """Print ``data`` as JSON on stdout (``one_line``: compact, a JSON Lines record, for
    output a script reads as it comes)."""
    click.echo(json.dumps(data, indent=None if one_line else 2, default=str))


@click.group(cls=SecVFGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="secvf")
def main() -> None:
    """SecVF: VMs for security work, with a host-guest channel only where it is meant to be."""
    library_log = logging.getLogger("secvf")
    if _warnings not in library_log.handlers:  # once, also when main runs twice in a process
        library_log.addHandler(_warnings)
