"""The machine plan: QEMU arguments plus the list of guest-visible devices they create.

A plan is data, built before anything starts: the supervisor runs it, ``secvf
audit`` reads it for stopped VMs, and tests inspect it. Builders add devices only
through :meth:`MachinePlan.add_device`, so the device list and the command line
cannot disagree.
"""

from __future__ import annotations

import functools
import os
import subprocess
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from secvf.errors import ForbiddenDevice, LaunchFailed
from secvf.model.channels import channel_of
from secvf.model.config import VMConfig, VMKind
from secvf.model.savedstate import MachineShape
from secvf.store.bundle import Bundle, RuntimeFiles


class RunMode(StrEnum):
    """How one run of a VM begins."""

    COLD = "cold"  # boot the guest; a sandbox has its channel devices from the start
    RESTORE = "restore"  # load a saved state; a sandbox's channels are hot-plugged after
    TEMPLATE = "template"  # boot a sandbox guest to save as a template: spare slots, no channel


@dataclass(frozen=True)
class PlannedDevice:
    """One ``-device`` of the plan."""

    id: str  # QEMU device id (qdev id)
    driver: str  # QEMU device type, e.g. virtio-blk-pci
    purpose: str  # what it is for, shown by status/audit


@dataclass(frozen=True)
class HelperSpec:
    """A host process a device needs, started (and ready) before QEMU - or, when it
    serves only a hot-plugged device (``for_hotplug``), while QEMU starts.

    Readiness is one of: the helper writes a line to the fd given by
    ``--ready-fd N`` (``ready_fd_arg``), or the supervisor binds and listens on
    ``listen_socket`` itself and hands the helper the listening fd (``fd_arg``,
    formatted with ``{fd}``), so QEMU's connect waits in the backlog. Every helper is
    critical: if one dies while the VM runs, the supervisor stops the VM as crashed.
    """

    name: str  # short name for logs and status, e.g. "vsock"
    argv: tuple[str, ...]  # command line (without the readiness argument)
    ready_fd_arg: str | None = None  # e.g. "--ready-fd"
    listen_socket: Path | None = None  # socket the supervisor creates for the helper
    fd_arg: str | None = None  # e.g. "--fd={fd}"
    for_hotplug: bool = False  # its device is hot-plugged: QEMU's command line has no use


@dataclass(frozen=True)
class HotplugDevice:
    """A device added over QMP once the guest runs (a restored sandbox's channels):
    ``chardev-add`` with :attr:`chardev`, then ``device_add`` with :attr:`device`."""

    device: dict[str, Any]  # device_add arguments (driver, id, bus, properties)
    chardev: dict[str, Any]  # chardev-add arguments (id, backend)
    purpose: str  # what it is for, shown by status/audit

    @property
    def planned(self) -> PlannedDevice:
        """The device as the plan lists it."""
        return PlannedDevice(str(self.device["id"]), str(self.device["driver"]), self.purpose)


@dataclass(frozen=True)
class SwitchPort:
    """One NIC's port on its network's switch: what the supervisor registers."""

    netdir: Path  # the network's runtime directory
    switch_config: dict[str, Any]  # the network's switch.json
    record: dict[str, Any]  # the port's ports/<port>.json (without the supervisor's pid)

    @property
    def name(self) -> str:
        """The port's name (``a1b2c3d4-0``)."""
        return str(self.record["port"])


@dataclass
class MachinePlan:
    """Everything the supervisor needs to launch QEMU for one run of one VM."""

    vm: VMConfig  # the VM this plan is for
    accel: str  # "kvm" or "tcg"
    mode: RunMode = RunMode.COLD  # how the run begins
    args: list[str] = field(default_factory=list)  # QEMU arguments (no binary)
    devices: list[PlannedDevice] = field(default_factory=list)  # guest-visible devices
    kernel_params: list[str] = field(default_factory=list)  # appended to the image cmdline
    helpers: list[HelperSpec] = field(default_factory=list)  # started before QEMU
    hotplug: list[HotplugDevice] = field(default_factory=list)  # added once the guest runs
    # devices the supervisor may unplug and plug again to recover a dead channel, by
    # the name of the helper that serves them (the helper is restarted in between)
    replug: dict[str, HotplugDevice] = field(default_factory=dict)
    cpu_model: str = "max"  # the -cpu value
    # isolated NICs' switch ports, registered by the supervisor before QEMU starts
    switch_ports: list[SwitchPort] = field(default_factory=list)

    def add_backend(self, *args: str) -> None:
        """Add host-side arguments that create no guest device (-object, -netdev, ...)."""
        self.args.extend(args)

    def add_device(self, driver: str, dev_id: str, purpose: str, **props: str) -> None:
        """Add one ``-device``; refuses a channel device on a non-sandbox VM."""
        if self.vm.kind is not VMKind.AI_SANDBOX and channel_of(driver):
            raise ForbiddenDevice(f"device:{driver}", str(self.vm.kind))
        opts = ",".join([driver, f"id={dev_id}", *(f"{k}={v}" for k, v in props.items())])
        self.args += ["-device", opts]
        self.devices.append(PlannedDevice(dev_id, driver, purpose))

    def add_hotplug(self, device: HotplugDevice) -> None:
        """Add a device to hot-plug once the guest runs; refuses a channel device on a
        non-sandbox VM, as :meth:`add_device` does."""
        driver = str(device.device["driver"])
        if self.vm.kind is not VMKind.AI_SANDBOX and channel_of(driver):
            raise ForbiddenDevice(f"device:{driver}", str(self.vm.kind))
        self.hotplug.append(device)

    @property
    def argv_tail(self) -> list[str]:
        """The arguments after the QEMU binary."""
        return list(self.args)

    def shape(self) -> MachineShape:
        """What a state saved from this machine depends on (see
        :class:`~secvf.model.savedstate.MachineShape`); hot-plugged devices excluded.

        Raises:
            LaunchFailed: the QEMU binary cannot tell its version.
        """
        return MachineShape(qemu_version=qemu_version(), cpu_model=self.cpu_model,
                            cpus=self.vm.cpus, memory_mib=self.vm.memory_mib, accel=self.accel,
                            devices=[f"{d.driver}:{d.id}" for d in self.devices])


def build_machine(config: VMConfig, bundle: Bundle, files: RuntimeFiles, accel: str,
                  mode: RunMode = RunMode.COLD, *, id_base: int | None = None) -> MachinePlan:
    """Build the plan for ``config`` with the builder its kind calls for. ``id_base``:
    the first host id of the VM's jail identity block, which its share servers map
    guest ids into (None: the invoking user's ``/etc/subuid`` range).

    Raises:
        ConfigError: ``mode`` is ``template`` for a VM that is not an AI sandbox.
    """
    if config.kind is VMKind.AI_SANDBOX:
        from secvf.machine.sandbox import build_sandbox_machine

        return build_sandbox_machine(config, bundle, files, accel, mode, id_base=id_base)
    from secvf.machine.generic import build_generic_machine

    return build_generic_machine(config, bundle, files, accel, mode)


@functools.cache
def qemu_version() -> str:
    """The version QEMU reports (``7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)``), once per
    process.

    Raises:
        LaunchFailed: the binary cannot be run or prints no version.
    """
    argv = [qemu_binary(), "--version"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LaunchFailed("QEMU", argv, str(exc), None) from exc
    first = out.stdout.splitlines()[0] if out.stdout.strip() else ""
    if "version " not in first:
        raise LaunchFailed("QEMU", argv, out.stdout + out.stderr, out.returncode)
    return first.split("version ", 1)[1].strip()


def qemu_binary() -> str:
    """The QEMU system emulator SecVF drives (``$SECVF_QEMU`` overrides it, e.g. for a
    custom build; the live device-tree check applies to whatever it starts)."""
    return os.environ.get("SECVF_QEMU", "qemu-system-x86_64")

