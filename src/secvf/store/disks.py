"""The host files a VM's QEMU opens — its disk chain, a disk image, an ISO — checked
before QEMU or ``qemu-img`` opens any of them.

QEMU runs as root here, and a disk file can name other host files: a qcow2 header
holds a backing file name (which may also be a ``json:{…}`` or protocol filename
such as ``nbd:`` or ``http:``), the backing file's format (when it is missing QEMU
guesses, and a guessed vmdk names extent files of its own) and an external data
file, which QEMU opens read-write as the guest's disk. A VM bundle comes from
elsewhere (``vm import``) or can be edited by hand, so these names are hostile input.

How a chain is checked (:func:`inspect_chain`): level by level, top first, each level
judged *before* the next is looked at, with SecVF's own qcow2 header reader (never
QEMU's, which would already open what the header names):

1. the file is a regular file (no device, FIFO or directory) in one of the places the
   caller allows — for a VM: SecVF's image cache, ``$SECVF_HOME/layers``, the VM's
   bundle and the disk image its ``vm.json`` says it was created from;
2. its format is qcow2 (version 2 or 3) or raw — nothing else (vmdk, qed … can name
   more files);
3. a qcow2 has no external data file, no encryption and no incompatible feature this
   reader does not know; its backing file name is a plain path (no ``json:``, no
   ``proto:`` prefix, no control characters) and the backing format is recorded;
4. at most :data:`MAX_CHAIN_DEPTH` levels and no loops.

Only a chain that passed is shown to ``qemu-img info --backing-chain -U``, and what
qemu-img reports must be the same chain, level by level. ``qemu-img`` is always told
the format (``-f``), so it never guesses one.

A single host file a VM reads (an ISO, a disk image given to ``vm create``) is checked
by :func:`check_host_file`: a readable regular file outside ``/proc``, ``/sys``,
``/dev``, ``/run`` and ``/etc``. A path that a *bundle* names must also be one every
local user can read, or one a VM in the library already uses (:func:`check_bundle_file`).
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import subprocess
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from secvf.errors import SecVFError
from secvf.model.config import DiskImageBoot, IsoBoot, VMConfig
from secvf.store import paths
from secvf.store.bundle import Bundle
from secvf.store.layers import layers_dir

#: The formats SecVF lets QEMU open.
ALLOWED_FORMATS = ("qcow2", "raw")
#: Most levels a disk chain may have (image rootfs, a few clone layers, the overlay).
MAX_CHAIN_DEPTH = 16
#: Host trees no file a VM reads may come from (pseudo-filesystems, devices, config).
SYSTEM_TREES = tuple(Path(p) for p in ("/proc", "/sys", "/dev", "/run", "/etc"))

# Places a chain level may be in (the ``where`` of a :class:`DiskLayer`).
IMAGE_CACHE = "image cache"
LAYERS = "layers"
BUNDLE = "bundle"
DISK_IMAGE = "disk image"
OUTSIDE = "outside"

_QCOW2_MAGIC = b"QFI\xfb"
_QCOW2_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # magic … snapshots_offset: 72 bytes
_QCOW2_V3 = struct.Struct(">QQQII")  # feature bits, refcount_order, header_length
_QCOW2_EXT = struct.Struct(">II")  # header extension: type, length
_EXT_END, _EXT_BACKING_FORMAT, _EXT_DATA_FILE = 0, 0xE2792ACA, 0x44415441
_INCOMPAT_DATA_FILE = 1 << 2
_INCOMPAT_KNOWN = (1 << 5) - 1  # dirty, corrupt, data file, compression type, extended L2
_MIN_CLUSTER_BITS, _MAX_CLUSTER_BITS = 9, 21
_MAX_BACKING_NAME_BYTES = 1023
_MAX_FORMAT_NAME_BYTES = 15

#: Signatures of the other image formats QEMU recognises (offset, bytes, format), so a
#: file in one of them is refused by name instead of being used as a raw disk.
_OTHER_FORMATS = (
    (0, b"KDMV", "vmdk"), (0, b"COWD", "vmdk"), (0, b"QED\0", "qed"),
    (0, b"conectix", "vpc"), (0, b"vhdxfile", "vhdx"), (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"LUKS\xba\xbe", "luks"), (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
)
#: A vmdk descriptor as QEMU's probe sees it: comment and blank lines, then ``version=N``.
_VMDK_DESCRIPTOR = re.compile(rb"\A(?:[ \r\n]|#[^\n]*\n)*version=[123]\r?\n")
#: How QEMU tells a protocol or ``json:`` filename from a path: a ':' before any '/'.
_PROTOCOL_PREFIX = re.compile(r"\A[^:/]*:")
_SNIFF_BYTES = 512
#: What to do about a disk that names files it must not: re-make it where it came from.
REMAKE_HINT = ("make a standalone qcow2 of it on the machine it came from (qemu-img convert "
               "-O qcow2 DISK NEW.qcow2 there; here, that would copy the host files it names "
               "into the new disk)")


class DiskError(SecVFError):
    """A disk or image file cannot be used (missing, unreadable, wrong size)."""


class UnsafeDisk(DiskError):
    """A disk chain or host file would make QEMU open a file SecVF must not give a guest."""


@dataclass(frozen=True)
class DiskLayer:
    """One level of a disk chain (the VM's disk is level 0)."""

    path: Path  # the file, symlinks resolved
    format: str  # "qcow2" or "raw" ("?" for a level refused before its format was known)
    where: str  # the allowed place that holds it (IMAGE_CACHE, …) or OUTSIDE

    def to_json(self) -> dict[str, str]:
        """The layer as ``secvf audit --json`` shows it."""
        return {"path": str(self.path), "format": self.format, "where": self.where}


@dataclass(frozen=True)
class DiskChain:
    """What :func:`inspect_chain` found: the levels it looked at and, if the chain may
    not be used, why (then the last layer is the one refused)."""

    layers: tuple[DiskLayer, ...]
    error: DiskError | None = None


@dataclass(frozen=True)
class Places:
    """Where the files of a disk chain may be: directories and single files, by label."""

    dirs: tuple[tuple[str, Path], ...] = ()
    files: tuple[tuple[str, Path], ...] = ()
    description: str = ""  # how messages name these places

    def label_of(self, path: Path) -> str | None:
        """The label of the place holding the resolved ``path``, or None."""
        for label, file in self.files:
            if path == _resolved(file):
                return label
        for label, directory in self.dirs:
            if path.is_relative_to(_resolved(directory)):
                return label
        return None


@dataclass(frozen=True)
class VMFiles:
    """The host files a VM's QEMU would open, as :func:`inspect_vm_files` judged them."""

    chain: DiskChain  # the disk chain
    errors: list[DiskError] = field(default_factory=list)  # every problem, boot file first


def secvf_places(bundle_dir: Path, *, disk_image: Path | None = None,
                 bundle_label: str = "the VM's bundle") -> Places:
    """SecVF's own places (image cache, layers), ``bundle_dir``, and, if given, the one
    disk image the VM was created from."""
    files = ((DISK_IMAGE, disk_image),) if disk_image is not None else ()
    names = ["SecVF's image cache", "its layers", bundle_label]
    if disk_image is not None:
        names.append(f"the disk image the VM is based on ({disk_image})")
    return Places(
        dirs=((IMAGE_CACHE, paths.images_dir()), (LAYERS, layers_dir()), (BUNDLE, bundle_dir)),
        files=files,
        description=f"{', '.join(names[:-1])} and {names[-1]}",
    )


# ---- single host files ----------------------------------------------------------------


def check_host_file(raw: str | Path, what: str) -> Path:
    """Return the resolved path of a file a VM may read (an ISO, a disk image).

    Raises:
        DiskError: it does not exist or cannot be read.
        UnsafeDisk: it is in a system tree (``/proc``, ``/sys``, ``/dev``, ``/run``,
            ``/etc``) or is not a regular file.
    """
    path = Path(raw).expanduser()
    resolved = _resolved(path if path.is_absolute() else Path.cwd() / path)
    tree = next((t for t in SYSTEM_TREES if resolved.is_relative_to(t)), None)
    if tree is not None:
        shown = path if resolved == path else f"{path} (-> {resolved})"
        raise UnsafeDisk(f"{what} {shown} is in {tree}: a VM never reads files from /proc, "
                         "/sys, /dev, /run or /etc; give a copy of the image elsewhere")
    with _open_regular(resolved, f"{what} {resolved}"):
        pass
    return resolved


def check_bundle_file(raw: str, what: str, known: Collection[Path]) -> Path:
    """:func:`check_host_file` for a path a VM bundle names (its ISO or disk image).

    A bundle comes from elsewhere, so it may name only a file that every local user
    can read, or one a VM in the library already uses (``known``, resolved paths).

    Raises:
        DiskError, UnsafeDisk: as :func:`check_host_file`; also for a relative path and
            for a private file.
    """
    if not Path(raw).is_absolute():
        raise UnsafeDisk(f"{what} path {raw!r} in the bundle is not absolute")
    path = check_host_file(raw, what)
    if path in known or _readable_by_everyone(path):
        return path
    raise UnsafeDisk(f"{what} {raw} named by the bundle is a private file (not readable by "
                     "every user of this host, or in a directory they cannot enter): a bundle "
                     "may only name files anyone here could read; if you mean it, make it "
                     "world-readable (chmod o+r) and import again")


def _readable_by_everyone(path: Path) -> bool:
    if not path.stat().st_mode & stat.S_IROTH:
        return False
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in path.parents)


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


@contextmanager
def _open_regular(path: Path, subject: str) -> Iterator[BinaryIO]:
    """Open ``path`` (``subject`` in messages) for reading only if it is a regular file;
    never blocks on a FIFO."""
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise UnsafeDisk(f"{subject} is a directory" if stat.S_ISDIR(mode)
                             else f"{subject} is not a regular file (it is {_file_kind(mode)})")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DiskError(f"{subject} does not exist") from None
    except OSError as exc:
        raise DiskError(f"cannot read {subject}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # swapped since the stat
            raise UnsafeDisk(f"{subject} is not a regular file")
        yield f


def _file_kind(mode: int) -> str:
    """What a non-regular file is, for messages ("a directory", "a FIFO" …)."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "a special file")


# ---- image formats and the qcow2 header -------------------------------------------------


@dataclass(frozen=True)
class _Qcow2Header:
    backing_name: bytes  # b"" when there is no backing file
    backing_format: bytes  # b"" when not recorded


def _sniff_format(f: BinaryIO, path: Path, subject: str) -> str:
    head = f.read(_SNIFF_BYTES)
    f.seek(0)
    if head.startswith(_QCOW2_MAGIC):
        return "qcow2"
    other = next((fmt for off, magic, fmt in _OTHER_FORMATS
                  if head[off:off + len(magic)] == magic), None)
    if other is None and _VMDK_DESCRIPTOR.match(head):
        other = "vmdk"
    if other is not None:
        raise UnsafeDisk(f"{subject} is a {other} image: SecVF uses only qcow2 and raw "
                         f"disks (others can name more host files); {REMAKE_HINT}")
    return "raw"


def _read_qcow2_header(f: BinaryIO, subject: str) -> _Qcow2Header:
    """Read what a qcow2 header makes QEMU open, refusing what SecVF never allows."""
    fixed = f.read(_QCOW2_V2.size + _QCOW2_V3.size)
    if len(fixed) < _QCOW2_V2.size or not fixed.startswith(_QCOW2_MAGIC):
        raise UnsafeDisk(f"{subject} is not a qcow2 image (and must be); {REMAKE_HINT}")
    (_, version, backing_off, backing_len, cluster_bits, _, crypt, *_) = \
        _QCOW2_V2.unpack_from(fixed)
    if version not in (2, 3) or not _MIN_CLUSTER_BITS <= cluster_bits <= _MAX_CLUSTER_BITS:
        raise UnsafeDisk(f"{subject} is a qcow2 image of an unsupported kind (version "
                         f"{version}, cluster bits {cluster_bits})")
    if crypt:
        raise UnsafeDisk(f"{subject} is an encrypted qcow2 image; SecVF cannot use it: "
                         "decrypt it where it came from (qemu-img convert -O qcow2)")
    incompatible, header_len = 0, _QCOW2_V2.size
    if version == 3:
        if len(fixed) < _QCOW2_V2.size + _QCOW2_V3.size:
            raise UnsafeDisk(f"{subject} has a truncated qcow2 header")
        incompatible, _, _, _, header_len = _QCOW2_V3.unpack_from(fixed, _QCOW2_V2.size)
        if not _QCOW2_V2.size + _QCOW2_V3.size <= header_len <= 1 << cluster_bits:
            raise UnsafeDisk(f"{subject} has a malformed qcow2 header (length {header_len})")
    cluster = fixed + f.read((1 << cluster_bits) - len(fixed))  # all of it is in cluster 0
    if incompatible & _INCOMPAT_DATA_FILE:
        raise _data_file_refused(subject)
    if incompatible & ~_INCOMPAT_KNOWN:
        raise UnsafeDisk(f"{subject} uses qcow2 features SecVF does not know "
                         f"(incompatible feature bits {incompatible:#x})")
    if backing_off and (backing_len > _MAX_BACKING_NAME_BYTES
                        or backing_off + backing_len > len(cluster)):
        raise UnsafeDisk(f"{subject} has a malformed qcow2 header (backing file name)")
    end = backing_off if backing_off else len(cluster)
    backing_format = _read_extensions(cluster, header_len, end, subject)
    name = cluster[backing_off:backing_off + backing_len] if backing_off else b""
    return _Qcow2Header(name, backing_format)


def _read_extensions(cluster: bytes, offset: int, end: int, subject: str) -> bytes:
    """Walk the qcow2 header extensions as QEMU does; return the recorded backing format."""
    backing_format = b""
    while offset + _QCOW2_EXT.size <= end:
        kind, length = _QCOW2_EXT.unpack_from(cluster, offset)
        offset += _QCOW2_EXT.size
        if kind == _EXT_END:
            break
        if length > end - offset:
            raise UnsafeDisk(f"{subject} has a malformed qcow2 header extension")
        if kind == _EXT_DATA_FILE:
            raise _data_file_refused(subject)
        if kind == _EXT_BACKING_FORMAT:
            if length > _MAX_FORMAT_NAME_BYTES:
                raise UnsafeDisk(f"{subject} records a malformed backing format")
            backing_format = cluster[offset:offset + length]
        offset += (length + 7) & ~7
    return backing_format


def _data_file_refused(subject: str) -> UnsafeDisk:
    return UnsafeDisk(f"{subject} is a qcow2 image with an external data file: QEMU "
                      f"would open that host file as the guest's disk; {REMAKE_HINT}")


def _backing_name(raw: bytes, referrer: Path) -> str:
    """The backing file name of ``referrer`` if it is a plain file path; else refuse it."""
    try:
        name = raw.decode()
    except UnicodeDecodeError:
        name = ""
    if not name or any(ord(c) < 0x20 or c == "\x7f" for c in name):
        raise UnsafeDisk(f"the backing file name of {referrer} is not a printable path "
                         f"({raw!r})")
    if _PROTOCOL_PREFIX.match(name):
        raise UnsafeDisk(f"the backing file of {referrer} is {name!r}, a QEMU json: or "
                         "protocol filename (nbd:, http:, file: …), which can reach any host "
                         f"file or the network; only plain file paths are allowed; {REMAKE_HINT}")
    return name


# ---- chains -------------------------------------------------------------------------


def inspect_chain(top: Path, places: Places, *, top_format: str | None = "qcow2",
                  what: str = "disk") -> DiskChain:
    """Judge the disk chain that starts at ``top`` (see the module docstring).

    ``top_format`` is the format the top must have; None means: recognise it (qcow2,
    else raw). Never raises for a bad chain: the problem is in the result's ``error``.
    """
    layers: list[DiskLayer] = []
    try:
        _walk(top, places, top_format, what, layers)
        _agree_with_qemu_img(top, layers)
    except DiskError as exc:
        return DiskChain(tuple(layers), exc)
    return DiskChain(tuple(layers))


def check_chain(top: Path, places: Places, *, top_format: str | None = "qcow2",
                what: str = "disk") -> tuple[DiskLayer, ...]:
    """The layers of the disk chain at ``top``, or raise why it may not be used.

    Raises:
        UnsafeDisk: a level breaks a rule of the module docstring.
        DiskError: a level is missing or unreadable, or qemu-img cannot read the chain.
    """
    chain = inspect_chain(top, places, top_format=top_format, what=what)
    if chain.error is not None:
        raise chain.error
    return chain.layers


def _walk(top: Path, places: Places, fmt: str | None, what: str,
          layers: list[DiskLayer]) -> None:
    """Append each level of the chain to ``layers`` once it is judged; raise at the first
    level that may not be used (it is appended too, so callers can show it)."""
    name = str(top)  # the name QEMU opens the level by
    referrer: Path | None = None  # the level whose header names this one
    while True:
        path = _resolved(Path(name))
        subject = f"{what} {path}" if referrer is None else \
            f"the backing file {path} of {referrer}"
        where = places.label_of(path)
        if where is None:
            layers.append(DiskLayer(path, fmt or "?", OUTSIDE))
            raise UnsafeDisk(f"{subject} is outside {places.description}: SecVF will not let "
                             f"QEMU (running as root) open it for a guest; {REMAKE_HINT}")
        if any(layer.path == path for layer in layers):
            layers.append(DiskLayer(path, fmt or "?", where))
            raise UnsafeDisk(f"the disk chain of {top} loops back to {path}")
        with _open_regular(path, subject) as f:
            fmt = fmt or _sniff_format(f, path, subject)
            layers.append(DiskLayer(path, fmt, where))
            if fmt == "raw":
                return
            header = _read_qcow2_header(f, subject)
        if not header.backing_name:
            return
        if len(layers) >= MAX_CHAIN_DEPTH:
            raise UnsafeDisk(f"the disk chain of {top} has more than {MAX_CHAIN_DEPTH} levels")
        backing = _backing_name(header.backing_name, path)
        fmt = header.backing_format.decode(errors="replace")
        if not fmt:
            raise UnsafeDisk(f"{path} does not record the format of its backing file "
                             f"{backing}, so QEMU would guess it (a guessed vmdk names more "
                             "host files); record it: qemu-img rebase -u -F raw|qcow2 -b "
                             f"{backing} {path}")
        if fmt not in ALLOWED_FORMATS:
            raise UnsafeDisk(f"{path} says its backing file {backing} is a {fmt!r} image: "
                             "SecVF lets QEMU open only qcow2 and raw (others, such as vmdk, "
                             f"can name more host files); {REMAKE_HINT}")
        referrer = path
        name = backing if backing.startswith("/") else os.path.join(os.path.dirname(name),
                                                                     backing)


def _agree_with_qemu_img(top: Path, layers: list[DiskLayer]) -> None:
    """qemu-img, opening only what was judged, must see exactly this chain."""
    out = qemu_img("info", "--output=json", "--backing-chain", "-U", "-f", layers[0].format,
                   str(top))
    try:
        infos = json.loads(out)
        seen = [(_resolved(Path(i["filename"])), i["format"],
                 "data-file" in i.get("format-specific", {}).get("data", {})) for i in infos]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise DiskError(f"cannot read what qemu-img says about {top}: {exc}") from None
    if seen != [(layer.path, layer.format, False) for layer in layers]:
        raise UnsafeDisk(f"qemu-img sees the disk chain of {top} differently from SecVF's "
                         f"check ({[str(s[0]) for s in seen]}); refusing it")


# ---- a VM's files ---------------------------------------------------------------------


def inspect_vm_files(bundle: Bundle, config: VMConfig) -> VMFiles:
    """Judge every host file VM ``config``'s QEMU would open: its ISO (unless ejected) or
    disk image (:func:`check_host_file`) and its disk chain, against the VM's own places.

    Never raises for a bad file: problems are in the result's ``errors``.
    """
    errors: list[DiskError] = []
    base: Path | None = None
    boot = config.boot
    ejected = isinstance(boot, IsoBoot) and boot.ejected  # QEMU will not open it
    if isinstance(boot, IsoBoot | DiskImageBoot) and not ejected:
        what = "ISO" if isinstance(boot, IsoBoot) else "disk image"
        try:
            checked = check_host_file(boot.path, what)
        except DiskError as exc:
            errors.append(exc)
        else:
            base = checked if isinstance(boot, DiskImageBoot) else None
    chain = inspect_chain(bundle.disk, secvf_places(bundle.path, disk_image=base))
    if chain.error is not None:
        errors.append(chain.error)
    return VMFiles(chain, errors)


def check_vm_files(bundle: Bundle, config: VMConfig) -> tuple[DiskLayer, ...]:
    """Check, before a VM starts, every host file its QEMU would open; return its chain.

    This is the start path's check (a hand-edited ``vm.json`` or disk is hostile too).

    Raises:
        UnsafeDisk, DiskError: the first problem :func:`inspect_vm_files` found.
    """
    files = inspect_vm_files(bundle, config)
    if files.errors:
        raise files.errors[0]
    return files.chain.layers


def disk_image_format(path: Path) -> str:
    """The format (qcow2 or raw) of a disk image a VM is to be created from.

    The image must be standalone: a disk image with a backing file of its own is refused.

    Raises:
        UnsafeDisk, DiskError: as :func:`check_chain`.
    """
    places = Places(files=((DISK_IMAGE, path),),
                    description=f"the disk image {path} itself (give a standalone image)")
    return check_chain(path, places, top_format=None, what="disk image")[0].format


def copy_chain(chain: tuple[DiskLayer, ...], dst: Path) -> None:
    """Write the disk of a checked ``chain`` to ``dst`` as a new qcow2, made by qemu-img:
    over the chain's first backing file when that is outside the bundle (SecVF's image
    cache or layers, or the VM's disk image), otherwise flattened into one file.

    Nothing of the top file's header is carried over but its data.
    """
    top = chain[0]
    args = ["convert", "-q", "-U", "-f", top.format, "-O", "qcow2"]
    if len(chain) > 1 and chain[1].where != BUNDLE:
        args += ["-B", str(chain[1].path), "-F", chain[1].format]
    qemu_img(*args, str(top.path), str(dst))


# ---- qemu-img -------------------------------------------------------------------------


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
    """``qemu-img info`` of one disk file (format, virtual-size, backing-filename, …).

    The format is recognised by SecVF (qcow2, else raw) and given to qemu-img, which
    never guesses one; the backing file is not opened.
    """
    with _open_regular(path, "disk image") as f:
        fmt = _sniff_format(f, path, "disk image")
    try:
        data = json.loads(qemu_img("info", "--output=json", "-U", "-f", fmt, str(path)))
    except json.JSONDecodeError as exc:
        raise DiskError(f"cannot read disk image {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise DiskError(f"cannot read disk image {path}")
    return data
