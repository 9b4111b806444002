"""``secvf vm …``: the VM library, lifecycle, status, serial console, logs, graphical
console and cdrom media."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

from secvf import api
from secvf.faces.cli.app import LIVE_STATES, NETWORK_HELP, Seconds, SecVFGroup
from secvf.faces.cli.common import err, escape, new_table, note, out, print_json

if TYPE_CHECKING:
    from rich.status import Status

#: When stderr is not a terminal, ``vm stop`` notes the time left this often (seconds).
STOP_NOTE_EVERY_S = 10.0


@click.group(cls=SecVFGroup)
def vm() -> None:
    """Create, run and inspect VMs."""


@vm.command("create")
@click.argument("name")
@click.option("--kind", type=click.Choice([k.value for k in api.VMKind]), default="generic",
              show_default=True)
@click.option("--cpus", type=int, default=1, show_default=True)
@click.option("--memory", default="1G", show_default=True, help="Guest RAM (e.g. 512M, 2G).")
@click.option("--disk", "disk_size", default="8G", show_default=True, help="Disk size.")
@click.option("--image", help="SecVF image to boot (default: base; sandbox for ai-sandbox).")
@click.option("--disk-image", type=click.Path(path_type=Path), help="Boot this disk image.")
@click.option("--iso", metavar="PATH|NAME",
              help="Boot this installer ISO (read-only): a file, or a cached ISO's name "
                   "(see: secvf iso list).")
@click.option("--network", "networks", multiple=True, metavar="SPEC",
              help=f"{NETWORK_HELP} Default: nat; none for malware-analysis.")
@click.option("--allow-internet", is_flag=True,
              help="Let a malware-analysis VM have --network nat (the sample gets the internet).")
@click.option("--accel", type=click.Choice([a.value for a in api.Accel]), default="auto",
              show_default=True)
@click.option("--share", "shares", multiple=True, metavar="HOSTDIR:GUESTPATH[:ro|:rw]",
              help="Share a host directory (read-only unless :rw; repeatable; ai-sandbox only).")
@click.option("--workspace", type=click.Path(path_type=Path), help="Workspace dir (ai-sandbox).")
@click.option("--root-password-file", type=click.File("r"), metavar="FILE",
              help="Console login as root with the password in FILE (one line; - reads stdin). "
                   "Generic VMs from a SecVF image; only a hash is kept.")
@click.option("--ask-root-password", is_flag=True,
              help="Like --root-password-file, but ask for the password.")
@click.option("--autologin", is_flag=True,
              help="A root shell on the serial console without a password (throwaway VMs).")
@click.option("--display", type=click.Choice([d.value for d in api.DisplayMode]),
              default="none", show_default=True,
              help="vnc: a graphical console on a private socket (see: vm display); "
                   "view-only on malware-analysis VMs, none on ai-sandbox.")
@click.option("--json", "as_json", is_flag=True, help="Print the new VM's config as JSON.")
def vm_create(name: str, kind: str, cpus: int, memory: str, disk_size: str, image: str | None,
              disk_image: Path | None, iso: str | None, networks: tuple[str, ...],
              allow_internet: bool, accel: str,
              shares: tuple[str, ...], workspace: Path | None,
              root_password_file: TextIO | None, ask_root_password: bool, autologin: bool,
              display: str, as_json: bool) -> None:
    """Create VM NAME (a copy-on-write overlay over its image)."""
    root_password = _root_password(root_password_file, ask_root_password)
    config = api.create_vm(name, kind=api.VMKind(kind), cpus=cpus, memory=memory,
                           disk_size=disk_size, image=image, disk_image=disk_image, iso=iso,
                           networks=networks, allow_internet=allow_internet, accel=accel,
                           shares=shares, workspace=workspace,
                           root_password=root_password, autologin=autologin, display=display)
    if as_json:
        print_json(config.model_dump(mode="json"))
    else:
        out.print(f"created {config.kind} VM [bold]{escape(name)}[/] ({config.id}) in "
                  f"{escape(str(api.vm_dir(name)))}")


def _root_password(file: TextIO | None, ask: bool) -> str | None:
    """The root password from ``--root-password-file`` or ``--ask-root-password``."""
    if file is not None and ask:
        raise click.UsageError("--root-password-file and --ask-root-password exclude each other")
    if file is not None:
        return file.read().removesuffix("\n").removesuffix("\r")
    if ask:
        return str(click.prompt("root password", hide_input=True, confirmation_prompt=True,
                                err=True))
    return None


@vm.command("list")
@click.option("--json", "as_json", is_flag=True)
def vm_list(as_json: bool) -> None:
    """List every VM with its kind and state."""
    rows: list[dict[str, Any]] = []
    for item in api.list_vms():
        if item.config is None:
            rows.append({"name": item.bundle.name, "state": "invalid", "error": item.error})
            continue
        status = api.vm_status(item.bundle.name)
        rows.append({k: status[k] for k in ("name", "id", "kind", "state", "accel", "network",
                                            "cpus", "memory_mib")})
    if as_json:
        print_json(rows)
        return
    table = new_table("NAME", "KIND", "STATE", "CPUS", "MEMORY", "NETWORK", "ACCEL", "ID")
    invalid = [row for row in rows if row["state"] == "invalid"]
    for row in rows:
        if row["state"] == "invalid":
            table.add_row(escape(row["name"]), "?", "[red]invalid[/]", "", "", "", "", "-")
            continue
        table.add_row(*map(escape, (row["name"], row["kind"], row["state"], str(row["cpus"]),
                                    api.format_size(row["memory_mib"] << 20), row["network"],
                                    row["accel"] or "-", row["id"])))
    out.print(table)
    for row in invalid:  # why, and what to do, below the table where it has room
        out.print(f"[red]{escape(row['name'])}[/] is invalid: {escape(row['error'])}",
                  highlight=False)


@vm.command("status")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def vm_status(name: str, as_json: bool) -> None:
    """Show a VM's state, accelerator, uptime, live device list and snapshots (while it
    runs: what it was restored from and the devices hot-plugged since it started)."""
    status = api.vm_status(name)
    if as_json:
        print_json(status)
        return
    out.print(f"[bold]{escape(status['name'])}[/] ({escape(status['kind'])}) {status['id']}")
    out.print(f"  state:   {escape(status['state'])}")
    if status["pid"]:
        out.print(f"  pid:     supervisor {status['pid']}, qemu {status['qemu_pid']}")
        out.print(f"  accel:   {escape(str(status['accel']))} "
                  f"({escape(str(status['accel_reason']))})")
        out.print(f"  uptime:  {status['uptime_s']} s, guest ready: {status['guest_ready']}")
    if status.get("exec_socket"):
        out.print(f"  exec:    {escape(status['exec_socket'])}")
    if status.get("restored_from"):
        out.print(f"  restored from: {escape(status['restored_from'])}", highlight=False)
    for dev in status.get("hotplugged", []):
        channel = f", {dev['channel']} channel" if dev.get("channel") else ""
        out.print(f"  hot-plugged: {escape(dev['path'].rsplit('/', 1)[-1])} "
                  f"({escape(dev['type'])}{escape(channel)})", highlight=False)
    for index, nic in enumerate(status.get("nics", [])):
        where = "nat" if nic["mode"] == "nat" else f"isolated:{nic['network']}"
        role = " (router)" if nic.get("router") else ""
        address = f" {nic['address']}" if nic.get("address") else ""
        out.print(f"  nic{index}:    {escape(where)}{role} {nic['mac']}{address}",
                  highlight=False)
    if status.get("snapshots"):
        out.print(f"  snapshots: {escape(', '.join(status['snapshots']))}", highlight=False)
    _print_jail(status.get("jail"))
    for warning in status.get("resource_warnings", []):
        out.print(f"  [yellow]resource {escape(warning['level'])}:[/] "
                  f"{escape(warning['message'])} since {warning['since']}", highlight=False)
    for line in status.get("device_errors", []):
        out.print(f"  [red]guest reports a dead virtio device:[/] {escape(line)}",
                  highlight=False)
    if status["devices"]:
        table = new_table("DEVICE", "TYPE", "CHANNEL", title="live devices (QMP)")
        for dev in status["devices"]:
            table.add_row(*map(escape, (dev["path"].rsplit("/", 1)[-1], dev["type"],
                                        dev["channel"] or "-")))
        out.print(table)
    last = status.get("last_run")
    if last:
        out.print(escape(f"  last run: {last.get('state')} ({last.get('reason')})"
                         f" at {last.get('ended_at')}"))


@vm.command("start")
@click.argument("name")
@click.option("--accel", type=click.Choice([a.value for a in api.Accel]),
              help="Override the VM's accelerator for this run.")
@click.option("--foreground", is_flag=True, help="Keep the supervisor attached.")
@click.option("--wait-ready", type=Seconds(), default=None, metavar="SECONDS",
              help="Also wait up to SECONDS for the guest's ready marker (VMs booted from "
                   "a SecVF image; refused for ISO and disk-image VMs).")
@click.option("--json", "as_json", is_flag=True)
def vm_start(name: str, accel: str | None, foreground: bool, wait_ready: float | None,
             as_json: bool) -> None:
    """Start VM NAME under its own supervisor (already running: a note, exit 0)."""
    if foreground:
        sys.exit(api.run_in_foreground(name, accel=accel))
    status = api.vm_status(name)
    if status["state"] == "running":
        note(f"VM '{name}' is already running")
        if wait_ready:
            status = api.wait_for_ready(name, wait_ready)
    else:
        status = api.start_vm(name, accel=accel, wait_ready=wait_ready)
        if not as_json:
            out.print(f"started [bold]{escape(name)}[/] (accel {status['accel']}, "
                      f"{len(status['devices'])} devices)")
    if as_json:
        print_json(status)


@vm.command("stop")
@click.argument("name")
@click.option("--force", is_flag=True, help="Do not wait for the guest: quit QEMU now.")
@click.option("--timeout", type=Seconds(zero_ok=True), default=30.0, show_default=True,
              help="Seconds to wait for a graceful powerdown before forcing (0: like --force).")
@click.option("--json", "as_json", is_flag=True)
def vm_stop(name: str, force: bool, timeout: float, as_json: bool) -> None:
    """Stop VM NAME (ACPI powerdown, then forced after --timeout; not running: a note, exit 0).

    While it waits for the guest, stderr shows the time left; it says so when it forced.
    """
    status = api.vm_status(name)
    progress = _StopProgress(gentle=not force and timeout > 0)
    if status["state"] not in LIVE_STATES:
        note(f"VM '{name}' is not running")
    else:
        try:
            status = api.stop_vm(name, force=force, timeout=timeout, progress=progress)
        finally:
            progress.close()
        if not as_json:
            out.print(f"stopped [bold]{escape(name)}[/]")
    if as_json:
        print_json({**status, "forced": progress.forced})


class _StopProgress:
    """Shows on stderr how long the guest has left to power off, and remembers whether
    the stop was forced. On a terminal one line counts down; otherwise a note every
    :data:`STOP_NOTE_EVERY_S` seconds. A forced stop is noted unless it was asked for
    (``gentle`` false: ``--force`` or ``--timeout 0``)."""

    def __init__(self, *, gentle: bool) -> None:
        self.gentle = gentle  # the guest was given time to power off
        self.forced = False  # set by the last event
        self._status: Status | None = None  # the countdown line (terminal only)
        self._noted_left: float | None = None  # time left at the last note (not a terminal)

    def __call__(self, event: api.StopWaiting | api.StopDone) -> None:
        if isinstance(event, api.StopDone):
            self.close()
            self.forced = event.forced
            if event.forced and self.gentle:
                note(event.why)
            return
        text = f"waiting for the guest to power off ({math.ceil(event.left_s)} s left)…"
        if err.is_terminal:
            if self._status is None:
                self._status = err.status(text)
                self._status.start()
            else:
                self._status.update(text)
        elif self._noted_left is None or self._noted_left - event.left_s >= STOP_NOTE_EVERY_S:
            note(text)
            self._noted_left = event.left_s

    def close(self) -> None:
        """Remove the countdown line, if there is one."""
        if self._status is not None:
            self._status.stop()
            self._status = None


@vm.command("pause")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def vm_pause(name: str, as_json: bool) -> None:
    """Pause running VM NAME: QEMU stops its vCPUs; memory, devices and connections stay
    (already paused: a note, exit 0). Exec, snapshots and media changes wait for
    vm resume; vm stop works (a graceful stop resumes the guest to power it off)."""
    _pause_or_resume(name, paused=True, as_json=as_json)


@vm.command("resume")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def vm_resume(name: str, as_json: bool) -> None:
    """Resume paused VM NAME (already running: a note, exit 0). The guest of a SecVF image
    steps its clock past the pause within about a second."""
    _pause_or_resume(name, paused=False, as_json=as_json)


def _pause_or_resume(name: str, *, paused: bool, as_json: bool) -> None:
    """``vm pause`` / ``vm resume``: a note if the VM already is so, else ask the API."""
    want = "paused" if paused else "running"
    status = api.vm_status(name)
    if status["state"] == want:
        note(f"VM '{name}' is already {want}")
    else:
        status = api.pause_vm(name) if paused else api.resume_vm(name)
        if not as_json:
            out.print(f"{'paused' if paused else 'resumed'} [bold]{escape(name)}[/]")
    if as_json:
        print_json(status)


@vm.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Stop the VM first if it is running.")
def vm_delete(name: str, force: bool) -> None:
    """Delete VM NAME and its disk (also a directory vm list shows as invalid)."""
    api.delete_vm(name, force=force)
    out.print(f"deleted [bold]{escape(name)}[/]")


@vm.command("clone")
@click.argument("src")
@click.argument("dst")
@click.option("--copy-workspace", is_flag=True,
              help="AI sandbox: copy SRC's workspace into DST's (default: DST's is empty).")
def vm_clone(src: str, dst: str, copy_workspace: bool) -> None:
    """Clone stopped VM SRC as DST (copy-on-write; new UUID and MAC; a sandbox clone
    gets its own workspace)."""
    api.clone_vm(src, dst, copy_workspace=copy_workspace)
    out.print(f"cloned [bold]{escape(src)}[/] to [bold]{escape(dst)}[/]")


@vm.command("rename")
@click.argument("old")
@click.argument("new")
def vm_rename(old: str, new: str) -> None:
    """Rename stopped VM OLD to NEW."""
    api.rename_vm(old, new)
    out.print(f"renamed [bold]{old}[/] to [bold]{new}[/]")


@vm.command("import")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", help="Name for the imported VM (default: the name in its vm.json); "
                            "it is written into the new vm.json.")
def vm_import(path: Path, name: str | None) -> None:
    """Import a VM bundle directory (vm.json + disk.qcow2).

    The bundle is treated as hostile: its config, boot ISO or disk image, shares and
    every file of its disk chain are checked first, and the disk is rewritten.
    """
    config = api.import_vm(path, name=name)
    out.print(f"imported {escape(str(config.kind))} VM [bold]{escape(config.name)}[/] "
              f"({config.id}) into {escape(str(api.vm_dir(config.name)))}")


@vm.command("logs")
@click.argument("name")
@click.option("--run", type=click.IntRange(min=1), metavar="N",
              help="An earlier run's log (the last few are kept; default: the current or "
                   "last run).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output while the run lasts.")
def vm_logs(name: str, run: int | None, follow: bool) -> None:
    """Print VM NAME's serial console log of one run (each start is a new run)."""
    api.print_serial_log(name, run=run, follow=follow)


@vm.command("console")
@click.argument("name")
def vm_console(name: str) -> None:
    """Attach to VM NAME's serial console (detach with Ctrl-])."""
    api.attach_console(name)


@vm.command("display")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def vm_display(name: str, as_json: bool) -> None:
    """Show how to connect to running VM NAME's graphical console (created with
    --display vnc): a VNC server on a Unix socket only you can open."""
    info = api.display_info(name)
    if as_json:
        print_json(info.as_json())
        return
    sock = escape(info.socket)
    access = "view-only: the guest has no keyboard or pointer" if info.view_only else \
        "keyboard and tablet pointer"
    out.print(f"VM [bold]{escape(name)}[/]: VNC console ({access}) on a Unix socket, mode "
              f"{info.mode} (only you and root can connect):\n  {sock}", highlight=False)
    out.print(f"connect here:       {escape(info.connect)}   (TigerVNC 1.11 or later)",
              highlight=False)
    out.print(f"from another host:  ssh -L 5900:{sock} THIS-HOST, then: vncviewer "
              "localhost:5900", highlight=False)
    out.print(f"any VNC viewer:     socat TCP-LISTEN:5900,bind=127.0.0.1,reuseaddr,fork "
              f"UNIX-CONNECT:{sock}, then: vncviewer localhost:5900 (every local user can "
              "reach port 5900 while socat runs)", highlight=False)


@vm.group("media", cls=SecVFGroup)
def vm_media() -> None:
    """Change the medium in a VM's cdrom drive (VMs created with --iso): at once if it
    runs, and for its next start."""


@vm_media.command("eject")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def vm_media_eject(name: str, as_json: bool) -> None:
    """Eject the ISO from VM NAME's cdrom drive (e.g. once the install is done)."""
    _media_done(api.eject_medium(name), as_json)


@vm_media.command("insert")
@click.argument("name")
@click.argument("iso", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def vm_media_insert(name: str, iso: Path, as_json: bool) -> None:
    """Put ISO into VM NAME's cdrom drive, read-only (checked as vm create --iso checks it)."""
    _media_done(api.insert_medium(name, iso), as_json)


def _media_done(change: api.MediaChange, as_json: bool) -> None:
    if as_json:
        print_json(change.as_json())
        return
    medium = escape(change.medium) if change.medium else "empty"
    when = "now and from the next start" if change.live else "from the next start"
    out.print(f"cdrom of [bold]{escape(change.name)}[/]: {medium} ({when})", highlight=False)


def _print_jail(jail: dict[str, Any] | None) -> None:
    """The ``jail:`` lines of ``vm status`` (a running VM)."""
    if jail is None:
        return
    who = "your ids in a user namespace" if jail["user_namespace"] else f"uid {jail['uid']}"
    out.print(f"  jail:    {who}, namespaces {', '.join(jail['namespaces'])}", highlight=False)
    limits, usage = jail.get("limits"), jail.get("usage") or {}
    if limits is None:
        out.print(f"  [yellow]no cgroup:[/] {escape(jail.get('cgroup_problem') or '')}",
                  highlight=False)
        return
    cpus = limits["cpu_quota_us"] / limits["cpu_period_us"]
    out.print(f"  limits:  memory {_mib(usage.get('memory_bytes'))}/"
              f"{_mib(limits['memory_bytes'])} MiB, pids {usage.get('pids', '?')}/"
              f"{limits['pids_max']}, cpu {cpus:g}", highlight=False)


def _mib(value: int | None) -> str:
    return "?" if value is None else str(value >> 20)
