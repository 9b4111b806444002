"""The VM library: create, list, find, clone, rename, import and delete VM bundles.

A new VM (create, clone, import) is built in a staging directory in the library
and renamed into place: that rename claims the name, so of two processes creating
the same name one wins and the other gets :class:`AlreadyExists`, and a failure
half-way never leaves a half-made VM. Changes to an existing VM (clone's disk
freeze, rename, delete) happen under that VM's edit lock. Nothing here starts or
stops VMs: deleting a running VM is refused (the workflows layer stops it first).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from secvf.errors import AlreadyExists, ConfigError, NotFound, SecVFError, StateError
from secvf.model.config import (
    DiskImageBoot,
    ImageBoot,
    IsoBoot,
    VMConfig,
    new_mac,
    now_iso,
    parse_config,
    save_config,
)
from secvf.model.names import validate_name
from secvf.store import events as seclog
from secvf.store import paths
from secvf.store.bundle import Bundle
from secvf.store.locks import locked
from secvf.store.runstate import is_running


class DiskError(SecVFError):
    """A disk or image file cannot be used (missing, unreadable, wrong size)."""


def bundle_for(name: str) -> Bundle:
    """Return the bundle of VM ``name`` (validating the name; the VM may not exist)."""
    return Bundle(paths.vms_dir() / validate_name(name))


def get_bundle(name: str) -> Bundle:
    """Return the bundle of an existing VM.

    Raises:
        InvalidName: the name is not valid. NotFound: no such VM.
    """
    bundle = bundle_for(name)
    if not bundle.config_file.exists():
        raise NotFound(f"no VM named '{name}' (see: secvf vm list)")
    return bundle


def get_vm(name: str) -> tuple[Bundle, VMConfig]:
    """Return an existing VM's bundle and validated config."""
    bundle = get_bundle(name)
    return bundle, bundle.load()


@dataclass(frozen=True)
class ListedVM:
    """One row of ``vm list``: a valid config, or the error that makes it unusable."""

    bundle: Bundle
    config: VMConfig | None
    error: str | None


def list_vms() -> list[ListedVM]:
    """Every VM in the library; a broken ``vm.json`` is listed with its error."""
    out = []
    for path in sorted(paths.vms_dir().iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        bundle = Bundle(path)
        try:
            out.append(ListedVM(bundle, bundle.load(), None))
        except SecVFError as exc:
            out.append(ListedVM(bundle, None, str(exc)))
    return out


def qemu_img(*args: str) -> str:
    """Run ``qemu-img`` and return stdout, or raise :class:`DiskError` with its message."""
    try:
        proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise DiskError("qemu-img is not installed (run scripts/install-system-deps.sh)") from None
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "unknown error"
        raise DiskError(f"qemu-img {args[0]} failed: {msg}")
    return proc.stdout


def image_info(path: Path) -> dict[str, object]:
    """``qemu-img info`` of a disk file as a dict (format, virtual-size, ...)."""
    if not path.is_file():
        raise DiskError(f"disk image {path} does not exist or is not a file")
    try:
        data = json.loads(qemu_img("info", "--output=json", "-U", str(path)))
    except json.JSONDecodeError as exc:
        raise DiskError(f"cannot read disk image {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise DiskError(f"cannot read disk image {path}")
    return data


def create_overlay(disk: Path, backing: Path, backing_format: str, size: int) -> None:
    """Create a qcow2 copy-on-write overlay of ``backing`` (never modified)."""
    base_size = int(image_info(backing).get("virtual-size", 0))  # type: ignore[call-overload]
    if size < base_size:
        raise DiskError(
            f"disk size {size} bytes is smaller than the base image ({base_size} bytes)"
        )
    qemu_img("create", "-q", "-f", "qcow2", "-F", backing_format, "-b", str(backing),
             str(disk), str(size))


def create_vm(config: VMConfig, *, image_rootfs: Path | None = None) -> Bundle:
    """Create a VM bundle from a validated config (disk overlay, vm.json, event).

    ``image_rootfs`` is the root filesystem of the built image an image-booted VM's
    overlay sits on (the workflows layer resolves it).

    Raises:
        AlreadyExists: the name is taken (also when another process won the race).
        DiskError: ``qemu-img`` could not make the disk.
        ConfigError: an image-booted config without ``image_rootfs``.
    """
    bundle = bundle_for(config.name)
    if bundle.path.exists():
        raise AlreadyExists(f"a VM named '{config.name}' already exists")
    with _staging("creating") as staging:
        _make_disk(staging, config, image_rootfs)
        save_config(staging.config_file, config)
        _claim(staging, bundle)
    seclog.write_event("vm_created", vm=config.name, vm_id=config.id, kind=str(config.kind),
                       network=str(config.network), boot=config.boot.type)
    return bundle


@contextlib.contextmanager
def _staging(purpose: str) -> Iterator[Bundle]:
    """A private staging bundle in the library, removed unless it was claimed.

    Its name holds no VM name, so any valid name fits the file-name limit.
    """
    staging = paths.vms_dir() / f".{purpose}-{uuid.uuid4().hex}"
    staging.mkdir(mode=0o700)
    try:
        yield Bundle(staging)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


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
        trash = paths.vms_dir() / f".deleting-{uuid.uuid4().hex}"
        bundle.path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)
    seclog.write_event("vm_deleted", vm=name, vm_id=config.id if config else None)
    return config


def clone_vm(src: str, dst: str) -> Bundle:
    """Clone a stopped VM copy-on-write: the clone's disk is an overlay over a frozen
    snapshot of the source's disk. New UUID and MAC; kind, network and image kept."""
    bundle, config = get_vm(src)
    dst_bundle = bundle_for(dst)
    if dst_bundle.path.exists():
        raise AlreadyExists(f"a VM named '{dst}' already exists")
    with locked(bundle.edit_lock, f"VM '{src}'"):
        if is_running(bundle):
            raise StateError(f"VM '{src}' is running; stop it before cloning", "running")
        frozen = _freeze_disk(bundle)
        new = config.model_copy(
            update={"id": str(uuid.uuid4()), "name": dst, "mac": new_mac(),
                    "created_at": now_iso(), "updated_at": now_iso()}
        )
        with _staging("cloning") as staging:
            qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(frozen),
                     str(staging.disk), str(config.disk_bytes))
            save_config(staging.config_file, new)
            _claim(staging, dst_bundle)
    seclog.write_event("vm_cloned", vm=dst, vm_id=new.id, source=src, source_id=config.id)
    return dst_bundle


def _freeze_disk(bundle: Bundle) -> Path:
    """Turn the VM's current disk into a read-only snapshot layer and give the VM a
    fresh overlay over it, so source and clone can both keep writing safely.

    The new overlay is made before the VM's disk moves: if ``qemu-img`` fails (a
    full disk, say), the VM keeps its disk exactly as it was.
    """
    layers = paths.secvf_home() / "layers"
    paths.ensure_private_dir(layers)
    frozen = layers / f"{uuid.uuid4()}.qcow2"
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


def rename_vm(old: str, new: str) -> None:
    """Rename a stopped VM (its UUID, and so its runtime files, do not change)."""
    bundle, config = get_vm(old)
    dst = bundle_for(new)
    with locked(bundle.edit_lock, f"VM '{old}'"):
        if is_running(bundle):
            raise StateError(f"VM '{old}' is running; stop it before renaming", "running")
        if dst.path.exists():
            raise AlreadyExists(f"a VM named '{new}' already exists")
        save_config(bundle.config_file,
                    config.model_copy(update={"name": new, "updated_at": now_iso()}))
        bundle.path.rename(dst.path)
    seclog.write_event("vm_renamed", vm=new, vm_id=config.id, old_name=old)


def import_vm(source: Path, *, name: str | None = None) -> Bundle:
    """Import a VM bundle directory (``vm.json`` + ``disk.qcow2``) made by export or copy.

    Everything read is validated like ``create``: the config, the kind's channel
    rules, the disk and its backing chain. The imported VM gets a new UUID and MAC.
    """
    src = Bundle(source)
    if not src.config_file.is_file():
        raise NotFound(f"{source} is not a VM bundle: no vm.json in it")
    try:
        raw = json.loads(src.config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{src.config_file} is not valid JSON: {exc}") from exc
    config = parse_config(raw, source=str(src.config_file))
    new_name = validate_name(name or config.name)
    info = image_info(src.disk)
    if info.get("format") != "qcow2":
        raise DiskError(f"{src.disk} is not a qcow2 disk (format {info.get('format')})")
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if backing:
        image_info(Path(str(backing)))
    dst = bundle_for(new_name)
    if dst.path.exists():
        raise AlreadyExists(f"a VM named '{new_name}' already exists")
    new = config.model_copy(update={"id": str(uuid.uuid4()), "name": new_name, "mac": new_mac(),
                                    "updated_at": now_iso()})
    with _staging("importing") as staging:
        shutil.copy2(src.disk, staging.disk)
        save_config(staging.config_file, new)
        _claim(staging, dst)
    seclog.write_event("vm_imported", vm=new_name, vm_id=new.id, source=str(source))
    return dst


__all__ = [
    "DiskError", "ListedVM", "bundle_for", "clone_vm", "create_vm", "delete_vm", "get_bundle",
    "get_vm", "import_vm", "list_vms", "rename_vm",
]
