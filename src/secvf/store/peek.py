"""A quick look at a VM's records without validating them (standard library only).

``secvf vm exec`` runs once per command an agent runs, and validating ``vm.json`` and
the runtime record with pydantic costs it more than starting ``/bin/true`` in the
guest. :func:`running_exec_socket` answers its one question (where is the exec socket
of this running AI sandbox?) from the raw JSON, and it answers only a plain yes: for
anything else (another kind, not running, paused, still starting, a record that is missing,
unreadable or of another shape) it returns None, and the caller asks the validated
readers (:func:`secvf.store.library.get_vm`, :func:`secvf.store.runstate.current_state`),
which say what is wrong.

What a yes relies on: the supervisor holds ``run.lock`` for as long as the VM runs and
validated ``vm.json`` when it started the VM; the socket is in the private runtime
directory, named by the VM's UUID (only a canonical one is taken here), and the exec
bridge behind it checks who connects.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from secvf.model.enums import LIVE_STATES, VMKind, VmState
from secvf.store.bundle import Bundle, RuntimeFiles
from secvf.store.locks import is_locked

#: A UUID in its canonical form, as ``str(uuid.UUID(...))`` writes it (the uuid module
#: itself is not imported for this: it loads ``platform``, a cost on ``vm exec``'s start).
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def running_exec_socket(bundle: Bundle) -> Path | None:
    """The exec socket of the AI sandbox in ``bundle`` if a quick look finds it running
    (its supervisor holds ``run.lock`` and published a live state) with the socket in
    place; None for anything else. Never raises for what it finds on disk."""
    config = _json_object(bundle.config_file)
    if config is None or config.get("name") != bundle.name \
            or config.get("kind") != VMKind.AI_SANDBOX:
        return None
    vm_id = config.get("id")
    if not _is_canonical_uuid(vm_id) or not is_locked(bundle.run_lock):
        return None
    files = RuntimeFiles(str(vm_id))
    record = _json_object(files.state_file)
    state = None if record is None else record.get("state")
    if not isinstance(state, str) or state not in LIVE_STATES or state == VmState.PAUSED:
        return None  # a paused guest cannot answer: the validated path says so
    return files.exec_socket if files.exec_socket.exists() else None


def _json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in file ``path``; None if it is missing, unreadable or not one."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _is_canonical_uuid(value: object) -> bool:
    """True for a UUID in its canonical form (lower-case hex in 8-4-4-4-12 groups)."""
    return isinstance(value, str) and _CANONICAL_UUID.fullmatch(value) is not None
