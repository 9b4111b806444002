"""Building blocks shared by the machine builders: CPU/memory, QMP, serial, disks,
NIC, RNG, panic device and direct kernel boot. None of them makes a host-guest
channel; the only code that does is :mod:`secvf.machine.sandbox`."""

from __future__ import annotations

import re
import time

from secvf.errors import NotFound
from secvf.image import ImageInfo, list_images
from secvf.machine.plan import MachinePlan
from secvf.model.config import DiskImageBoot, ImageBoot, IsoBoot, NetworkMode, VMConfig, VMKind
from secvf.store.bundle import Bundle, RuntimeFiles

SANDBOX_POLICY = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

#: Host time from building the plan to the guest kernel's clock starting (starting QEMU and
#: its device check, firmware, loading and unpacking the kernel), added to ``secvf_time``;
#: the guest adds its own uptime. Measured under TCG on the 2-core development host with
#: no other VM running (docs/images.md); under KVM not measured, so nothing is added.
PRE_KERNEL_NS = {"tcg": 1_000_000_000, "kvm": 0}


def base_plan(config: VMConfig, bundle: Bundle, files: RuntimeFiles, accel: str) -> MachinePlan:
    """CPU, shared guest RAM, QMP, serial console and QEMU's own sandbox."""
    plan = MachinePlan(vm=config, accel=accel)
    mem = f"{config.memory_mib}M"
    plan.add_backend(
        "-name", f"secvf-{config.id},process=secvf-{config.name[:15]}",
        "-nodefaults", "-no-user-config", "-display", "none", "-msg", "timestamp=on",
        "-machine", "q35,memory-backend=mem0",
        "-accel", accel,
        "-cpu", "host" if accel == "kvm" else "max",
        "-smp", str(config.cpus),
        "-m", mem,
        "-object", f"memory-backend-memfd,id=mem0,size={mem},share=on",
        "-sandbox", SANDBOX_POLICY,
        "-S",
        "-chardev", f"socket,id=qmp0,path={files.qmp_socket},server=on,wait=off",
        "-mon", "chardev=qmp0,mode=control",
    )
    add_serial(plan, config, bundle, files)
    return plan


def add_serial(plan: MachinePlan, config: VMConfig, bundle: Bundle, files: RuntimeFiles) -> None:
    """Serial console: logged always; attachable only if the kind allows console input."""
    log = f"{bundle.serial_log}"
    if config.kind is VMKind.MALWARE_ANALYSIS:
        plan.add_backend("-chardev", f"file,id=ser0,path={log},append=on")
    else:
        plan.add_backend(
            "-chardev",
            f"socket,id=ser0,path={files.console_socket},server=on,wait=off,"
            f"logfile={log},logappend=on",
        )
    plan.add_backend("-serial", "chardev:ser0")


def add_boot_and_disks(plan: MachinePlan, config: VMConfig, bundle: Bundle) -> None:
    """The VM's disk, plus direct kernel boot (image) or a read-only cdrom (ISO)."""
    plan.add_backend(
        "-drive", f"file={bundle.disk},if=none,id=disk0,format=qcow2,discard=unmap"
    )
    plan.add_device("virtio-blk-pci", "disk0dev", "system disk", drive="disk0", bootindex="1")
    boot = config.boot
    if isinstance(boot, ImageBoot):
        image = resolve_image(boot)
        cmdline = " ".join([image.cmdline, *kernel_params(config, plan.accel),
                            *plan.kernel_params])
        plan.add_backend("-kernel", str(image.kernel), "-initrd", str(image.initrd),
                         "-append", cmdline)
    elif isinstance(boot, IsoBoot):
        plan.add_backend(
            "-drive", f"file={boot.path},if=none,id=cd0,media=cdrom,readonly=on,format=raw"
        )
        plan.add_device("ide-cd", "cd0dev", "installer ISO (read-only)", drive="cd0",
                        bootindex="0")
    elif isinstance(boot, DiskImageBoot):
        pass


def kernel_params(config: VMConfig, accel: str) -> list[str]:
    """Parameters SecVF's guest init reads: hostname, network, what the serial console
    offers, and the host's time now plus :data:`PRE_KERNEL_NS` for ``accel`` (the guest
    sets its clock from it)."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", config.name)[:63].strip("-") or "secvf"
    guest_time = time.time_ns() + PRE_KERNEL_NS.get(accel, 0)
    return [f"secvf_hostname={host}", f"secvf_net={config.network}",
            f"secvf_console={config.console}", f"secvf_time={guest_time}"]


def add_nic(plan: MachinePlan, config: VMConfig) -> None:
    """One virtio NIC on QEMU user networking (NAT), or none at all."""
    if config.network is NetworkMode.NAT:
        plan.add_backend("-netdev", "user,id=net0")
        plan.add_device("virtio-net-pci", "net0dev", "NIC (NAT)", netdev="net0", mac=config.mac)


def add_platform_devices(plan: MachinePlan) -> None:
    """Entropy for the guest (fast first boot) and a panic notifier."""
    plan.add_backend("-object", "rng-random,id=rng0,filename=/dev/urandom")
    plan.add_device("virtio-rng-pci", "rng0dev", "entropy source", rng="rng0")
    plan.add_device("pvpanic", "panic0", "guest panic notifier")


def resolve_image(boot: ImageBoot) -> ImageInfo:
    """Find the exact image build a VM's overlay is based on."""
    for image in list_images():
        if image.name == boot.image and image.recipe_hash == boot.recipe_hash:
            return image
    raise NotFound(
        f"image '{boot.image}' (build {boot.recipe_hash[:12]}) that this VM's disk is based on"
        f" is missing; run: secvf image build {boot.image}  (a VM based on a removed build"
        " must be recreated)"
    )
