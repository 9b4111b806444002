"""Per-VM cgroups: mount parsing, v2 and v1 against a fake cgroupfs under tmp_path, and
real groups on this host's hierarchies (limits read back, real processes joining, the
pids and memory limits hit for real, removal).

The fake tree is faithful where the code depends on the kernel: ``mkdir`` in a
hierarchy makes the interface files of its controllers, ``rmdir`` takes them along and
refuses (EBUSY) a group with processes or children, as cgroupfs does. It cannot take
pids out of ``cgroup.procs`` when they die, so only the real tests see processes go.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from secvf.jail import cgroup
from secvf.jail.cgroup import (
    CGROUP_NAME,
    NO_LIMIT,
    CgroupLimits,
    CgroupSupport,
    CgroupUnavailable,
    VmCgroup,
    create_vm_cgroup,
    detect,
    find_vm_cgroup,
    sweep,
)

V1_UNLIMITED = "9223372036854771712"
V2_FILES = {
    "": {"cgroup.procs": "", "cgroup.subtree_control": "", "cgroup.controllers": ""},
    "memory": {"memory.max": "max", "memory.current": "0", "memory.peak": "0",
               "memory.swap.max": "max", "memory.oom.group": "0",
               "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n"},
    "pids": {"pids.max": "max", "pids.current": "0"},
    "cpu": {"cpu.max": "max 100000", "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n"},
}
V1_FILES = {
    "": {"cgroup.procs": "", "tasks": ""},
    "memory": {"memory.limit_in_bytes": V1_UNLIMITED, "memory.usage_in_bytes": "0",
               "memory.max_usage_in_bytes": "0", "memory.memsw.limit_in_bytes": V1_UNLIMITED,
               "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n"},
    "pids": {"pids.max": "max", "pids.current": "0"},
    "cpu": {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "-1", "cpu.shares": "1024"},
    "cpuacct": {"cpuacct.usage": "0"},
}
#: this development host's cgroup lines of /proc/self/mounts, as they are
HYBRID_MOUNTS = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/devices cgroup rw,relatime,devices 0 0
cgroup /sys/fs/cgroup/freezer cgroup rw,relatime,freezer 0 0
cgroup /sys/fs/cgroup/blkio cgroup rw,relatime,blkio 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
DEBIAN_MOUNTS = """\
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate,memory_recursiveprot 0 0
"""
V2_OFFERED = "cpuset cpu io memory hugetlb pids rdma misc"
WAIT_S = 60  # a bound on waiting for a child (a hang fails the test; nothing asserts a time)
LIMITS = CgroupLimits(memory_bytes=256 << 20, pids_max=64, cpu_quota_us=150_000)


def _vm_id() -> str:
    return str(uuid.uuid4())


class FakeCgroupFs:
    """Hierarchies under ``root`` whose mkdir/rmdir behave as cgroupfs does."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.hierarchies: dict[Path, tuple[int, tuple[str, ...]]] = {}
        self.refused: set[Path] = set()  # mkdir there fails with EACCES
        self.lines: list[str] = []
        self._mkdir, self._rmdir = os.mkdir, os.rmdir
        monkeypatch.setattr(os, "mkdir", self.mkdir)
        monkeypatch.setattr(os, "rmdir", self.rmdir)

    def mount(self, version: int, where: str, controllers: tuple[str, ...],
              offered: str = "") -> Path:
        path = self.root / where.lstrip("/")
        path.mkdir(parents=True)
        self.hierarchies[path] = (version, controllers)
        fstype, options = ("cgroup2", "rw,relatime") if version == 2 else \
            ("cgroup", "rw,relatime," + ",".join(controllers))
        self.lines.append(f"cgroup {where} {fstype} {options} 0 0")
        if version == 2:
            self._fill(path, {"cgroup.controllers": offered, "cgroup.subtree_control": "",
                              "cgroup.procs": ""})
        else:
            self._fill(path, {"cgroup.procs": "", "tasks": ""})
        (self.root / "proc/self").mkdir(parents=True, exist_ok=True)
        (self.root / "proc/self/mounts").write_text("\n".join(self.lines) + "\n")
        return path

    @staticmethod
    def _fill(path: Path, files: dict[str, str]) -> None:
        for name, text in files.items():
            (path / name).write_text(text)

    def _hierarchy(self, path: Path) -> tuple[int, tuple[str, ...]] | None:
        for mount, kind in self.hierarchies.items():
            if Path(path).is_relative_to(mount) and Path(path) != mount:
                return kind
        return None

    def mkdir(self, path: str | os.PathLike[str], mode: int = 0o777, **kw: int | None) -> None:
        kind = None if kw.get("dir_fd") is not None else self._hierarchy(Path(path))
        if kind is not None and Path(path) in self.refused:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        self._mkdir(path, mode, **kw)
        if kind is not None:
            table = V2_FILES if kind[0] == 2 else V1_FILES
            for controller in ("", *kind[1]):
                self._fill(Path(path), table[controller])

    def rmdir(self, path: str | os.PathLike[str], **kw: int | None) -> None:
        directory = Path(path)
        if kw.get("dir_fd") is not None or self._hierarchy(directory) is None:
            self._rmdir(path, **kw)
            return
        if any(p.is_dir() for p in directory.iterdir()) or \
                (directory / "cgroup.procs").read_text().split():
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        for file in directory.iterdir():
            file.unlink()
        self._rmdir(path)


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCgroupFs:
    return FakeCgroupFs(tmp_path, monkeypatch)


def _v2(fake: FakeCgroupFs, offered: str = V2_OFFERED) -> tuple[CgroupSupport, Path]:
    mount = fake.mount(2, "/sys/fs/cgroup", ("memory", "pids", "cpu"), offered)
    return detect(fake.root), mount


def _v1(fake: FakeCgroupFs, *, cpuacct: bool = True) -> CgroupSupport:
    fake.mount(1, "/sys/fs/cgroup/memory", ("memory",))
    fake.mount(1, "/sys/fs/cgroup/pids", ("pids",))
    fake.mount(1, "/sys/fs/cgroup/cpu", ("cpu",))
    if cpuacct:
        fake.mount(1, "/sys/fs/cgroup/cpuacct", ("cpuacct",))
    return detect(fake.root)


def _mounts(root: Path, text: str) -> None:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/mounts").write_text(text)


def _controllers(root: Path, where: str, offered: str) -> None:
    path = root / where.lstrip("/")
    path.mkdir(parents=True, exist_ok=True)
    (path / "cgroup.controllers").write_text(offered + "\n")


# ---- detection ---------------------------------------------------------------------------


def test_hybrid_host_uses_v1_hierarchies_and_ignores_a_hugetlb_only_cgroup2(tmp_path):
    _mounts(tmp_path, HYBRID_MOUNTS)
    _controllers(tmp_path, "/sys/fs/cgroup/unified", "hugetlb")
    support = detect(tmp_path)
    base = tmp_path / "sys/fs/cgroup"
    assert support == CgroupSupport(1, {"memory": base / "memory", "pids": base / "pids",
                                        "cpu": base / "cpu", "cpuacct": base / "cpuacct"})
    assert support.parents() == tuple(base / c / CGROUP_NAME
                                      for c in ("memory", "pids", "cpu", "cpuacct"))


def test_pure_v2_host_uses_the_v2_root_for_all_three(tmp_path):
    _mounts(tmp_path, DEBIAN_MOUNTS)
    _controllers(tmp_path, "/sys/fs/cgroup", V2_OFFERED)
    support = detect(tmp_path)
    assert support == CgroupSupport(2, dict.fromkeys(("memory", "pids", "cpu"),
                                                     tmp_path / "sys/fs/cgroup"))
    assert support.parents() == (tmp_path / "sys/fs/cgroup" / CGROUP_NAME,)


def test_v2_is_preferred_when_it_offers_everything(tmp_path):
    _mounts(tmp_path, HYBRID_MOUNTS)
    _controllers(tmp_path, "/sys/fs/cgroup/unified", V2_OFFERED)
    assert detect(tmp_path).version == 2


def test_co_mounted_cpu_and_cpuacct_share_one_directory(tmp_path):
    _mounts(tmp_path, "cgroup /cg/memory cgroup rw,memory 0 0\n"
                      "cgroup /cg/cpu,cpuacct cgroup rw,nosuid,cpu,cpuacct 0 0\n"
                      "cgroup /cg/pids cgroup rw,pids 0 0\n"
                      "cgroup /cg/cpuset cgroup rw,cpuset 0 0\n")
    support = detect(tmp_path)
    assert support.version == 1
    assert support.mounts["cpu"] == support.mounts["cpuacct"] == tmp_path / "cg/cpu,cpuacct"
    assert [p.parent.name for p in support.parents()] == ["memory", "pids", "cpu,cpuacct"]


def test_escaped_mount_points_are_decoded(tmp_path):
    _mounts(tmp_path, "cgroup2 /sys/fs/my\\040cgroups cgroup2 rw 0 0\n")
    _controllers(tmp_path, "/sys/fs/my cgroups", "memory pids cpu")
    assert detect(tmp_path).mounts["pids"] == tmp_path / "sys/fs/my cgroups"


def test_nothing_usable_says_what_was_found_and_what_to_do(tmp_path):
    _mounts(tmp_path, "cgroup /cg/pids cgroup rw,pids 0 0\n"
                      "cgroup /cg/cpuset cgroup rw,cpuset 0 0\n"
                      "cgroup2 /cg/unified cgroup2 rw 0 0\n")
    _controllers(tmp_path, "/cg/unified", "hugetlb")
    support = detect(tmp_path)
    assert support.version is None and support.mounts == {}
    assert support.reason.startswith("no cgroup v2 memory/pids/cpu controllers and no v1 "
                                     "memory, pids, cpu hierarchies are mounted")
    assert f"cgroup2 at {tmp_path / 'cg/unified'} offers hugetlb" in support.reason
    assert "v1 hierarchies of those: pids" in support.reason
    assert "systemd.unified_cgroup_hierarchy=1" in support.reason
    with pytest.raises(CgroupUnavailable, match="^no cgroup v2"):
        create_vm_cgroup(_vm_id(), LIMITS, support=support)
    assert find_vm_cgroup(_vm_id(), support=support) is None
    assert sweep([], support=support) == []


def test_unreadable_mounts_is_a_reason_not_an_exception(tmp_path):
    support = detect(tmp_path)
    assert support.version is None
    assert "proc/self/mounts" in support.reason and "No such file" in support.reason


@pytest.mark.parametrize("bad", ["", "../../etc", "vm-" + str(uuid.UUID(int=1)),
                                 str(uuid.UUID(int=1)) + "\n", str(uuid.UUID(int=1)) + "/..",
                                 str(uuid.UUID(int=1)).replace("-", ""), "0" * 36])
def test_an_id_that_is_not_a_uuid_is_refused_before_any_file_is_touched(fake, bad):
    support, mount = _v2(fake)
    for call in (lambda: create_vm_cgroup(bad, LIMITS, support=support),
                 lambda: find_vm_cgroup(bad, support=support)):
        with pytest.raises(ValueError, match="is not a VM UUID"):
            call()
    assert not (mount / CGROUP_NAME).exists()


def test_limits_are_checked_against_the_kernels_bounds():
    with pytest.raises(ValueError, match="cpu_period_us 500"):
        CgroupLimits(1 << 30, 10, 100_000, cpu_period_us=500)
    with pytest.raises(ValueError, match="cpu_quota_us 999"):
        CgroupLimits(1 << 30, 10, 999)
    assert CgroupLimits(1 << 30, 10, 0).cpu_quota_us == 0


# ---- v2 on the fake tree -----------------------------------------------------------------


def test_v2_create_enables_only_missing_controllers_and_writes_the_limits(fake):
    support, mount = _v2(fake)
    (mount / "cgroup.subtree_control").write_text("memory io\n")
    vm_id = _vm_id()
    group = create_vm_cgroup(vm_id, LIMITS, support=support)
    vm_dir = mount / CGROUP_NAME / f"vm-{vm_id}"
    assert group == VmCgroup(vm_id, 2, (vm_dir,))
    assert group.procs_files == (vm_dir / "cgroup.procs",)
    assert (mount / "cgroup.subtree_control").read_text() == "+pids +cpu"
    assert (mount / CGROUP_NAME / "cgroup.subtree_control").read_text() == \
        "+memory +pids +cpu"
    written = {n: (vm_dir / n).read_text() for n in
               ("memory.max", "pids.max", "cpu.max", "memory.swap.max", "memory.oom.group")}
    assert written == {"memory.max": str(256 << 20), "pids.max": "64",
                       "cpu.max": "150000 100000", "memory.swap.max": "0",
                       "memory.oom.group": "1"}
    assert group.limits() == LIMITS


def test_v2_controllers_already_on_are_left_as_they_are(fake):
    support, mount = _v2(fake)
    (mount / "cgroup.subtree_control").write_text("cpu memory pids\n")
    (mount / CGROUP_NAME).mkdir()
    (mount / CGROUP_NAME / "cgroup.subtree_control").write_text("cpu io memory pids\n")
    create_vm_cgroup(_vm_id(), LIMITS, support=support)
    assert (mount / "cgroup.subtree_control").read_text() == "cpu memory pids\n"
    assert (mount / CGROUP_NAME / "cgroup.subtree_control").read_text() == \
        "cpu io memory pids\n"


def test_v2_no_limit_is_max_and_reads_back_as_no_limit(fake):
    support, mount = _v2(fake)
    group = create_vm_cgroup(_vm_id(), CgroupLimits(0, -5, 0, 50_000), support=support)
    assert [(group.dirs[0] / n).read_text() for n in ("memory.max", "pids.max", "cpu.max")] \
        == ["max", "max", "max 50000"]
    assert group.limits() == CgroupLimits(NO_LIMIT, NO_LIMIT, NO_LIMIT, 50_000)


def test_v2_usage_comes_from_current_peak_cpu_stat_and_events(fake):
    support, _ = _v2(fake)
    group = create_vm_cgroup(_vm_id(), LIMITS, support=support)
    d = group.dirs[0]
    d.joinpath("memory.current").write_text("1048576\n")
    d.joinpath("memory.peak").write_text("4194304\n")
    d.joinpath("pids.current").write_text("7\n")
    d.joinpath("cpu.stat").write_text("usage_usec 123456\nuser_usec 100000\n"
                                      "system_usec 23456\nnr_periods 3\n")
    d.joinpath("memory.events").write_text("low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\n"
                                           "oom_group_kill 1\n")
    usage = group.usage()
    assert (usage.memory_bytes, usage.memory_peak_bytes, usage.pids, usage.cpu_usage_us,
            usage.oom_kills) == (1 << 20, 4 << 20, 7, 123456, 2)
    d.joinpath("memory.peak").unlink()  # kernels before 5.19
    assert group.usage().memory_peak_bytes is None


def test_v2_kill_writes_cgroup_kill_when_the_kernel_has_it(fake):
    support, _ = _v2(fake)
    group = create_vm_cgroup(_vm_id(), LIMITS, support=support)
    group.kill()  # without cgroup.kill (kernels before 5.14): nothing to write
    assert not (group.dirs[0] / "cgroup.kill").exists()
    (group.dirs[0] / "cgroup.kill").write_text("")
    group.kill()
    assert (group.dirs[0] / "cgroup.kill").read_text() == "1"


def test_v2_busy_root_is_unavailable_with_the_reason(fake, monkeypatch):
    support, mount = _v2(fake)
    real_write = cgroup._write

    def busy(path: Path, value: str) -> None:
        if path == mount / "cgroup.subtree_control":
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        real_write(path, value)

    monkeypatch.setattr(cgroup, "_write", busy)
    with pytest.raises(CgroupUnavailable, match=r"cannot enable memory pids cpu in .*: "
                                                r"Device or resource busy \(the group has"):
        create_vm_cgroup(_vm_id(), LIMITS, support=support)


# ---- v1 on the fake tree -----------------------------------------------------------------


def test_v1_writes_each_limit_in_its_own_hierarchy_and_leaves_oom_and_swap_alone(fake):
    support = _v1(fake)
    vm_id = _vm_id()
    group = create_vm_cgroup(vm_id, LIMITS, support=support)
    base = fake.root / "sys/fs/cgroup"
    dirs = {c: base / c / CGROUP_NAME / f"vm-{vm_id}" for c in ("memory", "pids", "cpu",
                                                                  "cpuacct")}
    assert group.dirs == tuple(dirs.values())
    assert group.procs_files == tuple(d / "cgroup.procs" for d in dirs.values())
    assert dirs["memory"].joinpath("memory.limit_in_bytes").read_text() == str(256 << 20)
    assert dirs["pids"].joinpath("pids.max").read_text() == "64"
    assert dirs["cpu"].joinpath("cpu.cfs_quota_us").read_text() == "150000"
    assert dirs["cpu"].joinpath("cpu.cfs_period_us").read_text() == "100000"
    assert dirs["memory"].joinpath("memory.oom_control").read_text() == \
        V1_FILES["memory"]["memory.oom_control"]
    assert dirs["memory"].joinpath("memory.memsw.limit_in_bytes").read_text() == V1_UNLIMITED
    # nothing was written where it does not belong
    assert sorted(p.name for p in dirs["pids"].iterdir()) == \
        sorted([*V1_FILES[""], *V1_FILES["pids"]])
    assert group.limits() == LIMITS


def test_v1_no_limit_is_minus_one_and_reads_back_as_no_limit(fake):
    support = _v1(fake)
    group = create_vm_cgroup(_vm_id(), CgroupLimits(0, 0, 0), support=support)
    memory, pids, cpu = group.dirs[:3]
    assert memory.joinpath("memory.limit_in_bytes").read_text() == "-1"
    assert pids.joinpath("pids.max").read_text() == "max"
    assert cpu.joinpath("cpu.cfs_quota_us").read_text() == "-1"
    memory.joinpath("memory.limit_in_bytes").write_text(V1_UNLIMITED + "\n")  # as v1 shows it
    assert group.limits() == CgroupLimits(NO_LIMIT, NO_LIMIT, NO_LIMIT, 100_000)


def test_v1_usage_reads_cpuacct_in_microseconds_and_oom_kill_when_present(fake):
    support = _v1(fake)
    group = create_vm_cgroup(_vm_id(), LIMITS, support=support)
    memory, pids, _, acct = group.dirs
    memory.joinpath("memory.usage_in_bytes").write_text("2097152\n")
    memory.joinpath("memory.max_usage_in_bytes").write_text("3145728\n")
    memory.joinpath("memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n"
                                                     "oom_kill 3\n")
    pids.joinpath("pids.current").write_text("4\n")
    acct.joinpath("cpuacct.usage").write_text("987654321\n")
    usage = group.usage()
    assert (usage.memory_bytes, usage.memory_peak_bytes, usage.pids, usage.cpu_usage_us,
            usage.oom_kills) == (2 << 20, 3 << 20, 4, 987654, 3)
    memory.joinpath("memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n")
    assert group.usage().oom_kills == 0  # kernels before 4.13 have no oom_kill line


def test_v1_without_cpuacct_counts_no_cpu_time(fake):
    support = _v1(fake, cpuacct=False)
    group = create_vm_cgroup(_vm_id(), LIMITS, support=support)
    assert len(group.dirs) == 3
    assert group.usage().cpu_usage_us == 0


def test_a_refused_mkdir_is_unavailable_with_what_to_do(fake):
    support = _v1(fake)
    fake.refused.add(fake.root / "sys/fs/cgroup/memory" / CGROUP_NAME)
    with pytest.raises(CgroupUnavailable) as caught:
        create_vm_cgroup(_vm_id(), LIMITS, support=support)
    assert str(caught.value) == (f"cannot create {fake.root}/sys/fs/cgroup/memory/secvf: "
                                 "Permission denied (run as root or delegate a cgroup)")
    assert isinstance(caught.value.__cause__, PermissionError)


def test_limits_that_cannot_be_written_leave_no_group_behind(fake):
    support = _v1(fake)
    vm_id = _vm_id()
    with pytest.raises(CgroupUnavailable, match=f"cannot set the limits of vm-{vm_id}"):
        create_vm_cgroup(vm_id, LIMITS, support=CgroupSupport(1, {
            **support.mounts, "pids": support.mounts["cpuacct"]}))  # no pids.max there
    assert find_vm_cgroup(vm_id, support=support) is None


def test_a_dead_runs_group_is_reused_with_the_new_limits(fake):
    support = _v1(fake)
    vm_id = _vm_id()
    first = create_vm_cgroup(vm_id, LIMITS, support=support)
    second = create_vm_cgroup(vm_id, CgroupLimits(1 << 30, 10, 0), support=support)
    assert second == first
    assert second.limits() == CgroupLimits(1 << 30, 10, NO_LIMIT)


def test_find_returns_the_directories_that_exist(fake):
    support = _v1(fake)
    vm_id = _vm_id()
    assert find_vm_cgroup(vm_id, support=support) is None
    group = create_vm_cgroup(vm_id, LIMITS, support=support)
    assert find_vm_cgroup(vm_id, support=support) == group
    os.rmdir(group.dirs[3])
    assert find_vm_cgroup(vm_id, support=support) == VmCgroup(vm_id, 1, group.dirs[:3])


def test_remove_takes_every_directory_and_missing_ones_are_fine(fake):
    support = _v1(fake)
    group = create_vm_cgroup(_vm_id(), LIMITS, support=support)
    os.rmdir(group.dirs[1])
    group.remove()
    assert not any(d.exists() for d in group.dirs)
    group.remove()  # again: nothing left, nothing raised
    assert all(p.is_dir() for p in support.parents())


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A child of this test (outside any test group), for the fake's procs files."""
    child = subprocess.Popen(["sleep", "600"])
    yield child
    child.kill()
    child.wait()


def test_kill_is_bounded_and_remove_says_which_directory_stays(fake, sleeper):
    support = _v1(fake)
    group = create_vm_cgroup(_vm_id(), LIMITS, support=support)
    group.dirs[0].joinpath("cgroup.procs").write_text(f"{sleeper.pid}\n")
    assert group.pids() == [sleeper.pid]
    with pytest.raises(OSError, match=rf"still holds \[{sleeper.pid}\] after SIGKILL") as busy:
        group.kill(timeout_s=0.1)  # the fake never empties
    assert busy.value.errno == errno.EBUSY
    assert sleeper.wait(timeout=WAIT_S) == -signal.SIGKILL
    with pytest.raises(OSError, match=f"cannot remove the cgroup of VM {group.vm_id}: "
                                      f"{group.dirs[0]}: Device or resource busy") as stays:
        group.remove(timeout_s=0.1)
    assert stays.value.errno == errno.EBUSY
    assert [d.exists() for d in group.dirs] == [True, False, False, False]


def test_sweep_removes_only_empty_groups_of_vms_not_alive(fake, sleeper):
    support = _v1(fake)
    live, dead, busy = _vm_id(), _vm_id(), _vm_id()
    for vm_id in (live, dead, busy):
        create_vm_cgroup(vm_id, LIMITS, support=support)
    busy_group = find_vm_cgroup(busy, support=support)
    assert busy_group is not None
    busy_group.dirs[1].joinpath("cgroup.procs").write_text(f"{sleeper.pid}\n")
    memory_parent = support.parents()[0]
    os.mkdir(memory_parent / "vm-not-a-uuid")
    os.mkdir(memory_parent / "other")
    assert sweep([live], support=support) == [dead]
    assert find_vm_cgroup(dead, support=support) is None
    assert find_vm_cgroup(live, support=support) is not None
    assert find_vm_cgroup(busy, support=support) == busy_group
    assert sleeper.poll() is None  # sweeping never kills
    assert (memory_parent / "vm-not-a-uuid").is_dir() and (memory_parent / "other").is_dir()
    assert sweep([live], support=support) == []


# ---- real groups on this host ------------------------------------------------------------

HOST = detect()
needs_cgroups = pytest.mark.skipif(
    HOST.version is None or os.geteuid() != 0,
    reason=f"no usable cgroups: {HOST.reason}" if HOST.version is None
    else "creating cgroups needs root")

#: a child's first lines: join the groups whose procs files are argv[1] (':'-separated)
JOIN = """\
import json, os, sys
for procs in sys.argv[1].split(":"):
    with open(procs, "w") as f:
        f.write(str(os.getpid()))
"""
FORKS = JOIN + """\
r, w = os.pipe()
kids, failed = [], 0
for _ in range(20):
    try:
        pid = os.fork()
    except BlockingIOError:
        failed += 1
        continue
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    kids.append(pid)
os.close(w)
for pid in kids:
    os.waitpid(pid, 0)
print(json.dumps({"forked": len(kids), "failed": failed}))
"""
HOG = JOIN + """\
chunks = []
for _ in range(int(sys.argv[2]) >> 20):
    chunks.append(b"\\x01" * (1 << 20))
print("survived", flush=True)
"""


class RealGroups:
    """Groups and joined children made by one test; all removed at teardown."""

    def __init__(self) -> None:
        self.groups: list[VmCgroup] = []
        self.children: list[subprocess.Popen[str]] = []

    def make(self, limits: CgroupLimits = LIMITS, vm_id: str | None = None) -> VmCgroup:
        group = create_vm_cgroup(vm_id or _vm_id(), limits, support=HOST)
        self.groups.append(group)
        return group

    def run(self, group: VmCgroup, code: str, *args: str) -> subprocess.Popen[str]:
        joined = ":".join(map(str, group.procs_files))
        child = subprocess.Popen([sys.executable, "-I", "-c", code, joined, *args],
                                 stdout=subprocess.PIPE, text=True)
        self.children.append(child)
        return child

    def sleeper(self, group: VmCgroup) -> subprocess.Popen[str]:
        """A ``sleep`` joined to ``group`` (it has joined when this returns)."""
        child = self.run(group, JOIN + "print('joined', flush=True)\n"
                                       "os.execvp('sleep', ['sleep', '600'])\n")
        assert child.stdout is not None and child.stdout.readline() == "joined\n"
        return child

    def close(self) -> None:
        """Reap the children, then remove every group (each tried; the first error raised)."""
        try:
            for child in self.children:
                if child.poll() is None:
                    child.kill()
                child.wait(timeout=WAIT_S)
                if child.stdout is not None:
                    child.stdout.close()
        finally:
            errors = []
            for group in self.groups:
                try:
                    group.remove()
                except OSError as exc:
                    errors.append(exc)
            if errors:
                raise errors[0]


@pytest.fixture
def real() -> Iterator[RealGroups]:
    groups = RealGroups()
    try:
        yield groups
    finally:
        groups.close()
    assert not any(d.exists() for g in groups.groups for d in g.dirs)


@needs_cgroups
def test_real_group_reads_back_its_limits_and_is_found_from_its_id(real):
    group = real.make()
    assert group.version == HOST.version
    assert group.dirs == tuple(p / f"vm-{group.vm_id}" for p in HOST.parents())
    assert all(f.is_file() for f in group.procs_files)
    assert group.limits() == LIMITS
    assert find_vm_cgroup(group.vm_id, support=HOST) == group
    usage = group.usage()
    assert (usage.pids, usage.oom_kills) == (0, 0)


@needs_cgroups
def test_real_joined_process_is_seen_counted_and_killed_by_remove(real):
    group = real.make()
    child = real.sleeper(group)
    assert group.pids() == [child.pid]
    assert group.usage().pids == 1
    assert group.usage().memory_bytes > 0
    group.remove()
    assert child.wait(timeout=WAIT_S) == -signal.SIGKILL
    assert not any(d.exists() for d in group.dirs)
    assert find_vm_cgroup(group.vm_id, support=HOST) is None


@needs_cgroups
def test_real_group_of_a_dead_run_is_emptied_and_reused(real):
    group = real.make()
    child = real.sleeper(group)
    again = real.make(CgroupLimits(128 << 20, 32, 0), vm_id=group.vm_id)
    assert again == group
    assert child.wait(timeout=WAIT_S) == -signal.SIGKILL
    assert again.pids() == []
    assert again.limits() == CgroupLimits(128 << 20, 32, NO_LIMIT)


@needs_cgroups
def test_real_pids_limit_refuses_forks_past_it(real):
    pids_max = 5
    group = real.make(CgroupLimits(256 << 20, pids_max, 0))
    out, _ = real.run(group, FORKS).communicate(timeout=WAIT_S)
    result = json.loads(out)
    assert result["failed"] >= 1
    assert result["forked"] + result["failed"] == 20
    assert result["forked"] + 1 <= pids_max  # the forking process counts too


@needs_cgroups
def test_real_memory_limit_kills_a_process_that_goes_past_it(real):
    limit = 64 << 20
    group = real.make(CgroupLimits(limit, 64, 0))
    hog = real.run(group, HOG, str(3 * limit))
    out, _ = hog.communicate(timeout=WAIT_S)
    assert (hog.returncode, out) == (-signal.SIGKILL, "")
    usage = group.usage()
    assert usage.oom_kills >= 1
    assert usage.memory_peak_bytes is None or usage.memory_peak_bytes <= limit


@needs_cgroups
def test_real_cpu_time_is_counted_where_the_host_accounts_it(real):
    group = real.make()
    burner = real.run(group, JOIN + "print(sum(range(3_000_000)))\n")
    out, _ = burner.communicate(timeout=WAIT_S)
    assert burner.returncode == 0 and out.strip() == str(sum(range(3_000_000)))
    accounted = HOST.version == 2 or "cpuacct" in HOST.mounts
    assert (group.usage().cpu_usage_us > 0) == accounted
