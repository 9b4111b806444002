"""What the exec client's requests other than running a command return: background
processes (and the result of following one), file transfers, the agent's info, a
restore's report.

They are frozen dataclasses like the events and results of :mod:`secvf.exec.outcome`,
in a module of their own that the client imports when one of these requests is made:
``secvf vm exec`` starts once per command, and defining classes costs it time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from secvf.exec.outcome import ExecResult


@dataclass(frozen=True)
class AttachResult(ExecResult):
    """Outcome of following a background process to its end
    (:meth:`secvf.exec.AttachSession.collect`): an :class:`ExecResult` of the output this
    attach saw, plus how much of the process's output it did not see."""

    dropped_bytes: int = 0  # output dropped by the agent's buffer before this attach saw it


@dataclass(frozen=True)
class DetachedStart:
    """A background process just started (:meth:`secvf.exec.ExecClient.start_detached`)."""

    id: str  # the agent's id for it: what ps lists and attach and kill take
    pid: int  # its guest pid


@dataclass(frozen=True)
class DetachedProcessInfo:
    """One background process as ``ps`` reports it (text from the guest, shortened)."""

    id: str  # the agent's id for it
    argv: tuple[str, ...]  # what runs (a shell command as /bin/sh -c ...)
    user: str  # the guest account it runs as
    pid: int  # its guest pid
    state: str  # "running" or "exited"
    started_at: float  # seconds since the epoch, by the guest's clock
    exit_code: int | None  # its exit status once exited (None: running, or a signal)
    signal: int | None  # the signal that ended it, if one did
    duration_ms: int | None  # spawn to exit, once exited
    buffered_bytes: int  # output kept in the agent's buffer now
    dropped_bytes: int  # output dropped from the buffer so far (the buffer keeps 1 MiB)


@dataclass(frozen=True)
class FileTransfer:
    """Outcome of an upload or download."""

    path: str  # the guest path, absolute
    size: int  # bytes transferred
    mode: int  # permission bits of the file


@dataclass(frozen=True)
class AgentInfo:
    """What ``info`` reports about the guest agent."""

    agent_version: str  # the agent's software version
    generation: int  # the agent's protocol generation
    hostname: str  # guest hostname
    uptime_s: float  # guest uptime
    users: tuple[str, ...]  # accounts commands can run as
    default_user: str  # the account used when a request names none
    python: str  # guest Python version
    kernel: str  # guest kernel release


class RestoreShare(NamedTuple):
    """A virtio-fs share for :meth:`secvf.exec.ExecClient.restore` to mount (a plain
    ``(tag, guest_path, read_only)`` tuple works as well)."""

    tag: str  # the virtio-fs tag of the hot-plugged device
    guest_path: str  # where it is mounted in the guest
    read_only: bool  # mounted -o ro (the host enforces read-only shares anyway)


@dataclass(frozen=True)
class RestoreIssue:
    """One part of a restore that failed in the guest."""

    item: str  # clock, rng, hostname, tmp, mac, dhcp or share:TAG
    message: str  # the agent's explanation (untrusted text)


@dataclass(frozen=True)
class RestoreResult:
    """What :meth:`secvf.exec.ExecClient.restore` did in the guest."""

    clock_offset_s: float | None  # how far the guest clock was behind the host's (<0: ahead)
    clock_skew_s: float  # guest clock - host clock when the reply arrived (~0 minus transit)
    reseeded: bool  # kernel RNG got the host's entropy and reseeded; agent's random too
    hostname: str  # the guest's hostname now
    mac: str | None  # eth0's MAC now (None: the VM has no eth0)
    dhcp_restarted: bool  # eth0's DHCP client was restarted for the new MAC
    mounted: tuple[RestoreShare, ...]  # the shares that are mounted
    tmp_entries_removed: int  # entries removed from /tmp
    errors: tuple[RestoreIssue, ...]  # the items that failed

    @property
    def ok(self) -> bool:
        """True if every item of the restore succeeded."""
        return not self.errors
