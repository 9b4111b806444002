"""The ``secvf`` command line (alias ``secvf-cli``): a face over :mod:`secvf.api`.

One module per command group, put together in :mod:`.commands`; :mod:`.app` holds what
they share that needs click, :mod:`.common` what needs neither click nor rich (output,
errors, JSON), and :mod:`.terminal` the local terminal handling of ``vm exec``.

:func:`main` is the console script. It runs a plain ``secvf vm exec`` command line
without click or the rest of the command tree (:mod:`.lean_exec`: an agent pays that
start once per command) and everything else through click.
"""

import sys


def main() -> None:
    """Run the command line in :data:`sys.argv`; exits with the command's status."""
    if sys.argv[1:3] == ["vm", "exec"]:
        from secvf.faces.cli import lean_exec

        lean_exec.run(sys.argv[3:])  # ends the process, unless the words are for click
    from secvf.faces.cli.commands import cli

    cli()


__all__ = ["main"]
