"""Analysis results: ``$SECVF_HOME/analyses/<id>/``, one directory per detonated sample.

A detonation holds ``<id>/.lock`` (``flock``) while it runs and writes ``status.json``
(its state and the VMs and network it made) before it makes anything, so a later
command can tell a finished result from one whose ``secvf analyze`` was killed, and
remove what that one left (:func:`interrupted`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secvf.errors import ConfigError, NotFound, StateError
from secvf.model.config import now_iso, write_json_atomic
from secvf.store import paths
from secvf.store.locks import FileLock, is_locked

STATUS_FILE = "status.json"
LOCK_FILE = ".lock"
_ID = re.compile(r"^[0-9a-f]{12}$")


def analyses_dir() -> Path:
    """The directory of analysis results (0700)."""
    return paths.ensure_private_dir(paths.secvf_home() / "analyses")


def new_analysis() -> tuple[str, Path, FileLock]:
    """A new result directory, its id and its held lock (the caller releases it)."""
    analysis_id = uuid.uuid4().hex[:12]
    directory = analyses_dir() / analysis_id
    directory.mkdir(mode=0o700)
    lock = FileLock(directory / LOCK_FILE, f"analysis {analysis_id}").acquire()
    return analysis_id, directory, lock


def result_dir(analysis_id: str) -> Path:
    """The result directory of ``analysis_id`` (a unique prefix of 4+ characters works).

    Raises:
        NotFound: no such analysis, or the prefix is ambiguous.
    """
    if _ID.match(analysis_id):
        found = [analyses_dir() / analysis_id]
        found = [p for p in found if p.is_dir()]
    elif re.fullmatch(r"[0-9a-f]{4,11}", analysis_id):
        found = sorted(p for p in analyses_dir().glob(f"{analysis_id}*") if _ID.match(p.name))
    else:
        raise NotFound(f"'{analysis_id}' is not an analysis id (12 hex digits, or a unique "
                       "prefix of 4 or more; see: secvf analyses list)")
    if len(found) != 1:
        what = "no analysis" if not found else f"{len(found)} analyses"
        raise NotFound(f"{what} with an id starting '{analysis_id}' (see: secvf analyses list)")
    return found[0]


def write_status(directory: Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into ``status.json`` (atomically) and return the new status."""
    status = read_status(directory) | fields | {"updated_at": now_iso()}
    write_json_atomic(directory / STATUS_FILE, status)
    return status


def read_status(directory: Path) -> dict[str, Any]:
    """``status.json`` of a result directory (empty if it has none yet).

    Raises:
        ConfigError: it is not a JSON object.
    """
    path = directory / STATUS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return data


def running(directory: Path) -> bool:
    """Whether a detonation holds this result directory's lock right now."""
    return is_locked(directory / LOCK_FILE)


@dataclass(frozen=True)
class ListedAnalysis:
    """One result directory: its id, status and whether its detonation still runs."""

    id: str
    directory: Path
    status: dict[str, Any]
    running: bool


def list_analyses() -> list[ListedAnalysis]:
    """Every result directory, oldest first (an unreadable status is shown as such)."""
    found = []
    for path in sorted(analyses_dir().iterdir(), key=lambda p: p.stat().st_mtime):
        if not _ID.match(path.name) or not path.is_dir():
            continue
        try:
            status = read_status(path)
        except ConfigError as exc:
            status = {"state": "invalid", "error": str(exc)}
        found.append(ListedAnalysis(path.name, path, status, running(path)))
    return found


def interrupted() -> list[ListedAnalysis]:
    """Results whose detonation ended without finishing (its process was killed)."""
    return [a for a in list_analyses()
            if not a.running and a.status.get("state") in ("starting", "running")]


def remove_analysis(analysis_id: str) -> Path:
    """Remove a finished result directory; returns its path.

    Raises:
        NotFound, StateError (its detonation still runs).
    """
    directory = result_dir(analysis_id)
    if running(directory):
        raise StateError(f"analysis {directory.name} is still running", "running")
    shutil.rmtree(directory)
    return directory


def export_analysis(analysis_id: str, out: Path) -> Path:
    """Write a result directory as a gzipped tar (members 0600/0700, no lock file).

    Raises:
        NotFound, StateError (still running), ConfigError (``out`` exists).
    """
    directory = result_dir(analysis_id)
    if running(directory):
        raise StateError(f"analysis {directory.name} is still running", "running")
    if out.exists():
        raise ConfigError(f"{out} exists; choose another file")
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh, tarfile.open(fileobj=fh, mode="w:gz") as tar:
        tar.add(directory, arcname=directory.name,
                filter=lambda info: None if info.name.endswith(f"/{LOCK_FILE}") else info)
    return out
