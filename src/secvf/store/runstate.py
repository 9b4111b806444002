"""Where a VM's run is recorded, and how any ``secvf`` command reads it.

The supervisor holds the bundle's ``run.lock`` (an exclusive ``flock``) for the whole
run and publishes a :class:`~secvf.model.runtime.RuntimeRecord` to the runtime state
file; when the run ends it writes a :class:`~secvf.model.runtime.LastRun` to the
bundle. A reader trusts the state file only while that lock is held; otherwise the
supervisor is gone and the VM is stopped, or crashed if the last run says so. The
state machine itself (which transitions the supervisor may make) lives in
:mod:`secvf.runtime.lifecycle`.

Reading is pure: :func:`current_state` never changes anything. Runtime files left
by a supervisor that died (``kill -9``, power loss) are removed only by an explicit
:func:`reap_stale_runtime`, which the commands that need a clean slate call
(start, status/list, audit — after it has looked at what is there). A reaper
holds a *shared* ``flock`` on ``run.lock`` while it removes files, so no
supervisor can take the lock in between and have its fresh files removed; readers
(``is_running``) also only take shared locks and are never misled by a reaper.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from secvf.errors import CorruptRecord
from secvf.model.config import write_json_atomic
from secvf.model.enums import LIVE_STATES as LIVE_STATES  # re-exported
from secvf.model.runtime import LastRun, RuntimeRecord, VmState, decode
from secvf.store.bundle import Bundle, RuntimeFiles
from secvf.store.locks import is_locked

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class RunView:
    """What a command can know about a VM's run at one instant (read-only)."""

    state: VmState  # the VM's state
    record: RuntimeRecord | None  # the live supervisor's record, if it published one
    last_run: LastRun | None  # how the run ended (None while it runs or if it never ran)

    @property
    def live(self) -> bool:
        """True while a supervisor runs the VM (starting, running or stopping)."""
        return self.state in LIVE_STATES


def write_runtime_state(files: RuntimeFiles, record: RuntimeRecord) -> None:
    """Publish the supervisor's record atomically (readers see the old or the new one)."""
    write_json_atomic(files.state_file, record.model_dump(mode="json"))


def read_runtime_state(files: RuntimeFiles) -> RuntimeRecord | None:
    """Return the supervisor's last published record, or None if there is none yet.

    Raises:
        CorruptRecord: the state file is unreadable or not a runtime record.
    """
    return _read(files.state_file, RuntimeRecord)


def write_last_run(bundle: Bundle, last: LastRun) -> None:
    """Record how a run ended in the bundle's ``last_run.json``."""
    write_json_atomic(bundle.last_run_file, last.model_dump(mode="json"))


def read_last_run(bundle: Bundle) -> LastRun | None:
    """How the previous run ended (None if the VM never ran).

    Raises:
        CorruptRecord: ``last_run.json`` is unreadable or not a last-run record.
    """
    return _read(bundle.last_run_file, LastRun)


def _read(path: Path, schema: type[M]) -> M | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CorruptRecord(f"cannot read {path}: {exc.strerror}") from exc
    return decode(schema, data, source=str(path))


def is_running(bundle: Bundle) -> bool:
    """True while a supervisor holds the VM's run lock."""
    return is_locked(bundle.run_lock)


def current_state(bundle: Bundle, vm_id: str) -> RunView:
    """Return what is known about the VM's run right now. Changes nothing.

    Raises:
        CorruptRecord: the state file (while running) or ``last_run.json`` (while
            not running) is unreadable or of an unknown shape.
    """
    if is_running(bundle):
        record = read_runtime_state(RuntimeFiles(vm_id))
        # the supervisor holds the lock a moment before it first publishes
        if record is None or record.state in LIVE_STATES:
            return RunView(record.state if record else VmState.STARTING, record, None)
        # a run that ended, its supervisor still tidying up: it wrote why first
        return RunView(record.state, record, read_last_run(bundle))
    last = read_last_run(bundle)
    crashed = last is not None and last.state is VmState.CRASHED
    return RunView(VmState.CRASHED if crashed else VmState.STOPPED, None, last)


def reap_stale_runtime(bundle: Bundle, vm_id: str) -> list[str]:
    """Remove the runtime files of a supervisor that died; return the names removed.

    A no-op (returns ``[]``) while a supervisor runs the VM, and when the bundle is
    gone. Holds a shared lock on ``run.lock`` meanwhile (see the module docstring).
    """
    try:
        fd = os.open(bundle.run_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return []
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return []
        return remove_runtime_files(RuntimeFiles(vm_id))
    finally:
        os.close(fd)


def remove_runtime_files(files: RuntimeFiles) -> list[str]:
    """Remove every runtime file of the VM; return the names removed.

    Only for whoever knows no supervisor uses them: the supervisor itself (holding
    ``run.lock``) or :func:`reap_stale_runtime`. Files that cannot be removed (a
    directory in the way, say) are skipped.
    """
    removed = []
    for path in files.all_files():
        try:
            os.unlink(path)
        except OSError:
            continue
        removed.append(path.name)
    for directory in (files.helper_events, files.vm_dir):
        with contextlib.suppress(OSError):  # left alone if something unexpected is in it
            directory.rmdir()
    return removed
