"""SecVF's userspace vhost-user-vsock backend (one process per VM, standard library only).

QEMU's ``vhost-user-vsock-pci`` device connects to this backend, which gives the guest a
virtio-vsock device and exposes it to the host as a Firecracker-style "hybrid vsock"
Unix socket: ``CONNECT <port>\\n`` -> ``OK <hostport>\\n`` -> raw bytes; guest connections to
host port P go to ``<uds_path>_<P>``. See docs/vsock.md.

Run it as ``python -m secvf.vsock --vhost-user-socket PATH --uds-path PATH --guest-cid N``
or call :func:`serve`. x86-64 hosts only (see :mod:`secvf.vsock.virtqueue`).
"""

import logging

from secvf.vsock.backend import VsockBackend, serve
from secvf.vsock.errors import (
    BindFailed,
    GuestViolation,
    MalformedPacket,
    QueueViolation,
    VhostUserError,
    VsockError,
)
from secvf.vsock.limits import DEFAULT_MAX_CONNECTIONS, FIRST_HOST_PORT

__all__ = [
    "serve",
    "VsockBackend",
    "DEFAULT_MAX_CONNECTIONS",
    "FIRST_HOST_PORT",
    "VsockError",
    "BindFailed",
    "VhostUserError",
    "GuestViolation",
    "MalformedPacket",
    "QueueViolation",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
