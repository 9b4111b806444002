"""Errors of the host-side exec client.

Everything derives from :class:`secvf.errors.ExecError` (CLI exit code 125) except
:class:`CommandStartFailed`, whose exit code follows the shell's convention::

    SecVFError
     └── ExecError                 the exec channel failed
          ├── AgentUnavailable     no working agent behind the socket
          │    └── ConnectFailed   connecting to the exec socket failed (.path)
          ├── ExecRefused          the bridge or agent refused the connection (.code)
          ├── ProtocolError        the peer broke the exec protocol (.code)
          ├── CommandStartFailed   the command did not start (.kind, .errno, ...) - 126/127
          └── FileTransferError    an upload or download failed (.kind, .path, ...)
"""

from __future__ import annotations

from pathlib import Path

from secvf.errors import ExecError

EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127


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
        self.code = code  # protocol ERROR code, e.g. "refused" or "busy"
        self.detail = message  # the peer's explanation (untrusted text)
        super().__init__(f"exec connection refused ({code}): {message}")


class ProtocolError(ExecError):
    """The peer sent something the exec protocol does not allow (treat the guest as broken)."""

    def __init__(self, message: str, code: str = "protocol_violation") -> None:
        self.code = code  # protocol error code (secvf.exec.protocol.ERROR_CODES)
        super().__init__(message)


class CommandStartFailed(ExecError):
    """The guest could not start the command (not found, no permission, bad cwd, ...)."""

    def __init__(
        self, kind: str, message: str, errno: int | None, errno_name: str | None, stage: str
    ) -> None:
        self.kind = kind  # secvf.exec.protocol.START_FAILURE_KINDS value
        self.errno = errno  # guest errno, if the failure came from a system call
        self.errno_name = errno_name  # e.g. "ENOENT"
        self.stage = stage  # the step that failed: switch_user, chdir, exec
        self.exit_code = EXIT_NOT_FOUND if kind == "not_found" else EXIT_CANNOT_EXECUTE
        where = f" [{errno_name}]" if errno_name else ""
        super().__init__(f"command did not start ({kind} at {stage}){where}: {message}")


class FileTransferError(ExecError):
    """An upload or download failed (missing path, directory, permission, size cap)."""

    def __init__(
        self,
        kind: str,
        path: str,
        message: str,
        errno: int | None = None,
        errno_name: str | None = None,
    ) -> None:
        self.kind = kind  # secvf.exec.protocol.FILE_ERROR_KINDS value, or "too_large" (host cap)
        self.path = path  # the guest path concerned
        self.errno = errno  # guest errno, if any
        self.errno_name = errno_name  # e.g. "EACCES"
        super().__init__(f"file transfer failed ({kind}) for {path}: {message}")
