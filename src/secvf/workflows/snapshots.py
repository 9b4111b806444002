"""VM snapshots: create, list, revert and delete (``secvf vm snapshot …``).

A snapshot of a **running** VM is a memory snapshot by default: the supervisor pauses
the guest, takes an internal snapshot of its disk and saves its device state and RAM
(:mod:`secvf.runtime.savestate`), then resumes it — disk and memory from the same
instant. ``disk_only`` takes just the disk (crash-consistent). A **stopped** VM gets a
disk snapshot made with ``qemu-img``.

Reverting to a memory snapshot brings the VM back *running* at the saved instant,
whether it was running (its current run is discarded) or stopped: the disk is put
back to the snapshot while the VM's lock is held, and a new run restores the saved
state. A disk snapshot reverts a stopped VM's disk.

An AI sandbox gets disk snapshots only: QEMU 7.2 cannot save the state of its
vhost-user vsock and virtio-fs devices (sandboxes start fast from templates instead,
:mod:`secvf.workflows.templates`).

Every command holds the VM's edit lock, so two snapshot commands on one VM, or a
snapshot and a delete, exclude each other (:class:`~secvf.errors.LockBusy`).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from secvf.errors import (
    AlreadyExists,
    CorruptRecord,
    SnapshotError,
    StateError,
)
from secvf.machine import build_machine
from secvf.machine.plan import RunMode
from secvf.model.config import VMConfig, VMKind, now_iso
from secvf.model.runtime import SnapshotRequest
from secvf.model.savedstate import SnapshotInfo, SnapshotKind
from secvf.runtime import control
from secvf.runtime.accel import accel_for_vm
from secvf.store import events as seclog
from secvf.store import snapshots as store
from secvf.store.bundle import Bundle, RuntimeFiles
from secvf.store.library import get_vm
from secvf.store.locks import locked
from secvf.store.runstate import current_state, is_running
from secvf.store.savedstate import read_saved_state
from secvf.store.sparse import allocated_bytes


def create_snapshot(name: str, snapshot: str, *, disk_only: bool = False) -> SnapshotInfo:
    """Take snapshot ``snapshot`` of VM ``name`` (memory + disk while it runs, unless
    ``disk_only``; disk while it is stopped).

    Raises:
        InvalidName: a bad snapshot name.
        AlreadyExists: the VM has a snapshot of that name.
        LockBusy: another command is changing the VM.
        SnapshotError, DiskError: a memory snapshot of an AI sandbox, or saving failed
            (nothing is left behind; a running VM keeps running).
    """
    store.validate_snapshot_name(snapshot)
    bundle, config = get_vm(name)
    began = time.monotonic()
    with locked(bundle.edit_lock, f"VM '{name}'"):
        running = is_running(bundle)
        if not running:
            _remove_orphan_tags(bundle)
        if store.snapshot_dir(bundle, snapshot).exists():
            raise AlreadyExists(f"VM '{name}' already has a snapshot '{snapshot}'; delete it "
                                f"first: secvf vm snapshot delete {name} {snapshot}")
        memory = running and not disk_only
        if memory and config.kind is VMKind.AI_SANDBOX:
            raise SnapshotError(
                f"VM '{name}' is an AI sandbox: QEMU 7.2 cannot save the memory of its "
                "vhost-user vsock and virtio-fs devices; take a --disk-only snapshot, or "
                "start sandboxes fast from a template (secvf sandbox template build)")
        tag = f"{store.disk_tag(snapshot)}-{uuid.uuid4().hex[:8]}"
        with store.Staging(bundle, snapshot) as staging:
            saved = None
            if running:
                reply = control.snapshot_running(name, SnapshotRequest(
                    disk_tag=tag, state_dir=str(staging.path) if memory else None))
                saved = reply.saved
            else:
                store.create_disk_snapshot(bundle.disk, tag)
            info = SnapshotInfo(
                name=snapshot, kind=SnapshotKind.MEMORY if memory else SnapshotKind.DISK,
                created_at=now_iso(), vm_was="running" if running else "stopped",
                disk_tag=tag, state=saved, took_s=round(time.monotonic() - began, 3),
                size_bytes=allocated_bytes(staging.path))
            try:
                staging.commit(info)
            except BaseException:
                _drop_tag(name, bundle, tag)
                raise
    seclog.write_event("vm_snapshot_created", vm=name, vm_id=config.id, snapshot=snapshot,
                       kind=str(info.kind), took_s=info.took_s)
    return info


def list_snapshots(name: str) -> list[SnapshotInfo]:
    """VM ``name``'s snapshots, oldest first.

    Raises:
        NotFound: no such VM.
        CorruptRecord: a snapshot's record is damaged (the message names it).
    """
    bundle, _ = get_vm(name)
    found, problems = store.list_snapshots(bundle)
    if problems:
        raise CorruptRecord(f"VM '{name}': {problems[0]}")
    return found


def revert_snapshot(name: str, snapshot: str) -> dict[str, Any]:
    """Revert VM ``name`` to ``snapshot``; returns the VM's status and ``took_s``.

    A memory snapshot: the VM runs from the saved instant afterwards (a running VM's
    current run is stopped first, without a powerdown: its state is discarded). A disk
    snapshot: the VM must be stopped, and stays stopped.

    Raises:
        NotFound: no such VM or snapshot.
        StateError: a disk snapshot of a running VM.
        LockBusy: another command is changing the VM (or deleting it).
        SnapshotError: the saved state does not fit the VM any more (another QEMU, memory
            size or device set), or its files are damaged.
    """
    bundle, config = get_vm(name)
    info = store.get_snapshot(bundle, snapshot)
    began = time.monotonic()
    if info.kind is SnapshotKind.DISK:
        with locked(bundle.edit_lock, f"VM '{name}'"):
            if is_running(bundle):
                raise StateError(f"VM '{name}' is running; snapshot '{snapshot}' holds only its "
                                 f"disk: stop the VM first (secvf vm stop {name})", "running",
                                 ["stopped"])
            _apply_tag(bundle, info)
        status = control.vm_status(name)
    else:
        directory = store.snapshot_dir(bundle, snapshot)
        _check_fits(bundle, config, directory)  # before anything is stopped
        if is_running(bundle):
            control.stop_vm(name, force=True)

        def put_disk_back(locked_bundle: Bundle) -> None:
            _apply_tag(locked_bundle, store.get_snapshot(locked_bundle, snapshot))

        status = control.start_vm(name, restore=directory, before_start=put_disk_back)
    status["took_s"] = round(time.monotonic() - began, 3)
    seclog.write_event("vm_snapshot_reverted", vm=name, vm_id=config.id, snapshot=snapshot,
                       kind=str(info.kind), took_s=status["took_s"])
    return status


def delete_snapshot(name: str, snapshot: str) -> None:
    """Delete ``snapshot`` of VM ``name`` (running or not).

    Raises:
        NotFound: no such VM or snapshot.
        LockBusy: another command is changing the VM.
        SnapshotError, DiskError: the disk snapshot could not be deleted (the snapshot
            stays).
    """
    bundle, config = get_vm(name)
    with locked(bundle.edit_lock, f"VM '{name}'"):
        try:
            _drop_tag(name, bundle, store.get_snapshot(bundle, snapshot).disk_tag)
        except CorruptRecord:  # its disk snapshot is an orphan now: swept when stopped
            pass
        store.remove_snapshot_dir(bundle, snapshot)
    seclog.write_event("vm_snapshot_deleted", vm=name, vm_id=config.id, snapshot=snapshot)


def _check_fits(bundle: Bundle, config: VMConfig, directory: Path) -> None:
    """Refuse a memory snapshot whose files are damaged or whose machine is not the one
    the VM would be restored into now (the supervisor checks again).

    Raises:
        NotFound, CorruptRecord: its files are missing or damaged.
        SnapshotError: it was saved from another machine (QEMU, memory, devices …).
    """
    saved, what = read_saved_state(directory)
    record = current_state(bundle, config.id).record
    accel = record.accel if record is not None and record.accel else accel_for_vm(config).accel
    plan = build_machine(config, bundle, RuntimeFiles(config.id), accel, RunMode.RESTORE)
    problem = saved.shape.mismatch(plan.shape())
    if problem:
        raise SnapshotError(f"{what} cannot be restored into VM '{config.name}': {problem}; "
                            "delete it and take a new one")


def _apply_tag(bundle: Bundle, info: SnapshotInfo) -> None:
    if info.disk_tag not in store.disk_tags(bundle.disk):
        raise SnapshotError(f"snapshot '{info.name}' of VM '{bundle.name}': its disk snapshot "
                            f"{info.disk_tag} is missing from {bundle.disk}; delete the "
                            "snapshot")
    store.apply_disk_snapshot(bundle.disk, info.disk_tag)


def _drop_tag(name: str, bundle: Bundle, tag: str) -> None:
    """Delete disk snapshot ``tag``: over QMP if the VM runs, else with qemu-img."""
    if is_running(bundle):
        control.snapshot_running(name, SnapshotRequest(action="delete", disk_tag=tag))
    else:
        store.delete_disk_snapshot(bundle.disk, tag)


def _remove_orphan_tags(bundle: Bundle) -> None:
    """Remove what killed saves left: staging directories and unowned disk snapshots
    (the VM is stopped and locked)."""
    for tag in store.sweep(bundle):
        store.delete_disk_snapshot(bundle.disk, tag)
