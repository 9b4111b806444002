"""The image cache: built images on disk, their manifests, and atomic publishing.

Layout under ``secvf.store.paths.cache_dir() / "images"``::

    <name>-<hash12>/          one published build
        vmlinuz  initrd.img  rootfs.img  image.json
    .build-<name>-<hash12>-*/ a build in progress (never listed)
    .build.lock               flock held by whichever process is building

A build is assembled in a ``.build-*`` directory, its ``image.json`` written and every
file fsync'd, and only then renamed to ``<name>-<hash12>``: a reader sees a complete
image or none. A published build is never removed or replaced while a VM uses it: a
running VM has its files open, and a stopped VM's disk overlay reads through its
``rootfs.img``, so the VM could not boot any more (:func:`ensure_replaceable`).
``image.json`` is validated on every load; a damaged one is reported with the file's
path and how to fix it, never as a traceback.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from secvf.errors import ConfigError, ImageBuildFailed, NotFound, StateError
from secvf.image.recipe import RECIPES, SHORT_HASH_LEN, recipe_hash
from secvf.store import paths

MANIFEST = "image.json"
STAGING_PREFIX = ".build-"
_DIR_NAME = re.compile(rf"^(?P<name>.+)-(?P<hash>[0-9a-f]{{{SHORT_HASH_LEN}}})$")


class ImageFiles(BaseModel):
    """File names (inside the image directory) of an image's parts."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    kernel: str = "vmlinuz"
    initrd: str = "initrd.img"
    rootfs: str = "rootfs.img"

    @field_validator("kernel", "initrd", "rootfs")
    @classmethod
    def _plain_file_name(cls, value: str) -> str:
        if not value or "/" in value or value in (".", ".."):
            raise ValueError(f"{value!r} is not a plain file name")
        return value


class ImageManifest(BaseModel):
    """The content of ``image.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    format_version: int
    name: str
    recipe_hash: str
    built_at: datetime
    size_bytes: int
    kernel_version: str
    kernel_package: str
    cmdline: str
    has_agent: bool
    files: ImageFiles = ImageFiles()

    @field_validator("recipe_hash")
    @classmethod
    def _sha256_hex(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("must be 64 lowercase hex digits")
        return value


@dataclass(frozen=True)
class ImageInfo:
    """A built guest image, ready to boot."""

    name: str
    recipe_hash: str  #: full sha256 hex of the recipe (see :func:`recipe_hash`)
    built_at: datetime  #: UTC
    size_bytes: int  #: bytes the image's files occupy on the host disk
    kernel_version: str
    path: Path  #: the image directory
    kernel: Path  #: pass to QEMU ``-kernel``
    initrd: Path  #: pass to QEMU ``-initrd``
    rootfs: Path  #: raw ext4; use read-only, as the backing file of a qcow2 overlay
    cmdline: str  #: base kernel command line; append ``secvf_*`` parameters to it
    has_agent: bool  #: True if init starts the exec agent on vsock port 2222

    @property
    def short_hash(self) -> str:
        """The recipe hash as shown to users."""
        return self.recipe_hash[:SHORT_HASH_LEN]


def images_dir() -> Path:
    """Return the directory that holds every built image (created 0700)."""
    return paths.ensure_private_dir(paths.images_dir())


def image_dir(name: str, recipe_hash: str) -> Path:
    """Return where the build of ``name`` with ``recipe_hash`` is (or would be) published."""
    return images_dir() / f"{name}-{recipe_hash[:SHORT_HASH_LEN]}"


def load_image(directory: Path) -> ImageInfo:
    """Read and check one published image.

    Raises:
        ConfigError: ``image.json`` is missing, unreadable or invalid, or a file it
            names is missing; the message names the file and the fix.
    """
    manifest_path = directory / MANIFEST
    fix = f"remove it with: secvf image rm {_name_of(directory)}"
    try:
        manifest = ImageManifest.model_validate_json(manifest_path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read {manifest_path}: {exc.strerror}; {fix}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{manifest_path} is corrupt ({problems}); {fix}") from None
    if manifest.name != _name_of(directory):
        raise ConfigError(
            f"{manifest_path} names image {manifest.name!r}, not its directory; {fix}"
        )
    parts = {role: directory / getattr(manifest.files, role) for role in ImageFiles.model_fields}
    for role, path in parts.items():
        if not path.is_file():
            raise ConfigError(f"image {directory} is missing its {role} file {path.name}; {fix}")
    return ImageInfo(
        name=manifest.name,
        recipe_hash=manifest.recipe_hash,
        built_at=manifest.built_at,
        size_bytes=manifest.size_bytes,
        kernel_version=manifest.kernel_version,
        path=directory,
        cmdline=manifest.cmdline,
        has_agent=manifest.has_agent,
        **parts,
    )


def list_images() -> list[ImageInfo]:
    """Return every published build, by name, newest first within a name.

    Builds whose ``image.json`` is damaged are left out (``get_image`` reports them).
    """
    found = []
    for directory in _published_dirs():
        try:
            found.append(load_image(directory))
        except ConfigError:
            continue
    return sorted(found, key=lambda i: (i.name, -i.built_at.timestamp()))


def get_image(name: str) -> ImageInfo:
    """Return the build of image ``name`` made from its recipe as it is now; if there is
    none, its newest build (made from an earlier recipe).

    A newer build of an older recipe (built from an older checkout into the same cache)
    does not win over the current recipe's: new VMs get the guest this SecVF ships.

    Raises:
        NotFound: no build of ``name`` exists.
        ConfigError: a build of ``name`` is damaged (see :func:`load_image`).
    """
    builds = [load_image(d) for d in _published_dirs(name)]
    if not builds:
        raise NotFound(f"image '{name}' is not built; run: secvf image build {name}")
    current = current_recipe_hash(name)
    return max(builds, key=lambda i: (i.recipe_hash == current, i.built_at))


def current_recipe_hash(name: str) -> str | None:
    """The hash of the built-in recipe ``name`` as it is now (None: no such recipe, or
    one of its files is missing)."""
    recipe = RECIPES.get(name)
    if recipe is None:
        return None
    try:
        return recipe_hash(recipe)
    except ImageBuildFailed:
        return None


def remove_image(name: str) -> None:
    """Delete every build of image ``name``.

    Raises:
        NotFound: no build of ``name`` exists.
        StateError: a VM uses one of them (see :func:`ensure_replaceable`).
    """
    directories = _published_dirs(name)
    if not directories:
        raise NotFound(f"image '{name}' is not built")
    with build_lock():
        for directory in directories:
            ensure_replaceable(directory, "remove")
        for directory in directories:
            _delete_dir(directory)


def ensure_replaceable(directory: Path, action: str) -> None:
    """Raise :class:`StateError` if the build in ``directory`` is in use: a process (a
    running VM) has one of its files open, or the disk of a VM in the library, stopped
    or not, is an overlay over its root filesystem. ``action`` ("remove", "rebuild")
    words the message.
    """
    from secvf.store.gc import vms_based_on  # the library's disks: not needed to find images

    ensure_unused(directory)
    based = vms_based_on(directory)
    if based:
        raise StateError(
            f"cannot {action} image {directory.name}: the disks of VM "
            f"{', '.join(repr(n) for n in based)} are overlays over it, and those VMs "
            "would not boot any more; delete them first (secvf vm delete NAME)", "in use")


def ensure_unused(directory: Path) -> None:
    """Raise :class:`StateError` if a process has a file of ``directory`` open."""
    users = processes_using(directory)
    if users:
        raise StateError(
            f"image {directory.name} is in use by running processes (pids "
            f"{', '.join(map(str, users))}); stop the VMs that use it first"
        )


def processes_using(directory: Path) -> list[int]:
    """Pids of processes (that we may inspect) with a file under ``directory`` open."""
    prefix = str(directory.resolve()) + "/"
    pids = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            targets = [os.readlink(fd) for fd in fd_dir.iterdir()]
        except OSError:
            continue
        if any(t.startswith(prefix) for t in targets):
            pids.append(int(fd_dir.parent.name))
    return pids


@contextmanager
def build_lock(on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the cache-wide build lock (blocking); ``on_wait`` is called if we must wait."""
    fd = os.open(images_dir() / ".build.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def staging_dir(name: str, recipe_hash: str) -> Iterator[Path]:
    """A fresh private build directory inside the cache; deleted unless published.

    Call with the build lock held: it also clears leftovers of builds that were killed.
    """
    root = images_dir()
    for stale in root.glob(f"{STAGING_PREFIX}*"):
        _delete_dir(stale)
    work = Path(
        tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{name}-{recipe_hash[:SHORT_HASH_LEN]}-", dir=root)
    )
    try:
        yield work
    finally:
        _delete_dir(work)


def publish(work: Path, manifest: ImageManifest) -> ImageInfo:
    """Write ``image.json`` into ``work``, make it durable and move it into place.

    An existing build at the destination (a forced rebuild) is replaced, unless it is
    in use (:func:`ensure_replaceable` raises :class:`StateError`).
    """
    data = manifest.model_dump_json(indent=2).encode() + b"\n"
    with open(work / MANIFEST, "wb") as f:
        f.write(data)
    for item in work.iterdir():
        _fsync_path(item)
    _fsync_path(work)
    final = image_dir(manifest.name, manifest.recipe_hash)
    if final.exists():
        ensure_replaceable(final, "rebuild")
        old = final.with_name(f"{STAGING_PREFIX}old-{final.name}")
        os.rename(final, old)
        os.rename(work, final)
        _delete_dir(old)
    else:
        os.rename(work, final)
    _fsync_path(final.parent)
    return load_image(final)


def allocated_bytes(directory: Path) -> int:
    """Bytes the files directly in ``directory`` occupy on disk (sparse files count less)."""
    return sum(p.stat().st_blocks * 512 for p in directory.iterdir() if p.is_file())


def _published_dirs(name: str | None = None) -> list[Path]:
    result = []
    for d in sorted(images_dir().iterdir()):
        match = _DIR_NAME.match(d.name)
        if d.name.startswith(".") or match is None or not d.is_dir():
            continue
        if name is None or match["name"] == name:
            result.append(d)
    return result


def _name_of(directory: Path) -> str:
    match = _DIR_NAME.match(directory.name)
    return match["name"] if match else directory.name


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _delete_dir(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
