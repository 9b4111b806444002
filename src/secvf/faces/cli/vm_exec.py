"""``secvf vm exec``: run one command in an AI sandbox; exit with its status.

The command line is ``vm exec [OPTIONS] NAME [OPTIONS] [--] COMMAND [ARG...]``: options
may come before and after NAME, and option parsing stops at the first word after NAME
that is not an option (or at ``--``), so ``vm exec sp ls -w 200 /`` runs ``ls -w 200 /``.
An unknown option is a bad command line, refused before anything is contacted.

Every failure on SecVF's side (a bad command line included) exits 125, so a script can
tell it from the command's own status; the command not starting is 126/127 as in a
shell; Ctrl-C exits 130. With ``--json`` stdout is always one JSON object: the result,
or ``{"error": {type, message, exit_code}}``.

The ``secvf`` script parses a plain command line without click (:mod:`.lean_exec`, which
a test keeps in step with this command's options); this command parses every other one,
so the help and the usage errors are click's. Either way the command then runs as
:func:`~secvf.faces.cli.exec_core.run_vm_exec`.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from secvf.errors import ExitCode
from secvf.faces.cli.app import Seconds
from secvf.faces.cli.common import failure_json, print_json
from secvf.faces.cli.exec_core import run_vm_exec


class ExecCommand(click.Command):
    """A command whose bad command line exits 125, like its other SecVF failures.

    With ``--json`` among the words before ``--`` the usage error is also printed as a
    JSON error on stdout.
    """

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        """Parse ``args``; a usage error is shown as click shows it and exits 125."""
        words = list(args)
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            options = words[:words.index("--")] if "--" in words else words
            if "--json" in options:
                print_json(failure_json("UsageError", exc.format_message(),
                                        ExitCode.SECVF_ERROR))
            exc.show()
            sys.exit(ExitCode.SECVF_ERROR)


class VmExecCommand(ExecCommand):
    """``vm exec``'s parsing: options before and after NAME, up to the command.

    click (with ``allow_interspersed_args`` off) stops at the first positional word,
    NAME; the options between NAME and the command are moved in front of NAME before
    the real parse, so the command's own options are never read as SecVF's.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Parse ``args`` with the options that follow NAME moved before it."""
        return super().parse_args(ctx, self._options_first(ctx, args))

    def _options_first(self, ctx: click.Context, args: list[str]) -> list[str]:
        name, after = self._split(ctx, args)
        name_at = len(args) - len(after) - 1
        if name is None or "--" in args[:name_at]:
            return args  # no NAME (click says so), or "--" made everything after it words
        command, rest = self._split(ctx, after)
        command_words = len(rest) + (1 if command is not None else 0)
        options = after[:len(after) - command_words]
        return [*args[:name_at], *options, name, *after[len(options):]]

    def _split(self, ctx: click.Context, words: list[str]) -> tuple[str | None, list[str]]:
        """The first positional word of ``words`` and the words after it (click's
        parser, options skipped; they are checked, so an unknown one fails here)."""
        values, _, _ = self.make_parser(ctx).parse_args(args=list(words))
        first, rest = values.get("name"), values.get("command")
        return (first if isinstance(first, str) else None,
                list(rest) if isinstance(rest, list | tuple) else [])


@click.command("exec", cls=VmExecCommand, context_settings={"allow_interspersed_args": False})
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("-c", "shell", help="Run this shell string with /bin/sh -c.")
@click.option("--user", "-u", help="Guest user (default: agent).")
@click.option("--root", is_flag=True, help="Run as root in the guest.")
@click.option("-e", "--env", "env", multiple=True, metavar="K=V", help="Environment variable.")
@click.option("-w", "--workdir", help="Working directory in the guest (default /workspace).")
@click.option("-t", "--tty", "tty_mode", is_flag=True,
              help="Allocate a pseudo-terminal; on a terminal, forward input (escape: ~.).")
@click.option("-i", "--interactive", is_flag=True, help="Forward stdin (EOF included).")
@click.option("--timeout", type=Seconds(),
              help="Kill the command's process group after SECONDS (default: no limit).")
@click.option("--wait", type=Seconds(),
              help="Wait up to SECONDS for the guest agent of a booting VM first.")
@click.option("--detach", "-d", is_flag=True,
              help="Start COMMAND in the background (it outlives this call); print its id.")
@click.option("--json", "as_json", is_flag=True, help="Capture output; print a JSON result.")
def vm_exec(name: str, command: tuple[str, ...], shell: str | None, user: str | None, root: bool,
            env: tuple[str, ...], workdir: str | None, tty_mode: bool, interactive: bool,
            timeout: float | None, wait: float | None, detach: bool, as_json: bool) -> None:
    """Run COMMAND (or -c STRING) in AI sandbox NAME; exits with the command's status.

    Options go before COMMAND: its first word ends them (or `--` does).

    Exit status: the command's code; 128+N if killed by signal N; 124 on timeout;
    125 for a SecVF error (a bad command line included); 126/127 if the command could
    not run / was not found; 130 after Ctrl-C or ~. (the guest kills the command).

    With --detach the command runs in the background until it exits, `secvf vm kill`
    or the VM stops; this prints its id (--json: {"id", "pid"}) and exits 0. Follow it
    with `secvf vm attach`, list them with `secvf vm ps`.
    """
    sys.exit(run_vm_exec(name, command, shell=shell, user=user, root=root, env=env,
                         workdir=workdir, tty_mode=tty_mode, interactive=interactive,
                         timeout=timeout, wait=wait, detach=detach, as_json=as_json))
