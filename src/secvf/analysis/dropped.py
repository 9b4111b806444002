"""The files a detonated sample dropped, out of the session disk into an ``infected`` zip.

:func:`write_dropped_zip` takes the created and modified regular files of a
:class:`~secvf.analysis.diskdiff.DiskDiff`, reads them from the session image by inode
(``debugfs cat``; never by a guest path, never through a mount) and writes them into a
zip encrypted with the analysts' conventional password ``infected``::

    with raw_image(session, workdir) as raw:
        diff = diff_raw(clean_raw, raw, workdir=workdir)
        dropped = write_dropped_zip(diff, raw, result_dir / "dropped.zip")

Why the classic ZipCrypto zip made by Info-ZIP ``zip -P``: it is what sample-sharing
sites, sandboxes and analysts' tools exchange and what every unzip (Info-ZIP, 7-Zip,
Python's ``zipfile``, Windows Explorer) opens. AES zips (``pyzipper``, 7-Zip's
``-mem=AES256``) are stronger, but Info-ZIP's unzip cannot open them, and the password
is public anyway: the encryption is there so that no scanner quarantines, and nobody
double-clicks, a live sample — not for secrecy. Python's ``zipfile`` reads ZipCrypto
but cannot write it, and a pure-Python encryptor runs at about 1 MB/s.

``zip`` reads files, so each member is streamed from debugfs into a private staging
directory (0700, in ``workdir``, removed before this returns), as a 0644 file — no
member of the zip has an execute, setuid or setgid bit — and nothing else of the
sample touches the host filesystem unencrypted. Member names are the escaped guest
paths without the leading ``/`` (``escape_path``: printable, one line, no ``..``
component, since the walk never yields one); ``zip -nw`` takes them literally.

Bounded by :class:`DropLimits` (per file, in total, members); what is left out is
listed in :attr:`DroppedZip.skipped` with the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secvf.analysis.diskdiff import (
    TOOL_TIMEOUT_S,
    DiskDiff,
    Ext4Reader,
    FileChange,
    RawImage,
    raw_image,
)
from secvf.errors import SecVFError

#: The analysts' convention for archives of live samples.
DEFAULT_PASSWORD = "infected"
#: Mode of every member (and of its staged copy): never executable.
MEMBER_MODE = 0o644


class DroppedZipError(SecVFError):
    """The zip of dropped files could not be written (``.path``: the zip)."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class DropLimits:
    """Bounds on one zip of dropped files."""

    max_file_bytes: int = 64 * 1024 * 1024  # a bigger file is skipped
    max_total_bytes: int = 512 * 1024 * 1024  # files past it are skipped
    max_members: int = 5_000  # files past it are skipped


@dataclass(frozen=True)
class DroppedMember:
    """One file in the zip."""

    name: str  # member name: the escaped guest path without its leading "/"
    path: str  # the guest path, escaped
    size: int  # bytes stored
    sha256: str  # of the bytes stored (the whole file)
    change: str  # "created" or "modified"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "size": self.size,
                "sha256": self.sha256, "change": self.change}


@dataclass(frozen=True)
class SkippedFile:
    """A created or modified regular file that is not in the zip, and why."""

    path: str  # the guest path, escaped
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass
class DroppedZip:
    """What :func:`write_dropped_zip` wrote."""

    path: Path  # the zip
    password: str  # its password (ZipCrypto)
    members: list[DroppedMember] = field(default_factory=list)  # in zip order
    skipped: list[SkippedFile] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "password": self.password, "encryption": "zipcrypto",
                "members": [m.to_json() for m in self.members],
                "skipped": [s.to_json() for s in self.skipped]}


def write_dropped_zip(diff: DiskDiff, session: Path | RawImage, out: Path,
                      password: str = DEFAULT_PASSWORD, *, workdir: Path | None = None,
                      limits: DropLimits = DropLimits(),
                      keep_files: Path | None = None) -> DroppedZip:
    """Write the created and modified regular files of ``diff`` into the encrypted zip
    ``out`` (mode 0600; it must not exist yet).

    ``session`` is the session image the diff was made of (a path: flattened again
    into ``workdir``; a :class:`RawImage`: read as it is). ``workdir`` (default: the
    directory of ``out``) holds the staging directory. With ``keep_files`` (a directory
    that must not exist, 0700) the staged copies stay there, as ``keep_files/files/<member
    name>`` (mode 0644, never executable), for the caller to scan and then remove.

    Raises:
        DroppedZipError: ``out`` exists, ``zip`` is missing or failed, or the session
            image cannot be read (then no zip is left behind).
    """
    if not password:
        raise ValueError("a dropped-files zip needs a password")
    work = workdir or out.parent
    if out.exists() or out.is_symlink():
        raise DroppedZipError(f"{out} exists already", out)
    try:
        with _session_raw(session, work) as raw:
            return _write(diff, raw, out, password, work, limits, keep_files)
    except SecVFError as exc:
        if isinstance(exc, DroppedZipError):
            raise
        raise DroppedZipError(f"cannot read the dropped files: {exc}", out) from exc


@contextlib.contextmanager
def _session_raw(session: Path | RawImage, work: Path) -> Iterator[RawImage]:
    if isinstance(session, RawImage):
        yield session
    else:
        with raw_image(session, work) as raw:
            yield raw


def _selected(diff: DiskDiff) -> Iterator[tuple[str, FileChange]]:
    for which, changes in (("created", diff.created), ("modified", diff.modified)):
        for change in changes:
            if change.kind == "file":
                yield which, change


def _write(diff: DiskDiff, raw: RawImage, out: Path, password: str, work: Path,
           limits: DropLimits, keep: Path | None) -> DroppedZip:
    result = DroppedZip(out, password)
    stage = Path(tempfile.mkdtemp(prefix="secvf-dropped-", dir=work))  # 0700
    if keep is not None:
        keep.mkdir(mode=0o700)
    errors: list[str] = []
    fs = Ext4Reader(raw, stage, errors)
    total = 0
    try:
        for which, change in _selected(diff):
            reason = _too_much(change, total, len(result.members), limits)
            if reason:
                result.skipped.append(SkippedFile(change.path, reason))
                continue
            name = change.path.lstrip("/")
            try:
                member = _stage(fs, stage / "files", name, change, which)
            except OSError as exc:
                result.skipped.append(SkippedFile(change.path, f"cannot stage it: "
                                                  f"{exc.strerror}"))
                continue
            total += member.size
            result.members.append(member)
        _zip(stage, result, out)
        if keep is not None and (stage / "files").is_dir():
            os.replace(stage / "files", keep / "files")
    finally:
        fs.close()
        shutil.rmtree(stage, ignore_errors=True)
    return result


def _too_much(change: FileChange, total: int, members: int, limits: DropLimits) -> str:
    if change.size > limits.max_file_bytes:
        return f"{change.size} bytes: more than the {limits.max_file_bytes}-byte limit"
    if total + change.size > limits.max_total_bytes:
        return f"the zip's limit of {limits.max_total_bytes} bytes is reached"
    if members >= limits.max_members:
        return f"the zip's limit of {limits.max_members} files is reached"
    return ""


def _stage(fs: Ext4Reader, files: Path, name: str, change: FileChange, which: str) -> DroppedMember:
    """Stream inode ``change.inode`` into ``files/name`` (0644); its member entry."""
    target = files / name
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 MEMBER_MODE)
    digest, size = hashlib.sha256(), 0
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), MEMBER_MODE)  # whatever the umask
        for chunk in fs.stream(change.inode, change.size):
            digest.update(chunk)
            f.write(chunk)
            size += len(chunk)
    return DroppedMember(name, change.path, size, digest.hexdigest(), which)


def _zip(stage: Path, result: DroppedZip, out: Path) -> None:
    partial = stage / "dropped.zip"
    if not result.members:
        with zipfile.ZipFile(partial, "w"):
            pass  # an empty archive: nothing to encrypt
    else:
        names = "".join(f"{m.name}\n" for m in result.members).encode()
        argv = ["zip", "-q", "-X", "-D", "-nw", "-P", result.password, str(partial), "-@"]
        try:
            proc = subprocess.run(argv, input=names, cwd=stage / "files", capture_output=True,
                                  check=False, timeout=TOOL_TIMEOUT_S)
        except FileNotFoundError:
            raise DroppedZipError("cannot write the zip: 'zip' is not installed (Debian "
                                  "package zip)", out) from None
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DroppedZipError(f"cannot write the zip: {exc}", out) from None
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip()
            raise DroppedZipError(f"zip failed: {detail[-300:]}", out)
        with zipfile.ZipFile(partial) as archive:
            if archive.namelist() != [m.name for m in result.members]:
                raise DroppedZipError("zip stored other names than it was given", out)
    os.chmod(partial, 0o600)
    shutil.move(str(partial), str(out))
