"""Per-VM cgroups: memory, pids and CPU limits for a VM's host processes.

Each VM gets ``<mount>/secvf/vm-<UUID>`` in the cgroup v2 hierarchy when the host's v2
root offers the ``memory``, ``pids`` and ``cpu`` controllers, and otherwise in each of
the v1 hierarchies of those controllers (hosts that still mount cgroup v1, such as the
development machine). Mount points come from ``/proc/self/mounts``. Processes join by
writing their pid to each :attr:`VmCgroup.procs_files` (the jail launcher does, first
thing). Standard library only.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_NAME = "secvf"
CONTROLLERS = ("memory", "pids", "cpu")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
KILL_TIMEOUT_S = 5.0


class CgroupUnavailable(OSError):
    """No cgroup can be made for a VM here (the message says why and what to do)."""


@dataclass(frozen=True)
class CgroupLimits:
    """A VM's limits."""

    memory_bytes: int
    pids_max: int
    cpu_quota_us: int  # per period; <= 0: no CPU limit
    cpu_period_us: int = 100_000


@dataclass(frozen=True)
class CgroupUsage:
    """What a VM's cgroup holds now."""

    memory_bytes: int
    memory_peak_bytes: int | None
    pids: int
    cpu_usage_us: int
    oom_kills: int


@dataclass(frozen=True)
class CgroupSupport:
    """What this host offers: cgroup v2 with the controllers, or v1 hierarchies."""

    version: int | None  # 2, 1, or None (no usable cgroups)
    mounts: dict[str, Path] = field(default_factory=dict)  # controller -> mount point
    reason: str = ""  # why version is None

    def require(self) -> None:
        """Raises :class:`CgroupUnavailable` when there is nothing to use."""
        if self.version is None:
            raise CgroupUnavailable(self.reason)


def detect(root: Path = Path("/")) -> CgroupSupport:
    """The cgroups of this host, from ``<root>/proc/self/mounts``."""
    try:
        lines = (root / "proc/self/mounts").read_text().splitlines()
    except OSError as exc:
        return CgroupSupport(None, reason=f"cannot read /proc/self/mounts: {exc.strerror}")
    v1: dict[str, Path] = {}
    v2: Path | None = None
    for line in lines:
        parts = line.split()
        if len(parts) < 4:
            continue
        where, fstype, options = root / parts[1].lstrip("/"), parts[2], parts[3].split(",")
        if fstype == "cgroup2" and v2 is None:
            v2 = where
        elif fstype == "cgroup":
            for name in CONTROLLERS:
                if name in options:
                    v1.setdefault(name, where)
    if v2 is not None:
        try:
            offered = set((v2 / "cgroup.controllers").read_text().split())
        except OSError:
            offered = set()
        if offered >= set(CONTROLLERS):
            return CgroupSupport(2, dict.fromkeys(CONTROLLERS, v2))
    if set(v1) >= set(CONTROLLERS):
        return CgroupSupport(1, v1)
    return CgroupSupport(None, reason=(
        "this host has no cgroup v2 hierarchy with the memory, pids and cpu controllers "
        "and no cgroup v1 hierarchies of all three (found v1: "
        f"{', '.join(sorted(v1)) or 'none'}); VMs run without limits"))


def _check_id(vm_id: str) -> str:
    if not _UUID.match(vm_id):
        raise ValueError(f"{vm_id!r} is not a VM UUID")
    return vm_id


def _read(path: Path) -> str:
    return path.read_text().strip()


def _write(path: Path, value: str) -> None:
    with path.open("w") as f:
        f.write(value)


def _keyed(path: Path, key: str) -> int:
    """The value of ``key`` in a ``key value`` file (0 if absent)."""
    for line in path.read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().lstrip("-").isdigit():
            return int(value)
    return 0


@dataclass(frozen=True)
class VmCgroup:
    """One VM's cgroup: one directory (v2) or one per controller hierarchy (v1)."""

    vm_id: str
    version: int
    by_controller: dict[str, Path]  # controller -> the VM's directory for it

    @property
    def dirs(self) -> tuple[Path, ...]:
        """The VM's directories, each once."""
        return tuple(dict.fromkeys(self.by_controller.values()))

    @property
    def procs_files(self) -> tuple[Path, ...]:
        """The ``cgroup.procs`` files a process writes its pid to, to join."""
        return tuple(d / "cgroup.procs" for d in self.dirs)

    def _at(self, controller: str, name: str) -> Path:
        return self.by_controller[controller] / name

    def apply(self, limits: CgroupLimits) -> None:
        """Set ``limits``."""
        quota = limits.cpu_quota_us
        if self.version == 2:
            _write(self._at("memory", "memory.max"), str(limits.memory_bytes))
            if self._at("memory", "memory.swap.max").exists():
                _write(self._at("memory", "memory.swap.max"), "0")
            _write(self._at("memory", "memory.oom.group"), "1")
            _write(self._at("cpu", "cpu.max"),
                   f"{quota if quota > 0 else 'max'} {limits.cpu_period_us}")
        else:
            _write(self._at("memory", "memory.limit_in_bytes"), str(limits.memory_bytes))
            _write(self._at("cpu", "cpu.cfs_period_us"), str(limits.cpu_period_us))
            _write(self._at("cpu", "cpu.cfs_quota_us"), str(quota if quota > 0 else -1))
        _write(self._at("pids", "pids.max"), str(limits.pids_max))

    def limits(self) -> CgroupLimits:
        """The limits set now."""
        pids = _read(self._at("pids", "pids.max"))
        pids_max = -1 if pids == "max" else int(pids)
        if self.version == 2:
            memory = _read(self._at("memory", "memory.max"))
            quota, period = _read(self._at("cpu", "cpu.max")).split()
            return CgroupLimits(-1 if memory == "max" else int(memory), pids_max,
                                -1 if quota == "max" else int(quota), int(period))
        return CgroupLimits(int(_read(self._at("memory", "memory.limit_in_bytes"))), pids_max,
                            int(_read(self._at("cpu", "cpu.cfs_quota_us"))),
                            int(_read(self._at("cpu", "cpu.cfs_period_us"))))

    def usage(self) -> CgroupUsage:
        """What it holds now."""
        pids = int(_read(self._at("pids", "pids.current")))
        if self.version == 2:
            peak_file = self._at("memory", "memory.peak")
            return CgroupUsage(
                memory_bytes=int(_read(self._at("memory", "memory.current"))),
                memory_peak_bytes=int(_read(peak_file)) if peak_file.exists() else None,
                pids=pids, cpu_usage_us=_keyed(self._at("cpu", "cpu.stat"), "usage_usec"),
                oom_kills=_keyed(self._at("memory", "memory.events"), "oom_kill"))
        acct = self._at("cpu", "cpuacct.usage")
        return CgroupUsage(
            memory_bytes=int(_read(self._at("memory", "memory.usage_in_bytes"))),
            memory_peak_bytes=int(_read(self._at("memory", "memory.max_usage_in_bytes"))),
            pids=pids, cpu_usage_us=int(_read(acct)) // 1000 if acct.exists() else 0,
            oom_kills=_keyed(self._at("memory", "memory.oom_control"), "oom_kill"))

    def pids(self) -> list[int]:
        """The processes in it."""
        found: set[int] = set()
        for procs in self.procs_files:
            try:
                found |= {int(p) for p in procs.read_text().split()}
            except FileNotFoundError:
                continue
        return sorted(found)

    def kill(self) -> None:
        """SIGKILL everything in it; wait (bounded) until it is empty."""
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    def remove(self) -> None:
        """Kill what is left and remove its directories.

        Raises:
            OSError: a directory stays (a process would not die).
        """
        self.kill()
        for directory in self.dirs:
            try:
                directory.rmdir()
            except FileNotFoundError:
                continue


def _parent_dirs(support: CgroupSupport) -> dict[str, Path]:
    return {name: mount / CGROUP_NAME for name, mount in support.mounts.items()}


def _enable_v2(mount: Path, parent: Path) -> None:
    """Turn on the controllers for children of the mount root and of ``parent``."""
    for group in (mount, parent):
        enabled = set(_read(group / "cgroup.subtree_control").split())
        missing = [c for c in CONTROLLERS if c not in enabled]
        if missing:
            _write(group / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))


def create_vm_cgroup(vm_id: str, limits: CgroupLimits, *,
                     support: CgroupSupport | None = None) -> VmCgroup:
    """Create (or take over from a dead run) VM ``vm_id``'s cgroup with ``limits``.

    Raises:
        CgroupUnavailable: no usable cgroups, or they cannot be written here.
        ValueError: ``vm_id`` is not a UUID.
    """
    name = f"vm-{_check_id(vm_id)}"
    support = support or detect()
    support.require()
    parents = _parent_dirs(support)
    try:
        for parent in dict.fromkeys(parents.values()):
            parent.mkdir(exist_ok=True)
        if support.version == 2:
            mount = next(iter(support.mounts.values()))
            _enable_v2(mount, parents["memory"])
        group = VmCgroup(vm_id, support.version or 0,
                         {c: parent / name for c, parent in parents.items()})
        for directory in group.dirs:
            directory.mkdir(exist_ok=True)
        group.kill()  # a dead run's leftovers
        group.apply(limits)
    except OSError as exc:
        raise CgroupUnavailable(
            f"cannot set up cgroup {name} ({exc.filename or ''}: {exc.strerror}); run as "
            "root, or on a systemd host start SecVF in a delegated scope (systemd-run "
            "--user --scope -p Delegate=yes)") from exc
    return group


def find_vm_cgroup(vm_id: str, *, support: CgroupSupport | None = None) -> VmCgroup | None:
    """VM ``vm_id``'s existing cgroup (None: it has none)."""
    support = support or detect()
    if support.version is None:
        return None
    name = f"vm-{_check_id(vm_id)}"
    group = VmCgroup(vm_id, support.version,
                     {c: parent / name for c, parent in _parent_dirs(support).items()})
    return group if all(d.is_dir() for d in group.dirs) else None


def sweep(live_vm_ids: Collection[str], *, support: CgroupSupport | None = None) -> list[str]:
    """Remove the empty cgroups of VMs not in ``live_vm_ids``; return their ids."""
    support = support or detect()
    if support.version is None:
        return []
    removed = []
    parent = _parent_dirs(support)["memory"]
    for entry in sorted(parent.glob("vm-*")) if parent.is_dir() else []:
        vm_id = entry.name[3:]
        if not _UUID.match(vm_id) or vm_id in live_vm_ids:
            continue
        group = find_vm_cgroup(vm_id, support=support)
        if group is not None and not group.pids():
            try:
                group.remove()
            except OSError:
                continue
            removed.append(vm_id)
    return removed


__all__ = ["CGROUP_NAME", "CgroupLimits", "CgroupSupport", "CgroupUnavailable", "CgroupUsage",
           "VmCgroup", "create_vm_cgroup", "detect", "find_vm_cgroup", "sweep"]
