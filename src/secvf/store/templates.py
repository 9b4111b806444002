"""Sandbox templates on disk: ``$SECVF_HOME/templates/<ID>/``.

A template directory holds ``template.json``
(:class:`~secvf.model.savedstate.TemplateInfo`) and a saved state
(:mod:`secvf.store.savedstate`); the disk it was saved with is a frozen layer in
``$SECVF_HOME/layers`` (:mod:`secvf.store.layers`), because the overlays of the
sessions restored from it read through that layer even after the template is removed
or rebuilt. ``secvf gc`` keeps every layer a template names.

A template is built in ``templates/.building-<hex>`` (held with an ``flock`` while in
use) and renamed to its ID when complete; a rebuild replaces the old directory in one
rename.
"""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path

from secvf.errors import CorruptRecord, NotFound
from secvf.model.savedstate import TemplateInfo
from secvf.store import paths
from secvf.store.savedstate import TEMPLATE_RECORD, read_record, write_record
from secvf.store.staging import HeldDir, sweep_unheld, trash

RECORD_FILE = TEMPLATE_RECORD
_STAGING_PREFIX = ".building-"
_ID = re.compile(r"^[0-9a-f]{64}$")


def template_dir(template_id: str) -> Path:
    """The directory of template ``template_id`` (it may not exist).

    Raises:
        NotFound: ``template_id`` is not a template ID (64 hex digits).
    """
    if not _ID.match(template_id):
        raise NotFound(f"'{template_id}' is not a template ID (see: secvf sandbox template list)")
    return paths.templates_dir() / template_id


def get_template(template_id: str) -> TemplateInfo:
    """The record of template ``template_id``.

    Raises:
        NotFound, CorruptRecord.
    """
    record = read_record(template_dir(template_id) / RECORD_FILE, TemplateInfo,
                         f"template {template_id[:12]}")
    if record.id != template_id:
        raise CorruptRecord(f"template {template_id[:12]}: its record names {record.id[:12]}")
    return record


def list_templates() -> tuple[list[TemplateInfo], list[str]]:
    """Every template, newest first, and a problem line for each broken directory."""
    found: list[TemplateInfo] = []
    problems: list[str] = []
    for entry in sorted(paths.templates_dir().iterdir()):
        if entry.name.startswith("."):
            continue
        try:
            found.append(get_template(entry.name))
        except (NotFound, CorruptRecord) as exc:
            problems.append(str(exc))
    found.sort(key=lambda t: t.created_at, reverse=True)
    return found, problems


def find_template_ids(prefix: str) -> list[str]:
    """IDs of the templates whose ID starts with ``prefix`` (the CLI takes short IDs)."""
    return sorted(e.name for e in paths.templates_dir().iterdir()
                  if _ID.match(e.name) and e.name.startswith(prefix.lower()))


class TemplateStaging(HeldDir):
    """A template being built; :meth:`commit` renames it to the template's ID."""

    def __init__(self) -> None:
        super().__init__(paths.templates_dir(), _STAGING_PREFIX)

    def commit(self, record: TemplateInfo) -> Path:
        """Write ``record`` and move the directory to the template's ID, replacing an
        older build of the same ID; returns the new path."""
        write_record(self.path / RECORD_FILE, record)
        target = template_dir(record.id)
        old: Path | None = target.with_name(f"{_STAGING_PREFIX}{uuid.uuid4().hex}")
        try:
            target.rename(str(old))
        except FileNotFoundError:
            old = None
        self.path.rename(target)
        self.release(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return target


def remove_template(template_id: str) -> None:
    """Remove template ``template_id`` (its layer stays until ``secvf gc`` finds it unused).

    Raises:
        NotFound: there is no such template.
    """
    if not trash(template_dir(template_id), _STAGING_PREFIX):
        raise NotFound(f"template {template_id[:12]} does not exist")


def template_layers() -> set[Path]:
    """The disk layers the templates (and builds in progress) need, resolved."""
    used = set()
    for template in list_templates()[0]:
        used.add(Path(template.layer).resolve())
    return used


def sweep() -> None:
    """Remove build directories no live process holds (a killed build's)."""
    sweep_unheld(paths.templates_dir(), _STAGING_PREFIX)
