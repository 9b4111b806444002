"""Per-VM cgroups: memory, pids and CPU limits for a VM's host processes.

Each running VM gets ``vm-<UUID>`` under a ``secvf`` group of its own, holding its QEMU
and device helpers:

* **cgroup v2** (Debian 12/13 and other systemd hosts): ``<mount>/secvf/vm-<UUID>``
  when the v2 root's ``cgroup.controllers`` offers ``memory``, ``pids`` and ``cpu``.
  Creating it turns on ``+memory +pids +cpu`` in the ``cgroup.subtree_control`` of the
  mount root and of ``secvf`` (only what is missing).
* **cgroup v1** otherwise (hybrid hosts such as the development machine, whose
  ``cgroup2`` offers only ``hugetlb``): ``<mount>/secvf/vm-<UUID>`` in the ``memory``,
  ``pids`` and ``cpu`` hierarchies, plus ``cpuacct`` when it is mounted on its own (for
  the CPU time used); co-mounted controllers share one directory. Each limit is written
  in its own hierarchy's files.

Mount points come from ``/proc/self/mounts`` (:func:`detect`), never from guessed paths.
A process joins by writing its own pid to each :attr:`VmCgroup.procs_files` (the jail
launcher does, first thing, before it execs).

Limits (:class:`CgroupLimits`) use one rule for all three: a value ``<= 0`` means no
limit (v2 ``max``, v1 ``-1``), which is also what :meth:`VmCgroup.limits` reads back as
:data:`NO_LIMIT`. Past the memory limit the kernel's OOM killer kills a process of that
VM only (v1 ``memory.oom_control`` is left at its default, kill; v2 also sets
``memory.oom.group`` so the whole VM goes together); swap is not used (v2
``memory.swap.max`` 0, v1 ``memory.memsw.*`` left alone).

Standard library only: code that may import nothing else uses it.

Errors::

    OSError
     └── CgroupUnavailable    no usable cgroups here, or they cannot be written
    ValueError                a VM id that is not a UUID
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_NAME = "secvf"  # the parent group under each hierarchy
CONTROLLERS = ("memory", "pids", "cpu")  # what a VM's cgroup needs
V1_OPTIONAL = ("cpuacct",)  # v1 only: joined too when mounted, for the CPU time used
NO_LIMIT = -1  # what limits() reads back for "no limit"
KILL_TIMEOUT_S = 5.0  # how long kill() waits for the group to empty
KILL_POLL_S = 0.02  # between rounds of SIGKILL
CPU_PERIOD_MIN_US, CPU_PERIOD_MAX_US = 1_000, 1_000_000  # the kernel's bounds
CPU_QUOTA_MIN_US = 1_000
_V1_UNLIMITED_MEMORY = 1 << 62  # v1 reads "no limit" as LONG_MAX rounded to a page

_UUID = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}", re.IGNORECASE)
_OCTAL = re.compile(r"\\([0-7]{3})")
_PREFIX = "vm-"
_HINT_PERMISSION = "run as root or delegate a cgroup"
_HINT_BUSY = ("the group has processes of its own, so it cannot hand controllers to "
              "children; run SecVF from a delegated cgroup without processes")

assert CPU_PERIOD_MIN_US <= 100_000 <= CPU_PERIOD_MAX_US


class CgroupUnavailable(OSError):
    """No cgroup can be made for a VM here; the message says why and what to do."""


@dataclass(frozen=True)
class CgroupLimits:
    """A VM's limits; any value ``<= 0`` except the period means no limit.

    Raises:
        ValueError: the period is outside 1 ms..1 s, or a quota is under 1 ms.
    """

    memory_bytes: int  # hard limit (v2 memory.max, v1 memory.limit_in_bytes)
    pids_max: int  # processes and threads (pids.max)
    cpu_quota_us: int  # CPU time per period (v2 cpu.max "Q P", v1 cpu.cfs_quota_us)
    cpu_period_us: int = 100_000  # v2 cpu.max "Q P", v1 cpu.cfs_period_us

    def __post_init__(self) -> None:
        if not CPU_PERIOD_MIN_US <= self.cpu_period_us <= CPU_PERIOD_MAX_US:
            raise ValueError(f"cpu_period_us {self.cpu_period_us} is outside "
                             f"{CPU_PERIOD_MIN_US}..{CPU_PERIOD_MAX_US}")
        if 0 < self.cpu_quota_us < CPU_QUOTA_MIN_US:
            raise ValueError(f"cpu_quota_us {self.cpu_quota_us} is under {CPU_QUOTA_MIN_US} "
                             "(use <= 0 for no CPU limit)")


@dataclass(frozen=True)
class CgroupUsage:
    """What a VM's cgroup holds now."""

    memory_bytes: int  # v2 memory.current, v1 memory.usage_in_bytes
    memory_peak_bytes: int | None  # v2 memory.peak (None: kernel too old), v1 max_usage
    pids: int  # pids.current (processes and threads)
    cpu_usage_us: int  # v2 cpu.stat usage_usec, v1 cpuacct.usage // 1000 (0: no cpuacct)
    oom_kills: int  # processes the memory limit killed (memory.events / memory.oom_control)


@dataclass(frozen=True)
class CgroupSupport:
    """What this host offers (:func:`detect`)."""

    version: int | None  # 2, 1, or None: no usable cgroups
    mounts: dict[str, Path] = field(default_factory=dict)  # controller -> its mount point
    reason: str = ""  # why version is None ("" otherwise)

    def parents(self) -> tuple[Path, ...]:
        """``<mount>/secvf`` in each hierarchy, each once (memory, pids, cpu, cpuacct)."""
        return tuple(dict.fromkeys(mount / CGROUP_NAME for mount in self.mounts.values()))


# ---- detection ---------------------------------------------------------------------------


def _unescape(field_text: str) -> str:
    """A /proc/self/mounts field with its octal escapes (``\\040`` is a space) undone."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field_text)


def _parse_mounts(text: str, root: Path) -> tuple[list[Path], dict[str, Path]]:
    """The cgroup2 mount points, and the first v1 mount point of each controller."""
    v2: list[Path] = []
    v1: dict[str, Path] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        where = root / _unescape(parts[1]).lstrip("/")
        if parts[2] == "cgroup2":
            v2.append(where)
        elif parts[2] == "cgroup":
            for option in parts[3].split(","):
                v1.setdefault(option, where)
    return v2, v1


def _v2_controllers(mount: Path) -> set[str]:
    try:
        return set((mount / "cgroup.controllers").read_text().split())
    except OSError:
        return set()


def _unusable(v2: dict[Path, set[str]], v1: dict[str, Path]) -> str:
    offered = "; ".join(f"cgroup2 at {m} offers {' '.join(sorted(c)) or 'nothing'}"
                        for m, c in v2.items()) or "no cgroup2 is mounted"
    found = ", ".join(c for c in CONTROLLERS if c in v1) or "none"
    return ("no cgroup v2 memory/pids/cpu controllers and no v1 memory, pids, cpu "
            f"hierarchies are mounted ({offered}; v1 hierarchies of those: {found}); "
            "boot with systemd.unified_cgroup_hierarchy=1, or mount the missing v1 "
            "hierarchies")


def detect(root: Path = Path("/")) -> CgroupSupport:
    """What this host offers, from ``<root>/proc/self/mounts`` (v2 preferred).

    ``root`` lets tests point it at a fake tree; mount points are taken under it.
    Never raises: what is missing is in :attr:`CgroupSupport.reason`.
    """
    try:
        text = (root / "proc/self/mounts").read_text()
    except OSError as exc:
        return CgroupSupport(None, reason=f"cannot read {root / 'proc/self/mounts'}: "
                                          f"{exc.strerror}")
    v2_mounts, v1 = _parse_mounts(text, root)
    v2 = {mount: _v2_controllers(mount) for mount in v2_mounts}
    for mount, offered in v2.items():
        if offered >= set(CONTROLLERS):
            return CgroupSupport(2, dict.fromkeys(CONTROLLERS, mount))
    if all(c in v1 for c in CONTROLLERS):
        return CgroupSupport(1, {c: v1[c] for c in (*CONTROLLERS, *V1_OPTIONAL) if c in v1})
    return CgroupSupport(None, reason=_unusable(v2, v1))


# ---- files -------------------------------------------------------------------------------


def _group_name(vm_id: str) -> str:
    """``vm-<vm_id>``; raises ValueError unless ``vm_id`` is a UUID (no path can escape)."""
    if not isinstance(vm_id, str) or not _UUID.fullmatch(vm_id):
        raise ValueError(f"{vm_id!r} is not a VM UUID")
    return _PREFIX + vm_id


def _read(path: Path) -> str:
    return path.read_text().strip()


def _write(path: Path, value: str) -> None:
    with path.open("w") as f:
        f.write(value)


def _int_or_max(text: str) -> int:
    return NO_LIMIT if text == "max" else int(text)


def _keyed(path: Path, key: str) -> int:
    """The value of ``key`` in a file of ``key value`` lines (0 if absent)."""
    for line in path.read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


# ---- one VM's group ----------------------------------------------------------------------


@dataclass(frozen=True)
class VmCgroup:
    """One VM's cgroup: one directory (v2) or one per controller hierarchy (v1).

    Usage::

        group = create_vm_cgroup(vm_id, CgroupLimits(2 << 30, 1024, 200_000))
        # each process of the VM writes its pid to every group.procs_files entry
        group.usage().memory_bytes
        group.remove()
    """

    vm_id: str  # the VM's UUID
    version: int  # 1 or 2
    dirs: tuple[Path, ...]  # the VM's directory in each hierarchy (co-mounted: once)

    @property
    def procs_files(self) -> tuple[Path, ...]:
        """The ``cgroup.procs`` files a process writes its own pid to, to join."""
        return tuple(d / "cgroup.procs" for d in self.dirs)

    def _find(self, name: str) -> Path | None:
        """The interface file ``name`` in whichever directory has it (None: none has)."""
        return next((d / name for d in self.dirs if (d / name).exists()), None)

    def _file(self, name: str) -> Path:
        found = self._find(name)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, f"no {name} in the cgroup of VM "
                                    f"{self.vm_id}", str(self.dirs[0] / name))
        return found

    def apply(self, limits: CgroupLimits) -> None:
        """Set ``limits`` (each in its own controller's files).

        Raises:
            OSError: a file is missing or the kernel refused a value (v1: a memory limit
                under what the group uses already is EBUSY).
        """
        if self.version == 2:
            self._apply_v2(limits)
        else:
            self._apply_v1(limits)
        _write(self._file("pids.max"), str(limits.pids_max) if limits.pids_max > 0 else "max")

    def _apply_v2(self, limits: CgroupLimits) -> None:
        memory, quota = limits.memory_bytes, limits.cpu_quota_us
        _write(self._file("memory.max"), str(memory) if memory > 0 else "max")
        for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
            if (path := self._find(name)) is not None:
                _write(path, value)
        _write(self._file("cpu.max"), f"{quota if quota > 0 else 'max'} {limits.cpu_period_us}")

    def _apply_v1(self, limits: CgroupLimits) -> None:
        memory, quota = limits.memory_bytes, limits.cpu_quota_us
        _write(self._file("memory.limit_in_bytes"), str(memory if memory > 0 else -1))
        _write(self._file("cpu.cfs_period_us"), str(limits.cpu_period_us))
        _write(self._file("cpu.cfs_quota_us"), str(quota if quota > 0 else -1))

    def limits(self) -> CgroupLimits:
        """The limits set now (:data:`NO_LIMIT` where there is none).

        Raises:
            OSError: the group is gone or a file is unreadable.
        """
        pids_max = _int_or_max(_read(self._file("pids.max")))
        if self.version == 2:
            quota, period = _read(self._file("cpu.max")).split()
            return CgroupLimits(_int_or_max(_read(self._file("memory.max"))), pids_max,
                                _int_or_max(quota), int(period))
        memory = int(_read(self._file("memory.limit_in_bytes")))
        quota_v1 = int(_read(self._file("cpu.cfs_quota_us")))
        return CgroupLimits(NO_LIMIT if memory >= _V1_UNLIMITED_MEMORY else memory, pids_max,
                            NO_LIMIT if quota_v1 < 0 else quota_v1,
                            int(_read(self._file("cpu.cfs_period_us"))))

    def usage(self) -> CgroupUsage:
        """What it holds now.

        Raises:
            OSError: the group is gone or a file is unreadable.
        """
        pids = int(_read(self._file("pids.current")))
        if self.version == 2:
            peak = self._find("memory.peak")
            return CgroupUsage(int(_read(self._file("memory.current"))),
                               int(_read(peak)) if peak is not None else None, pids,
                               _keyed(self._file("cpu.stat"), "usage_usec"),
                               _keyed(self._file("memory.events"), "oom_kill"))
        acct = self._find("cpuacct.usage")
        return CgroupUsage(int(_read(self._file("memory.usage_in_bytes"))),
                           int(_read(self._file("memory.max_usage_in_bytes"))), pids,
                           int(_read(acct)) // 1000 if acct is not None else 0,
                           _keyed(self._file("memory.oom_control"), "oom_kill"))

    def pids(self) -> list[int]:
        """The processes in it, in any of its hierarchies (sorted; [] once it is gone)."""
        found: set[int] = set()
        for procs in self.procs_files:
            with suppress(FileNotFoundError):
                found.update(int(pid) for pid in procs.read_text().split())
        return sorted(found)

    def kill(self, timeout_s: float = KILL_TIMEOUT_S) -> None:
        """SIGKILL everything in it and wait until it is empty.

        v2 writes ``cgroup.kill`` where the kernel has it (5.14+); every round (all of v1)
        also signals each pid listed, until none is left. A pid that exits between being
        listed and being signalled is skipped.

        Raises:
            OSError: (EBUSY) processes are still listed after ``timeout_s``.
        """
        if self.version == 2 and (switch := self._find("cgroup.kill")) is not None:
            _write(switch, "1")
        deadline = time.monotonic() + timeout_s
        while pids := self.pids():
            if time.monotonic() >= deadline:
                raise OSError(errno.EBUSY, f"the cgroup of VM {self.vm_id} still holds "
                              f"{pids} after SIGKILL for {timeout_s:g} s")
            for pid in pids:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(KILL_POLL_S)

    def remove(self, timeout_s: float = KILL_TIMEOUT_S) -> None:
        """:meth:`kill` what is left, then remove every directory (a missing one is fine).

        Raises:
            OSError: a directory stays (the message names each, and why).
        """
        killed: OSError | None = None
        try:
            self.kill(timeout_s)
        except OSError as exc:
            killed = exc
        stays = []
        for directory in self.dirs:
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                continue
            except OSError as exc:
                stays.append(f"{directory}: {exc.strerror}")
        if stays:
            why = f" ({killed.strerror})" if killed is not None else ""
            raise OSError(errno.EBUSY, f"cannot remove the cgroup of VM {self.vm_id}: "
                          f"{'; '.join(stays)}{why}")


# ---- creating, finding, sweeping ---------------------------------------------------------


@contextmanager
def _step(what: str, busy: str = _HINT_BUSY) -> Iterator[None]:
    """Turn an OSError of ``what`` into :class:`CgroupUnavailable` saying what to do
    (``busy``: the advice for EBUSY)."""
    try:
        yield
    except CgroupUnavailable:
        raise
    except OSError as exc:
        hint = {errno.EACCES: _HINT_PERMISSION, errno.EPERM: _HINT_PERMISSION,
                errno.EROFS: _HINT_PERMISSION, errno.EBUSY: busy}.get(exc.errno or 0)
        reason = exc.strerror or str(exc)
        raise CgroupUnavailable(f"{what}: {reason}" + (f" ({hint})" if hint else "")) from exc


def _enable_v2(group: Path) -> None:
    """Add whatever of ``+memory +pids +cpu`` ``group``'s subtree_control lacks."""
    control = group / "cgroup.subtree_control"
    with _step(f"cannot read {control}"):
        enabled = set(_read(control).split())
    missing = [c for c in CONTROLLERS if c not in enabled]
    if missing:
        with _step(f"cannot enable {' '.join(missing)} in {control}"):
            _write(control, " ".join(f"+{c}" for c in missing))


def _mkdir(path: Path) -> bool:
    """Create ``path`` (False: it was there already)."""
    with _step(f"cannot create {path}"):
        try:
            path.mkdir()
        except FileExistsError:
            return False
    return True


def _supported(support: CgroupSupport | None) -> CgroupSupport:
    return support if support is not None else detect()


def create_vm_cgroup(vm_id: str, limits: CgroupLimits, *,
                     support: CgroupSupport | None = None) -> VmCgroup:
    """Create VM ``vm_id``'s cgroup with ``limits`` (``support``: :func:`detect` now).

    A group of the same VM left by a dead run is emptied (SIGKILL) and reused: call
    this only while holding the VM's run lock, with no run of it alive.

    Raises:
        ValueError: ``vm_id`` is not a UUID.
        CgroupUnavailable: no usable cgroups, or they cannot be made or written here.
    """
    name = _group_name(vm_id)
    support = _supported(support)
    if support.version is None:
        raise CgroupUnavailable(support.reason)
    for parent in support.parents():
        if support.version == 2:
            _enable_v2(parent.parent)
        _mkdir(parent)
        if support.version == 2:
            _enable_v2(parent)
    group = VmCgroup(vm_id, support.version, tuple(p / name for p in support.parents()))
    made = [d for d in group.dirs if _mkdir(d)]
    try:
        with _step(f"cannot empty {name} of an earlier run",
                   busy="a process of it does not die; see `ps` for its state"):
            group.kill()
        with _step(f"cannot set the limits of {name}"):
            group.apply(limits)
    except CgroupUnavailable:
        for directory in made:
            with suppress(OSError):
                os.rmdir(directory)
        raise
    log.debug("cgroup v%d of VM %s: %s", group.version, vm_id, ", ".join(map(str, group.dirs)))
    return group


def find_vm_cgroup(vm_id: str, *, support: CgroupSupport | None = None) -> VmCgroup | None:
    """VM ``vm_id``'s existing cgroup, from any process (None: it has none).

    A v1 group with some hierarchies' directories gone has only the others.

    Raises:
        ValueError: ``vm_id`` is not a UUID.
    """
    name = _group_name(vm_id)
    support = _supported(support)
    if support.version is None:
        return None
    dirs = tuple(d for d in (p / name for p in support.parents()) if d.is_dir())
    return VmCgroup(vm_id, support.version, dirs) if dirs else None


def _vm_ids_under(parents: tuple[Path, ...]) -> set[str]:
    ids: set[str] = set()
    for parent in parents:
        with suppress(FileNotFoundError, NotADirectoryError):
            for entry in parent.iterdir():
                vm_id = entry.name.removeprefix(_PREFIX)
                if entry.name.startswith(_PREFIX) and _UUID.fullmatch(vm_id):
                    ids.add(vm_id)
    return ids


def sweep(live_vm_ids: Collection[str], *, support: CgroupSupport | None = None) -> list[str]:
    """Remove the groups of VMs not in ``live_vm_ids`` that hold no process.

    A group that still holds processes is left alone (a run without a record is not
    for this to kill), as is one that cannot be removed (logged).

    Returns:
        The ids of the VMs whose groups were removed, sorted.
    """
    support = _supported(support)
    if support.version is None:
        return []
    removed = []
    for vm_id in sorted(_vm_ids_under(support.parents()) - set(live_vm_ids)):
        group = find_vm_cgroup(vm_id, support=support)
        if group is None or group.pids():
            continue
        try:
            group.remove()
        except OSError as exc:
            log.warning("cannot sweep cgroup of VM %s: %s", vm_id, exc)
            continue
        removed.append(vm_id)
    return removed


__all__ = ["CGROUP_NAME", "CgroupLimits", "CgroupSupport", "CgroupUnavailable",
           "CgroupUsage", "VmCgroup", "create_vm_cgroup", "detect", "find_vm_cgroup",
           "sweep", "NO_LIMIT"]
