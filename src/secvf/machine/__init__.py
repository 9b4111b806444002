"""Machine builders: turn a VM's config into a QEMU command line.

* :mod:`secvf.machine.generic` — the generic machine builder (generic and
  malware-analysis VMs). It has no way to produce a host-guest channel.
* :mod:`secvf.machine.sandbox` — the AI-sandbox machine builder, the only code
  that creates vsock and virtio-fs devices.

:func:`build_machine` picks the builder from the VM's kind.
"""

from __future__ import annotations

from secvf.machine.plan import MachinePlan, PlannedDevice, build_machine

__all__ = ["MachinePlan", "PlannedDevice", "build_machine"]
