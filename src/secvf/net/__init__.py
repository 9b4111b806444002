"""Isolated networks: one userspace L2 switch process per network (standard library only).

VMs on an isolated network reach each other, and nothing else, through that network's
switch. QEMU's ``-netdev dgram`` backend sends each frame as one ``AF_UNIX`` datagram
to the switch, which checks the sender, the size, the pinned source MAC and the rate
limits, then forwards, counts, writes security events and keeps a ring of recent
frames for capture. A watchdog process keeps the switch running while ports exist.
The contract with the VM side is ``docs/networks.md`` ("Files and protocol"); how the switch works
is ``docs/switch.md``.

Modules: :mod:`~secvf.net.frame` (Ethernet header), :mod:`~secvf.net.ratelimit`,
:mod:`~secvf.net.events`, :mod:`~secvf.net.config` (``NETDIR`` files),
:mod:`~secvf.net.engine` (the rules, no sockets), :mod:`~secvf.net.taps` (capture
fan-out and ring), :mod:`~secvf.net.switch` (the socket loop process),
:mod:`~secvf.net.watchdog`, :mod:`~secvf.net.launcher` (what the VM side calls),
:mod:`~secvf.net.control` (protocol and query), :mod:`~secvf.net.capture` (capture
client), :mod:`~secvf.net.pcapng`.

Importing this package loads nothing: the names below are imported on first use.
"""

from __future__ import annotations

from secvf import lazy_exports

__all__ = [
    "ensure_switch",
    "write_port",
    "release_port",
    "query",
    "open_capture",
    "read_ring",
    "SwitchUnavailable",
    "ConfigError",
    "CaptureStream",
    "Interface",
    "Interfaces",
    "Frame",
    "Dropped",
    "PcapngWriter",
    "NetPaths",
    "DROP_REASONS",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    "ensure_switch": "secvf.net.launcher",
    "write_port": "secvf.net.launcher",
    "release_port": "secvf.net.launcher",
    "query": "secvf.net.control",
    "SwitchUnavailable": "secvf.net.control",
    "open_capture": "secvf.net.capture",
    "read_ring": "secvf.net.capture",
    "CaptureStream": "secvf.net.capture",
    "Interface": "secvf.net.capture",
    "Interfaces": "secvf.net.capture",
    "Frame": "secvf.net.capture",
    "Dropped": "secvf.net.capture",
    "PcapngWriter": "secvf.net.pcapng",
    "ConfigError": "secvf.net.config",
    "NetPaths": "secvf.net.config",
    "DROP_REASONS": "secvf.net.engine",
})
