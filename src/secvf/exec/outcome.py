"""What an exec call produces: session events, results, and their exit codes.

On the wire a command's fate is data, not an exception (docs/protocol.md): ``started``,
output chunks, a non-terminal ``stdin_error``, and finally ``exit``. The client turns
those into the frozen dataclasses here; :func:`exit_code_for` maps a finished command,
or the exception that ended the attempt, to the status ``secvf vm exec`` exits with
(the table is :class:`secvf.errors.ExitCode`). What the client's other requests return
is in :mod:`secvf.exec.replies`, apart, so that running a command does not pay for
defining those classes.
"""

from __future__ import annotations

from dataclasses import dataclass

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
