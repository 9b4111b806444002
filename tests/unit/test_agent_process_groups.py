"""Finding and ending what a command left in its process group or session
(:mod:`secvf.guest.agent.process_groups`): with a :class:`ForkMark` only the pids given
out after the leader's are read, while that provably covers its descendants; otherwise
every process is. Logic against a fake ``/proc``; then real processes on this host."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secvf.guest.agent import process_groups
from secvf.guest.agent.process_groups import (
    RESERVED_PIDS,
    ForkMark,
    _in_window,
    group_members,
    terminate_group,
)
from tests.helpers import alive
from tests.unit.running_sandbox import wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

STAT_PATH = re.compile(r"/proc/(\d+)/stat")
#: Generous bound for terminate_group to return (a sweep that never ends fails, not hangs).
TERMINATE_WAIT_S = 60.0
#: Most scans of the fake /proc a test's sweep may make.
MAX_SCANS = 5000


def terminate_within_bound(*args: Any, **kwargs: Any) -> None:
    """:func:`terminate_group`, on a daemon thread the test waits for at most
    TERMINATE_WAIT_S; its exception, if any, is raised here."""
    errors: list[BaseException] = []

    def sweep() -> None:
        try:
            terminate_group(*args, **kwargs)
        except BaseException as error:  # handed to the test thread
            errors.append(error)

    thread = threading.Thread(target=sweep, daemon=True)
    thread.start()
    thread.join(TERMINATE_WAIT_S)
    assert not thread.is_alive(), "terminate_group did not return: the group never emptied"
    if errors:
        raise errors[0]


class FakeProc:
    """A scripted ``/proc`` as :mod:`process_groups` sees it (its ``_read`` and the
    ``os.listdir`` it calls); records every path read and every signal sent."""

    def __init__(self, forks: int = 1000, tasks: int = 120, pid_max: int = 32768,
                 last: int = 5000) -> None:
        self.files: dict[str, bytes] = {}
        self.processes: dict[int, tuple[bytes, int, int]] = {}  # pid: state, pgrp, session
        self.extra_entries = ["self", "thread-self", "sys", "meminfo", "1a"]
        self.reads: list[str] = []
        self.scans = 0
        self.signals: list[tuple[int, int]] = []
        #: What a signal does to a process: pid -> callback(sig); default: it ends.
        self.on_signal: dict[int, Callable[[int], None]] = {}
        self.last = last
        self.set_counts(forks, tasks)
        self.files["/proc/sys/kernel/pid_max"] = b"%d\n" % pid_max

    def set_last(self, last: int) -> None:
        """The last pid given out (``/proc/loadavg``'s last field)."""
        self.last = last
        running = self.files["/proc/loadavg"].split()[3]
        self.files["/proc/loadavg"] = b"0.10 0.05 0.01 %s %d\n" % (running, last)

    def set_counts(self, forks: int, tasks: int) -> None:
        self.files["/proc/stat"] = (
            b"cpu  1 2 3 4 5 6 7 0 0 0\ncpu0 1 2 3 4 5 6 7 0 0 0\nintr 12 0 0 3\n"
            b"ctxt 4567\nbtime 1700000000\nprocesses %d\nprocs_running 1\n"
            b"procs_blocked 0\nsoftirq 1 2 3\n" % forks
        )
        self.files["/proc/loadavg"] = b"0.10 0.05 0.01 2/%d %d\n" % (tasks, self.last)

    def add(self, pid: int, pgrp: int, session: int, state: bytes = b"S",
            comm: bytes = b"sleep") -> None:
        self.processes[pid] = (state, pgrp, session)
        self.files[f"/proc/{pid}/stat"] = (
            b"%d (%s) %s 1 %d %d 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 1234 0 0\n"
            % (pid, comm, state, pgrp, session)
        )

    def _read(self, path: str) -> bytes | None:
        self.reads.append(path)
        return self.files.get(path)

    def listdir(self, path: str) -> list[str]:
        assert path == "/proc"
        self.scans += 1
        # A sweep that never ends fails here (rather than hangs): a grace of 0.05 s with
        # polls of 0.001 s scans some 50 times.
        assert self.scans < MAX_SCANS, "terminate_group did not return: the group never emptied"
        return [*self.extra_entries[:2], *(str(pid) for pid in self.processes),
                *self.extra_entries[2:]]

    def kill(self, pid: int, sig: int) -> None:
        self.signals.append((pid, sig))
        if pid not in self.processes:
            raise ProcessLookupError(pid)
        self.on_signal.get(pid, self.end)(sig)

    def end(self, sig: int) -> None:
        """Default reaction to a signal: whoever got it (the last signalled) is gone."""
        pid = self.signals[-1][0]
        del self.processes[pid]
        del self.files[f"/proc/{pid}/stat"]

    def stat_reads(self) -> list[int]:
        return [int(m[1]) for path in self.reads if (m := STAT_PATH.fullmatch(path))]


class _FakeOs:
    """``os`` for the module under test: the real one but for ``listdir`` and ``kill``."""

    def __init__(self, proc: FakeProc) -> None:
        self._proc = proc

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def listdir(self, path: str) -> list[str]:
        return self._proc.listdir(path)

    def kill(self, pid: int, sig: int) -> None:
        self._proc.kill(pid, sig)


@pytest.fixture
def proc(monkeypatch) -> FakeProc:
    fake = FakeProc()
    monkeypatch.setattr(process_groups, "_read", fake._read)
    monkeypatch.setattr(process_groups, "os", _FakeOs(fake))
    monkeypatch.setattr(process_groups, "GROUP_POLL_S", 0.001)
    monkeypatch.setattr(process_groups, "_pid_max", None)  # read from this fake
    monkeypatch.setattr(process_groups, "_latest", None)  # no sweep has read yet
    return fake


# -- ForkMark ---------------------------------------------------------------------------


def test_a_mark_is_the_fork_count_of_proc_stat_and_the_task_count_of_loadavg(proc):
    proc.set_counts(forks=123456, tasks=321)
    assert ForkMark.now() == ForkMark(forks=123456, tasks=321)


@pytest.mark.parametrize("path, content", [
    ("/proc/stat", None),
    ("/proc/stat", b"cpu  1 2 3\nctxt 4\nprocs_running 1\n"),  # no "processes" line
    ("/proc/stat", b"cpu  1 2 3\nprocesses many\nprocs_running 1\n"),
    ("/proc/stat", b"cpu  1 2 3\nprocesses 77"),  # cut short: no end of line
    ("/proc/stat", b"processes 77\n"),  # not after a line: not the field
    ("/proc/loadavg", None),
    ("/proc/loadavg", b"0.10 0.05 0.01\n"),
    ("/proc/loadavg", b"0.10 0.05 0.01 2 4999\n"),
    ("/proc/loadavg", b"0.10 0.05 0.01 2/lots 4999\n"),
])
def test_no_mark_where_proc_does_not_say(proc, path, content):
    if content is None:
        del proc.files[path]
    else:
        proc.files[path] = content
    assert ForkMark.now() is None


def test_the_window_is_the_pids_given_out_after_the_leader(proc):
    mark = ForkMark.now()
    proc.set_counts(forks=1010, tasks=130)
    proc.set_last(4010)
    assert mark.pid_window(4000) == (4000, 4010)


def test_the_window_ends_where_the_allocator_could_have_gone_round(proc):
    pid_max, tasks = 32768, 120
    limit = pid_max - RESERVED_PIDS
    mark = ForkMark(forks=1000, tasks=tasks)
    created = (limit - tasks) // 2  # 2 * created + tasks == limit - (0 or 1)
    below = created if 2 * created + tasks < limit else created - 1
    proc.set_counts(forks=1000 + below, tasks=tasks)
    assert mark.pid_window(4000) == (4000, 5000)
    proc.set_counts(forks=1000 + below + 1, tasks=tasks)  # now 2*created + tasks >= limit
    assert 2 * (below + 1) + tasks >= limit
    assert mark.pid_window(4000) is None


def test_the_tasks_at_the_mark_count_not_those_now(proc):
    """Pids in use at the mark may be skipped over: those count, not today's."""
    limit = 32768 - RESERVED_PIDS
    proc.set_counts(forks=1010, tasks=limit)  # many tasks now, few at the mark: a window
    assert ForkMark(forks=1000, tasks=100).pid_window(4000) == (4000, 5000)
    assert ForkMark(forks=1000, tasks=limit - 20).pid_window(4000) is None


def test_no_window_when_fewer_forks_than_at_the_mark(proc):
    """The count went back (another boot, another /proc): nothing can be assumed."""
    assert ForkMark(forks=1001, tasks=120).pid_window(4000) is None
    assert ForkMark(forks=1000, tasks=120).pid_window(4000) == (4000, 5000)


@pytest.mark.parametrize("path, content", [
    ("/proc/sys/kernel/pid_max", None),
    ("/proc/sys/kernel/pid_max", b"lots\n"),
    ("/proc/loadavg", b"0.10 0.05 0.01 2/120\n"),  # no last pid
    ("/proc/loadavg", b"0.10 0.05 0.01 2/120 12x\n"),
    ("/proc/stat", None),
    ("/proc/stat", b"cpu  1\n"),
    ("/proc/loadavg", None),
    ("/proc/loadavg", b"garbage\n"),
])
def test_no_window_when_a_proc_file_is_unreadable_or_garbled(proc, path, content):
    mark = ForkMark.now()
    if content is None:
        del proc.files[path]
    else:
        proc.files[path] = content
    assert mark.pid_window(4000) is None


@pytest.mark.parametrize("pid, window, inside", [
    (123, None, True),
    (1, None, True),
    (4000, (4000, 4010), False),  # the leader itself is read apart from the window
    (4001, (4000, 4010), True),
    (4010, (4000, 4010), True),
    (4011, (4000, 4010), False),
    (3999, (4000, 4010), False),
    (1, (4000, 4010), False),
    (4000, (4000, 4000), False),  # nothing given out since the leader
    (4001, (4000, 4000), False),
    (32000, (32000, 400), False),  # wrapped after the leader
    (32001, (32000, 400), True),
    (32767, (32000, 400), True),
    (300, (32000, 400), True),
    (400, (32000, 400), True),
    (401, (32000, 400), False),
    (31999, (32000, 400), False),
    (5000, (32000, 400), False),
])
def test_in_window(pid, window, inside):
    assert _in_window(pid, window) is inside


# -- group_members against a fake /proc --------------------------------------------------


def populate(proc: FakeProc, pids_and_groups: dict[int, tuple[int, int]],
             zombies: tuple[int, ...] = ()) -> None:
    for pid, (pgrp, session) in pids_and_groups.items():
        proc.add(pid, pgrp, session, state=b"Z" if pid in zombies else b"S")


def test_with_a_window_only_the_leader_and_the_pids_after_it_are_read(proc):
    leader = 4000
    proc.set_last(4010)
    populate(proc, {
        1: (1, 1), 2: (0, 0), 300: (300, 300),
        3999: (leader, leader),  # impossible, but shows pids before the leader are not read
        leader: (leader, leader),
        4003: (leader, leader),  # in the leader's group
        4005: (leader, leader),  # a zombie in it: excluded
        4007: (4007, 4007),  # another group and session
        4009: (4009, leader),  # its own group, the leader's session: included
        4011: (leader, leader),  # after the last pid given out: not read
        20000: (leader, leader),
    }, zombies=(4005,))
    mark = ForkMark(forks=990, tasks=120)
    assert sorted(group_members(leader, mark)) == [leader, 4003, 4009]
    assert sorted(proc.stat_reads()) == [leader, 4003, 4005, 4007, 4009]


def test_a_few_pids_in_the_window_are_tried_one_by_one_without_listing_proc(proc):
    leader = 4000
    proc.set_last(leader + process_groups.PROBE_MAX)
    populate(proc, {1: (1, 1), leader: (leader, leader), 4002: (leader, leader),
                    4005: (4005, 4005), 4020: (leader, leader)}, zombies=(leader,))
    assert group_members(leader, ForkMark(forks=990, tasks=120)) == [4002]
    assert proc.scans == 0
    assert proc.stat_reads() == list(range(leader, leader + process_groups.PROBE_MAX + 1))


def test_pid_max_is_read_once(proc):
    mark = ForkMark(forks=990, tasks=120)
    assert mark.pid_window(4000) == mark.pid_window(4000) == (4000, 5000)
    assert proc.reads.count("/proc/sys/kernel/pid_max") == 1


def test_with_a_wrapped_window_the_pids_after_the_leader_and_from_the_start_are_read(proc):
    leader = 32000
    proc.set_last(350)
    populate(proc, {
        1: (1, 1), 299: (299, 299), 310: (leader, leader), 350: (350, leader),
        351: (leader, leader), 5000: (leader, leader), 31999: (leader, leader),
        leader: (leader, leader), 32100: (leader, leader), 32767: (32767, 32767),
    })
    mark = ForkMark(forks=500, tasks=120)
    assert sorted(group_members(leader, mark)) == [310, 350, leader, 32100]
    assert sorted(proc.stat_reads()) == [1, 299, 310, 350, leader, 32100, 32767]


def test_a_zombie_leader_is_not_a_member_but_what_it_left_is(proc):
    leader = 4000
    proc.set_last(4002)
    populate(proc, {leader: (leader, leader), 4001: (leader, leader),
                            4002: (4002, leader)}, zombies=(leader,))
    assert sorted(group_members(leader, ForkMark(forks=999, tasks=50))) == [4001, 4002]


def test_a_process_gone_before_its_stat_is_read_is_skipped(proc):
    leader = 4000
    proc.set_last(4002)
    populate(proc, {leader: (leader, leader), 4001: (leader, leader),
                            4002: (leader, leader)})
    del proc.files["/proc/4001/stat"]  # listed, then gone
    assert sorted(group_members(leader, ForkMark(forks=999, tasks=50))) == [leader, 4002]


FORK_MARK = ForkMark(forks=990, tasks=120)  # a window, were the files all there
FALLBACKS: dict[str, Callable[[FakeProc], ForkMark | None]] = {
    "no mark": lambda proc: None,
    "enough forks to go round": lambda proc: ForkMark(forks=1000 - 16234, tasks=10),
    "tasks at the mark alone go round": lambda proc: ForkMark(forks=1000, tasks=32768),
    "fewer forks than at the mark": lambda proc: ForkMark(forks=1001, tasks=120),
    "proc/stat unreadable": lambda proc: (proc.files.pop("/proc/stat"), FORK_MARK)[1],
    "proc/stat garbled": lambda proc: (proc.files.update({"/proc/stat": b"processes x\n"}),
                                       FORK_MARK)[1],
    "loadavg unreadable": lambda proc: (proc.files.pop("/proc/loadavg"), FORK_MARK)[1],
    "loadavg garbled": lambda proc: (proc.files.update({"/proc/loadavg": b"1 2 3 4 5\n"}),
                                     FORK_MARK)[1],
    "pid_max unreadable": lambda proc: (proc.files.pop("/proc/sys/kernel/pid_max"),
                                        FORK_MARK)[1],
    "last pid garbled": lambda proc: (
        proc.files.update({"/proc/loadavg": b"0.10 0.05 0.01 2/120 12x\n"}), FORK_MARK)[1],
}


@pytest.mark.parametrize("reason", list(FALLBACKS))
def test_without_a_provable_window_every_process_is_read(proc, reason):
    leader = 4000
    proc.set_last(4010)
    everyone = {1: (1, 1), 100: (leader, leader), 3999: (3999, 3999), leader: (leader, leader),
                4003: (leader, leader), 4011: (4011, leader), 20000: (leader, leader),
                20001: (20001, 20001)}
    populate(proc, everyone)
    mark = FALLBACKS[reason](proc)
    # Members anywhere are found (pids before the leader stand for pids after a wrap).
    assert sorted(group_members(leader, mark)) == [100, leader, 4003, 4011, 20000]
    assert sorted(proc.stat_reads()) == sorted(everyone)


def test_the_fork_mark_fixture_gives_a_window(proc):
    """The fallbacks above fail for their reason alone: the same mark, all files there,
    gives a window."""
    proc.set_last(4010)
    assert FORK_MARK.pid_window(4000) == (4000, 4010)


# -- terminate_group against a fake /proc ------------------------------------------------


def test_terminate_group_reads_only_the_window_and_kills_what_survives_sigterm(proc):
    leader = 4000
    proc.set_last(4010)
    populate(proc, {1: (1, 1), 3000: (3000, 3000), leader: (leader, leader),
                            4002: (leader, leader), 4004: (4004, leader),
                            4006: (4006, 4006)}, zombies=(leader,))

    def ignores_sigterm(sig: int) -> None:
        if sig == signal.SIGKILL:
            proc.end(sig)

    proc.on_signal[4004] = ignores_sigterm
    terminate_group(leader, ForkMark(forks=990, tasks=120), grace_s=0.05)
    assert {pid for pid, _ in proc.signals} == {4002, 4004}
    assert proc.signals[0][1] == signal.SIGTERM
    assert [sig for pid, sig in proc.signals if pid == 4002] == [signal.SIGTERM]
    to_4004 = [sig for pid, sig in proc.signals if pid == 4004]
    assert to_4004[0] == signal.SIGTERM and to_4004[-1] == signal.SIGKILL
    assert set(to_4004) == {signal.SIGTERM, signal.SIGKILL}
    assert set(proc.stat_reads()) <= {leader, 4002, 4004, 4006}
    assert 4006 in proc.processes and 3000 in proc.processes  # not in the group: untouched


def test_terminate_group_without_a_mark_reads_every_process(proc):
    leader = 4000
    populate(proc, {1: (1, 1), 100: (leader, leader), leader: (leader, leader)},
             zombies=(leader,))
    terminate_group(leader, grace_s=0.05)
    assert proc.signals == [(100, signal.SIGTERM)]
    assert set(proc.stat_reads()) == {1, 100, leader}


# -- real processes on this host ---------------------------------------------------------


@pytest.fixture
def session() -> Iterator[tuple[subprocess.Popen[bytes], ForkMark]]:
    """``sh`` leading a new session with two ``sleep`` children, and the mark taken just
    before it started."""
    mark = ForkMark.now()
    assert mark is not None  # this host's /proc says
    leader = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"],
                              start_new_session=True)
    try:
        yield leader, mark
    finally:
        try:
            os.killpg(leader.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        leader.wait()


def comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return None


def sleeps_started(leader: int, mark: ForkMark | None) -> list[int] | None:
    """The members once both sleeps run (have exec'd ``sleep``), else None."""
    members = group_members(leader, mark)
    others = [pid for pid in members if pid != leader]
    if len(others) == 2 and all(comm(pid) == "sleep" for pid in others):
        return members
    return None


def test_group_members_with_a_mark_finds_the_leader_and_both_sleeps(session):
    leader, mark = session
    members = wait_for(lambda: sleeps_started(leader.pid, mark))
    assert leader.pid in members and len(members) == 3
    assert sorted(group_members(leader.pid)) == sorted(members)  # what a full scan finds


def test_terminate_group_with_a_mark_ends_the_leader_and_both_sleeps(session):
    leader, mark = session
    members = wait_for(lambda: sleeps_started(leader.pid, mark))
    terminate_within_bound(leader.pid, mark, grace_s=2)
    assert leader.wait(timeout=30) == -signal.SIGTERM
    # The sleeps were sh's children: ended (gone, or zombies until init reaps them).
    assert not any(alive(pid) for pid in members)
    assert group_members(leader.pid) == []


def test_the_window_spares_the_full_scan_on_this_host(session, monkeypatch):
    leader, mark = session
    members = wait_for(lambda: sleeps_started(leader.pid, mark))
    reads: list[str] = []
    real_read = process_groups._read

    def counting_read(path: str) -> bytes | None:
        reads.append(path)
        return real_read(path)

    monkeypatch.setattr(process_groups, "_read", counting_read)

    def stat_reads() -> list[str]:
        return [path for path in reads if STAT_PATH.fullmatch(path)]

    assert sorted(group_members(leader.pid)) == sorted(members)
    full_scan = len(stat_reads())
    entries = sum(entry.isdigit() for entry in os.listdir("/proc"))
    if entries < 20:
        pytest.skip(f"only {entries} processes here: a window is no smaller than a scan")
    assert full_scan >= entries // 2  # the counting sees a scan (processes may come and go)

    reads.clear()
    assert sorted(group_members(leader.pid, mark)) == sorted(members)
    windowed = stat_reads()
    assert f"/proc/{leader.pid}/stat" in windowed
    assert len(windowed) < entries // 4, windowed
    window = mark.pid_window(leader.pid)
    assert window is not None
    assert all(_in_window(int(STAT_PATH.fullmatch(path)[1]), window)
               for path in windowed if path != f"/proc/{leader.pid}/stat")


# -- the mark a command starts with ------------------------------------------------------


def test_before_the_first_sweep_a_mark_is_read(proc):
    proc.set_counts(forks=2000, tasks=90)
    assert ForkMark.before_start() == ForkMark(forks=2000, tasks=90)
    assert "/proc/stat" in proc.reads


def test_after_a_sweep_the_next_command_starts_with_its_reading(proc):
    ForkMark(forks=990, tasks=120).pid_window(4000)  # what a sweep reads: 1000 / 120
    proc.set_counts(forks=1500, tasks=200)
    proc.reads.clear()
    assert ForkMark.before_start() == ForkMark(forks=1000, tasks=120)
    assert proc.reads == []


@given(old_forks=st.integers(0, 10**6), between=st.integers(0, 20000),
       tasks_old=st.integers(1, 30000), tasks_gone=st.integers(0, 30000),
       since=st.integers(0, 20000), pid_max=st.sampled_from([32768, 4194304, 1000]))
def test_an_older_mark_is_never_less_cautious(old_forks, between, tasks_old, tasks_gone,
                                              since, pid_max):
    """Whenever the mark read before a command's start allows no window, an older one
    allows none either."""
    tasks_at_start = max(1, tasks_old + between - tasks_gone)  # at most t0 + forks between
    fresh = ForkMark(forks=old_forks + between, tasks=tasks_at_start)
    older = ForkMark(forks=old_forks, tasks=tasks_old)
    fake = FakeProc(forks=old_forks + between + since, tasks=100, pid_max=pid_max)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(process_groups, "_read", fake._read)
        patch.setattr(process_groups, "_pid_max", None)
        patch.setattr(process_groups, "_latest", None)
        if fresh.pid_window(4000) is None:
            assert older.pid_window(4000) is None
