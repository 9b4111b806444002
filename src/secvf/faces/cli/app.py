"""The ``secvf`` root command and what the commands share that needs click.

Each command turns flags into one :mod:`secvf.api` call and the result (or a
:class:`~secvf.errors.SecVFError`) into output: a rich table or text for people,
``--json`` for scripts, a one-line error and the error's exit code on failure (with
``--json``, the error as JSON on stdout as well). How they print (consoles, markup
escaping, JSON, notes, errors) is in :mod:`.common`, which needs no click.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, NoReturn

import click

from secvf.errors import SecVFError
from secvf.faces.cli.common import (
    err,
    escape,
    note,
    parse_seconds,
    report_error,
    show_library_warnings,
)

#: ``vm status`` states in which a supervisor runs the VM (any other: it is not running).
LIVE_STATES = ("starting", "running", "paused", "stopping")

#: :func:`working` says what is under way only once it has taken this long (seconds), so
#: a command that fails at once still prints just its one-line error.
WORKING_NOTE_AFTER_S = 0.5

#: What ``--network`` takes (``vm create``, ``sandbox create|run``).
NETWORK_HELP = ("none, nat, or isolated:NAME[,router][,ip=ADDRESS] (see: secvf net); "
                "repeat for several NICs.")


def fail(exc: SecVFError) -> NoReturn:
    """Report ``exc`` (:func:`~secvf.faces.cli.common.report_error`: as JSON too if the
    running command was given ``--json``, its ``as_json`` parameter) and exit with its
    exit code."""
    ctx = click.get_current_context(silent=True)
    report_error(exc, as_json=ctx is not None and bool(ctx.params.get("as_json")))
    sys.exit(exc.exit_code)


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
        """Return ``value`` as seconds (:func:`~secvf.faces.cli.common.parse_seconds`), or
        fail with a usage error saying what is allowed."""
        try:
            return parse_seconds(value, zero_ok=self.zero_ok)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@click.group(cls=SecVFGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="secvf")
def main() -> None:
    """SecVF: VMs for security work, with a host-guest channel only where it is meant to be."""
    show_library_warnings()
