"""A VM's lifecycle state and how any ``secvf`` command finds it out.

States and the transitions the supervisor makes::

    stopped ──start──▶ starting ──QEMU up, devices checked──▶ running
       ▲                  │                                     │
       │                  └──launch failed──▶ crashed           ├─stop──▶ stopping ──▶ stopped
       └──────────────────────────────────────────────────────── └─QEMU died/panic──▶ crashed

The supervisor holds the bundle's ``run.lock`` for the whole run and writes its
state to the runtime state file. A reader trusts the state file only while that
lock is held; otherwise the supervisor is gone, the VM is stopped (or crashed, if
the last run said so) and any leftover runtime files are stale and removed.
"""

from __future__ import annotations

import json
import os
from enum import StrEnum
from typing import Any

from secvf.model.config import write_json_atomic
from secvf.store.bundle import Bundle, RuntimeFiles
from secvf.store.locks import is_locked


class VmState(StrEnum):
    """Lifecycle state of a VM as ``vm status`` reports it."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    CRASHED = "crashed"


def write_runtime_state(files: RuntimeFiles, record: dict[str, Any]) -> None:
    """Publish the supervisor's state record atomically."""
    write_json_atomic(files.state_file, record)


def read_runtime_state(files: RuntimeFiles) -> dict[str, Any] | None:
    """Return the supervisor's last published record, or None if absent or unreadable."""
    try:
        data = json.loads(files.state_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def read_last_run(bundle: Bundle) -> dict[str, Any]:
    """How the previous run ended (``{}`` if the VM never ran or the file is unreadable)."""
    try:
        data = json.loads(bundle.last_run_file.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def is_running(bundle: Bundle) -> bool:
    """True while a supervisor holds the VM's run lock."""
    return is_locked(bundle.run_lock)


def current_state(bundle: Bundle, vm_id: str) -> tuple[VmState, dict[str, Any]]:
    """Return the VM's state and the runtime record (empty when not running).

    Cleans up stale runtime files of a supervisor that died.
    """
    files = RuntimeFiles(vm_id)
    if is_running(bundle):
        record = read_runtime_state(files) or {}
        try:
            state = VmState(record.get("state", VmState.STARTING))
        except ValueError:
            state = VmState.STARTING
        return state, record
    remove_stale_runtime_files(files)
    last = read_last_run(bundle)
    if last.get("state") == VmState.CRASHED:
        return VmState.CRASHED, {"last_run": last}
    return VmState.STOPPED, ({"last_run": last} if last else {})


def remove_stale_runtime_files(files: RuntimeFiles) -> list[str]:
    """Remove runtime files left by a dead supervisor; return the names removed."""
    removed = []
    for path in files.all_files():
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError:
            continue
        removed.append(path.name)
    return removed
