"""What counts as a host-guest channel, by QEMU device type.

Used three ways: the plan refuses to add such a device to a non-sandbox VM, the
supervisor checks the live QMP device tree after QEMU starts, and ``secvf audit``
reports the surfaces of every VM. Matching is on QOM type names as QEMU reports
them (``vhost-user-vsock-pci``, its inner ``vhost-user-vsock-device`` ...).
"""

from __future__ import annotations

# (substring of a QOM type name, channel kind). Order matters: first match wins.
_CHANNEL_PATTERNS: tuple[tuple[str, str], ...] = (
    ("vsock", "vsock"),
    ("vhost-user-fs", "virtio-fs"),
    ("virtio-fs", "virtio-fs"),
    ("virtio-9p", "9p"),
    ("9p", "9p"),
    ("virtio-serial", "virtio-serial"),
    ("virtserialport", "virtio-serial"),
    ("virtconsole", "virtio-serial"),
    ("vhost-user", "vhost-user"),
    ("ivshmem", "shared-memory"),
)


def channel_of(qom_type: str) -> str | None:
    """Return the channel kind a QOM type provides, or None if it is not a channel."""
    lowered = qom_type.lower()
    for pattern, kind in _CHANNEL_PATTERNS:
        if pattern in lowered:
            return kind
    return None


#: Channel kinds an AI-sandbox VM is meant to have.
SANDBOX_CHANNELS = frozenset({"vsock", "virtio-fs"})
