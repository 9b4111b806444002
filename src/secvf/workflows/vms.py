"""VM library operations that need more than the store: a disk made from a built
image (with the root password the user chose written into the guest's shadow file),
stopping a VM (an AI sandbox syncs its disks through the agent first), deleting a VM
that may still be running (and collecting the layers it leaves),
cloning or renaming a sandbox together with its workspace, and importing a bundle
(whose boot source, shares and disk chain are all checked before anything is written).

The store (:mod:`secvf.store.library`) never resolves images, stops VMs or decides
about workspaces; these functions do that and then call it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from secvf.errors import AlreadyExists, ConfigError, LockBusy, SecVFError
from secvf.exec import ExecClient
from secvf.image import get_image
from secvf.jail.identity import release_identity
from secvf.machine.shares import WORKSPACE_TAG, default_workspace, validate_shares
from secvf.model.config import (
    DiskImageBoot,
    ImageBoot,
    IsoBoot,
    VMConfig,
    VMKind,
    now_iso,
)
from secvf.model.names import validate_name
from secvf.runtime import control
from secvf.store import gc, library
from secvf.store.bundle import Bundle
from secvf.store.disks import (
    DiskError,
    check_bundle_file,
    check_chain,
    disk_image_format,
    secvf_places,
)
from secvf.store.locks import locked
from secvf.store.networks import networks_lock, renew_nics
from secvf.store.runstate import is_running
from secvf.workflows import vm_exec, workspaces
from secvf.workflows.create import boot_source

log = logging.getLogger(__name__)

#: The guest file that gets the root password hash.
GUEST_SHADOW = "/etc/shadow"

#: How long the raw view of a disk (a FUSE export) may take to appear, and to go away.
DISK_VIEW_TIMEOUT_S = 10.0

#: Connecting to a sandbox's agent, and its ``sync``, before a stop: short, because a
#: guest that does not answer is stopped anyway.
STOP_SYNC_CONNECT_TIMEOUT_S = 3.0
STOP_SYNC_TIMEOUT_S = 10.0


def create_vm(config: VMConfig, *, root_password_hash: str | None = None,
              backing: Path | None = None) -> Bundle:
    """Create the VM ``config`` describes; an image-booted VM's disk is an overlay
    over that image's root filesystem. With ``root_password_hash`` (a crypt hash, see
    :func:`secvf.workflows.create.hash_root_password`) the guest's root account gets
    that password (:func:`set_root_password`); if that fails, the VM is deleted again.
    ``backing``: a frozen layer over the image to put the overlay on (a template's disk).

    Raises:
        NotFound: the image is not built.
        AlreadyExists, DiskError: as :func:`secvf.store.library.create_vm`.
        DiskError: the password could not be written into the disk.
    """
    rootfs = get_image(config.boot.image).rootfs if isinstance(config.boot, ImageBoot) else None
    bundle = library.create_vm(config, image_rootfs=rootfs, backing=backing)
    if root_password_hash is not None:
        try:
            set_root_password(bundle, root_password_hash)
        except BaseException:
            library.delete_vm(config.name)
            raise
    return bundle


def set_root_password(bundle: Bundle, password_hash: str) -> None:
    """Put ``password_hash`` into root's entry of ``/etc/shadow`` on stopped VM
    ``bundle``'s disk (the file keeps its mode and owner).

    Nothing is mounted and the image under the overlay is not touched:
    ``qemu-storage-daemon`` exports the qcow2 disk as a raw file over FUSE (as root, or
    with ``fusermount3``) and ``debugfs`` edits the ext4 filesystem in it.

    Raises:
        LockBusy: another command is changing the VM.
        DiskError: the disk cannot be exported or edited, or has no root account.
    """
    with (locked(bundle.edit_lock, f"VM '{bundle.name}'"),
          tempfile.TemporaryDirectory(prefix="secvf-disk-") as tmp,
          raw_view(bundle.disk, Path(tmp) / "disk.raw") as raw):
        shadow = _debugfs(raw, f"cat {GUEST_SHADOW}")
        mode, uid, gid = _file_mode_and_owner(raw, GUEST_SHADOW)
        edited = _with_root_password(shadow, password_hash)
        local = Path(tmp) / "shadow"
        local.write_text(edited)
        _debugfs(raw, f"rm {GUEST_SHADOW}", f"write {local} {GUEST_SHADOW}",
                 f"sif {GUEST_SHADOW} mode 0{mode:o}", f"sif {GUEST_SHADOW} uid {uid}",
                 f"sif {GUEST_SHADOW} gid {gid}", writable=True)
        if (_debugfs(raw, f"cat {GUEST_SHADOW}") != edited
                or _file_mode_and_owner(raw, GUEST_SHADOW) != (mode, uid, gid)):
            raise DiskError(f"writing {GUEST_SHADOW} into the disk of VM '{bundle.name}' "
                            "did not take")


def _with_root_password(shadow: str, password_hash: str) -> str:
    lines = shadow.splitlines(keepends=True)
    for i, line in enumerate(lines):
        fields = line.rstrip("\n").split(":")
        if fields[0] == "root" and len(fields) > 1:
            fields[1] = password_hash
            lines[i] = ":".join(fields) + "\n"
            return "".join(lines)
    raise DiskError(f"the guest's {GUEST_SHADOW} has no root account")


def _file_mode_and_owner(raw: Path, path: str) -> tuple[int, int, int]:
    """The inode mode (with the file type bits), uid and gid of ``path`` in ``raw``."""
    out = _debugfs(raw, f"stat {path}")
    mode = re.search(r"Mode:\s+(\d+)", out)
    owner = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", out)
    kind = re.search(r"Type: regular", out)
    if not (mode and owner and kind):
        raise DiskError(f"the guest's {path} is missing or not a regular file")
    return 0o100000 | int(mode.group(1), 8), int(owner.group(1)), int(owner.group(2))


def _debugfs(raw: Path, *commands: str, writable: bool = False) -> str:
    """Run ``debugfs`` commands on the ext4 filesystem in ``raw``; returns their output."""
    argv = ["debugfs", *(["-w"] if writable else []), "-f", "-", str(raw)]
    try:
        proc = subprocess.run(argv, input="\n".join(commands) + "\n", capture_output=True,
                              text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DiskError(f"debugfs failed: {exc} (debugfs comes with e2fsprogs)") from None
    if proc.returncode != 0:
        raise DiskError(f"debugfs failed: {proc.stderr.strip()[-500:]}")
    # with -f, debugfs echoes each command as "debugfs: CMD" before its output
    return "".join(line for line in proc.stdout.splitlines(keepends=True)
                   if not line.startswith("debugfs: "))


@contextlib.contextmanager
def raw_view(disk: Path, mountpoint: Path, *, writable: bool = True) -> Iterator[Path]:
    """``disk`` (qcow2, with its backing chain) as the raw file ``mountpoint`` for as long
    as the context lasts (qemu-storage-daemon's FUSE export: nothing is copied; reads go
    to the qcow2 chain).

    Raises:
        DiskError: the export did not start (it needs root or fusermount3).
    """
    mountpoint.touch(mode=0o600)

    def opt(path: Path) -> str:
        return str(path).replace(",", ",,")  # QEMU option syntax

    argv = ["qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=file0,filename={opt(disk)}",
            "--blockdev", "driver=qcow2,node-name=disk0,file=file0",
            "--export", f"type=fuse,id=view0,node-name=disk0,mountpoint={opt(mountpoint)},"
                        f"writable={'on' if writable else 'off'},allow-other=off"]
    try:
        daemon = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
    except OSError as exc:
        raise DiskError(f"cannot run qemu-storage-daemon: {exc.strerror} (it comes with "
                        "qemu-system-common)") from None
    try:
        deadline = time.monotonic() + DISK_VIEW_TIMEOUT_S
        while os.stat(mountpoint).st_dev == os.stat(mountpoint.parent).st_dev:
            if daemon.poll() is not None or time.monotonic() > deadline:
                daemon.kill()
                _, err = daemon.communicate()
                detail = (err or "").strip().splitlines()[-1:] or ["it did not start"]
                raise DiskError(f"cannot open the disk {disk} for editing: {detail[0]} "
                                "(qemu-storage-daemon's FUSE export needs root or fusermount3)")
            time.sleep(0.02)
        yield mountpoint
    finally:
        if daemon.poll() is None:
            daemon.terminate()
        try:
            daemon.communicate(timeout=DISK_VIEW_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.communicate()


def stop_vm(name: str, *, force: bool = False, timeout: float = 30.0,
            progress: control.StopListener | None = None) -> dict[str, Any]:
    """Stop VM ``name`` (see :func:`secvf.runtime.control.stop_vm`): an ACPI powerdown
    within ``timeout`` seconds, then forced, or forced at once with ``force``; ``progress``
    hears how long the guest has left and whether the stop was forced.

    A running AI sandbox first gets ``sync`` as root through its agent, so writes still
    in the guest's page cache reach the disk even if the stop ends up forced. A guest
    that does not answer within a few seconds is stopped all the same; a paused one gets
    no ``sync`` (it cannot answer), and the supervisor resumes it for the powerdown.

    Raises:
        StateError: the VM is not running, or still runs after all that.
    """
    bundle, config = library.get_vm(name)
    if config.kind is VMKind.AI_SANDBOX and is_running(bundle):
        sync_guest(name)
    return control.stop_vm(name, force=force, timeout=timeout, progress=progress)


def sync_guest(name: str) -> None:
    """Run ``sync`` as root in running AI sandbox ``name``, with short timeouts.
    Failures are logged (``secvf.workflows.vms``), never raised."""
    try:
        with ExecClient.connect(vm_exec.exec_socket_for(name),
                                timeout=STOP_SYNC_CONNECT_TIMEOUT_S) as client:
            result = client.run(["sync"], user="root", timeout=STOP_SYNC_TIMEOUT_S)
    except (SecVFError, OSError) as exc:
        log.info("VM '%s': no sync through the agent before stopping: %s", name, exc)
        return
    if not result.ok:
        log.info("VM '%s': sync in the guest failed (exit status %s)", name,
                 result.shell_exit_code)


def delete_vm(name: str, *, force: bool = False) -> VMConfig | None:
    """Delete VM ``name``; a running VM is refused unless ``force`` (then stopped first).
    Then collects garbage (:func:`secvf.store.gc.collect`; skipped while a clone runs),
    so the disk layers only this VM used go too.

    Returns the deleted VM's config (None if its vm.json was unreadable).

    Raises:
        NotFound: there is no such VM.
        StateError: the VM is running and ``force`` is false (or it was started again
            between the stop and the delete).
    """
    bundle = library.get_bundle(name)
    if force and is_running(bundle):
        control.stop_vm(name, force=True)
    config = library.delete_vm(name)
    if config is not None:  # (an unreadable vm.json's slot is freed when claimed again)
        release_identity(config.id)
    with contextlib.suppress(LockBusy):
        gc.collect()
    return config


def clone_vm(src: str, dst: str, *, copy_workspace: bool = False) -> Bundle:
    """Clone stopped VM ``src`` as ``dst`` (see :func:`secvf.store.library.clone_vm`).

    A sandbox clone gets its own default workspace: empty, or with ``copy_workspace`` a
    copy of the source's (:func:`secvf.workflows.workspaces.copy_workspace`), made
    while the source is locked and stopped. Read-only shares are kept.

    Raises:
        ConfigError: ``copy_workspace`` for a VM that has no workspace.
        AlreadyExists: ``dst`` is taken, or a workspace is left at its default place.
        StateError: ``src`` is running. WorkspaceError: the copy failed.
    """
    _, config = library.get_vm(src)
    if workspaces.workspace_of(config) is None:
        if copy_workspace:
            raise ConfigError(f"VM '{src}' is a {config.kind} VM and has no workspace to "
                              "copy; clone it without --copy-workspace")
        return library.clone_vm(src, dst)
    with workspaces.fresh_default(dst) as target:

        def own_workspace(clone: VMConfig) -> VMConfig:
            source = workspaces.workspace_of(clone)
            if copy_workspace and source is not None:
                workspaces.copy_workspace(source, target)
            return workspaces.with_workspace(clone, target)

        return library.clone_vm(src, dst, prepare=own_workspace)


def rename_vm(old: str, new: str) -> None:
    """Rename stopped VM ``old`` to ``new``; a sandbox's default workspace moves to
    ``new``'s default place (a workspace named with ``--workspace`` stays, and so does
    one another VM shares as well).

    Raises:
        AlreadyExists: ``new`` is taken, or a workspace is left at its default place.
        StateError: the VM is running.
    """
    _, config = library.get_vm(old)
    move = None
    current = workspaces.workspace_of(config)
    shared = current is not None and workspaces.users_of(current) != [old]
    if workspaces.is_default(config) and not shared:
        target = default_workspace(new)
        if target.exists() and not library.bundle_for(new).path.exists():
            raise AlreadyExists(workspaces.leftover_message(new, target))
        move = (WORKSPACE_TAG, target)
    library.rename_vm(old, new, move_share=move)


def import_vm(source: Path, *, name: str | None = None) -> Bundle:
    """Import the VM bundle directory ``source`` (``vm.json`` + ``disk.qcow2``) as VM
    ``name`` (default: the name in its ``vm.json``, which is then the new directory's
    name and is written into the new ``vm.json``). It gets a new UUID and MAC.

    A bundle is hostile input: QEMU runs as root and opens what it names. So before
    anything is written, all of it is checked:

    * ``vm.json`` as on every read (schema; the kind's channel rules);
    * the boot source as ``vm create`` checks it, and an ISO or disk image it names
      must also be a file every local user can read or one a VM here already uses
      (:func:`secvf.store.disks.check_bundle_file`); a disk image must be standalone;
    * an AI sandbox's shares, as create and start check them (``validate_shares``,
      under the new name);
    * the disk chain (:func:`secvf.store.disks.check_chain`): qcow2 or raw only, no
      external data file, no ``json:``/protocol file names, and every file in SecVF's
      image cache or layers, in the bundle, or the disk image the VM is based on.

    The new disk is then written by qemu-img (over SecVF's own base file, or
    flattened): nothing of the bundle's disk header but its data is kept.

    Raises:
        NotFound: no vm.json in ``source`` (or the image it boots is not built).
        ConfigError, ForbiddenDevice, InvalidName, ShareError: the config cannot work.
        UnsafeDisk, DiskError: the bundle names a file SecVF will not open, or a disk
            that cannot be read. AlreadyExists: the name is taken.
    """
    src, config = library.read_bundle(source)
    boot = _imported_boot(config)
    new_name = validate_name(name or config.name)
    with networks_lock():  # until the new VM's addresses are written
        new = config.model_copy(update={
            "id": str(uuid.uuid4()), "name": new_name,
            "nics": renew_nics(config.nics, vm=new_name), "boot": boot,
            "updated_at": now_iso()})
        validate_shares(new)
        base = Path(boot.path) if isinstance(boot, DiskImageBoot) else None
        chain = check_chain(src.disk, secvf_places(src.path, disk_image=base,
                                                   bundle_label="the bundle"))
        return library.import_vm(new, chain, source=src.path)


def _imported_boot(config: VMConfig) -> ImageBoot | DiskImageBoot | IsoBoot:
    """The boot source of an imported VM, checked as create checks it (and more)."""
    boot = config.boot
    if isinstance(boot, ImageBoot):
        boot_source(config.kind, boot.image, None, None, config.disk_bytes)
        return boot  # its recipe hash names the build the bundle's disk sits on
    if isinstance(boot, IsoBoot) and boot.ejected:
        return boot  # an empty drive: QEMU opens no ISO, so there is nothing to check
    what = "ISO" if isinstance(boot, IsoBoot) else "disk image"
    path = check_bundle_file(boot.path, what, _boot_files_in_use())
    if isinstance(boot, IsoBoot):
        return boot_source(config.kind, None, None, path, config.disk_bytes)
    disk_image_format(path)  # refuses one that is not standalone
    return boot_source(config.kind, None, path, None, config.disk_bytes)


def _boot_files_in_use() -> set[Path]:
    """The ISOs and disk images the VMs in the library boot from (resolved)."""
    return {Path(os.path.realpath(item.config.boot.path)) for item in library.list_vms()
            if item.config is not None
            and isinstance(item.config.boot, IsoBoot | DiskImageBoot)}
