"""Changing the medium in a VM's cdrom drive (``secvf vm media eject|insert``).

Only a VM created with ``--iso`` has a cdrom drive. The drive's medium is part of the
VM's config (``boot``: the ISO last inserted and whether it was ejected), so the next
start has the same medium. On a running VM the supervisor changes the medium first,
over QMP (a :class:`~secvf.model.runtime.MediaRequest` on its control socket), and
``vm.json`` is written only once QEMU confirmed it; on a stopped VM only ``vm.json``
changes. An ISO is checked as ``vm create --iso`` checks it.

Both hold the VM's edit lock, so a start, rename or clone cannot run meanwhile.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from secvf.errors import ConfigError
from secvf.model.config import ImageBoot, IsoBoot, VMConfig, now_iso, save_config
from secvf.runtime import control
from secvf.store import library
from secvf.store.locks import locked
from secvf.store.runstate import is_running
from secvf.workflows.create import boot_source


@dataclass(frozen=True)
class MediaChange:
    """What a medium change did."""

    name: str  # the VM
    medium: str | None  # the ISO now in the drive; None: the drive is empty
    live: bool  # the VM runs and its drive changed at once (else: from its next start)

    def as_json(self) -> dict[str, Any]:
        """The dict ``vm media … --json`` prints."""
        return asdict(self)


def eject_medium(name: str) -> MediaChange:
    """Eject the medium of VM ``name``'s cdrom drive (now, if it runs, and for the next
    start).

    Raises:
        NotFound: no such VM. ConfigError: it has no cdrom drive.
        LockBusy: another command is changing (or starting) it.
        SecVFError: the running VM's supervisor or QEMU refused the change.
    """
    return _change(name, None)


def insert_medium(name: str, iso: Path) -> MediaChange:
    """Put ISO ``iso`` (read-only) into VM ``name``'s cdrom drive (now, if it runs, and
    for the next start).

    Raises:
        NotFound: no such VM. ConfigError: it has no cdrom drive.
        DiskError: ``iso`` is missing, unreadable or not a regular file; UnsafeDisk: it
            is in a system tree (as ``vm create --iso`` refuses it).
        LockBusy: another command is changing (or starting) it.
        SecVFError: the running VM's supervisor or QEMU refused the change.
    """
    return _change(name, iso)


def _change(name: str, iso: Path | None) -> MediaChange:
    bundle = library.get_bundle(name)
    with locked(bundle.edit_lock, f"VM '{name}'"):
        _, config = library.get_vm(name)
        boot = config.boot
        if not isinstance(boot, IsoBoot):
            source = "a SecVF image" if isinstance(boot, ImageBoot) else "a disk image"
            raise ConfigError(f"VM '{name}' has no cdrom drive: it boots {source}, and only "
                              "VMs created with --iso have one")
        new_boot = (boot.model_copy(update={"ejected": True}) if iso is None
                    else _checked_iso(config, iso))
        medium = None if new_boot.ejected else new_boot.path
        live = is_running(bundle)
        if live:
            control.change_medium(name, None if medium is None else Path(medium))
        save_config(bundle.config_file,
                    config.model_copy(update={"boot": new_boot, "updated_at": now_iso()}))
    return MediaChange(name=name, medium=medium, live=live)


def _checked_iso(config: VMConfig, iso: Path) -> IsoBoot:
    """The cdrom medium ``iso``, checked exactly as ``vm create --iso`` checks it."""
    boot = boot_source(config.kind, None, None, iso, config.disk_bytes)
    assert isinstance(boot, IsoBoot)  # given only an ISO, create boots from it
    return boot
