"""Each VM's own unprivileged host identity: a uid/gid slot of the range SecVF owns.

When SecVF runs as root, every VM gets a **slot**: a block of :data:`SLOT_IDS` host ids
starting at ``ID_BASE + slot * SLOT_IDS``. The block's first id is the VM's uid and gid
(its QEMU, vsock backend and virtiofsd run as it); a share's virtiofsd maps the other
guest ids into the rest of the block, so nothing one VM's guest creates on a share is
owned by an id another VM uses.

A slot belongs to one VM for the VM's lifetime (files its guest made on a share keep
their owner from run to run) and is recorded in ``$SECVF_HOME/jail/slots/<slot>``; it
is freed by ``vm delete``, and a slot whose VM bundle is gone is taken again. Claims are
serialised by a lock file, so two VMs never hold the same slot.

The range (``2,000,000,000`` + up to 2048 blocks of 65,536) lies above the ids
distributions hand out to users and to ``/etc/subuid`` ranges, and below ``2^31``.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from secvf.errors import ConfigError
from secvf.store import paths

ID_BASE = 2_000_000_000
SLOT_IDS = 65536
MAX_SLOTS = 2048


class JailIdentityError(ConfigError):
    """No identity can be given to a VM (every slot is taken, or the registry is bad)."""


@dataclass(frozen=True)
class JailIdentity:
    """A VM's host identity: its slot, and the ids that follow from it."""

    slot: int

    @property
    def uid(self) -> int:
        """The uid (and gid) the VM's host processes run as."""
        return ID_BASE + self.slot * SLOT_IDS

    @property
    def gid(self) -> int:
        return self.uid

    def contains(self, host_id: int) -> bool:
        """Whether ``host_id`` lies in this VM's block."""
        return self.uid <= host_id < self.uid + SLOT_IDS


def slot_of_uid(uid: int) -> int | None:
    """The slot whose block holds ``uid`` (None: not an id of SecVF's range)."""
    if ID_BASE <= uid < ID_BASE + MAX_SLOTS * SLOT_IDS:
        return (uid - ID_BASE) // SLOT_IDS
    return None


def _registry() -> Path:
    return paths.ensure_private_dir(paths.secvf_home() / "jail")


@contextmanager
def _locked() -> Iterator[Path]:
    root = _registry()
    slots = root / "slots"
    slots.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(root / "slots.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield slots
    finally:
        os.close(fd)


def _holder(record: Path) -> tuple[str, Path] | None:
    """The (vm id, bundle) a slot file names; None for an unreadable one (free)."""
    try:
        data = json.loads(record.read_text())
        return str(data["vm_id"]), Path(data["bundle"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def claim_identity(vm_id: str, bundle_dir: Path) -> JailIdentity:
    """The slot of VM ``vm_id`` (whose bundle is ``bundle_dir``): the one it holds, else
    the lowest free one, now recorded as its own.

    Raises:
        JailIdentityError: all :data:`MAX_SLOTS` slots belong to existing VMs.
    """
    with _locked() as slots:
        free: int | None = None
        for slot in range(MAX_SLOTS):
            holder = _holder(slots / str(slot))
            if holder is not None and holder[0] == vm_id:
                return JailIdentity(slot)
            if free is None and (holder is None or not holder[1].is_dir()):
                free = slot
        if free is None:
            raise JailIdentityError(f"all {MAX_SLOTS} jail identities belong to existing VMs; "
                                    "delete VMs you no longer need")
        record = slots / str(free)
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"vm_id": vm_id, "bundle": str(bundle_dir)}))
        os.replace(tmp, record)
        return JailIdentity(free)


def identity_of(vm_id: str) -> JailIdentity | None:
    """The slot VM ``vm_id`` holds, if any (no claim)."""
    slots = paths.secvf_home() / "jail" / "slots"
    if not slots.is_dir():
        return None
    for record in slots.iterdir():
        holder = _holder(record)
        if record.name.isdigit() and holder is not None and holder[0] == vm_id:
            return JailIdentity(int(record.name))
    return None


def release_identity(vm_id: str) -> None:
    """Free VM ``vm_id``'s slot (``vm delete``); nothing if it holds none."""
    if not (paths.secvf_home() / "jail" / "slots").is_dir():
        return
    with _locked() as slots:
        for record in slots.iterdir():
            holder = _holder(record)
            if holder is not None and holder[0] == vm_id:
                record.unlink(missing_ok=True)


__all__ = ["ID_BASE", "MAX_SLOTS", "SLOT_IDS", "JailIdentity", "JailIdentityError",
           "claim_identity", "identity_of", "release_identity", "slot_of_uid"]
