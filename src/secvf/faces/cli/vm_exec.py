"""``secvf vm exec``: run one command in an AI sandbox; exit with its status."""

from __future__ import annotations

import sys

import click

from secvf import api
from secvf.errors import ConfigError
from secvf.faces.cli.app import print_json
from secvf.faces.cli.terminal import run_streaming


@click.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("-c", "shell", help="Run this shell string with /bin/sh -c.")
@click.option("--user", "-u", help="Guest user (default: agent).")
@click.option("--root", is_flag=True, help="Run as root in the guest.")
@click.option("-e", "--env", "env", multiple=True, metavar="K=V", help="Environment variable.")
@click.option("-w", "--workdir", help="Working directory in the guest (default /workspace).")
@click.option("-t", "--tty", "tty_mode", is_flag=True, help="Allocate a pseudo-terminal.")
@click.option("-i", "--interactive", is_flag=True, help="Forward stdin (EOF included).")
@click.option("--timeout", type=float, help="Kill the command's process group after S seconds.")
@click.option("--json", "as_json", is_flag=True, help="Capture output; print a JSON result.")
def vm_exec(name: str, command: tuple[str, ...], shell: str | None, user: str | None, root: bool,
            env: tuple[str, ...], workdir: str | None, tty_mode: bool, interactive: bool,
            timeout: float | None, as_json: bool) -> None:
    """Run a command in AI sandbox NAME; exits with the command's status.

    Exit status: the command's code; 128+N if killed by signal N; 124 on timeout;
    125 for a SecVF error; 126/127 if the command could not run / was not found.
    """
    args = list(command[1:] if command[:1] == ("--",) else command)
    if bool(shell) == bool(args):
        raise ConfigError("give a command after '--' or a shell string with -c (not both)")
    if root and user:
        raise ConfigError("--root and --user exclude each other")
    env_map = {}
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"-e {item!r}: expected KEY=VALUE")
        env_map[key] = value
    cmd: str | list[str] = shell if shell else args
    user = "root" if root else user
    if as_json:
        result = api.run_command(name, cmd, env=env_map, cwd=workdir, user=user, tty=tty_mode,
                                 timeout=timeout)
        data = api.result_as_json(result)
        print_json(data)
        sys.exit(data["exit_status"])
    sys.exit(run_streaming(name, cmd, env=env_map, cwd=workdir, user=user, tty_mode=tty_mode,
                           interactive=interactive, timeout=timeout))
