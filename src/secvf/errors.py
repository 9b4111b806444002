"""SecVF's exception hierarchy and the CLI's exit codes.

Every error SecVF raises on purpose derives from :class:`SecVFError`, carries a
message a user can act on, and is turned into a one-line message and the exit code in
its ``exit_code`` (an :class:`ExitCode`) by the CLI::

    SecVFError                        exit 1 unless noted
     ├── InvalidName                  a VM/image/share name that cannot be used
     ├── ConfigError                  a vm.json (or other config file) that is corrupt or invalid
     │    └── CorruptRecord           a runtime record or inter-process message is unreadable
     ├── ForbiddenDevice              a request for a device the VM's kind must never have
     ├── NotFound                     a VM or image that does not exist
     ├── AlreadyExists                a VM or image name that is already taken
     ├── StateError                   an operation that needs another state (.state, .required)
     │    └── IllegalTransition       a lifecycle transition the supervisor's table forbids
     ├── LockBusy                     another secvf process holds the VM's lock
     ├── ImageBuildFailed             building a guest image failed (.step)
     ├── LaunchFailed                 QEMU (or a helper) did not start (.argv, .output, .exitcode)
     ├── SupervisorFailed             a supervisor step failed (.stage, .errno)
     ├── SnapshotError                saving or restoring guest state failed
     ├── NetworkError                 an isolated network, its switch or a capture failed
     ├── InvalidFilter                a packet filter that does not parse (.position)
     ├── MediaError                   installer media (the ISO cache) cannot be fetched or used
     │    ├── UntrustedSource         a download URL or redirect the policy refuses
     │    ├── DownloadFailed          the download failed (.resumable: run again to go on)
     │    └── ChecksumMismatch        content is not what its SHA-256 says (.expected, .actual)
     ├── NoExecChannel                exec on a VM without a channel (by design)   125
     ├── ExecError                    the exec channel failed                      125
     │    ├── AgentUnavailable        no working agent behind the socket
     │    │    └── ConnectFailed      connecting to the exec socket failed (.path)
     │    ├── ExecRefused             the bridge or agent refused the connection (.code)
     │    ├── ProtocolError           the peer broke the exec protocol (.code)
     │    ├── CommandStartFailed      the command did not start (.kind, .errno …)  126/127
     │    ├── FileTransferError       an upload or download failed (.kind, .path …)
     │    └── RestoreFailed           the agent refused or did not finish a restore (.kind)
     └── VsockError                   the vsock backend's errors (in secvf.vsock.errors)

The ``.code`` and ``.kind`` attributes hold the exec protocol's values
(``secvf.exec.protocol.ErrorCode``, ``StartFailureKind``, ``FileErrorKind``; all
``str`` enums). This module is the bottom layer and standard-library only, so it
names those values but does not import them.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from pathlib import Path


class ExitCode(enum.IntEnum):
    """The CLI's exit codes: the one table (docs/cli.md, "Errors and exit status").

    ``vm exec`` and ``sandbox run`` exit with the guest command's own status, or one of
    the 124-128 codes below (the conventions of ``timeout(1)`` and POSIX shells); every
    other command exits 0, :attr:`ERROR` or :attr:`USAGE`.
    """

    ERROR = 1  # a SecVF error (the default of every SecVFError)
    USAGE = 2  # a bad command line (click's usage errors)
    TIMEOUT = 124  # exec: the command's timeout passed and the guest killed it
    SECVF_ERROR = 125  # exec: SecVF itself failed (no channel, refused, agent gone …)
    CANNOT_EXECUTE = 126  # exec: the command exists but could not be started
    NOT_FOUND = 127  # exec: the command was not found
    SIGNAL_BASE = 128  # exec: 128 + N when signal N ended the command


class SecVFError(Exception):
    """Root of every error SecVF raises deliberately."""

    #: Process exit code the CLI uses for this error.
    exit_code: int = ExitCode.ERROR


class InvalidName(SecVFError):
    """A name (VM, image, share) is empty, too long or unsafe as a file name."""


class ConfigError(SecVFError):
    """A configuration file is unreadable, corrupt, or fails validation."""


class ForbiddenDevice(SecVFError):
    """A VM of this kind asked for a host-guest channel it must never have."""

    def __init__(self, field: str, kind: str, detail: str = "") -> None:
        self.field = field
        self.kind = kind
        msg = f"field '{field}' is not allowed for a {kind} VM: it would add a host-guest channel"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class NotFound(SecVFError):
    """A VM or image does not exist."""


class AlreadyExists(SecVFError):
    """The name is taken."""


class StateError(SecVFError):
    """The VM is not in a state that allows the operation."""

    def __init__(self, msg: str, state: str = "", required: Sequence[str] = ()) -> None:
        super().__init__(msg)
        self.state = state
        self.required = tuple(required)


class LockBusy(SecVFError):
    """Another secvf process is working on this VM right now."""


class ImageBuildFailed(SecVFError):
    """Building a guest image failed."""

    def __init__(self, step: str, detail: str) -> None:
        self.step = step
        super().__init__(f"image build failed at step '{step}': {detail}")


class LaunchFailed(SecVFError):
    """A process (QEMU, a device backend) failed to start."""

    def __init__(self, what: str, argv: Sequence[str], output: str, exitcode: int | None) -> None:
        self.what = what
        self.argv = list(argv)
        self.output = output
        self.exitcode = exitcode
        tail = output.strip().splitlines()[-1] if output.strip() else "(no output)"
        super().__init__(f"{what} failed to start (exit {exitcode}): {tail}")


class NoExecChannel(SecVFError):
    """The VM has no exec channel, by design or because it is not running."""

    exit_code = ExitCode.SECVF_ERROR


class ExecError(SecVFError):
    """The exec channel failed: the command's fate is unknown."""

    exit_code = ExitCode.SECVF_ERROR


class AgentUnavailable(ExecError):
    """The guest agent cannot be reached, stopped answering, or hung up mid-operation."""


class ConnectFailed(AgentUnavailable):
    """Connecting to the exec socket (or the vsock hybrid handshake) failed."""

    def __init__(self, path: Path, detail: str) -> None:
        self.path = path  # the Unix socket that was dialled
        super().__init__(f"cannot connect to exec socket {path}: {detail}")


class ExecRefused(ExecError):
    """The bridge or the agent refused the connection with an ERROR frame."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code  # the ERROR frame's ErrorCode: "refused" or "busy"
        self.detail = message  # the peer's explanation (untrusted text)
        super().__init__(f"exec connection refused ({code}): {message}")


class ProtocolError(ExecError):
    """The peer sent something the exec protocol does not allow (treat the guest as broken)."""

    def __init__(self, message: str, code: str = "protocol_violation") -> None:
        self.code = code  # an ErrorCode value, or the unknown code a peer sent
        super().__init__(message)


class CommandStartFailed(ExecError):
    """The guest could not start the command (not found, no permission, bad cwd, ...).

    Its exit code follows the shell: 127 for ``not_found``, 126 for any other kind.
    """

    def __init__(
        self, kind: str, message: str, errno: int | None, errno_name: str | None, stage: str
    ) -> None:
        self.kind = kind  # a StartFailureKind value (an unknown one from a newer agent: 126)
        self.errno = errno  # guest errno, if the failure came from a system call
        self.errno_name = errno_name  # e.g. "ENOENT"
        self.stage = stage  # the step that failed: switch_user, chdir, exec
        self.exit_code = (
            ExitCode.NOT_FOUND if kind == "not_found" else ExitCode.CANNOT_EXECUTE
        )
        where = f" [{errno_name}]" if errno_name else ""
        super().__init__(f"command did not start ({kind} at {stage}){where}: {message}")


class FileTransferError(ExecError):
    """An upload or download failed (missing path, directory, permission, size cap)."""

    #: The kind the host adds to the guest's FileErrorKind values: over the size cap.
    TOO_LARGE = "too_large"

    def __init__(
        self,
        kind: str,
        path: str,
        message: str,
        errno: int | None = None,
        errno_name: str | None = None,
    ) -> None:
        self.kind = kind  # a FileErrorKind value, or TOO_LARGE
        self.path = path  # the guest path concerned
        self.errno = errno  # guest errno, if any
        self.errno_name = errno_name  # e.g. "EACCES"
        super().__init__(f"file transfer failed ({kind}) for {path}: {message}")


class RestoreFailed(ExecError):
    """A ``restore`` (making a restored guest its own machine) was refused or not finished.

    ``kind`` is a ``RestoreFailureKind`` value (``invalid_request``: a field breaks its rule,
    named in ``field``, and nothing was changed; ``unsupported``: the agent cannot restore),
    or :attr:`INCOMPLETE`: the agent applied the request but some items failed; ``result``
    then holds the :class:`secvf.exec.RestoreResult` with its ``errors``.
    """

    #: The kind the host adds: the restore ran, but not every item succeeded.
    INCOMPLETE = "incomplete"

    def __init__(
        self, kind: str, message: str, field: str | None = None, result: object | None = None
    ) -> None:
        self.kind = kind  # a RestoreFailureKind value, or INCOMPLETE
        self.field = field  # the request field that broke a rule (invalid_request)
        self.result = result  # the RestoreResult (INCOMPLETE only)
        super().__init__(f"restore failed ({kind}): {message}")


class DetachedProcessError(ExecError):
    """A background-process request (detach, ps, attach, kill) was refused.

    ``kind`` is a ``DetachedErrorKind`` value from the agent (``not_found``: no such id;
    ``not_running``: it has exited; ``limit_reached``: too many background processes, or
    attachers of one; ``invalid_request``), or :attr:`UNSUPPORTED`: the guest agent is too
    old to have background processes (nothing was sent). ``process_id`` is the id the
    request named, if any.
    """

    #: The kind the host adds: the agent does not offer background processes.
    UNSUPPORTED = "unsupported"

    def __init__(self, kind: str, message: str, process_id: str = "") -> None:
        self.kind = kind  # a DetachedErrorKind value, or UNSUPPORTED
        self.process_id = process_id  # the id the request named ("" if none)
        super().__init__(f"background process request refused ({kind}): {message}")


class SupervisorFailed(SecVFError):
    """A VM's supervisor failed at a step of its own (control socket, QMP, its report).

    The supervisor tears the VM down and records the run as crashed. ``stage`` names
    the step (a ``secvf.model.runtime.LaunchStage`` value; ``report`` when ``vm start``
    got no usable report at all) and ``errno`` the OS error, if any.
    """

    def __init__(self, stage: str, message: str, errno: int | None = None) -> None:
        self.stage = stage  # the supervisor step that failed, e.g. "control"
        self.errno = errno  # the OS errno behind it, if it was an OS error
        super().__init__(message)


class SnapshotError(SecVFError):
    """A snapshot, a template or another saved guest state could not be made or used."""


class NetworkError(SecVFError):
    """An isolated network could not be created, used or removed, its switch did not
    answer, or a capture could not go on (the message says which and why)."""


class InvalidFilter(SecVFError):
    """A packet filter expression that does not parse; ``position`` is the 0-based
    character offset where the problem is (``None`` for the expression as a whole)."""

    def __init__(self, message: str, position: int | None = None) -> None:
        self.position = position
        super().__init__(message if position is None else f"{message} (at character "
                         f"{position + 1})")


class IllegalTransition(StateError):
    """The supervisor tried a lifecycle transition its table does not allow (a bug)."""


class CorruptRecord(ConfigError):
    """A runtime record or message between SecVF processes is unreadable or of an
    unknown shape (state file, ``last_run.json``, start report, control message)."""


class MediaError(SecVFError):
    """Installer media (the ISO cache) cannot be fetched, added, verified or removed."""


class UntrustedSource(MediaError):
    """A download URL or redirect is refused: not HTTPS, or a host not on the allowlist."""


class DownloadFailed(MediaError):
    """A download failed (connection, certificate, HTTP status, a cut-off transfer).

    ``resumable``: what arrived is kept, and the same command goes on from there.
    """

    def __init__(self, message: str, *, resumable: bool = False) -> None:
        self.resumable = resumable
        super().__init__(message)


class ChecksumMismatch(MediaError):
    """A file's SHA-256 is not the one it must have (nothing was published)."""

    def __init__(self, subject: str, expected: str, actual: str, detail: str = "") -> None:
        self.subject = subject  # what was hashed (a URL, a path, a cache entry)
        self.expected = expected
        self.actual = actual
        super().__init__(f"SHA-256 mismatch for {subject}: expected {expected}, got {actual}"
                         + (f"; {detail}" if detail else ""))
