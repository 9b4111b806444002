"""Saved guest state: what a snapshot or a sandbox template records about itself.

A saved state is a directory holding ``state`` (QEMU's device state, written by a
migration to a file descriptor) and ``ram`` (a sparse copy of the guest's RAM file),
described by a :class:`SavedState`. It can be restored only into a machine of the same
:class:`MachineShape`: the same QEMU version, CPU model, vCPUs, memory size,
accelerator and devices. :meth:`MachineShape.mismatch` names the first difference,
which is what a refused restore tells the user.

A VM snapshot (:class:`SnapshotInfo`, ``snapshots/<NAME>/snapshot.json`` in the VM's
bundle) pairs an internal qcow2 snapshot of the VM's disk with, for a memory snapshot,
a saved state. A sandbox template (:class:`TemplateInfo`) is a saved state of a booted
sandbox guest plus the frozen disk layer it was saved with.

This module does no I/O.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: Format of the saved-state records; a change that old readers cannot take bumps it.
SAVED_STATE_FORMAT: Literal[1] = 1


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class MachineShape(_Record):
    """Everything a saved state's restore depends on besides the files themselves."""

    qemu_version: str  # e.g. "7.2.22"
    cpu_model: str  # QEMU -cpu value
    cpus: int
    memory_mib: int
    accel: str  # "kvm" or "tcg"
    devices: list[str]  # "driver:id" of every planned device, in plan order

    def mismatch(self, other: MachineShape) -> str | None:
        """The first way ``other`` (the machine to restore into) differs, in words."""
        for field in ("qemu_version", "cpu_model", "cpus", "memory_mib", "accel"):
            saved, now = getattr(self, field), getattr(other, field)
            if saved != now:
                return f"{field.replace('_', ' ')} was {saved} when saved, is {now} now"
        if self.devices != other.devices:
            gone = sorted(set(self.devices) - set(other.devices))
            new = sorted(set(other.devices) - set(self.devices))
            return (f"the devices differ (saved with {', '.join(gone) or 'the same set'}; "
                    f"now {', '.join(new) or 'in another order'})")
        return None


class SavedState(_Record):
    """A restorable guest state: the ``state`` and ``ram`` files of its directory."""

    format: Literal[1] = SAVED_STATE_FORMAT
    shape: MachineShape  # the machine it was saved from
    state_bytes: int = Field(ge=1)  # size of the device-state file
    ram_bytes: int = Field(ge=1)  # apparent size of the RAM file (the guest's memory)
    ram_allocated_bytes: int = Field(ge=0)  # what the sparse RAM copy occupies
    saved_at: str  # RFC 3339
    pause_s: float = Field(ge=0)  # how long the guest was paused to save it
    guest_ready: bool = False  # the guest had printed its ready marker (a restore is ready)


class SnapshotKind(StrEnum):
    """What a VM snapshot holds."""

    MEMORY = "memory"  # disk + RAM + devices: a revert resumes the guest where it was
    DISK = "disk"  # the disk only: a revert restores a stopped VM's disk


class SnapshotInfo(_Record):
    """A VM snapshot, as ``snapshots/<NAME>/snapshot.json`` records it."""

    format: Literal[1] = SAVED_STATE_FORMAT
    name: str
    kind: SnapshotKind
    created_at: str  # RFC 3339
    vm_was: Literal["running", "stopped"]  # the VM's state when it was taken
    disk_tag: str  # the internal qcow2 snapshot of the VM's disk
    state: SavedState | None = None  # memory snapshots only
    took_s: float = Field(ge=0)  # wall time of the whole save
    size_bytes: int = Field(ge=0)  # bytes its files occupy (the disk snapshot not counted)


class TemplateInfo(_Record):
    """A sandbox template: ``templates/<ID>/template.json``."""

    format: Literal[1] = SAVED_STATE_FORMAT
    id: str  # the key: sha256 (hex) of everything the template depends on
    # what it is for: a sandbox template (sessions), or an analysis clean state (the
    # guest and gateway `secvf analyze` restores); `sandbox template` shows the first only
    purpose: Literal["sandbox", "clean-state"] = "sandbox"
    image: str  # image name
    recipe_hash: str  # the image build it was booted from
    network: str  # "nat" or "none"
    disk_bytes: int  # the disk size sessions get
    spare_ports: int  # PCIe root ports left free for hot-plugged channel devices
    layer: str  # the frozen disk layer sessions' overlays sit on (absolute path)
    state: SavedState
    created_at: str
    build_s: float = Field(ge=0)  # wall time of the build (boot + save)
