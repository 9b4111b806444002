"""The ISO cache, ``$SECVF_HOME/isos/``: verified installer media a VM boots by name.

Layout::

    isos/<name>/image.iso        the medium (0644), never written after it is published
    isos/<name>/iso.json         its record (:class:`~secvf.model.iso.IsoRecord`, 0600)
    isos/.partial/<key>.part     a download under way (0600), locked by its downloader,
                                 kept when a transfer breaks off so the next fetch resumes
    isos/.adding-<hex>/          an entry being assembled (held, see store.staging)
    isos/.removing-<hex>/        an entry being removed
    isos/.lock                   held while an entry is published, re-recorded or removed

An entry appears only complete and verified: its medium and record are put together in
an ``.adding-`` directory, which one ``rename`` turns into ``<name>/``. Nothing here
reads the network or decides what is trusted: that is :mod:`secvf.workflows.iso_fetch`.
A record that does not validate is reported (naming the file), never rewritten or
removed by a read.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydantic import ValidationError

from secvf.errors import AlreadyExists, ConfigError, InvalidName, LockBusy, NotFound, StateError
from secvf.model.config import write_json_atomic
from secvf.model.iso import (
    DEFAULT_ISO_HOSTS,
    HostAllowlist,
    IsoRecord,
    parse_host_allowlist,
    validate_iso_name,
)
from secvf.store import paths
from secvf.store.staging import HeldDir, sweep_unheld, trash

ISO_FILE = "image.iso"
RECORD_FILE = "iso.json"
#: The cached medium's mode: readable, written by nobody after it is published.
ISO_MODE = 0o644
HOSTS_FILE = "iso-hosts"
PARTIAL_DIR = ".partial"
ADDING_PREFIX = ".adding-"
REMOVING_PREFIX = ".removing-"
LOCK_FILE = ".lock"


@dataclass(frozen=True)
class CachedIso:
    """One entry of the cache: its record, or the error that makes the record unusable."""

    name: str
    directory: Path
    record: IsoRecord | None
    error: str | None = None

    @property
    def path(self) -> Path:
        """The medium a VM's cdrom drive opens (read-only)."""
        return self.directory / ISO_FILE

    def to_json(self) -> dict[str, object]:
        """The entry as ``iso list --json`` prints it (record fields None if unusable)."""
        record = self.record
        return {"name": self.name, "path": str(self.path),
                "size_bytes": record.size_bytes if record else None,
                "sha256": record.sha256 if record else None,
                "source": record.source if record else None,
                "checksums": record.checksums if record else None,
                "added_at": record.added_at if record else None,
                "verified_at": record.verified_at if record else None,
                "error": self.error}


def entry_dir(name: str) -> Path:
    """Where cached ISO ``name`` lives (it may not exist). Raises InvalidName."""
    return paths.isos_dir() / validate_iso_name(name)


def read_record(directory: Path) -> IsoRecord:
    """The validated record in ``directory`` (an entry of the cache).

    Raises:
        ConfigError: it is missing, unreadable, not JSON, fails validation or names
            another entry; the message names the file and says the medium is untouched.
    """
    path = directory / RECORD_FILE
    keep = (f"the ISO itself ({directory / ISO_FILE}) is untouched; fix the record or "
            f"remove the entry with: secvf iso rm {directory.name}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing; {keep}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}; {keep}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); {keep}") from None
    try:
        record = IsoRecord.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(f"{path}: field '{loc}': {first['msg']}; {keep}") from None
    if record.name != directory.name:
        raise ConfigError(f"{path} names the ISO {record.name!r}, but its directory is "
                          f"{directory.name!r}; {keep}")
    return record


def get_iso(name: str) -> CachedIso:
    """Cached ISO ``name`` with its validated record.

    Raises:
        InvalidName, NotFound (with how to add one), ConfigError (see :func:`read_record`).
    """
    directory = entry_dir(name)
    if not directory.is_dir() or directory.is_symlink():
        raise NotFound(f"no cached ISO named '{name}' (see: secvf iso list; add one with "
                       "secvf iso fetch URL or secvf iso add PATH)")
    return CachedIso(name, directory, read_record(directory))


def cached_iso_path(name: str) -> Path | None:
    """The medium of cached ISO ``name``, or None if the cache has no entry of that name
    (also when ``name`` could not be one: it has a ``/``, or is no valid name).

    Raises:
        ConfigError: the entry exists but its record is unusable.
    """
    try:
        directory = entry_dir(name)
    except InvalidName:
        return None
    if not directory.is_dir():
        return None
    return get_iso(name).path


def list_isos() -> list[CachedIso]:
    """Every entry, by name; one whose record is unusable carries the error (what a
    killed add or remove left behind is swept first)."""
    root = paths.isos_dir()
    for prefix in (ADDING_PREFIX, REMOVING_PREFIX):
        sweep_unheld(root, prefix)
    found = []
    for directory in sorted(root.iterdir()):
        if directory.name.startswith(".") or not directory.is_dir() or directory.is_symlink():
            continue
        try:
            found.append(CachedIso(directory.name, directory, read_record(directory)))
        except ConfigError as exc:
            found.append(CachedIso(directory.name, directory, None, str(exc)))
    return found


def check_name_free(name: str) -> None:
    """Raise AlreadyExists (with what to do) if the cache has an entry called ``name``."""
    directory = entry_dir(name)
    if directory.exists() or directory.is_symlink():
        raise AlreadyExists(f"the ISO cache already has an entry named '{name}' (see: secvf "
                            f"iso list); choose another with --name, or remove it first: "
                            f"secvf iso rm {name}")


@contextmanager
def new_entry() -> Iterator[HeldDir]:
    """A held ``.adding-`` directory to put a medium (``ISO_FILE``) into before
    :func:`publish`; removed on leaving the block unless it was published."""
    with HeldDir(paths.isos_dir(), ADDING_PREFIX) as work:
        yield work


def publish(work: HeldDir, record: IsoRecord) -> CachedIso:
    """Make the verified medium in ``work`` (``work.path / ISO_FILE``) cache entry
    ``record.name``: mode 0644, the record written beside it, then one rename.

    Raises:
        AlreadyExists: the name was taken meanwhile (``work`` is discarded by its block).
    """
    medium = work.path / ISO_FILE
    os.chmod(medium, ISO_MODE)
    _fsync(medium)
    write_json_atomic(work.path / RECORD_FILE, record.model_dump(mode="json"))
    target = entry_dir(record.name)
    with _cache_lock():
        check_name_free(record.name)
        os.rename(work.path, target)
        work.release(target)
    _fsync(target.parent)
    return CachedIso(record.name, target, record)


def rewrite_record(record: IsoRecord) -> None:
    """Replace entry ``record.name``'s record (e.g. a new ``verified_at``), if the entry
    still holds the same medium (same SHA-256). Raises NotFound, ConfigError."""
    with _cache_lock():
        current = get_iso(record.name)
        if current.record is not None and current.record.sha256 == record.sha256:
            write_json_atomic(current.directory / RECORD_FILE, record.model_dump(mode="json"))


def remove_iso(name: str) -> Path:
    """Remove cached ISO ``name`` (also one whose record is unusable); return where it was.

    Raises:
        InvalidName, NotFound.
        StateError: a VM's ``vm.json`` names the medium (the VMs are named).
    """
    directory = entry_dir(name)
    with _cache_lock():
        if not directory.is_dir() or directory.is_symlink():
            raise NotFound(f"no cached ISO named '{name}' (see: secvf iso list)")
        users = vms_using(directory / ISO_FILE)
        if users:
            raise StateError(f"cached ISO '{name}' is used by VM {', '.join(users)} (its cdrom "
                             "drive, ejected or not, names it); delete the VM or put another "
                             "medium in with: secvf vm media insert VM ISO, then remove it")
        trash(directory, REMOVING_PREFIX)
    return directory


def vms_using(medium: Path) -> list[str]:
    """The VMs whose ``vm.json`` names ``medium`` as their ISO (a VM whose config does
    not validate counts if its file mentions the path, so it is never left dangling)."""
    from secvf.model.config import IsoBoot
    from secvf.store.library import list_vms

    users = []
    for listed in list_vms():
        if listed.config is not None:
            boot = listed.config.boot
            if isinstance(boot, IsoBoot) and Path(boot.path) == medium:
                users.append(listed.bundle.name)
        elif _mentions(listed.bundle.config_file, str(medium)):
            users.append(listed.bundle.name)
    return users


def _mentions(path: Path, text: str) -> bool:
    try:
        return json.dumps(text)[1:-1] in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


# ---- downloads under way -------------------------------------------------------------------


def partial_path(url: str, sha256: str) -> Path:
    """The staging file of a download of ``url`` expected to hash to ``sha256``: the same
    request finds the same file, and so resumes it."""
    key = hashlib.sha256(f"{url}\n{sha256}".encode()).hexdigest()[:32]
    return paths.ensure_private_dir(paths.isos_dir() / PARTIAL_DIR) / f"{key}.part"


@contextmanager
def held_partial(path: Path, what: str) -> Iterator[BinaryIO]:
    """Open (or create, 0600) the staging file ``path`` and hold its lock while the block
    runs; ``what`` names the download in the :class:`LockBusy` message. The file object
    is positioned at the start.

    Raises:
        LockBusy: another process is downloading into it.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockBusy(f"another secvf command is downloading {what} right now") from None
        if os.fstat(fd).st_nlink:  # not removed by a failed download before we got the lock
            break
        os.close(fd)
    with os.fdopen(fd, "r+b") as fh:
        yield fh


def discard_partial(path: Path) -> None:
    """Remove a staging file (a failed verification, or one that cannot be resumed)."""
    path.unlink(missing_ok=True)


# ---- the download host allowlist -------------------------------------------------------------


def host_allowlist() -> HostAllowlist:
    """The hosts ISO downloads may reach: ``$SECVF_HOME/config/iso-hosts``, written with
    :data:`~secvf.model.iso.DEFAULT_ISO_HOSTS` (0600) on first use so it can be edited.

    Raises:
        ConfigError: it cannot be read or written, or a line is no host entry.
    """
    path = paths.config_dir() / HOSTS_FILE
    try:
        if not path.exists():
            _write_new(path, DEFAULT_ISO_HOSTS)
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot use the ISO host allowlist {path}: {exc}") from None
    return parse_host_allowlist(text, source=str(path))


def _write_new(path: Path, text: str) -> None:
    """Create ``path`` with ``text`` (0600) unless another process just did."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(0o600)
    try:
        os.link(tmp, path)  # never replaces a file another process made meanwhile
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


@contextmanager
def _cache_lock() -> Iterator[None]:
    """Hold the cache's lock, waiting for another command's (each holds it only for a
    rename or a record write, so a verified download is never thrown away for it)."""
    fd = os.open(paths.isos_dir() / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a directory
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)
