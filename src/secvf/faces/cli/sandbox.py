"""``secvf sandbox …``: AI sandboxes, disposable VMs with an exec channel and a workspace."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from secvf import api
from secvf.errors import StateError
from secvf.faces.cli.app import LIVE_STATES, Seconds, SecVFGroup, note, out, print_json
from secvf.faces.cli.terminal import run_streaming
from secvf.faces.cli.vm_exec import ExecCommand, exec_errors

Command = Callable[..., Any]


def sandbox_options(func: Command) -> Command:
    """Options shared by ``sandbox create`` and ``sandbox run``."""
    for option in reversed([
        click.option("--image", default="sandbox", show_default=True),
        click.option("--cpus", type=int, default=1, show_default=True),
        click.option("--memory", default="1G", show_default=True),
        click.option("--workspace", type=click.Path(path_type=Path),
                     help="Host dir for /workspace (default: under $SECVF_HOME/sandboxes)."),
        click.option("--share", "shares", multiple=True, metavar="HOSTDIR:GUESTPATH[:ro|:rw]",
                     help="Extra share, read-only unless :rw (repeatable)."),
        click.option("--network", type=click.Choice(["nat", "none"]), default="nat",
                     show_default=True),
        click.option("--accel", type=click.Choice([a.value for a in api.Accel]), default="auto",
                     show_default=True),
    ]):
        func = option(func)
    return func


@click.group(cls=SecVFGroup)
def sandbox() -> None:
    """AI sandboxes: disposable VMs with an exec channel and a workspace share."""


@sandbox.command("create")
@click.argument("name")
@sandbox_options
@click.option("--json", "as_json", is_flag=True)
def sandbox_create(name: str, image: str, cpus: int, memory: str, workspace: Path | None,
                   shares: tuple[str, ...], network: str, accel: str, as_json: bool) -> None:
    """Create sandbox NAME from the sealed sandbox image (copy-on-write)."""
    config = api.create_sandbox(name, image=image, cpus=cpus, memory=memory,
                                workspace=workspace, shares=shares, network=network, accel=accel)
    if as_json:
        print_json(config.model_dump(mode="json"))
    else:
        ws = config.channels.shares[0].host_path if config.channels else "-"
        out.print(f"created sandbox [bold]{name}[/] ({config.id}); workspace {ws}")


@sandbox.command("start")
@click.argument("name")
@click.option("--timeout", type=Seconds(), default=120.0, show_default=True,
              help="Seconds to wait for the guest agent to answer.")
@click.option("--json", "as_json", is_flag=True)
def sandbox_start(name: str, timeout: float, as_json: bool) -> None:
    """Boot sandbox NAME; returns when `secvf vm exec` works (already running: a note)."""
    status = api.vm_status(name)
    if status["kind"] == "ai-sandbox" and status["state"] == "running":
        note(f"sandbox '{name}' is already running")
    else:
        status = api.start_sandbox(name, timeout=timeout)
        if not as_json:
            out.print(f"sandbox [bold]{escape(name)}[/] ready in {status['boot_s']} s "
                      f"(exec socket {escape(str(status['exec_socket']))})")
    if as_json:
        print_json(status)


@sandbox.command("run", cls=ExecCommand, context_settings={"allow_interspersed_args": False})
@click.option("--name", help="Session name (default: sbx-<random>).")
@click.option("--rm", "remove", is_flag=True, help="Stop and delete the sandbox afterwards.")
@sandbox_options
@click.option("--timeout", type=Seconds(), help="Command timeout in seconds (default: none).")
@click.option("-t", "--tty", "tty_mode", is_flag=True,
              help="Allocate a pseudo-terminal; on a terminal, forward input (escape: ~.).")
@click.option("-i", "--interactive", is_flag=True, help="Forward stdin (EOF included).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def sandbox_run(name: str | None, remove: bool, image: str, cpus: int, memory: str,
                workspace: Path | None, shares: tuple[str, ...], network: str, accel: str,
                timeout: float | None, tty_mode: bool, interactive: bool,
                command: tuple[str, ...]) -> None:
    """Create + start a sandbox, run COMMAND, exit with its status (--rm: then delete).

    Options go before COMMAND: its first word ends them (or `--` does); an unknown
    option is refused before anything is created. Exit status as for `vm exec`.
    """
    with exec_errors(as_json=False):
        config = api.create_sandbox(name, image=image, cpus=cpus, memory=memory,
                                    workspace=workspace, shares=shares, network=network,
                                    accel=accel)
        try:
            api.start_sandbox(config.name)
            code = run_streaming(config.name, list(command), env={}, cwd=None, user=None,
                                 tty_mode=tty_mode, interactive=interactive, timeout=timeout)
        finally:  # also on errors and Ctrl-C: --rm means nothing is left behind
            if remove:
                api.remove_sandbox(config.name, purge=workspace is None, force=True)
    sys.exit(code)


@sandbox.command("list")
@click.option("--json", "as_json", is_flag=True)
def sandbox_list(as_json: bool) -> None:
    """List sandboxes."""
    rows = api.list_sandboxes()
    if as_json:
        print_json(rows)
        return
    table = Table("NAME", "STATE", "EXEC SOCKET", "ID")
    for row in rows:
        table.add_row(row["name"], row["state"], row["exec_socket"] or "-", row["id"])
    out.print(table)


@sandbox.command("stop")
@click.argument("name")
def sandbox_stop(name: str) -> None:
    """Stop sandbox NAME (bridge, virtiofsd, vsock backend, QEMU: nothing left behind).

    A sandbox that is not running is left as it is: a note, exit 0.
    """
    if api.vm_status(name)["state"] not in LIVE_STATES:
        note(f"sandbox '{name}' is not running")
        return
    api.stop_vm(name)
    out.print(f"stopped sandbox [bold]{escape(name)}[/]")


@sandbox.command("rm")
@click.argument("name")
@click.option("--purge", is_flag=True, help="Also delete the default workspace directory.")
@click.option("--force", is_flag=True, help="Stop the sandbox first if it is running.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before stopping a running sandbox.")
def sandbox_rm(name: str, purge: bool, force: bool, yes: bool) -> None:
    """Delete sandbox NAME (keeps its workspace unless --purge). A running sandbox needs
    --force, or a yes on a terminal; VMs that are not AI sandboxes are refused."""
    try:
        api.remove_sandbox(name, purge=purge, force=force or yes)
    except StateError as exc:
        if exc.state != "running" or not sys.stdin.isatty():
            raise
        click.confirm(f"sandbox '{name}' is running; stop it and delete it?", abort=True,
                      err=True)
        api.remove_sandbox(name, purge=purge, force=True)
    out.print(f"removed sandbox [bold]{escape(name)}[/]")
