"""What an exec call produces: session events, results, and their exit codes.

On the wire a command's fate is data, not an exception (docs/protocol.md): ``started``,
output chunks, a non-terminal ``stdin_error``, and finally ``exit``. The client turns
those into the frozen dataclasses here; :func:`exit_code_for` maps a finished command,
or the exception that ended the attempt, to the status ``secvf vm exec`` exits with
(the table is :class:`secvf.errors.ExitCode`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from secvf.errors import CommandStartFailed, ExitCode


@dataclass(frozen=True)
class Started:
    """The command is running in the guest."""

    pid: int  # guest pid of the command (leader of its process group)


@dataclass(frozen=True)
class Stdout:
    """A chunk of standard output (all output when a PTY is used)."""

    data: bytes  # raw bytes, as the command wrote them


@dataclass(frozen=True)
class Stderr:
    """A chunk of standard error."""

    data: bytes  # raw bytes, as the command wrote them


@dataclass(frozen=True)
class StdinError:
    """Writing the command's stdin failed (non-terminal; later stdin is dropped)."""

    errno: int | None  # guest errno, e.g. 32 (EPIPE)
    errno_name: str | None  # e.g. "EPIPE"
    message: str  # the agent's explanation (untrusted text)


@dataclass(frozen=True)
class Exited:
    """The command ended; always the last event of a session."""

    exit_code: int | None  # exit status, or None if a signal ended it
    signal: int | None  # the signal that ended it, if any
    timed_out: bool  # the guest killed it because the timeout passed
    cancelled: bool  # the guest killed it because the client cancelled
    duration_ms: int  # wall time in the guest, spawn to exit


@dataclass(frozen=True)
class OutputDropped:
    """Attach only: output of the background process that this attach will never see.

    At the start of an attach, the bytes the agent's buffer had dropped already; later,
    bytes the buffer dropped while this attacher was too slow to read them.
    """

    size: int  # how many bytes were dropped here, between the events before and after


ExecEvent = Started | Stdout | Stderr | StdinError | OutputDropped | Exited
"""Every event type of an exec or attach session (see :class:`secvf.exec.ExecSession`)."""


@dataclass(frozen=True)
class ExecResult:
    """Outcome of :meth:`secvf.exec.ExecClient.run`."""

    exit_code: int | None  # exit status, or None if a signal ended the command
    signal: int | None  # signal number that ended the command, if any
    timed_out: bool  # killed by the guest because the timeout passed
    cancelled: bool  # killed because the client cancelled
    duration_ms: int  # wall time in the guest
    stdout: bytes  # captured stdout (at most max_output_bytes)
    stderr: bytes  # captured stderr (at most max_output_bytes)
    stdout_truncated: bool  # True if stdout was longer than the cap
    stderr_truncated: bool  # True if stderr was longer than the cap

    @property
    def ok(self) -> bool:
        """True if the command exited with status 0."""
        return self.exit_code == 0

    @property
    def shell_exit_code(self) -> int:
        """The exit code a shell would report: the code, 128+N for signal N, 124 timeout."""
        return exit_code_for(self)


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


def exit_code_for(outcome: ExecResult | BaseException) -> int:
    """Map an exec outcome to a process exit code (what ``secvf vm exec`` returns).

    A finished command: 124 if it timed out, 128+N if signal N ended it, else its own
    code. An exception: 127 if the command was not found and 126 if it could not be
    started otherwise (:class:`~secvf.errors.CommandStartFailed`); 125 for anything
    else, SecVF error or not.
    """
    if isinstance(outcome, ExecResult):
        if outcome.timed_out:
            return ExitCode.TIMEOUT
        if outcome.signal is not None:
            return ExitCode.SIGNAL_BASE + outcome.signal
        return outcome.exit_code if outcome.exit_code is not None else ExitCode.SECVF_ERROR
    if isinstance(outcome, CommandStartFailed):
        return outcome.exit_code
    return ExitCode.SECVF_ERROR
