"""A command's process group and session: who is still in it, and ending all of them.

When a command's leader exits, whatever it left in its process group or session is
ended. Finding those processes means reading ``/proc/PID/stat``, which costs ~0.3 ms per
process under TCG: a guest has ~60 processes, most of them kernel threads, so reading
them all took ~20 ms per exec, as long as running ``/bin/true`` itself.

Every process left in the leader's group or session is a descendant of the leader, so
its pid was given out after the leader's. Linux gives out pids in cyclic order, so those
pids lie between the leader's and the last pid given out (the last field of
``/proc/loadavg``), as long as the allocator has not gone all the way round since the
leader started.
:class:`ForkMark`, taken just before the command starts, knows how many tasks existed
then and how many were created since (``/proc/stat``'s ``processes``); while they are
too few to go round ``pid_max``, only the pids in that window are read (for a short
command: none; a few are tried one by one, more are found by listing ``/proc``).
Otherwise, or when those files cannot be read, every process is.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from secvf.exec import protocol

GROUP_POLL_S = 0.02
#: Pids Linux never gives out again after a wrap (``RESERVED_PIDS``).
RESERVED_PIDS = 300
#: Up to this many pids in the window are tried one by one; more, and ``/proc`` is listed.
PROBE_MAX = 8


def _read(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 1 << 16)
    except OSError:
        return None
    finally:
        os.close(fd)


def _int_file(path: str) -> int | None:
    data = _read(path)
    try:
        return int(data) if data is not None else None
    except ValueError:
        return None


def _proc_counts() -> tuple[int, int, int] | None:
    """Tasks created since boot (``/proc/stat``), tasks existing now and the last pid
    given out (``/proc/loadavg``, read first: forks counted after it are only more)."""
    loadavg, stat = _read("/proc/loadavg"), _read("/proc/stat")
    if stat is None or loadavg is None:
        return None
    try:
        start = stat.index(b"\nprocesses ") + len(b"\nprocesses ")
        forks = int(stat[start : stat.index(b"\n", start)])
        _, _, _, running, last = loadavg.split()
        tasks = int(running.split(b"/")[1])
        pid = int(last)
    except (ValueError, IndexError):
        return None
    global _latest
    _latest = ForkMark(forks, tasks)  # for the next command (ForkMark.before_start)
    return forks, tasks, pid


_pid_max: int | None = None
#: The latest reading of the fork and task counts (see :meth:`ForkMark.before_start`).
_latest: ForkMark | None = None


def _known_pid_max() -> int | None:
    """``kernel.pid_max``, read once (a sysctl read costs ~0.2 ms under TCG). Only root
    in the guest can change it, and the sweep is cleanup, not a boundary: a command that
    wants to outlive its exec can ``setsid`` anyway."""
    global _pid_max
    if _pid_max is None:
        _pid_max = _int_file("/proc/sys/kernel/pid_max")
    return _pid_max


@dataclass(frozen=True)
class ForkMark:
    """How many tasks had been created, and how many existed, before a command started."""

    forks: int
    tasks: int

    @classmethod
    def now(cls) -> ForkMark | None:
        """Take a mark (None where ``/proc`` does not say: every process is read then)."""
        counts = _proc_counts()
        return None if counts is None else cls(counts[0], counts[1])

    @classmethod
    def before_start(cls) -> ForkMark | None:
        """A mark for a command about to start: the latest counts read (by a sweep, or
        an earlier mark; no ``/proc`` read here), else a new one.

        An older mark only makes the window's test more cautious: with ``f0``/``t0`` at
        the older mark, the tasks existing at the start are at most ``t0`` plus the forks
        between, so ``2 * created + tasks`` counted from the older mark is never less.
        """
        return _latest if _latest is not None else cls.now()

    def pid_window(self, leader: int) -> tuple[int, int] | None:
        """The pids given out after ``leader`` as ``(leader, last)``, cyclic; None if the
        allocator may have gone round since this mark (then any pid may be a descendant)."""
        counts, pid_max = _proc_counts(), _known_pid_max()
        if counts is None or pid_max is None:
            return None
        forks, _, last = counts
        created = forks - self.forks
        # Each pid handed out moves the cursor past it and past every pid in use that it
        # skips: at most the tasks that existed at the mark and those created since.
        if created < 0 or 2 * created + self.tasks >= pid_max - RESERVED_PIDS:
            return None
        return leader, last


def _in_window(pid: int, window: tuple[int, int] | None) -> bool:
    if window is None:
        return True
    leader, last = window
    if leader <= last:
        return leader < pid <= last
    return pid > leader or pid <= last  # the allocator wrapped after the leader


def _candidates(leader: int, window: tuple[int, int] | None) -> list[int]:
    """The pids to read: the leader and, with a window, those in it (tried one by one
    when there are few: cheaper than listing ``/proc``), else every process."""
    if window is not None and window[0] <= window[1] <= window[0] + PROBE_MAX:
        return list(range(leader, window[1] + 1))
    found = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    return [pid for pid in found if pid == leader or _in_window(pid, window)]


def group_members(leader: int, mark: ForkMark | None = None) -> list[int]:
    """Return live pids whose process group or session is ``leader`` (zombies excluded).

    With the :class:`ForkMark` taken before the leader started, only pids given out
    after the leader's are read where that is provably enough.
    """
    window = mark.pid_window(leader) if mark is not None else None
    members = []
    for pid in _candidates(leader, window):
        data = _read(f"/proc/{pid}/stat")
        if data is None:
            continue
        fields = data.rsplit(b")", 1)[1].split()
        state, pgrp, session = fields[0], int(fields[2]), int(fields[3])
        if state != b"Z" and leader in (pgrp, session):
            members.append(pid)
    return members


def terminate_group(
    leader: int, mark: ForkMark | None = None, grace_s: float = protocol.KILL_GRACE_S
) -> None:
    """SIGTERM every process of ``leader``'s group/session, SIGKILL survivors after grace.

    ``mark``: the :class:`ForkMark` taken before the leader started (see
    :func:`group_members`).
    """
    deadline = time.monotonic() + grace_s
    sig = signal.SIGTERM
    while members := group_members(leader, mark):
        for pid in members:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGKILL:
            time.sleep(GROUP_POLL_S)
        elif time.monotonic() >= deadline:
            sig = signal.SIGKILL
        else:
            time.sleep(GROUP_POLL_S)
