"""Errors raised by the vhost-user-vsock backend.

::

    SecVFError
     └── VsockError                 root of this package's errors
          ├── BindFailed            a listening socket could not be created (path, cause)
          ├── VhostUserError        the vhost-user frontend (QEMU) broke the protocol
          └── GuestViolation        the guest broke the virtio/vsock rules (untrusted input)
               ├── MalformedPacket  one packet is unusable; only its connection suffers
               └── QueueViolation   a ring is corrupt; the queue is marked broken and stopped

Guest violations never escape the backend: they are reported as security events and
contained (packet dropped, connection reset, or queue stopped).
"""

from __future__ import annotations

from pathlib import Path

from secvf.errors import SecVFError


class VsockError(SecVFError):
    """Root of the vsock backend's errors."""


class BindFailed(VsockError):
    """A listening Unix socket could not be created at ``path``."""

    def __init__(self, path: Path, cause: OSError | str) -> None:
        self.path = path
        super().__init__(f"cannot listen on {path}: {cause}")


class VhostUserError(VsockError):
    """The vhost-user frontend sent a message the backend cannot honour."""


class GuestViolation(VsockError):
    """The guest driver broke a rule of the virtio or vsock specification."""


class MalformedPacket(GuestViolation):
    """A vsock packet from the guest is unusable (short header, bad length, bad type)."""


class QueueViolation(GuestViolation):
    """A virtqueue is corrupt (bad index, loop, address outside guest memory)."""
