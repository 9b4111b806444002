"""The generic machine builder (the original's ``createVirtualMachine()``).

Builds the QEMU machine for ``generic`` and ``malware-analysis`` VMs: disk(s), a
read-only cdrom drive for ISO installs, a NIC per the network setting, the serial
console, an optional graphical console (VNC on a private Unix socket; view-only on a
malware-analysis VM), virtio-rng and a pvpanic notifier. It has **no way** to produce a vsock,
virtio-fs, 9p, virtio-serial or guest-agent device: nothing here constructs one,
a config that asks for one is refused, and :meth:`MachinePlan.add_device`
rejects any channel device for these kinds as a last line of defence.
"""

from __future__ import annotations

from secvf.errors import ConfigError, ForbiddenDevice
from secvf.machine.common import (
    add_boot_and_disks,
    add_display,
    add_platform_devices,
    base_plan,
)
from secvf.machine.network import add_nics
from secvf.machine.plan import MachinePlan, RunMode
from secvf.model.config import VMConfig, VMKind
from secvf.store.bundle import Bundle, RuntimeFiles

GENERIC_KINDS = frozenset({VMKind.GENERIC, VMKind.MALWARE_ANALYSIS})


def build_generic_machine(
    config: VMConfig, bundle: Bundle, files: RuntimeFiles, accel: str,
    mode: RunMode = RunMode.COLD,
) -> MachinePlan:
    """Return the plan for a generic or malware-analysis VM (the same machine for a cold
    boot and a restore, which only waits for its saved state).

    Raises:
        ForbiddenDevice: the config is not of a generic kind or carries channels.
        NotFound: the VM's base image is gone.
        ConfigError: ``mode`` is ``template`` for a generic VM (a malware-analysis VM's
            template machine is its normal machine: ``secvf analyze``'s clean state).
    """
    if config.kind not in GENERIC_KINDS:
        raise ForbiddenDevice("kind", str(config.kind), "use the AI-sandbox machine builder")
    if config.channels is not None:
        raise ForbiddenDevice("channels", str(config.kind))
    if mode is RunMode.TEMPLATE and config.kind is not VMKind.MALWARE_ANALYSIS:
        raise ConfigError(f"VM '{config.name}' is a {config.kind} VM: only AI sandboxes and "
                          "malware-analysis VMs (secvf analyze's clean states) are saved as "
                          "templates")
    plan = base_plan(config, bundle, files, accel, mode)
    add_boot_and_disks(plan, config, bundle)
    add_display(plan, config, files)
    add_nics(plan, config)
    add_platform_devices(plan)
    return plan
