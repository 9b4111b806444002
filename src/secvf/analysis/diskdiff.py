"""What a detonated sample did to the disk: the session overlay's ext4 diffed against the
clean state, read without mounting it.

After the guest powered off, :func:`diff_disks` compares two disk images whose whole
device is one ext4 filesystem (what ``secvf.image.disk`` makes; no partition table) —
the *clean* state the session started from and the *session* disk — and lists the files
created, modified and deleted (path, kind, size, mode, owner, mtime, sha256)::

    diff = diff_disks(clean_layer, session_overlay, workdir=tmp)
    for change in diff.created:
        print(change.path, change.kind, change.sha256)
    json.dumps(diff.to_json())

The session filesystem is hostile: the sample ran as root on it and may have written
any bytes to the block device, so nothing here mounts it in the host kernel, follows
one of its symlinks or opens one of its names on the host.

How (the reasoning is in docs/analysis-diskdiff.md, with the numbers):

1. **Raw views.** A qcow2 image is flattened with ``qemu-img convert -O raw`` (sparse)
   into ``workdir`` (:func:`raw_image`); a raw image is used where it is.
2. **What changed, by block.** If the session is a qcow2 overlay whose backing file is
   the clean image, ``qemu-img map`` says which byte ranges the session wrote (depth 0):
   only those can differ. Otherwise the two raw files are compared chunk by chunk.
3. **Walk.** Each filesystem's tree is listed with ``debugfs -c`` (read-only,
   catastrophic mode: no bitmaps) ``ls -p <inode>`` commands, one batch per tree level.
   debugfs is only ever given inode numbers (``<12>``), never a name from the guest; its
   ``-p`` output is parsed knowing that a name cannot hold ``/`` (a listing that breaks
   that is reported in ``errors``, not trusted).
4. **Which files to look at.** A path in both trees is unchanged if its inode number,
   type, mode, owner and size are the same, its on-disk inode slot (``imap``) is in no
   changed range and none of its blocks (``blocks``) is. Every other file is a
   *candidate*: its inode is read from the raw files and its contents hashed on both
   sides (streamed from ``debugfs cat <inode>``, bounded), and it is reported as
   modified only if something differs. Unchanged directories are not reported
   (their new and removed entries are).
5. **Noise.** Writes the image's init makes at every boot (``/etc/hosts``,
   ``/etc/resolv.conf`` in the exact form init writes them; ``src/secvf/guest/init.sh``)
   are moved to :attr:`DiskDiff.ignored`, never dropped silently; anything else at those
   paths is reported.

Every quantity is bounded by :class:`DiffLimits`: entries walked, entries reported
(``truncated``), bytes hashed per file (``hash_truncated``) and in total, path length,
tree depth, debugfs output and run time. A rename shows as a deletion plus a creation
(the created entry's ``note`` names the deleted path with the same inode).

Errors::

    SecVFError
     └── DiskDiffError        an image could not be flattened or its filesystem opened
                              (.image; .partial: the diff made so far, if any)
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secvf.errors import SecVFError

#: How long one qemu-img or debugfs run may take.
TOOL_TIMEOUT_S = 600.0
#: Most stdout one debugfs batch may produce (a hostile directory can be huge).
MAX_DEBUGFS_OUTPUT_BYTES = 512 * 1024 * 1024
#: Address space a debugfs run may use (it parses hostile metadata).
DEBUGFS_MAX_AS_BYTES = 2 * 1024 * 1024 * 1024
#: Most a debugfs run may write to its stderr (a file; more kills it with SIGXFSZ).
DEBUGFS_MAX_STDERR_BYTES = 1024 * 1024
#: Commands per debugfs batch (one process each).
DEBUGFS_BATCH_COMMANDS = 20_000
#: Granularity of the raw-file comparison when no ``qemu-img map`` can be used.
COMPARE_CHUNK_BYTES = 64 * 1024
#: Longest symlink target read (PATH_MAX).
MAX_LINK_TARGET_BYTES = 4096
#: Largest file a noise rule looks at.
MAX_NOISE_FILE_BYTES = 4096
#: Most debugfs error lines kept in :attr:`DiskDiff.errors`.
MAX_ERRORS = 50

_QCOW2_MAGIC = b"QFI\xfb"
_EXT4_MAGIC = 0xEF53
_SUPERBLOCK_OFFSET = 1024
_ROOT_INODE = 2
_INCOMPAT_64BIT = 0x80
#: Inode bytes a guest changes by reading a file: i_atime, l_i_checksum_lo,
#: i_checksum_hi, i_atime_extra.
_VOLATILE_INODE_BYTES = ((8, 12), (124, 126), (130, 132), (140, 144))
_CHUNK_BYTES = 1024 * 1024
_FAST_SYMLINK_MAX = 60  # a target shorter than i_block (60 bytes) lives in the inode

#: File kinds by ``stat.S_IFMT`` value.
_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
          stat.S_IFCHR: "chardev", stat.S_IFBLK: "blockdev", stat.S_IFIFO: "fifo",
          stat.S_IFSOCK: "socket"}


class DiskDiffError(SecVFError):
    """An image could not be flattened, or its filesystem could not be opened or walked.

    ``image`` is the file concerned; ``partial`` the diff made before the failure, when
    there is one (else None).
    """

    def __init__(self, message: str, image: Path | None = None,
                 partial: DiskDiff | None = None) -> None:
        super().__init__(message)
        self.image = image
        self.partial = partial


@dataclass(frozen=True)
class NoiseRule:
    """A change the base image makes at every boot: ``path`` (guest bytes) as a regular
    file whose whole content matches ``content`` (a bytes regex)."""

    path: bytes  # absolute guest path
    content: re.Pattern[bytes]  # fullmatch against the file's bytes (≤ MAX_NOISE_FILE_BYTES)
    why: str  # what writes it


#: What ``secvf-init`` writes at each boot (src/secvf/guest/init.sh): set_hostname's
#: /etc/hosts and the network's /etc/resolv.conf. /tmp, /run and /dev are tmpfs there,
#: and the images run no journald, so nothing else is rewritten on every boot.
DEFAULT_NOISE: tuple[NoiseRule, ...] = (
    NoiseRule(b"/etc/hosts",
              re.compile(rb"127\.0\.0\.1\tlocalhost\n127\.0\.1\.1\t[A-Za-z0-9._-]{0,253}\n"
                         rb"::1\tlocalhost ip6-localhost\n"),
              "secvf-init set_hostname"),
    NoiseRule(b"/etc/resolv.conf", re.compile(rb"(?:nameserver [0-9A-Fa-f.:]{1,45}\n){0,8}"),
              "secvf-init network (DHCP or a static gateway)"),
)


@dataclass(frozen=True)
class DiffLimits:
    """Bounds on one diff (every one of them is reported when reached)."""

    max_reported: int = 10_000  # changes listed in total; past it ``truncated``
    max_walk_entries: int = 2_000_000  # directory entries walked per filesystem
    max_hash_bytes_per_file: int = 64 * 1024 * 1024  # bytes hashed of one file
    max_hash_bytes_total: int = 2 * 1024 * 1024 * 1024  # bytes hashed in all
    max_path_bytes: int = 4096  # longer paths are not descended into
    max_depth: int = 256  # directory levels walked

    def __post_init__(self) -> None:
        for name in ("max_reported", "max_walk_entries", "max_hash_bytes_per_file",
                     "max_hash_bytes_total", "max_path_bytes", "max_depth"):
            if getattr(self, name) < 0:
                raise ValueError(f"DiffLimits.{name} must not be negative")


@dataclass
class FileChange:
    """One created, modified, deleted or ignored filesystem entry.

    For a deletion the fields describe the clean file; otherwise the session's.
    """

    path: str  # guest path, escaped (see escape_path): printable, one line
    kind: str  # file, dir, symlink, chardev, blockdev, fifo, socket, unknown
    size: int  # i_size in bytes
    mode: int  # permission bits (with setuid/setgid/sticky), no type bits
    uid: int
    gid: int
    mtime: float  # seconds since the epoch (nanoseconds as the fraction)
    sha256: str | None = None  # hex, of the contents (regular files; of the first
    #                            hashed_bytes if hash_truncated); None: not hashed
    before_sha256: str | None = None  # modified: the clean file's; deleted: the file's
    raw_path: bytes = b""  # the guest path as bytes
    inode: int = 0  # inode number in the session (deleted: in the clean image)
    target: str | None = None  # symlink: its target, escaped (never followed)
    hashed_bytes: int = 0  # bytes that went into sha256 (or before_sha256 for deleted)
    hash_truncated: bool = False  # the file is bigger than what was hashed
    changed: tuple[str, ...] = ()  # modified: what differs (content, mode, uid, …)
    note: str = ""  # anything else worth knowing (hash budget spent, read error …)

    def to_json(self) -> dict[str, Any]:
        """This change as a JSON object (``raw_path`` as hex)."""
        out: dict[str, Any] = {
            "path": self.path, "kind": self.kind, "size": self.size,
            "mode": f"0{self.mode:o}", "uid": self.uid, "gid": self.gid,
            "mtime": self.mtime, "sha256": self.sha256, "before_sha256": self.before_sha256,
            "inode": self.inode, "hashed_bytes": self.hashed_bytes,
            "hash_truncated": self.hash_truncated,
        }
        if self.raw_path != self.path.encode("utf-8", "surrogateescape"):
            out["raw_path_hex"] = self.raw_path.hex()
        if self.target is not None:
            out["target"] = self.target
        if self.changed:
            out["changed"] = list(self.changed)
        if self.note:
            out["note"] = self.note
        return out


@dataclass
class DiskDiff:
    """The result of :func:`diff_disks`."""

    created: list[FileChange] = field(default_factory=list)  # in the session only
    modified: list[FileChange] = field(default_factory=list)  # in both, something differs
    deleted: list[FileChange] = field(default_factory=list)  # in the clean image only
    ignored: list[FileChange] = field(default_factory=list)  # boot noise (DEFAULT_NOISE)
    truncated: bool = False  # more changes than max_reported, or a walk hit a limit
    counts: dict[str, int] = field(default_factory=dict)  # changes found per list,
    #                                                       even past max_reported
    elapsed_s: float = 0.0  # wall time of the whole diff
    method: str = ""  # how changed blocks were found: "qemu-img map" or "compare"
    changed_bytes: int = 0  # bytes of the device the session wrote (or that differ)
    hashed_bytes: int = 0  # bytes hashed in all
    errors: list[str] = field(default_factory=list)  # what could not be read (escaped)

    def to_json(self) -> dict[str, Any]:
        """The diff as a JSON object (``secvf analyze`` report)."""
        return {
            "created": [c.to_json() for c in self.created],
            "modified": [c.to_json() for c in self.modified],
            "deleted": [c.to_json() for c in self.deleted],
            "ignored": [c.to_json() for c in self.ignored],
            "counts": dict(self.counts), "truncated": self.truncated,
            "elapsed_s": round(self.elapsed_s, 3), "method": self.method,
            "changed_bytes": self.changed_bytes, "hashed_bytes": self.hashed_bytes,
            "errors": list(self.errors),
        }


# --- names -----------------------------------------------------------------------

_SHORT_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_path(raw: bytes) -> str:
    """``raw`` (guest bytes) as a printable one-line string: UTF-8 where it is valid
    and printable, ``\\n``, ``\\t``, ``\\\\``, ``\\xNN`` (bytes that are not UTF-8) and
    ``\\uNNNN`` (unprintable characters) otherwise. ``../`` stays as it is: it is a name."""
    out = []
    for ch in raw.decode("utf-8", "surrogateescape"):
        if ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        elif 0xDC80 <= ord(ch) <= 0xDCFF:
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif not ch.isprintable():
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    return "".join(out)


# --- raw views ---------------------------------------------------------------------


@dataclass
class RawImage:
    """A disk image as a raw file debugfs can open (from :func:`raw_image`)."""

    source: Path  # the image given
    format: str  # its format: "qcow2" or "raw"
    raw: Path  # the raw file (``source`` itself for a raw image)
    backing: Path | None = None  # a qcow2's backing file, resolved (None: none or raw)


def image_format(path: Path) -> str:
    """``"qcow2"`` if ``path`` starts with the qcow2 magic, else ``"raw"``.

    Raises:
        DiskDiffError: the file cannot be read.
    """
    try:
        with path.open("rb") as f:
            return "qcow2" if f.read(4) == _QCOW2_MAGIC else "raw"
    except OSError as exc:
        raise DiskDiffError(f"cannot read the disk image {path}: {exc.strerror}",
                            path) from None


@contextlib.contextmanager
def raw_image(image: Path, workdir: Path) -> Iterator[RawImage]:
    """``image`` as a raw file for as long as the context lasts.

    A qcow2 image is flattened (``qemu-img convert -O raw``, sparse) into a private
    (0700) directory in ``workdir``, removed on exit; a raw image is used in place.

    Raises:
        DiskDiffError: the image cannot be read or converted.
    """
    fmt = image_format(image)
    if fmt == "raw":
        yield RawImage(image, fmt, image)
        return
    info = _qemu_img_json(["info", "--output=json", "-f", "qcow2", str(image)], image)
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    tmp = Path(tempfile.mkdtemp(prefix="secvf-raw-", dir=workdir))
    try:
        raw = tmp / "disk.raw"
        _run_tool(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", str(image),
                   str(raw)], image, "flatten")
        yield RawImage(image, fmt, raw, Path(str(backing)).resolve() if backing else None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_tool(argv: Sequence[str], image: Path, step: str) -> bytes:
    try:
        proc = subprocess.run(argv, capture_output=True, check=False, timeout=TOOL_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise DiskDiffError(f"cannot {step} {image}: {argv[0]} is not installed "
                            "(qemu-utils)", image) from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DiskDiffError(f"cannot {step} {image}: {exc}", image) from None
    if proc.returncode != 0:
        detail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["?"]
        raise DiskDiffError(f"cannot {step} {image}: {detail[0]}", image)
    return proc.stdout


def _qemu_img_json(args: Sequence[str], image: Path) -> Any:
    out = _run_tool(["qemu-img", *args], image, "inspect")
    try:
        return json.loads(out)
    except ValueError:
        raise DiskDiffError(f"qemu-img gave unreadable JSON for {image}", image) from None


Ranges = list[tuple[int, int]]  # sorted, disjoint [start, end) byte ranges


def changed_ranges(clean: RawImage, session: RawImage) -> tuple[Ranges, str]:
    """The byte ranges of the device that may differ between the two images, and how
    they were found (``"qemu-img map"`` or ``"compare"``).

    Raises:
        DiskDiffError: qemu-img or reading a raw file failed.
    """
    if (session.format == "qcow2" and session.backing is not None
            and session.backing == clean.source.resolve()):
        # -U: the session may be open read-only in a FUSE export (nothing writes to it)
        entries = _qemu_img_json(["map", "-U", "--output=json", "-f", "qcow2",
                                  str(session.source)], session.source)
        ranges = [(int(e["start"]), int(e["start"]) + int(e["length"]))
                  for e in entries if e.get("depth") == 0 and e.get("present", True)]
        return _merge(ranges), "qemu-img map"
    return _compare(clean.raw, session.raw), "compare"


def _compare(a: Path, b: Path) -> Ranges:
    ranges: Ranges = []
    try:
        with a.open("rb") as fa, b.open("rb") as fb:
            size_a, size_b = os.fstat(fa.fileno()).st_size, os.fstat(fb.fileno()).st_size
            pos = 0
            while pos < min(size_a, size_b):
                ca, cb = fa.read(_CHUNK_BYTES), fb.read(_CHUNK_BYTES)
                if ca != cb:
                    for off in range(0, max(len(ca), len(cb)), COMPARE_CHUNK_BYTES):
                        end = off + COMPARE_CHUNK_BYTES
                        if ca[off:end] != cb[off:end]:
                            ranges.append((pos + off, pos + min(end, len(cb))))
                pos += len(cb) or _CHUNK_BYTES
            if size_b > size_a:
                ranges.append((size_a, size_b))
    except OSError as exc:
        raise DiskDiffError(f"cannot compare the raw images: {exc}", b) from None
    return _merge(ranges)


def _merge(ranges: Iterable[tuple[int, int]]) -> Ranges:
    out: Ranges = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        elif end > start:
            out.append((start, end))
    return out


def _overlaps(ranges: Ranges, starts: list[int], start: int, end: int) -> bool:
    i = bisect.bisect_right(starts, start) - 1
    if i >= 0 and ranges[i][1] > start:
        return True
    return i + 1 < len(ranges) and ranges[i + 1][0] < end


# --- the filesystem, through debugfs -----------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """A directory entry as ``ls -p`` shows it."""

    ino: int
    mode: int  # with the type bits
    uid: int
    gid: int
    size: int


@dataclass
class _Inode:
    """The fields of an on-disk inode this module uses."""

    mode: int
    uid: int
    gid: int
    size: int
    mtime: float
    flags: int
    block: bytes  # i_block: extents, or a fast symlink's target, or a device number


_LS_HEAD = re.compile(rb"debugfs: ls -p <(\d+)>\n")
_LS_ENTRY = re.compile(rb"/(\d+)/([0-7]+)/(\d+)/(\d+)/([^/]*)/(\d*)/\n")
_IMAP = re.compile(rb"Inode (\d+) is part of block group \d+\n"
                   rb"\tlocated at block (\d+), offset 0x([0-9a-f]+)\n")
_BANNER = re.compile(r"debugfs \d[\w.]* \(.*\)|catastrophic mode.*")
_OPEN_FAILED = ("while trying to open", "Filesystem not open", "while opening filesystem")


class Ext4Reader:
    """One ext4 filesystem in a raw file, read through debugfs and ``pread``."""

    def __init__(self, image: RawImage, workdir: Path, errors: list[str]) -> None:
        self.image = image
        self.workdir = workdir
        self.errors = errors
        self.block_size, self.inode_size = self._superblock()
        self._fd = os.open(image.raw, os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self._fd)

    def _superblock(self) -> tuple[int, int]:
        try:
            with self.image.raw.open("rb") as f:
                f.seek(_SUPERBLOCK_OFFSET)
                sb = f.read(1024)
        except OSError as exc:
            raise self._error(f"cannot read {self.image.source}: {exc.strerror}") from None
        if len(sb) < 1024 or struct.unpack_from("<H", sb, 56)[0] != _EXT4_MAGIC:
            raise self._error(f"{self.image.source} holds no ext2/3/4 filesystem "
                              "(bad superblock magic): corrupt or truncated")
        log_block, = struct.unpack_from("<I", sb, 24)
        rev, = struct.unpack_from("<I", sb, 76)
        inode_size = struct.unpack_from("<H", sb, 88)[0] if rev >= 1 else 128
        if log_block > 6 or inode_size < 128 or inode_size & (inode_size - 1):
            raise self._error(f"{self.image.source}: corrupt superblock (block size "
                              f"2^{10 + log_block}, inode size {inode_size})")
        blocks, = struct.unpack_from("<I", sb, 4)
        if struct.unpack_from("<I", sb, 96)[0] & _INCOMPAT_64BIT:
            blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
        fs_bytes, disk_bytes = blocks * (1024 << log_block), self.image.raw.stat().st_size
        if fs_bytes > disk_bytes:
            raise self._error(f"{self.image.source} is truncated: its filesystem has "
                              f"{fs_bytes} bytes, the disk {disk_bytes}")
        return 1024 << log_block, inode_size

    def _error(self, message: str) -> DiskDiffError:
        return DiskDiffError(message, self.image.source)

    # one debugfs process per batch of commands, fed from a file of our own commands

    def batch(self, commands: Sequence[str]) -> bytes:
        """Run ``commands`` (inode numbers only, never guest names) in one debugfs."""
        out = bytearray()
        for i in range(0, len(commands), DEBUGFS_BATCH_COMMANDS):
            out += self._batch(commands[i:i + DEBUGFS_BATCH_COMMANDS])
        return bytes(out)

    def _batch(self, commands: Sequence[str]) -> bytes:
        fd, name = tempfile.mkstemp(prefix="secvf-debugfs-", suffix=".cmd", dir=self.workdir)
        try:
            with os.fdopen(fd, "w") as f:
                f.write("\n".join(commands) + "\n")
            with tempfile.TemporaryFile(dir=self.workdir) as err:
                proc = self._spawn(["-f", name], err)
                assert proc.stdout is not None
                out = proc.stdout.read(MAX_DEBUGFS_OUTPUT_BYTES + 1)
                proc.stdout.close()
                self._reap(proc)
                if proc.returncode < 0:
                    raise self._error(f"debugfs was killed by signal {-proc.returncode} "
                                      f"reading {self.image.source}")
                if len(out) > MAX_DEBUGFS_OUTPUT_BYTES:
                    raise self._error(f"debugfs printed more than {MAX_DEBUGFS_OUTPUT_BYTES} "
                                      f"bytes for {self.image.source}")
                self._check_stderr(err)
                return out
        finally:
            os.unlink(name)

    def _spawn(self, args: Sequence[str], err: Any) -> subprocess.Popen[bytes]:
        try:
            return subprocess.Popen(["debugfs", "-c", *args, str(self.image.raw)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=err, preexec_fn=_confine_debugfs)
        except OSError as exc:
            raise self._error(f"cannot run debugfs: {exc.strerror} (it comes with "
                              "e2fsprogs)") from None

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            proc.wait(timeout=TOOL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise self._error(f"debugfs took longer than {TOOL_TIMEOUT_S:.0f} s on "
                              f"{self.image.source}") from None

    def _check_stderr(self, err: Any) -> list[str]:
        err.seek(0)
        text = err.read(64 * 1024).decode("utf-8", "surrogateescape")
        lines = [ln for ln in text.splitlines() if ln.strip() and not _BANNER.fullmatch(ln)]
        if any(marker in ln for ln in lines for marker in _OPEN_FAILED):
            raise self._error(f"debugfs cannot open the filesystem of {self.image.source}: "
                              f"{escape_path(lines[0].encode('utf-8', 'surrogateescape'))}")
        for ln in lines:
            if len(self.errors) < MAX_ERRORS:
                self.errors.append(f"{self.image.source.name}: "
                                   f"{escape_path(ln.encode('utf-8', 'surrogateescape'))}")
        return lines

    # the tree

    def walk(self, limits: DiffLimits) -> tuple[dict[bytes, _Entry], bool]:
        """Every entry of the tree by path, and whether a limit cut the walk short."""
        entries: dict[bytes, _Entry] = {}
        frontier: list[tuple[int, bytes]] = [(_ROOT_INODE, b"")]
        seen_dirs = {_ROOT_INODE}
        cut = False
        depth = 0
        while frontier and depth <= limits.max_depth:
            depth += 1
            listing = self.batch([f"ls -p <{ino}>" for ino, _ in frontier])
            if depth == 1 and not _LS_ENTRY.search(listing):
                raise self._error(f"the root directory of {self.image.source} cannot be "
                                  f"read: {'; '.join(self.errors[-2:]) or 'no entries'}")
            parents = dict(frontier)
            frontier = []
            for dir_ino, name, entry in self._parse_ls(listing):
                path = parents[dir_ino] + b"/" + name
                if len(path) > limits.max_path_bytes:
                    self._note(f"{escape_path(path[:200])}…: path longer than "
                               f"{limits.max_path_bytes} bytes, not walked")
                    cut = True
                    continue
                if len(entries) >= limits.max_walk_entries:
                    return entries, True
                entries[path] = entry
                if stat.S_ISDIR(entry.mode):
                    if entry.ino in seen_dirs:
                        self._note(f"{escape_path(path)}: directory inode {entry.ino} "
                                   "seen before (a loop), not walked again")
                        continue
                    seen_dirs.add(entry.ino)
                    frontier.append((entry.ino, path))
        if frontier:
            self._note(f"directories deeper than {limits.max_depth} levels not walked")
            cut = True
        return entries, cut

    def _parse_ls(self, out: bytes) -> Iterator[tuple[int, bytes, _Entry]]:
        pos, dir_ino = 0, -1
        while pos < len(out):
            if out[pos:pos + 1] == b"\n":
                pos += 1
                continue
            head = _LS_HEAD.match(out, pos)
            if head:
                dir_ino, pos = int(head.group(1)), head.end()
                continue
            m = _LS_ENTRY.match(out, pos)
            if m is None or dir_ino < 0:
                nxt = out.find(b"\ndebugfs: ls -p <", pos)
                self._note(f"directory inode {dir_ino}: a listing that does not parse "
                           "(a name holding '/'?): the rest of that directory is unread")
                if nxt < 0:
                    return
                pos = nxt + 1
                continue
            pos = m.end()
            name = m.group(5)
            if name in (b".", b"..", b"") or m.group(1) == b"0":
                continue  # "." and "..", and the empty slots of lost+found
            yield dir_ino, name, _Entry(int(m.group(1)), int(m.group(2), 8),
                                        int(m.group(3)), int(m.group(4)),
                                        int(m.group(6) or 0))

    def _note(self, message: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(f"{self.image.source.name}: {message}")

    # inodes and blocks

    def inode_slots(self, inodes: Iterable[int]) -> dict[int, int]:
        """Byte offset of each inode's on-disk slot in the raw file."""
        inos = sorted(set(inodes))
        out = self.batch([f"imap <{ino}>" for ino in inos])
        return {int(m.group(1)): int(m.group(2)) * self.block_size + int(m.group(3), 16)
                for m in _IMAP.finditer(out)}

    def blocks(self, inodes: Iterable[int]) -> dict[int, list[int]]:
        """The blocks (data and extent-tree blocks) of each inode."""
        inos = sorted(set(inodes))
        out = self.batch([f"blocks <{ino}>" for ino in inos])
        result: dict[int, list[int]] = {}
        current = -1
        for line in out.split(b"\n"):
            if line.startswith(b"debugfs: blocks <"):
                current = int(line[len(b"debugfs: blocks <"):-1])
                result[current] = []
            elif current >= 0 and line.strip():
                result[current].extend(int(w) for w in line.split() if w.isdigit())
        return result

    def block(self, number: int) -> bytes:
        """Filesystem block ``number`` of the raw file."""
        return os.pread(self._fd, self.block_size, number * self.block_size)

    def inode_bytes(self, slot: int) -> bytes:
        """The inode at ``slot`` without what a read changes (atime, checksums)."""
        data = bytearray(os.pread(self._fd, self.inode_size, slot))
        for start, end in _VOLATILE_INODE_BYTES:
            data[start:end] = bytes(len(data[start:end]))
        return bytes(data)

    def read_inode(self, slot: int) -> _Inode | None:
        """The inode at byte ``slot`` of the raw file, or None if it cannot be read."""
        data = os.pread(self._fd, self.inode_size, slot)
        if len(data) < 128:
            return None
        mode, uid_lo, size_lo = struct.unpack_from("<HHI", data, 0)
        gid_lo, = struct.unpack_from("<H", data, 24)
        flags, = struct.unpack_from("<I", data, 32)
        size_hi, = struct.unpack_from("<I", data, 108)
        uid_hi, gid_hi = struct.unpack_from("<HH", data, 120)
        seconds, nanos = float(struct.unpack_from("<i", data, 16)[0]), 0
        if len(data) >= 140 and struct.unpack_from("<H", data, 128)[0] >= 12:
            extra, = struct.unpack_from("<I", data, 136)
            seconds += (extra & 3) << 32
            nanos = extra >> 2
        return _Inode(mode, uid_lo | uid_hi << 16, gid_lo | gid_hi << 16,
                      size_lo | size_hi << 32, seconds + min(nanos, 999_999_999) / 1e9,
                      flags, bytes(data[40:100]))

    def stream(self, ino: int, limit: int) -> Iterator[bytes]:
        """The contents of inode ``ino`` (``debugfs cat``), at most ``limit`` bytes."""
        with tempfile.TemporaryFile(dir=self.workdir) as err:
            proc = self._spawn(["-R", f"cat <{ino}>"], err)
            assert proc.stdout is not None
            left = limit
            try:
                while left > 0:
                    chunk = proc.stdout.read(min(_CHUNK_BYTES, left))
                    if not chunk:
                        break
                    left -= len(chunk)
                    yield chunk
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.stdout.close()
                self._reap(proc)
            if left > 0 and proc.returncode == 0:
                self._check_stderr(err)

    def symlink_target(self, ino: int, inode: _Inode) -> bytes:
        """A symlink's target bytes (read from the inode or its block; never followed)."""
        if inode.size < _FAST_SYMLINK_MAX:
            return inode.block[:inode.size]
        return b"".join(self.stream(ino, min(inode.size, MAX_LINK_TARGET_BYTES)))


def _confine_debugfs() -> None:  # runs in the child between fork and exec
    resource.setrlimit(resource.RLIMIT_AS, (DEBUGFS_MAX_AS_BYTES, DEBUGFS_MAX_AS_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # it writes files only for its stderr (a temp file): a bound on that too
    resource.setrlimit(resource.RLIMIT_FSIZE, (DEBUGFS_MAX_STDERR_BYTES,) * 2)


def kind_of(mode: int) -> str:
    """The kind name of an inode mode (``file``, ``dir``, ``symlink`` …)."""
    return _KINDS.get(stat.S_IFMT(mode), "unknown")


# --- the diff ------------------------------------------------------------------------


def diff_disks(clean: Path, session: Path, *, workdir: Path,
               limits: DiffLimits = DiffLimits(),
               noise: Sequence[NoiseRule] = DEFAULT_NOISE) -> DiskDiff:
    """Diff the ext4 filesystem of ``session`` against that of ``clean``.

    ``clean`` and ``session`` are qcow2 or raw images whose whole device is ext4;
    ``workdir`` holds the temporary raw copies (as big as the images' data), removed
    before this returns. Neither image is modified or mounted.

    Raises:
        DiskDiffError: an image cannot be read or flattened, or holds no readable ext4
            filesystem (corrupt superblock, truncated image); ``.image`` names it.
    """
    with raw_image(clean, workdir) as clean_raw, raw_image(session, workdir) as session_raw:
        return diff_raw(clean_raw, session_raw, workdir=workdir, limits=limits, noise=noise)


def diff_raw(clean: RawImage, session: RawImage, *, workdir: Path,
             limits: DiffLimits = DiffLimits(),
             noise: Sequence[NoiseRule] = DEFAULT_NOISE) -> DiskDiff:
    """:func:`diff_disks` on images already opened with :func:`raw_image`.

    Raises:
        DiskDiffError: as :func:`diff_disks`.
    """
    started = time.monotonic()
    diff = DiskDiff()
    clean_fs = Ext4Reader(clean, workdir, diff.errors)
    try:
        session_fs = Ext4Reader(session, workdir, diff.errors)
    except BaseException:
        clean_fs.close()
        raise
    try:
        _Differ(clean_fs, session_fs, limits, noise, diff).run(clean, session)
    finally:
        clean_fs.close()
        session_fs.close()
        diff.elapsed_s = time.monotonic() - started
    return diff


class _Differ:
    """One diff: walks, candidates, classification, hashing."""

    def __init__(self, clean: Ext4Reader, session: Ext4Reader, limits: DiffLimits,
                 noise: Sequence[NoiseRule], diff: DiskDiff) -> None:
        self.clean, self.session = clean, session
        self.limits, self.diff = limits, diff
        self.noise = {rule.path: rule for rule in noise}
        self.budget = limits.max_hash_bytes_total

    def run(self, clean: RawImage, session: RawImage) -> None:
        diff = self.diff
        ranges, diff.method = changed_ranges(clean, session)
        diff.changed_bytes = sum(end - start for start, end in ranges)
        before, cut_before = self.clean.walk(self.limits)
        after, cut_after = self.session.walk(self.limits)
        diff.truncated = cut_before or cut_after
        created = sorted(set(after) - set(before))
        deleted = sorted(set(before) - set(after))
        candidates = self._candidates(before, after, ranges)
        try:
            self._report(before, after, created, deleted, candidates)
        except DiskDiffError as exc:
            exc.partial = diff
            raise

    def _candidates(self, before: dict[bytes, _Entry], after: dict[bytes, _Entry],
                    ranges: Ranges) -> list[bytes]:
        """The paths in both trees whose inode or blocks may differ."""
        out: list[bytes] = []
        same: list[bytes] = []
        for path in sorted(after):
            if path in before:
                (same if before[path] == after[path] else out).append(path)
        if not same or not ranges:
            return out
        inos = [after[p].ino for p in same]
        clean_slots = self.clean.inode_slots(inos)
        session_slots = self.session.inode_slots(inos)
        data_paths: list[bytes] = []
        for path in same:
            ino, mode, size = after[path].ino, after[path].mode, after[path].size
            if ino not in clean_slots or ino not in session_slots or (
                    self.clean.inode_bytes(clean_slots[ino])
                    != self.session.inode_bytes(session_slots[ino])):
                out.append(path)
            elif stat.S_ISREG(mode) or (stat.S_ISLNK(mode) and size >= _FAST_SYMLINK_MAX):
                data_paths.append(path)
        starts = [start for start, _ in ranges]
        blocks = self.session.blocks(after[p].ino for p in data_paths)
        bs = self.session.block_size
        for path in data_paths:
            # the inode is the same on both sides, so are its block numbers: a block the
            # session wrote to is compared with the clean one where it is
            if any(_overlaps(ranges, starts, blk * bs, blk * bs + bs)
                   and self.clean.block(blk) != self.session.block(blk)
                   for blk in blocks.get(after[path].ino, ())):
                out.append(path)
        return sorted(out)

    def _report(self, before: dict[bytes, _Entry], after: dict[bytes, _Entry],
                created: list[bytes], deleted: list[bytes], candidates: list[bytes]) -> None:
        diff = self.diff
        need = [after[p].ino for p in created + candidates]
        session_slots = self.session.inode_slots(need) if need else {}
        old = [before[p].ino for p in deleted + candidates]
        clean_slots = self.clean.inode_slots(old) if old else {}
        deleted_by_ino = {before[p].ino: p for p in deleted}
        found = {"created": 0, "modified": 0, "deleted": 0}
        for path in created:
            change = self._describe(self.session, path, after[path], session_slots)
            if change.kind != "dir" and change.inode in deleted_by_ino:
                change.note = ("same inode as deleted "
                               f"{escape_path(deleted_by_ino[change.inode])} (a rename?)")
            self._add("created", change, found)
        for path in candidates:
            mod = self._modified(path, before[path], after[path], clean_slots, session_slots)
            if mod is not None:
                self._add("modified", mod, found)
        for path in deleted:
            change = self._describe(self.clean, path, before[path], clean_slots)
            change.before_sha256, change.sha256 = change.sha256, None
            self._add("deleted", change, found)
        diff.counts = found
        diff.hashed_bytes = self.limits.max_hash_bytes_total - self.budget

    def _add(self, which: str, change: FileChange, found: dict[str, int]) -> None:
        rule = self.noise.get(change.raw_path)
        if which != "deleted" and rule is not None and self._is_noise(change, rule):
            change.note = f"boot noise: {rule.why}"
            self.diff.ignored.append(change)
            return
        found[which] += 1
        if sum(len(getattr(self.diff, k)) for k in found) >= self.limits.max_reported:
            self.diff.truncated = True
            return
        getattr(self.diff, which).append(change)

    def _is_noise(self, change: FileChange, rule: NoiseRule) -> bool:
        if change.kind != "file" or change.size > MAX_NOISE_FILE_BYTES:
            return False
        content = b"".join(self.session.stream(change.inode, MAX_NOISE_FILE_BYTES))
        return rule.content.fullmatch(content) is not None

    def _describe(self, fs: Ext4Reader, path: bytes, entry: _Entry,
                  slots: dict[int, int]) -> FileChange:
        slot = slots.get(entry.ino)
        inode = fs.read_inode(slot) if slot is not None else None
        change = FileChange(
            path=escape_path(path), kind=kind_of(entry.mode), size=entry.size,
            mode=stat.S_IMODE(entry.mode), uid=entry.uid, gid=entry.gid,
            mtime=inode.mtime if inode else 0.0, raw_path=path, inode=entry.ino)
        if inode is None:
            change.note = "inode not readable"
            return change
        change.size = inode.size
        if change.kind == "symlink":
            change.target = escape_path(fs.symlink_target(entry.ino, inode))
        elif change.kind == "file":
            self._hash(fs, change)
        return change

    def _hash(self, fs: Ext4Reader, change: FileChange) -> None:
        if self.budget <= 0 and change.size > 0:
            change.note = "not hashed: the total hash budget is spent"
            return
        limit = min(change.size, self.limits.max_hash_bytes_per_file, self.budget)
        digest = hashlib.sha256()
        for chunk in fs.stream(change.inode, limit):
            digest.update(chunk)
            change.hashed_bytes += len(chunk)
        self.budget -= change.hashed_bytes
        change.sha256 = digest.hexdigest()
        change.hash_truncated = change.hashed_bytes < change.size
        if change.hash_truncated and limit == change.size:
            change.note = "short read: the file's blocks are not all readable"

    def _modified(self, path: bytes, a: _Entry, b: _Entry, clean_slots: dict[int, int],
                  session_slots: dict[int, int]) -> FileChange | None:
        now = self._describe(self.session, path, b, session_slots)
        if now.kind == "dir" and kind_of(a.mode) == "dir":
            # entries created and removed are listed on their own; a directory's size and
            # mtime follow from them
            if (stat.S_IMODE(a.mode), a.uid, a.gid) == (now.mode, now.uid, now.gid):
                return None
        was = self._describe(self.clean, path, a, clean_slots)
        changed = tuple(name for name in ("kind", "size", "mode", "uid", "gid", "mtime",
                                          "sha256", "target")
                        if getattr(was, name) != getattr(now, name))
        if a.ino != b.ino:
            changed += ("inode",)
        if not changed and now.kind in ("chardev", "blockdev"):
            changed = ("device",) if self._device(self.clean, clean_slots, a) != \
                self._device(self.session, session_slots, b) else ()
        if not changed and (was.hash_truncated or now.hash_truncated):
            changed = ("beyond-hash-limit?",)
            now.note = "its blocks changed past the hashed prefix; contents not compared"
        if not changed:
            return None
        now.changed = tuple("content" if c == "sha256" else c for c in changed)
        now.before_sha256 = was.sha256
        return now

    @staticmethod
    def _device(fs: Ext4Reader, slots: dict[int, int], entry: _Entry) -> bytes:
        slot = slots.get(entry.ino)
        inode = fs.read_inode(slot) if slot is not None else None
        return inode.block[:8] if inode else b""


