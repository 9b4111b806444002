"""Machine builders: turn a VM's config into a QEMU command line.

* :mod:`secvf.machine.generic` — the generic machine builder (generic and
  malware-analysis VMs). It has no way to produce a host-guest channel.
* :mod:`secvf.machine.sandbox` — the AI-sandbox machine builder, the only code
  that creates vsock and virtio-fs devices.

:func:`build_machine` picks the builder from the VM's kind.

The names below are imported from :mod:`secvf.machine.plan` on first use: the
standard-library-only modules of this package (the seccomp assembler, the share
launcher) run in freshly started helper processes, which must not pay for the
builders' imports (the models and pydantic: 0.2-0.3 s of CPU on the 2-core test host).
"""

from typing import TYPE_CHECKING

from secvf import lazy_exports

if TYPE_CHECKING:  # what _LAZY resolves at run time (a test keeps the two the same)
    from secvf.machine.plan import MachinePlan, PlannedDevice, build_machine

__all__ = ["MachinePlan", "PlannedDevice", "build_machine"]

#: Each name above and the module it is imported from on first use.
_LAZY = dict.fromkeys(__all__, "secvf.machine.plan")

if not TYPE_CHECKING:  # mypy sees the imports above, so a misspelt name stays an error
    __getattr__, __dir__ = lazy_exports(__name__, _LAZY)
