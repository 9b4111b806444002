"""The files of a saved guest state (a memory snapshot or a sandbox template).

A saved-state directory holds ``state`` (QEMU's device state: a migration stream,
which starts with the magic ``QEVM``) and ``ram`` (a sparse copy of the guest's RAM
file). :func:`check_state_files` is what a restore runs first: a missing, truncated
or foreign file is refused with a message naming it, before any QEMU starts. The
record describing the files (:class:`~secvf.model.savedstate.SavedState`) is kept
by the owner of the directory (``snapshot.json``, ``template.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from secvf.errors import CorruptRecord, NotFound
from secvf.model.config import write_json_atomic
from secvf.model.runtime import decode
from secvf.model.savedstate import SavedState, SnapshotInfo, TemplateInfo

R = TypeVar("R", SnapshotInfo, TemplateInfo)

STATE_FILE = "state"
RAM_FILE = "ram"
#: The records that describe a saved state, by who owns the directory.
SNAPSHOT_RECORD = "snapshot.json"
TEMPLATE_RECORD = "template.json"
SAVED_RECORD = "saved-state.json"  # a state the supervisor saved for a template build
#: The first bytes of a QEMU migration stream.
STATE_MAGIC = b"QEVM"


def state_file(directory: Path) -> Path:
    """The device-state file of saved-state ``directory``."""
    return directory / STATE_FILE


def ram_file(directory: Path) -> Path:
    """The RAM copy of saved-state ``directory``."""
    return directory / RAM_FILE


def check_state_files(directory: Path, saved: SavedState, what: str) -> None:
    """Refuse the saved state in ``directory`` unless its files are what ``saved``
    records (``what`` names it in messages, e.g. "snapshot 'clean' of VM 'web'").

    Raises:
        NotFound: a file is missing.
        CorruptRecord: a file has the wrong size, or the state is not a QEMU stream.
    """
    for path, expected in ((state_file(directory), saved.state_bytes),
                           (ram_file(directory), saved.ram_bytes)):
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise NotFound(f"{what}: {path} is missing; delete the {what.split()[0]} and "
                           "save it again") from None
        if size != expected:
            raise CorruptRecord(f"{what}: {path} is {size} bytes, not the {expected} it was "
                                "saved with (truncated or replaced); delete it and save it again")
    with open(state_file(directory), "rb") as fh:
        if fh.read(len(STATE_MAGIC)) != STATE_MAGIC:
            raise CorruptRecord(f"{what}: {state_file(directory)} is not a QEMU state file")


def read_saved_state(directory: Path) -> tuple[SavedState, str]:
    """The saved state in snapshot or template ``directory`` and what to call it,
    after :func:`check_state_files`.

    Raises:
        NotFound: the directory holds no saved state (a disk-only snapshot, or nothing).
        CorruptRecord: its record or files are damaged.
    """
    snapshot = directory / SNAPSHOT_RECORD
    if snapshot.exists():
        info = read_record(snapshot, SnapshotInfo, f"snapshot {directory.name}")
        what = f"snapshot '{info.name}'"
        if info.state is None:
            raise NotFound(f"{what} is a disk-only snapshot: it holds no guest state")
        saved = info.state
    else:
        template = read_record(directory / TEMPLATE_RECORD, TemplateInfo,
                               f"saved state in {directory}")
        what, saved = f"template {template.id[:12]}", template.state
    check_state_files(directory, saved, what)
    return saved, what


def read_record(path: Path, schema: type[R], what: str) -> R:
    """Read and validate a saved-state record (``snapshot.json``, ``template.json``).

    Raises:
        NotFound: it does not exist.
        CorruptRecord: it is not a valid record.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{what} does not exist") from None
    return decode(schema, data, source=str(path))


def write_record(path: Path, record: SnapshotInfo | TemplateInfo | SavedState) -> None:
    """Write ``record`` to ``path`` atomically (``model.config.write_json_atomic``)."""
    write_json_atomic(path, record.model_dump(mode="json"))
