"""``secvf sandbox …``: AI sandboxes, disposable VMs with an exec channel and a workspace."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from secvf import api
from secvf.errors import StateError
from secvf.faces.cli.app import LIVE_STATES, NETWORK_HELP, Seconds, SecVFGroup
from secvf.faces.cli.common import err, escape, new_table, note, out, print_json
from secvf.faces.cli.exec_core import exec_errors
from secvf.faces.cli.terminal import run_streaming
from secvf.faces.cli.vm_exec import ExecCommand

Command = Callable[..., Any]

#: ``--cold``: shared by ``sandbox create``, ``start`` and ``run``.
cold_option = click.option(
    "--cold", is_flag=True,
    help="Boot the guest instead of restoring a sandbox template (the template is not used).")


def sandbox_options(func: Command) -> Command:
    """Options shared by ``sandbox create`` and ``sandbox run``."""
    for option in reversed([
        click.option("--image", default="sandbox", show_default=True),
        click.option("--cpus", type=int, default=1, show_default=True),
        click.option("--memory", default="1G", show_default=True),
        click.option("--disk", "disk_size", default="8G", show_default=True,
                     help="Disk size (a sandbox template fits sessions of its --disk)."),
        click.option("--workspace", type=click.Path(path_type=Path),
                     help="Host dir for /workspace (default: under $SECVF_HOME/sandboxes)."),
        click.option("--share", "shares", multiple=True, metavar="HOSTDIR:GUESTPATH[:ro|:rw]",
                     help="Extra share, read-only unless :rw (repeatable)."),
        click.option("--network", "networks", multiple=True, default=("nat",),
                     show_default=True, metavar="SPEC", help=NETWORK_HELP),
        click.option("--accel", type=click.Choice([a.value for a in api.Accel]), default="auto",
                     show_default=True),
        cold_option,
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
def sandbox_create(name: str, image: str, cpus: int, memory: str, disk_size: str,
                   workspace: Path | None, shares: tuple[str, ...], networks: tuple[str, ...],
                   accel: str, cold: bool, as_json: bool) -> None:
    """Create sandbox NAME from the sealed sandbox image (copy-on-write); over a sandbox
    template of its shape if there is one (its first start restores it), unless --cold."""
    notes: list[str] = []
    try:
        config = api.create_sandbox(name, image=image, cpus=cpus, memory=memory,
                                    disk_size=disk_size, workspace=workspace, shares=shares,
                                    networks=networks, accel=accel, cold=cold, notes=notes)
    finally:
        _say_notes(notes)
    if as_json:
        print_json(config.model_dump(mode="json"))
        return
    ws = config.channels.shares[0].host_path if config.channels else "-"
    template = config.channels.template if config.channels else None
    over = f"; its first start restores template {template[:12]}" if template else ""
    out.print(f"created sandbox [bold]{escape(name)}[/] ({config.id}); workspace "
              f"{escape(ws)}{over}", highlight=False)


def _say_notes(lines: list[str]) -> None:
    """Print what creating or starting a session had to tell (a stale template, say)."""
    for line in lines:
        note(line)


def _started_how(status: dict[str, Any]) -> str:
    """How ``sandbox start`` got a session running, for people: "restored from
    template" or "booted"."""
    return "restored from template" if status.get("start_mode") == "restored" else "booted"


@sandbox.command("start")
@click.argument("name")
@click.option("--timeout", type=Seconds(), default=120.0, show_default=True,
              help="Seconds to wait for the guest agent to answer.")
@cold_option
@click.option("--json", "as_json", is_flag=True)
def sandbox_start(name: str, timeout: float, cold: bool, as_json: bool) -> None:
    """Start sandbox NAME; returns when `secvf vm exec` works (already running: a note).

    A new session made over a sandbox template is restored from it, unless --cold;
    otherwise (or if the restore fails: a note says so) the guest boots.
    """
    status = api.vm_status(name)
    if status["kind"] == "ai-sandbox" and status["state"] == "running":
        note(f"sandbox '{name}' is already running")
    else:
        status = api.start_sandbox(name, timeout=timeout, cold=cold)
        _say_notes(status.get("notes", []))
        if not as_json:
            out.print(f"sandbox [bold]{escape(name)}[/] ready in {status['boot_s']} s "
                      f"({_started_how(status)}; exec socket "
                      f"{escape(str(status['exec_socket']))})", highlight=False)
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
                disk_size: str, workspace: Path | None, shares: tuple[str, ...],
                networks: tuple[str, ...], accel: str, cold: bool, timeout: float | None,
                tty_mode: bool, interactive: bool, command: tuple[str, ...]) -> None:
    """Create + start a sandbox, run COMMAND, exit with its status (--rm: then delete).

    The session is restored from a sandbox template of its shape if there is one
    (--cold: it boots). Options go before COMMAND: its first word ends them (or `--`
    does); an unknown option is refused before anything is created. Exit status as for
    `vm exec`; on a terminal, stderr first says how the session started.
    """
    with exec_errors(as_json=False):
        notes: list[str] = []
        try:
            config = api.create_sandbox(name, image=image, cpus=cpus, memory=memory,
                                        disk_size=disk_size, workspace=workspace,
                                        shares=shares, networks=networks, accel=accel,
                                        cold=cold, notes=notes)
        finally:
            _say_notes(notes)
        try:
            status = api.start_sandbox(config.name, cold=cold)
            _say_notes(status.get("notes", []))
            if err.is_terminal:  # a script's stderr stays the command's own
                note(f"sandbox {config.name} ready in {status['boot_s']} s "
                     f"({_started_how(status)})")
            code = run_streaming(config.name, list(command), env={}, cwd=None, user=None,
                                 tty_mode=tty_mode, interactive=interactive, timeout=timeout)
        finally:  # also on errors and Ctrl-C: --rm means nothing is left behind
            if remove:
                api.remove_sandbox(config.name, purge=workspace is None, force=True)
    sys.exit(code)


#: How often ``sandbox port-forward`` checks that the sandbox still runs.
FORWARD_POLL_S = 1.0


@sandbox.command("port-forward")
@click.argument("name")
@click.argument("specs", nargs=-1, required=True, metavar="[HOST_ADDR:]HOST_PORT:GUEST_PORT...")
@click.option("--json", "as_json", is_flag=True,
              help="JSON Lines: one object per forward as it starts, then a list of their "
                   "counters at the end.")
def sandbox_port_forward(name: str, specs: tuple[str, ...], as_json: bool) -> None:
    """Forward host TCP ports to TCP ports inside running sandbox NAME, until Ctrl-C or
    the sandbox stops.

    Listens on 127.0.0.1 unless HOST_ADDR is given ([::1]:8080:80 for IPv6); HOST_PORT 0
    picks a free port. The connections ride the sandbox's vsock channel, so it works
    with `--network none` too. A guest port nobody listens on resets the connection.
    """
    import time

    forwards = []
    try:
        for spec in specs:
            forwards.append(api.port_forward(name, spec))
            started = forwards[-1].describe()
            if as_json:
                print_json(started, one_line=True)
            else:
                note(f"forwarding {started['host_addr']}:{started['host_port']} -> "
                     f"guest port {started['guest_port']}")
        while api.vm_status(name)["state"] in LIVE_STATES:
            time.sleep(FORWARD_POLL_S)
        note(f"sandbox '{name}' stopped; forwards closed")
    except KeyboardInterrupt:
        pass
    finally:
        for forward in forwards:
            forward.close()
        if as_json and forwards:
            print_json([f.describe() for f in forwards], one_line=True)
        elif forwards:
            for f in forwards:
                st = f.stats
                note(f"{f.host_addr}:{f.host_port} -> {f.guest_port}: {st.connections} "
                     f"connection(s), {st.refused} reset, {st.bytes_to_guest} bytes in, "
                     f"{st.bytes_from_guest} bytes out")


@sandbox.command("list")
@click.option("--json", "as_json", is_flag=True)
def sandbox_list(as_json: bool) -> None:
    """List sandboxes."""
    rows = api.list_sandboxes()
    if as_json:
        print_json(rows)
        return
    table = new_table("NAME", "STATE", "EXEC SOCKET", "ID")
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
