"""The closed sets of values in SecVF's records: a VM's kind, network, accelerator and
display (``vm.json``), and a VM's lifecycle state (its runtime record).

Standard library only: the CLI builds its options from these, and ``vm exec`` checks a
VM's kind and state, without loading pydantic. :mod:`secvf.model.config` and
:mod:`secvf.model.runtime` use them in their schemas and re-export them, so
``from secvf.model.config import VMKind`` names the same class.
"""

from __future__ import annotations

from enum import StrEnum


class VMKind(StrEnum):
    """What a VM is for; picks the machine builder."""

    GENERIC = "generic"
    MALWARE_ANALYSIS = "malware-analysis"
    AI_SANDBOX = "ai-sandbox"


class NetworkMode(StrEnum):
    """How a VM's NIC is attached: QEMU user networking (``nat``) or a port of an isolated
    network's switch (``isolated``); ``none`` (no NIC at all) is only ever a request."""

    NONE = "none"
    NAT = "nat"
    ISOLATED = "isolated"


class Accel(StrEnum):
    """Accelerator choice: ``auto`` probes KVM and falls back to TCG."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class DisplayMode(StrEnum):
    """The VM's graphical console: none, or VNC on a private Unix socket (``vm display``)."""

    NONE = "none"
    VNC = "vnc"


class VmState(StrEnum):
    """Lifecycle state of a VM as ``vm status`` reports it (see runtime/lifecycle.py)."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"  # QEMU holds the vCPUs (QMP ``stop``): ``vm pause`` / ``vm resume``
    STOPPING = "stopping"
    CRASHED = "crashed"


#: States in which a supervisor is alive and its runtime record is the truth.
LIVE_STATES = frozenset({VmState.STARTING, VmState.RUNNING, VmState.PAUSED, VmState.STOPPING})
