"""The ``secvf`` root command and what every command shares: output, errors, JSON.

Each command turns flags into one :mod:`secvf.api` call and the result (or a
:class:`~secvf.errors.SecVFError`) into output: a rich table or text for people,
``--json`` for scripts, a one-line error and the error's exit code on failure.
"""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click
from rich.console import Console

from secvf.errors import LaunchFailed, SecVFError

out = Console()
err = Console(stderr=True, soft_wrap=True)


def fail(exc: SecVFError) -> NoReturn:
    """Print ``exc`` as a one-line error (plus QEMU's output for launch failures) and exit."""
    err.print(f"secvf: error: {exc}", markup=False, highlight=False)
    if isinstance(exc, LaunchFailed):
        if exc.argv:
            err.print("command line: " + " ".join(exc.argv), markup=False, highlight=False)
        if exc.output.strip():
            err.print("output:\n" + exc.output.strip()[-3000:], markup=False, highlight=False)
    sys.exit(exc.exit_code)


class SecVFGroup(click.Group):
    """A click group that turns SecVF errors into clean one-line messages."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SecVFError as exc:
            fail(exc)


def print_json(data: object) -> None:
    """Print ``data`` as JSON on stdout."""
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(cls=SecVFGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="secvf")
def main() -> None:
    """SecVF: VMs for security work, with a host-guest channel only where it is meant to be."""
