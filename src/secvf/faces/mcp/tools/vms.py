"""VM tools: list, status, audit, images, lifecycle (start, stop, pause, resume), snapshots,
create/clone/delete."""

from __future__ import annotations

from typing import Any, Literal

from secvf import api

from ..confirm import DestructiveConfirmation, settle
from ..output import jsonable
from ..registry import tool
from ..tiers import Tier


@tool(Tier.READ_ONLY, read_only=True, idempotent=True)
def vm_list() -> dict[str, Any]:
    """Every VM in the library: name, kind, and an error for one that cannot be read."""
    return {"vms": [jsonable(vm) for vm in api.list_vms()]}


@tool(Tier.READ_ONLY, read_only=True, idempotent=True)
def vm_status(name: str) -> dict[str, Any]:
    """VM ``name``'s state, devices, host-guest channels, NICs, snapshots and last run."""
    return jsonable(api.vm_status(name))  # type: ignore[no-any-return]


@tool(Tier.READ_ONLY, read_only=True, idempotent=True)
def audit_vms() -> dict[str, Any]:
    """Every VM's host-guest surfaces and findings (what `secvf audit --json` prints)."""
    return api.audit()


@tool(Tier.READ_ONLY, read_only=True, idempotent=True)
def image_list() -> dict[str, Any]:
    """The built guest images (name, build time, size, kernel, whether it has the agent)."""
    return {"images": [jsonable(i) for i in api.list_images()]}


@tool(Tier.READ_ONLY, read_only=True, idempotent=True)
def snapshot_list(name: str) -> dict[str, Any]:
    """VM ``name``'s snapshots, oldest first."""
    return {"snapshots": [jsonable(s) for s in api.list_snapshots(name)]}


@tool(Tier.SAFE_MUTATE, idempotent=True)
def vm_start(name: str, wait_ready_s: float | None = None) -> dict[str, Any]:
    """Start VM ``name`` (``wait_ready_s``: also wait for its guest's ready marker; only
    for a VM booted from a SecVF image). Returns its status."""
    return jsonable(api.start_vm(name, wait_ready=wait_ready_s))  # type: ignore[no-any-return]


@tool(Tier.SAFE_MUTATE, idempotent=True)
def vm_stop(name: str, force: bool = False, timeout_s: float = 30.0) -> dict[str, Any]:
    """Stop VM ``name``: ACPI powerdown, forced after ``timeout_s`` (or at once with
    ``force``). Returns its status."""
    return jsonable(api.stop_vm(name, force=force, timeout=timeout_s))  # type: ignore[no-any-return]


@tool(Tier.SAFE_MUTATE, idempotent=True)
def vm_pause(name: str) -> dict[str, Any]:
    """Pause running VM ``name``: its vCPUs stop, memory and devices stay (already paused:
    nothing happens). Exec, snapshots and media changes are refused until vm_resume;
    vm_stop works. Returns its status (state ``paused``)."""
    return jsonable(api.pause_vm(name))  # type: ignore[no-any-return]


@tool(Tier.SAFE_MUTATE, idempotent=True)
def vm_resume(name: str) -> dict[str, Any]:
    """Resume paused VM ``name`` (already running: nothing happens). Returns its status
    (state ``running``)."""
    return jsonable(api.resume_vm(name))  # type: ignore[no-any-return]


@tool(Tier.SAFE_MUTATE)
def snapshot_create(name: str, snapshot: str, disk_only: bool = False) -> dict[str, Any]:
    """Take snapshot ``snapshot`` of VM ``name`` (memory + disk while it runs, unless
    ``disk_only``)."""
    return {"snapshot": jsonable(api.create_snapshot(name, snapshot, disk_only=disk_only))}


@tool(Tier.SAFE_MUTATE, destructive=True)
def snapshot_revert(name: str, snapshot: str,
                    confirmation: DestructiveConfirmation) -> dict[str, Any]:
    """Revert VM ``name`` to ``snapshot``; its current state is discarded (asks the user)."""
    settle(confirmation)
    return jsonable(api.revert_snapshot(name, snapshot))  # type: ignore[no-any-return]


@tool(Tier.FULL, destructive=True)
def snapshot_delete(name: str, snapshot: str,
                    confirmation: DestructiveConfirmation) -> dict[str, Any]:
    """Delete snapshot ``snapshot`` of VM ``name`` (asks the user)."""
    settle(confirmation)
    api.delete_snapshot(name, snapshot)
    return {"name": name, "snapshot": snapshot, "deleted": True}


@tool(Tier.FULL)
def vm_create(name: str, kind: Literal["generic", "malware-analysis"] = "generic",
              image: str | None = None, cpus: int = 1, memory: str = "1G",
              disk_size: str = "8G", networks: list[str] | None = None) -> dict[str, Any]:
    """Create VM ``name`` from built image ``image`` (AI sandboxes: sandbox_create).
    ``networks``: ``nat``, ``none``, ``isolated:NAME[,router][,ip=ADDR]``."""
    config = api.create_vm(name, kind=api.VMKind(kind), image=image, cpus=cpus,
                           memory=memory, disk_size=disk_size, networks=networks or ())
    return {"vm": jsonable(config)}


@tool(Tier.FULL)
def vm_clone(source: str, name: str) -> dict[str, Any]:
    """Clone stopped VM ``source`` as ``name`` (copy-on-write; new UUID and MACs)."""
    return {"vm": jsonable(api.clone_vm(source, name))}


@tool(Tier.FULL, destructive=True)
def vm_delete(name: str, confirmation: DestructiveConfirmation,
              force: bool = False) -> dict[str, Any]:
    """Delete VM ``name`` and its disk (``force``: stop it first if it runs; asks the user)."""
    settle(confirmation)
    api.delete_vm(name, force=force)
    return {"name": name, "deleted": True}
