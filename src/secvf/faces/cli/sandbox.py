"""``secvf sandbox …``: AI sandboxes, disposable VMs with an exec channel and a workspace."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from secvf import api
from secvf.errors import SecVFError
from secvf.faces.cli.app import SecVFGroup, fail, out, print_json
from secvf.faces.cli.terminal import run_streaming

Command = Callable[..., Any]


def sandbox_options(func: Command) -> Command:
    """Options shared by ``sandbox create`` and ``sandbox run``."""
    for option in reversed([
        click.option("--image", default="sandbox", show_default=True),
        click.option("--cpus", type=int, default=1, show_default=True),
        click.option("--memory", default="1G", show_default=True),
        click.option("--workspace", type=click.Path(path_type=Path),
                     help="Host dir for /workspace (default: under $SECVF_HOME/sandboxes)."),
        click.option("--share", "shares", multiple=True, metavar="HOSTDIR:GUESTPATH:ro",
                     help="Extra read-only share (repeatable)."),
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
@click.option("--timeout", type=float, default=120.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def sandbox_start(name: str, timeout: float, as_json: bool) -> None:
    """Boot sandbox NAME; returns when `secvf vm exec` works."""
    status = api.start_sandbox(name, timeout=timeout)
    if as_json:
        print_json(status)
    else:
        out.print(f"sandbox [bold]{name}[/] ready in {status['boot_s']} s "
                  f"(exec socket {status['exec_socket']})")


@sandbox.command("run", context_settings={"ignore_unknown_options": True,
                                          "allow_interspersed_args": False})
@click.option("--name", help="Session name (default: sbx-<random>).")
@click.option("--rm", "remove", is_flag=True, help="Stop and delete the sandbox afterwards.")
@sandbox_options
@click.option("--timeout", type=float, help="Command timeout in seconds.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def sandbox_run(name: str | None, remove: bool, image: str, cpus: int, memory: str,
                workspace: Path | None, shares: tuple[str, ...], network: str, accel: str,
                timeout: float | None, command: tuple[str, ...]) -> None:
    """Create + start a sandbox, run COMMAND, exit with its status (--rm: then delete)."""
    args = list(command[1:] if command[:1] == ("--",) else command)
    config = api.create_sandbox(name, image=image, cpus=cpus, memory=memory,
                                workspace=workspace, shares=shares, network=network,
                                accel=accel)
    error: SecVFError | None = None
    code = 125
    try:
        api.start_sandbox(config.name)
        code = run_streaming(config.name, args, env={}, cwd=None, user=None, tty_mode=False,
                             interactive=False, timeout=timeout)
    except SecVFError as exc:
        error = exc
    finally:  # also on Ctrl-C: --rm means nothing is left behind
        if remove:
            api.remove_sandbox(config.name, purge=workspace is None)
    if error is not None:
        fail(error)
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
    """Stop sandbox NAME (bridge, virtiofsd, vsock backend, QEMU: nothing left behind)."""
    api.stop_vm(name)
    out.print(f"stopped sandbox [bold]{name}[/]")


@sandbox.command("rm")
@click.argument("name")
@click.option("--purge", is_flag=True, help="Also delete the default workspace directory.")
def sandbox_rm(name: str, purge: bool) -> None:
    """Delete sandbox NAME (keeps its workspace unless --purge)."""
    api.remove_sandbox(name, purge=purge)
    out.print(f"removed sandbox [bold]{name}[/]")
