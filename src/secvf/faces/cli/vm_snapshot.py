"""``secvf vm snapshot …``: take, list, revert and delete a VM's snapshots.

A running VM gets a memory snapshot by default (RAM, devices and disk from one instant;
a revert brings it back running there), a stopped VM a disk snapshot. An AI sandbox
gets disk snapshots only: QEMU 7.2 cannot save its vhost-user devices.
"""

from __future__ import annotations

import click

from secvf import api
from secvf.faces.cli.app import LIVE_STATES, SecVFGroup, format_time, working
from secvf.faces.cli.common import escape, new_table, note, out, print_json


@click.group("snapshot", cls=SecVFGroup)
def vm_snapshot() -> None:
    """Snapshots of a VM: memory + disk while it runs, disk while it is stopped."""


@vm_snapshot.command("create")
@click.argument("name")
@click.argument("snap")
@click.option("--memory/--disk-only", "memory", default=None,
              help="Save RAM and devices with the disk (a running VM only), or the disk "
                   "alone (crash-consistent). Default: --memory while the VM runs, the disk "
                   "when it is stopped; an AI sandbox: --disk-only.")
@click.option("--json", "as_json", is_flag=True, help="Print the snapshot's record as JSON.")
def snapshot_create(name: str, snap: str, memory: bool | None, as_json: bool) -> None:
    """Take snapshot SNAP of VM NAME (the rules of VM names apply to SNAP)."""
    status = api.vm_status(name)
    running = status["state"] in LIVE_STATES
    if memory and not running:
        raise click.UsageError(
            f"--memory needs a running VM, and VM '{name}' is {status['state']}: start it "
            "first, or leave out --memory for a disk snapshot")
    sandbox_disk = memory is None and running and status["kind"] == str(api.VMKind.AI_SANDBOX)
    disk_only = memory is False or sandbox_disk
    what = "memory and disk" if running and not disk_only else "disk"
    with working(f"saving the {what} of VM '{name}' as snapshot '{snap}'…"):
        info = api.create_snapshot(name, snap, disk_only=disk_only)
    if sandbox_disk:
        note(f"VM '{name}' is an AI sandbox: its snapshot holds the disk only (QEMU 7.2 "
             "cannot save the state of its vhost-user devices)")
    elif running and memory and info.kind is not api.SnapshotKind.MEMORY:
        note(f"VM '{name}' stopped meanwhile: snapshot '{snap}' holds only its disk")
    if as_json:
        print_json(info.model_dump(mode="json"))
        return
    detail = f"{_size(info)} saved, guest paused {info.state.pause_s:.2f} s" if info.state \
        else f"VM {info.vm_was}"
    out.print(f"VM [bold]{escape(name)}[/]: {info.kind} snapshot '{escape(info.name)}' taken in "
              f"{info.took_s:.2f} s ({detail})", highlight=False)


@vm_snapshot.command("list")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def snapshot_list(name: str, as_json: bool) -> None:
    """List VM NAME's snapshots, oldest first."""
    snapshots = api.list_snapshots(name)
    if as_json:
        print_json([info.model_dump(mode="json") for info in snapshots])
        return
    table = new_table("NAME", "KIND", "TAKEN", "VM WAS", "SIZE", "TOOK")
    for info in snapshots:
        table.add_row(escape(info.name), str(info.kind), escape(format_time(info.created_at)),
                      info.vm_was, _size(info), f"{info.took_s:.2f} s")
    out.print(table)


@vm_snapshot.command("revert")
@click.argument("name")
@click.argument("snap")
@click.option("--json", "as_json", is_flag=True, help="Print the VM's status (and took_s).")
def snapshot_revert(name: str, snap: str, as_json: bool) -> None:
    """Revert VM NAME to snapshot SNAP.

    A memory snapshot: the VM runs from the saved instant afterwards (a running VM's
    current state is discarded, without a powerdown). A disk snapshot: the VM must be
    stopped, and stays stopped.
    """
    with working(f"reverting VM '{name}' to snapshot '{snap}'…"):
        status = api.revert_snapshot(name, snap)
    if as_json:
        print_json(status)
        return
    out.print(f"VM [bold]{escape(name)}[/] reverted to '{escape(snap)}' in "
              f"{status['took_s']:.2f} s; it is {escape(str(status['state']))}", highlight=False)


@vm_snapshot.command("delete")
@click.argument("name")
@click.argument("snap")
@click.option("--json", "as_json", is_flag=True)
def snapshot_delete(name: str, snap: str, as_json: bool) -> None:
    """Delete snapshot SNAP of VM NAME (running or not)."""
    api.delete_snapshot(name, snap)
    if as_json:
        print_json({"name": name, "snapshot": snap, "deleted": True})
        return
    out.print(f"deleted snapshot '{escape(snap)}' of VM [bold]{escape(name)}[/]",
              highlight=False)


def _size(info: api.SnapshotInfo) -> str:
    """What a snapshot's own files occupy; a disk snapshot's blocks are inside the VM's
    disk and not counted ("-")."""
    if info.kind is api.SnapshotKind.DISK:
        return "-"
    return api.format_size(info.size_bytes)
