"""Garbage collection in the VM library (``secvf gc``; ``vm delete`` runs it too).

Two kinds of garbage:

* **layers** — frozen disk layers in ``$SECVF_HOME/layers`` that no VM's disk and no
  sandbox template reads through any more (clones freeze their source into layers, a
  template's disk is one; deleting the VMs leaves the layers behind);
* **work directories** — ``vms/.creating-*``, ``.cloning-*``, ``.importing-*`` and
  ``.deleting-*`` that no live process holds (see :mod:`secvf.store.staging`): what a
  killed create, clone, import or delete left.

References are found by walking every VM disk's backing chain with ``qemu-img``. If a
disk that exists cannot be read, it could reference any layer, so no layer is removed
and the report says which disk is the problem. Collection excludes cloning (see
:mod:`secvf.store.layers`), so a layer frozen a moment ago is never taken for garbage.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secvf.store import paths
from secvf.store.disks import DiskError, image_info
from secvf.store.layers import LAYER_SUFFIX, collecting_layers, layers_dir
from secvf.store.sparse import allocated_bytes
from secvf.store.staging import is_work_dir, try_hold
from secvf.store.templates import sweep as sweep_templates
from secvf.store.templates import template_layers

#: A chain longer than this is taken for a loop.
MAX_CHAIN = 256


@dataclass(frozen=True)
class Garbage:
    """One thing the collector removed (or, in a dry run, would remove)."""

    path: Path
    kind: str  # "layer" or "work-dir"
    size_bytes: int  # bytes it occupies on disk


@dataclass
class GcReport:
    """What a collection found and did."""

    dry_run: bool
    removed: list[Garbage] = field(default_factory=list)
    kept_layers: int = 0  # layers some VM still uses (or all of them, if problems)
    problems: list[str] = field(default_factory=list)  # why layers were kept

    @property
    def freed_bytes(self) -> int:
        """Bytes the removed items occupied."""
        return sum(g.size_bytes for g in self.removed)

    def as_json(self) -> dict[str, Any]:
        """The report as ``secvf gc --json`` prints it."""
        return {"dry_run": self.dry_run, "freed_bytes": self.freed_bytes,
                "kept_layers": self.kept_layers, "problems": self.problems,
                "removed": [{"path": str(g.path), "kind": g.kind, "size_bytes": g.size_bytes}
                            for g in self.removed]}


def collect(*, dry_run: bool = False) -> GcReport:
    """Remove unused layers and leftover work directories; ``dry_run``: only report.

    Raises:
        LockBusy: a clone is in progress (try again when it is done).
    """
    report = GcReport(dry_run)
    with collecting_layers():
        live = _sweep_work_dirs(report)
        sweep_templates()
        used: set[Path] = set()
        for layer in template_layers():  # and what those layers read through
            used.add(layer)
            if layer.exists():
                live.append((f"template layer {layer.name}", layer))
        for label, disk in live:
            try:
                used.update(backing_files(disk))
            except DiskError as exc:
                report.problems.append(f"cannot read the disk of {label}, so every layer "
                                       f"was kept: {exc}")
        for layer in sorted(layers_dir().glob(f"*{LAYER_SUFFIX}")):
            if report.problems or layer.resolve() in used:
                report.kept_layers += 1
                continue
            report.removed.append(Garbage(layer, "layer", allocated_bytes(layer)))
            if not dry_run:
                layer.unlink(missing_ok=True)
    return report


def _sweep_work_dirs(report: GcReport) -> list[tuple[str, Path]]:
    """Remove (or report) work directories nobody holds; return the disks of every VM
    and of every live create, clone or import, which may reference layers."""
    disks = []
    for entry in sorted(paths.vms_dir().iterdir()):
        if not is_work_dir(entry):
            if entry.is_dir() and not entry.name.startswith("."):
                disks.append((f"VM '{entry.name}'", entry / "disk.qcow2"))
            continue
        held = try_hold(entry)
        if held is None:  # in use; a delete in progress references nothing any more
            if not entry.name.startswith(".deleting-"):
                disks.append((f"{entry} (in progress)", entry / "disk.qcow2"))
            continue
        try:
            report.removed.append(Garbage(entry, "work-dir", allocated_bytes(entry)))
            if not report.dry_run:
                shutil.rmtree(entry, ignore_errors=True)
        finally:
            os.close(held)
    return [(label, disk) for label, disk in disks if disk.exists()]


def backing_files(disk: Path) -> list[Path]:
    """Every file VM disk ``disk`` (a qcow2) reads through, nearest first, as resolved
    paths.

    A missing backing file ends the chain: the disk is broken, but references nothing
    beyond it.

    Raises:
        DiskError: a file of the chain exists but cannot be read, the disk is not a
            qcow2 (a damaged header hides its backing file), or the chain loops.
    """
    chain: list[Path] = []
    current = disk
    while len(chain) < MAX_CHAIN:
        info = image_info(current)
        if current is disk and info.get("format") != "qcow2":
            raise DiskError(f"{disk} is not a qcow2 disk (is its header damaged?)")
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        if not backing:
            return chain
        path = Path(str(backing))
        path = (path if path.is_absolute() else current.parent / path).resolve()
        chain.append(path)
        if not path.exists():
            return chain
        current = path
    raise DiskError(f"the backing chain of {disk} is longer than {MAX_CHAIN} files "
                    "(a loop?)")


def vms_based_on(directory: Path) -> list[str]:
    """Names of the VMs (and creates in progress) whose disk reads through a file in
    ``directory``; a disk that cannot be read is left out."""
    top = directory.resolve()
    users = []
    for entry in sorted(paths.vms_dir().iterdir()):
        disk = entry / "disk.qcow2"
        if not entry.is_dir() or entry.name.startswith(".deleting-") or not disk.exists():
            continue
        try:
            chain = backing_files(disk)
        except DiskError:
            continue
        if any(top in p.parents for p in chain):
            users.append(entry.name)
    return users
