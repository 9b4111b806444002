"""The VM library: create, list, find, clone, rename, import and delete VM bundles.

A new VM (create, clone, import) is built in a staging directory in the library
and renamed into place: that rename claims the name, so of two processes creating
the same name one wins and the other gets :class:`AlreadyExists`, and a failure
half-way never leaves a half-made VM. Staging and trash directories are held while in
use (:mod:`secvf.store.staging`), so the garbage collector removes only those a killed
process left. Changes to an existing VM (clone's disk freeze, rename, delete) happen
under that VM's edit lock. Nothing here starts or stops VMs: deleting a running VM is
refused (the workflows layer stops it first).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from secvf.errors import (
    AlreadyExists,
    ConfigError,
    InvalidName,
    NotFound,
    SecVFError,
    StateError,
)
from secvf.model.config import (
    DiskImageBoot,
    ImageBoot,
    IsoBoot,
    VMConfig,
    now_iso,
    save_config,
)
from secvf.model.names import validate_name
from secvf.model.sizes import format_size, round_up_size
from secvf.store import events as seclog
from secvf.store import paths
from secvf.store.bundle import Bundle, bundle_for, get_bundle
from secvf.store.disks import (
    BUNDLE,
    DiskError,
    DiskLayer,
    UnsafeDisk,
    check_vm_files,
    copy_chain,
    image_info,
    qemu_img,
)
from secvf.store.layers import LAYER_SUFFIX, layers_dir, using_layers
from secvf.store.locks import locked
from secvf.store.networks import networks_lock, renew_nics
from secvf.store.runstate import is_running
from secvf.store.staging import hold, new_work_dir, work_dir_name


def get_vm(name: str) -> tuple[Bundle, VMConfig]:
    """Return an existing VM's bundle and validated config (see :func:`load_vm`).

    Raises:
        InvalidName, NotFound: as :func:`get_bundle`. ConfigError, ForbiddenDevice: the
            bundle is not a usable VM.
    """
    bundle = get_bundle(name)
    return bundle, load_vm(bundle)


def load_vm(bundle: Bundle) -> VMConfig:
    """The validated config of library bundle ``bundle``.

    The rule: **a VM's name is its directory's name.** A directory whose ``vm.json``
    is missing, or names another VM (a bundle copied into ``vms/`` by hand, which also
    shares the original's UUID and so its runtime files), is not a usable VM; the
    message says how to import it properly or delete it.

    A directory whose name is no VM name (``vm delete`` cannot take it) gets, with any
    of these errors, the advice to remove it by hand.

    Raises:
        ConfigError: no ``vm.json``, an invalid one, or one that names another VM.
        ForbiddenDevice: ``vm.json`` asks for a channel its kind must not have.
    """
    named, delete = True, f"delete it with: secvf vm delete {bundle.name}"
    try:
        validate_name(bundle.name)
    except InvalidName as exc:
        named, delete = False, f"{exc}, so remove the directory by hand: rm -r {bundle.path}"
    if not bundle.config_file.exists():
        raise ConfigError(f"{bundle.path} has no vm.json, so it is not a usable VM; {delete}")
    try:
        config = bundle.load()
    except SecVFError as exc:
        if named:
            raise
        raise ConfigError(f"{exc}; {delete}") from None
    if config.name != bundle.name:
        raise ConfigError(
            f"{bundle.config_file} names the VM {config.name!r}, but its directory is "
            f"{bundle.name!r} (a VM's name is its directory's name; was the bundle copied "
            "into the library by hand?): move it out of the library and run: secvf vm "
            f"import DIR --name NAME, or {delete}")
    return config


@dataclass(frozen=True)
class ListedVM:
    """One row of ``vm list``: a valid config, or the error that makes it unusable."""

    bundle: Bundle
    config: VMConfig | None
    error: str | None


def list_vms() -> list[ListedVM]:
    """Every directory in the library, by name; one that is not a usable VM (see
    :func:`load_vm`; a symlink, which SecVF never makes) is listed with why."""
    out = []
    for path in sorted(paths.vms_dir().iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        bundle = Bundle(path)
        try:
            if path.is_symlink():
                raise ConfigError(f"{path} is a symlink, not a VM directory SecVF made; "
                                  f"remove it by hand: rm {path}")
            out.append(ListedVM(bundle, load_vm(bundle), None))
        except SecVFError as exc:
            out.append(ListedVM(bundle, None, str(exc)))
    return out


def create_overlay(disk: Path, backing: Path, backing_format: str, size: int) -> None:
    """Create a qcow2 copy-on-write overlay of ``backing`` (never modified)."""
    base_size = int(image_info(backing).get("virtual-size", 0))  # type: ignore[call-overload]
    if size < base_size:
        raise DiskError(f"disk size {format_size(size)} is smaller than the base image "
                        f"({format_size(base_size)}); use --disk "
                        f"{format_size(round_up_size(base_size))} or more")
    qemu_img("create", "-q", "-f", "qcow2", "-F", backing_format, "-b", str(backing),
             str(disk), str(size))


def create_vm(config: VMConfig, *, image_rootfs: Path | None = None,
              backing: Path | None = None) -> Bundle:
    """Create a VM bundle from a validated config (disk overlay, vm.json, event).

    ``image_rootfs`` is the root filesystem of the built image an image-booted VM's
    overlay sits on (the workflows layer resolves it); ``backing``, a frozen qcow2 layer
    over that image to sit on instead (a sandbox template's disk).

    Raises:
        AlreadyExists: the name is taken (also when another process won the race).
        DiskError: ``qemu-img`` could not make the disk.
        ConfigError: an image-booted config without ``image_rootfs``.
    """
    bundle = bundle_for(config.name)
    if bundle.path.exists():
        raise AlreadyExists(f"a VM named '{config.name}' already exists")
    with _staging("creating") as staging:
        if backing is not None:
            create_overlay(staging.disk, backing, "qcow2", config.disk_bytes)
        else:
            _make_disk(staging, config, image_rootfs)
        save_config(staging.config_file, config)
        _claim(staging, bundle)
    seclog.write_event("vm_created", vm=config.name, vm_id=config.id, kind=str(config.kind),
                       network=config.network_summary, boot=config.boot.type)
    return bundle


@contextlib.contextmanager
def _staging(purpose: str) -> Iterator[Bundle]:
    """A private staging bundle in the library, held while in use and removed unless
    it was claimed (see :mod:`secvf.store.staging`)."""
    path, held = new_work_dir(purpose)
    try:
        yield Bundle(path)
    finally:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        os.close(held)


def _claim(staging: Bundle, bundle: Bundle) -> None:
    """Rename ``staging`` to ``bundle``'s path; the rename is what claims the name."""
    try:
        staging.path.rename(bundle.path)
    except OSError as exc:
        raise AlreadyExists(f"a VM named '{bundle.name}' already exists") from exc


def _make_disk(bundle: Bundle, config: VMConfig, image_rootfs: Path | None) -> None:
    boot = config.boot
    if isinstance(boot, ImageBoot):
        if image_rootfs is None:
            raise ConfigError(f"VM '{config.name}' boots image '{boot.image}': "
                              "the image's root filesystem must be given")
        create_overlay(bundle.disk, image_rootfs, "raw", config.disk_bytes)
    elif isinstance(boot, DiskImageBoot):
        create_overlay(bundle.disk, Path(boot.path), boot.format, config.disk_bytes)
    elif isinstance(boot, IsoBoot):
        qemu_img("create", "-q", "-f", "qcow2", str(bundle.disk), str(config.disk_bytes))


def delete_vm(name: str) -> VMConfig | None:
    """Delete a stopped VM's bundle; returns its config (None if vm.json was unreadable).

    Raises:
        NotFound: there is no such VM.
        StateError: the VM is running (stop it first).
        LockBusy: another command is changing the VM.
    """
    bundle = get_bundle(name)
    config: VMConfig | None
    try:
        config = bundle.load()
    except SecVFError:
        config = None
    with locked(bundle.edit_lock, f"VM '{name}'"):
        if is_running(bundle):
            raise StateError(f"VM '{name}' is running; stop it first or use --force", "running")
        held = hold(bundle.path)
        trash = paths.vms_dir() / work_dir_name("deleting")
        try:
            bundle.path.rename(trash)
        except BaseException:
            os.close(held)
            raise
    try:
        shutil.rmtree(trash, ignore_errors=True)
    finally:
        os.close(held)
    seclog.write_event("vm_deleted", vm=name, vm_id=config.id if config else None)
    return config


def clone_vm(src: str, dst: str, *,
             prepare: Callable[[VMConfig], VMConfig] | None = None) -> Bundle:
    """Clone a stopped VM copy-on-write. New UUID and MAC; kind, network and image kept.

    The clone's disk is an overlay over a base that never changes, shared with the
    source (see :func:`_shared_base`): cloning a VM that has written nothing since it
    was last cloned adds no layer and does not lengthen its backing chain. A source with
    snapshots keeps its disk (and so its snapshots): the clone gets a copy of the disk's
    current state and no snapshots.

    ``prepare`` gets the clone's config while the source is locked and stopped, and
    returns the config to save (the workflows layer gives a sandbox clone its own
    workspace there). What it makes outside the bundle is the caller's to remove if
    the clone fails.
    """
    bundle, config = get_vm(src)
    dst_bundle = bundle_for(dst)
    if dst_bundle.path.exists():
        raise AlreadyExists(f"a VM named '{dst}' already exists")
    with locked(bundle.edit_lock, f"VM '{src}'"), networks_lock():
        if is_running(bundle):
            raise StateError(f"VM '{src}' is running; stop it before cloning", "running")
        new = config.model_copy(
            update={"id": str(uuid.uuid4()), "name": dst,
                    "nics": renew_nics(config.nics, vm=dst),
                    "created_at": now_iso(), "updated_at": now_iso()}
        )
        if prepare is not None:
            new = prepare(new)
        with using_layers(), _staging("cloning") as work:
            if image_info(bundle.disk).get("snapshots"):
                _copy_current_disk(bundle.disk, work.disk)
            else:
                base, base_format = _shared_base(bundle)
                qemu_img("create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base),
                         str(work.disk), str(config.disk_bytes))
            save_config(work.config_file, new)
            _claim(work, dst_bundle)
    seclog.write_event("vm_cloned", vm=dst, vm_id=new.id, source=src, source_id=config.id)
    return dst_bundle


def _copy_current_disk(disk: Path, dst: Path) -> None:
    """Give a clone a copy of the current state of ``disk``, which has snapshots: freezing
    it into a layer would leave its internal snapshots behind in the layer. The copy is
    an overlay over the same backing file, holding what the VM wrote (no snapshots)."""
    info = image_info(disk)
    args = ["convert", "-q", "-f", "qcow2", "-O", "qcow2"]
    backing, backing_format = info.get("full-backing-filename"), info.get("backing-filename-format")
    if backing and backing_format:
        args += ["-B", str(backing), "-F", str(backing_format)]
    qemu_img(*args, str(disk), str(dst))


def _shared_base(bundle: Bundle) -> tuple[Path, str]:
    """The base (path, format) a clone of stopped VM ``bundle`` can share with it.

    If the VM's overlay holds nothing of its own (a fresh VM, or one cloned before and
    not run since), that is the overlay's backing file, which is never written;
    otherwise the disk is frozen into a new layer (:func:`_freeze_disk`).
    """
    info = image_info(bundle.disk)
    backing = info.get("full-backing-filename")
    backing_format = info.get("backing-filename-format")
    unchanged = not info.get("snapshots") and _holds_no_data(bundle.disk)
    if backing and backing_format and unchanged:
        return Path(str(backing)), str(backing_format)
    return _freeze_disk(bundle), "qcow2"


def _holds_no_data(disk: Path) -> bool:
    """True if every block of qcow2 overlay ``disk`` reads through to its backing file
    (nothing, not even zeroes or a discard, was written to the overlay itself)."""
    try:
        extents = json.loads(qemu_img("map", "--output=json", "-U", "-f", "qcow2", str(disk)))
    except json.JSONDecodeError:
        return False
    return isinstance(extents, list) and all(
        isinstance(e, dict) and (e.get("depth") != 0 or e.get("present") is False)
        for e in extents)


def _freeze_disk(bundle: Bundle) -> Path:
    """Turn the VM's current disk into a read-only snapshot layer and give the VM a
    fresh overlay over it, so source and clone can both keep writing safely.

    The new overlay is made before the VM's disk moves: if ``qemu-img`` fails (a
    full disk, say), the VM keeps its disk exactly as it was.
    """
    frozen = layers_dir() / f"{uuid.uuid4()}{LAYER_SUFFIX}"
    fresh = bundle.path / f".{bundle.disk.name}.new"
    _link_or_copy(bundle.disk, frozen)  # the VM's disk stays untouched
    try:
        qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(frozen), str(fresh))
        os.replace(fresh, bundle.disk)
    except BaseException:
        fresh.unlink(missing_ok=True)
        frozen.unlink()
        raise
    frozen.chmod(0o400)
    return frozen


def _link_or_copy(src: Path, dst: Path) -> None:
    """Give ``src`` a second name ``dst`` (a copy when they are on different filesystems)."""
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.copy2(src, dst)


def rename_vm(old: str, new: str, *, move_share: tuple[str, Path] | None = None) -> None:
    """Rename a stopped VM (its UUID, and so its runtime files, do not change).

    ``move_share`` (tag, new host directory) moves that share's host directory along
    and points the share at its new place (the workflows layer uses it for a
    sandbox's default workspace, which is named after the VM). The new directory must
    not exist; the one it was in is removed if that leaves it empty. If the rename
    fails, the directory is moved back.

    Raises:
        AlreadyExists: the new name, or the share's new directory, is taken.
        StateError: the VM is running. LockBusy: another command is changing it.
    """
    bundle, config = get_vm(old)
    dst = bundle_for(new)
    with locked(bundle.edit_lock, f"VM '{old}'"):
        if is_running(bundle):
            raise StateError(f"VM '{old}' is running; stop it before renaming", "running")
        if dst.path.exists():
            raise AlreadyExists(f"a VM named '{new}' already exists")
        renamed = config.model_copy(update={"name": new, "updated_at": now_iso()})
        moved_from = None
        if move_share is not None:
            renamed, moved_from = _move_share_dir(renamed, *move_share)
        try:
            save_config(bundle.config_file, renamed)
            try:
                bundle.path.rename(dst.path)
            except OSError as exc:
                save_config(bundle.config_file, config)
                raise AlreadyExists(f"a VM named '{new}' already exists") from exc
        except BaseException:
            if move_share is not None and moved_from is not None:
                move_share[1].rename(moved_from)
            raise
    if moved_from is not None:
        with contextlib.suppress(OSError):
            moved_from.parent.rmdir()
    seclog.write_event("vm_renamed", vm=new, vm_id=config.id, old_name=old)


def _move_share_dir(config: VMConfig, tag: str, target: Path) -> tuple[VMConfig, Path | None]:
    """Move share ``tag``'s host directory to ``target``; return the config pointing
    there and where the directory was (None if it was missing: then the share is only
    re-pointed)."""
    channels = config.channels
    share = next((s for s in channels.shares if s.tag == tag), None) if channels else None
    if channels is None or share is None:
        raise ConfigError(f"VM '{config.name}' has no share '{tag}'")
    if target.exists():
        raise AlreadyExists(f"cannot move share '{tag}' of VM '{config.name}' to {target}: "
                            "it exists already; remove it or choose another name")
    source = Path(share.host_path)
    moved = source.is_dir()
    if moved:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        source.rename(target)
    shares = [s.model_copy(update={"host_path": str(target)}) if s is share else s
              for s in channels.shares]
    channels = channels.model_copy(update={"shares": shares})
    return config.model_copy(update={"channels": channels}), source if moved else None


def read_bundle(source: Path) -> tuple[Bundle, VMConfig]:
    """Read the VM bundle directory ``source`` (outside the library) that is to be
    imported: its ``vm.json`` validated as on every read.

    Nobody but you (or root) may be able to change the bundle: it must not change
    between its check and its copy.

    Raises:
        NotFound: no ``vm.json`` in it. ConfigError, ForbiddenDevice: an invalid one.
        UnsafeDisk: others can write to the directory or its ``vm.json``.
    """
    src = Bundle(Path(os.path.realpath(source.expanduser())))
    if not src.config_file.is_file():
        raise NotFound(f"{source} is not a VM bundle: no vm.json in it")
    check_unshared(src.path)
    check_unshared(src.config_file)
    return src, src.load()


def check_unshared(path: Path) -> None:
    """Refuse a bundle file or directory that another user could change.

    Raises:
        UnsafeDisk: it is not owned by you or root, or is group- or world-writable.
    """
    st = path.stat()
    if st.st_uid in (0, os.getuid()) and not st.st_mode & 0o022:
        return
    raise UnsafeDisk(f"{path} can be changed by other users (owner uid {st.st_uid}, mode "
                     f"{st.st_mode & 0o7777:04o}), so it could change between SecVF's check "
                     f"and its copy: run chown {os.getuid()} and chmod go-w on it, then "
                     "import again")


def import_vm(config: VMConfig, chain: tuple[DiskLayer, ...], *, source: Path) -> Bundle:
    """Add the VM ``config`` describes from the bundle ``source``, whose disk ``chain``
    has been checked (:func:`secvf.workflows.vms.import_vm` checks everything first).

    The new disk is written by qemu-img from the chain (:func:`disks.copy_chain`:
    over SecVF's own base file, or flattened) and checked again as ``vm start``
    checks it; ``config`` (with its new name, UUID and MAC) becomes its ``vm.json``.

    Raises:
        AlreadyExists: the name is taken. UnsafeDisk: a file of the chain inside the
            bundle can be changed by others. DiskError: qemu-img failed.
    """
    for layer in chain:
        if layer.where == BUNDLE:
            check_unshared(layer.path)
    dst = bundle_for(config.name)
    if dst.path.exists():
        raise AlreadyExists(f"a VM named '{config.name}' already exists")
    with using_layers(), _staging("importing") as staging:
        copy_chain(chain, staging.disk)
        check_vm_files(staging, config)
        save_config(staging.config_file, config)
        _claim(staging, dst)
    seclog.write_event("vm_imported", vm=config.name, vm_id=config.id, source=str(source))
    return dst


__all__ = [
    "DiskError", "ListedVM", "bundle_for", "check_unshared", "clone_vm", "create_vm",
    "delete_vm", "get_bundle", "get_vm", "image_info", "import_vm", "list_vms", "load_vm",
    "read_bundle", "rename_vm",
]
