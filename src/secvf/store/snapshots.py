"""VM snapshots in the bundle: ``snapshots/<NAME>/`` plus an internal snapshot of the disk.

Each snapshot is an internal qcow2 snapshot of the VM's ``disk.qcow2`` (tag
``secvf-<NAME>``) and a directory ``snapshots/<NAME>/`` holding ``snapshot.json``
(:class:`~secvf.model.savedstate.SnapshotInfo`) and, for a memory snapshot, the saved
state (:mod:`secvf.store.savedstate`). Everything lives in the bundle, so snapshots
survive SecVF's restarts and go with ``vm delete``.

A snapshot is assembled in ``snapshots/.saving-<hex>`` (held with an ``flock`` while
in use, like the library's work directories) and renamed into place only once
complete, so a killed save never leaves a half snapshot behind a valid name:
:func:`sweep` removes staging directories nobody holds, and disk tags without a
snapshot directory. The disk part is done with ``qemu-img`` while the VM is stopped;
while it runs, the supervisor does it over QMP.
"""

from __future__ import annotations

from pathlib import Path

from secvf.errors import AlreadyExists, CorruptRecord, InvalidName, NotFound
from secvf.model.names import validate_name
from secvf.model.savedstate import SnapshotInfo
from secvf.store.bundle import Bundle
from secvf.store.disks import image_info, qemu_img
from secvf.store.savedstate import SNAPSHOT_RECORD, read_record, write_record
from secvf.store.staging import HeldDir, sweep_unheld, trash

SNAPSHOTS_DIR = "snapshots"
RECORD_FILE = SNAPSHOT_RECORD
DISK_TAG_PREFIX = "secvf-"
_STAGING_PREFIX = ".saving-"


def validate_snapshot_name(name: str) -> str:
    """Return ``name`` if it can name a snapshot (the rules of VM names).

    Raises:
        InvalidName: it cannot.
    """
    return validate_name(name, "snapshot")


def disk_tag(name: str) -> str:
    """The internal qcow2 snapshot that holds snapshot ``name``'s disk."""
    return f"{DISK_TAG_PREFIX}{name}"


def snapshots_root(bundle: Bundle) -> Path:
    """``snapshots/`` in ``bundle`` (created 0700)."""
    path = bundle.path / SNAPSHOTS_DIR
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def snapshot_dir(bundle: Bundle, name: str) -> Path:
    """The directory of snapshot ``name`` (it may not exist)."""
    return bundle.path / SNAPSHOTS_DIR / validate_snapshot_name(name)


def get_snapshot(bundle: Bundle, name: str) -> SnapshotInfo:
    """The record of snapshot ``name`` of the VM in ``bundle``.

    Raises:
        InvalidName, NotFound, CorruptRecord.
    """
    record = read_record(snapshot_dir(bundle, name) / RECORD_FILE, SnapshotInfo,
                         f"snapshot '{name}' of VM '{bundle.name}'")
    if record.name != name:
        raise CorruptRecord(f"snapshot '{name}' of VM '{bundle.name}': its record names "
                            f"'{record.name}'")
    return record


def list_snapshots(bundle: Bundle) -> tuple[list[SnapshotInfo], list[str]]:
    """Every snapshot of the VM in ``bundle``, oldest first, and a problem line for each
    directory that is not a valid snapshot."""
    root = bundle.path / SNAPSHOTS_DIR
    found: list[SnapshotInfo] = []
    problems: list[str] = []
    if not root.is_dir():
        return found, problems
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        try:
            found.append(get_snapshot(bundle, entry.name))
        except (NotFound, CorruptRecord) as exc:
            problems.append(str(exc))
        except InvalidName as exc:
            problems.append(f"{entry}: {exc}")
    found.sort(key=lambda s: s.created_at)
    return found, problems


class Staging(HeldDir):
    """A snapshot being assembled; :meth:`commit` renames it into place."""

    def __init__(self, bundle: Bundle, name: str) -> None:
        self.name = validate_snapshot_name(name)
        super().__init__(snapshots_root(bundle), _STAGING_PREFIX)
        self.bundle = bundle

    def commit(self, record: SnapshotInfo) -> Path:
        """Write ``record`` and move the directory to its name; returns the new path.

        Raises:
            AlreadyExists: a snapshot of that name appeared meanwhile.
        """
        write_record(self.path / RECORD_FILE, record)
        target = snapshot_dir(self.bundle, self.name)
        try:
            self.path.rename(target)
        except OSError as exc:
            raise AlreadyExists(f"VM '{self.bundle.name}' already has a snapshot "
                                f"'{self.name}'") from exc
        self.release(target)
        return target


def remove_snapshot_dir(bundle: Bundle, name: str) -> None:
    """Remove snapshot ``name``'s directory (renamed away first, so no reader sees half)."""
    trash(snapshot_dir(bundle, name), _STAGING_PREFIX)


def sweep(bundle: Bundle) -> list[str]:
    """Remove staging directories no live process holds (a killed save's); return the
    tags of the VM's disk snapshots that no snapshot owns (the caller removes them, as
    only it knows whether the VM is stopped)."""
    sweep_unheld(bundle.path / SNAPSHOTS_DIR, _STAGING_PREFIX)
    owned = {s.disk_tag for s in list_snapshots(bundle)[0]}
    return sorted(t for t in disk_tags(bundle.disk) if t not in owned)


# ---- the disk part, on a stopped VM (qemu-img) ------------------------------------------


def disk_tags(disk: Path) -> list[str]:
    """The internal snapshots of ``disk`` that SecVF made (tags ``secvf-*``)."""
    snaps = image_info(disk).get("snapshots")
    names = [str(s.get("name", "")) for s in (snaps if isinstance(snaps, list) else [])
             if isinstance(s, dict)]
    return [n for n in names if n.startswith(DISK_TAG_PREFIX)]


def create_disk_snapshot(disk: Path, tag: str) -> None:
    """Take internal snapshot ``tag`` of stopped VM disk ``disk``."""
    qemu_img("snapshot", "-q", "-c", tag, str(disk))


def apply_disk_snapshot(disk: Path, tag: str) -> None:
    """Revert stopped VM disk ``disk`` to its internal snapshot ``tag``."""
    qemu_img("snapshot", "-q", "-a", tag, str(disk))


def delete_disk_snapshot(disk: Path, tag: str) -> None:
    """Delete internal snapshot ``tag`` of stopped VM disk ``disk`` (gone already: fine)."""
    if tag in disk_tags(disk):
        qemu_img("snapshot", "-q", "-d", tag, str(disk))
