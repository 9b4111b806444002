"""SecVF's exception hierarchy.

Every error SecVF raises on purpose derives from :class:`SecVFError`, carries a
message a user can act on, and is turned into a one-line message and a non-zero
exit code by the CLI::

    SecVFError
     ├── InvalidName          a VM/image/share name that cannot be used
     ├── ConfigError          a vm.json (or other config file) that is corrupt or invalid
     ├── ForbiddenDevice      a request for a device the VM's kind must never have
     ├── NotFound             a VM or image that does not exist
     ├── AlreadyExists        a VM or image name that is already taken
     ├── StateError           an operation that needs another VM state
     ├── LockBusy             another secvf process holds the VM's lock
     ├── ImageBuildFailed     building a guest image failed (names the step)
     ├── LaunchFailed         QEMU (or a helper) did not start; has argv and stderr
     ├── NoExecChannel        exec on a VM without a channel (by design)
     └── ExecError            the exec channel failed (see secvf.exec)
"""

from __future__ import annotations

from collections.abc import Sequence


class SecVFError(Exception):
    """Root of every error SecVF raises deliberately."""

    #: Process exit code the CLI uses for this error.
    exit_code: int = 1


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

    exit_code = 125


class ExecError(SecVFError):
    """The exec channel failed: the command's fate is unknown (see secvf.exec.errors)."""

    exit_code = 125
