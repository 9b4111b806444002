"""The machine plan: QEMU arguments plus the list of guest-visible devices they create.

A plan is data, built before anything starts: the supervisor runs it, ``secvf
audit`` reads it for stopped VMs, and tests inspect it. Builders add devices only
through :meth:`MachinePlan.add_device`, so the device list and the command line
cannot disagree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from secvf.errors import ForbiddenDevice
from secvf.model.channels import channel_of
from secvf.model.config import VMConfig, VMKind
from secvf.store.bundle import Bundle, RuntimeFiles


@dataclass(frozen=True)
class PlannedDevice:
    """One ``-device`` of the plan."""

    id: str  # QEMU device id (qdev id)
    driver: str  # QEMU device type, e.g. virtio-blk-pci
    purpose: str  # what it is for, shown by status/audit


@dataclass(frozen=True)
class HelperSpec:
    """A host process a device needs, started (and ready) before QEMU.

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


@dataclass
class MachinePlan:
    """Everything the supervisor needs to launch QEMU for one run of one VM."""

    vm: VMConfig  # the VM this plan is for
    accel: str  # "kvm" or "tcg"
    args: list[str] = field(default_factory=list)  # QEMU arguments (no binary)
    devices: list[PlannedDevice] = field(default_factory=list)  # guest-visible devices
    kernel_params: list[str] = field(default_factory=list)  # appended to the image cmdline
    helpers: list[HelperSpec] = field(default_factory=list)  # started before QEMU

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

    @property
    def argv_tail(self) -> list[str]:
        """The arguments after the QEMU binary."""
        return list(self.args)


def build_machine(config: VMConfig, bundle: Bundle, files: RuntimeFiles, accel: str) -> MachinePlan:
    """Build the plan for ``config`` with the builder its kind calls for."""
    if config.kind is VMKind.AI_SANDBOX:
        from secvf.machine.sandbox import build_sandbox_machine

        return build_sandbox_machine(config, bundle, files, accel)
    from secvf.machine.generic import build_generic_machine

    return build_generic_machine(config, bundle, files, accel)


def qemu_binary() -> str:
    """The QEMU system emulator SecVF drives (``$SECVF_QEMU`` overrides it, e.g. for a
    custom build; the live device-tree check applies to whatever it starts)."""
    return os.environ.get("SECVF_QEMU", "qemu-system-x86_64")

