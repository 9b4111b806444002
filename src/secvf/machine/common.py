"""Building blocks shared by the machine builders: CPU/memory, QMP, serial, disks and
the cdrom drive, the graphical console, NIC, RNG, panic device and direct kernel boot.
None of them makes a host-guest channel; the only code that does is
:mod:`secvf.machine.sandbox`."""

from __future__ import annotations

import re
import time

from secvf.errors import NotFound
from secvf.image import ImageInfo, list_images
from secvf.machine.network import nics_kernel_param
from secvf.machine.plan import MachinePlan, RunMode
from secvf.model.config import (
    DiskImageBoot,
    DisplayMode,
    ImageBoot,
    IsoBoot,
    VMConfig,
    VMKind,
)
from secvf.store.bundle import Bundle, RuntimeFiles

SANDBOX_POLICY = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

#: qdev id of the cdrom drive of an ISO-installed VM (``vm media`` changes its medium).
CDROM_DEVICE_ID = "cd0dev"

#: Host time from building the plan to the guest kernel's clock starting (starting QEMU and
#: its device check, firmware, loading and unpacking the kernel), added to ``secvf_time``;
#: the guest adds its own uptime. Under TCG on the 2-core development host it was 0.5-0.7 s
#: for one VM booting on an idle host, 0.5-1.1 s for one VM, up to 3.3 s while others booted
#: (docs/images.md, "The clock"); under KVM it was not measured, so nothing is added.
PRE_KERNEL_NS = {"tcg": 600_000_000, "kvm": 0}


def base_plan(config: VMConfig, bundle: Bundle, files: RuntimeFiles, accel: str,
              mode: RunMode = RunMode.COLD) -> MachinePlan:
    """CPU, guest RAM, QMP, serial console and QEMU's own sandbox; a restore waits for
    its saved state (``-incoming defer``).

    Guest RAM is the file :attr:`RuntimeFiles.ram_file` on a memory filesystem, mapped
    shared: vhost-user device helpers map it too, and saving the guest's state copies
    that file instead of streaming the RAM through QEMU (migration capability
    ``x-ignore-shared``). The supervisor creates the file before QEMU starts.
    """
    plan = MachinePlan(vm=config, accel=accel, mode=mode,
                       cpu_model="host" if accel == "kvm" else "max")
    mem = f"{config.memory_mib}M"
    ram = _option_value(str(files.ram_file))
    plan.add_backend(
        "-name", f"secvf-{config.id},process=secvf-{config.name[:15]}",
        "-nodefaults", "-no-user-config", "-display", "none", "-msg", "timestamp=on",
        "-machine", "q35,memory-backend=mem0",
        "-accel", accel,
        "-cpu", plan.cpu_model,
        "-smp", str(config.cpus),
        "-m", mem,
        "-object", f"memory-backend-file,id=mem0,size={mem},mem-path={ram},share=on",
        "-sandbox", SANDBOX_POLICY,
        "-S",
        "-chardev", f"socket,id=qmp0,path={files.qmp_socket},server=on,wait=off",
        "-mon", "chardev=qmp0,mode=control",
    )
    if mode is RunMode.RESTORE:
        plan.add_backend("-incoming", "defer")
    add_serial(plan, config, bundle, files)
    return plan


#: The chardevs of the serial console (ttyS0) and of a malware-analysis VM's monitor
#: port (ttyS1).
CONSOLE_CHARDEV = "ser0"
MONITOR_CHARDEV = "ser1"


def add_serial(plan: MachinePlan, config: VMConfig, bundle: Bundle, files: RuntimeFiles) -> None:
    """Serial console: logged always; attachable only if the kind allows console input.

    A malware-analysis VM's serial ports are files QEMU appends to (a file chardev takes
    no input, so nothing can be typed into the guest), and it has a second one, ttyS1:
    the monitor log of the image's detonator (``secvf analyze``)."""
    log = f"{bundle.serial_log}"
    if config.kind is VMKind.MALWARE_ANALYSIS:
        plan.add_backend("-chardev", f"file,id={CONSOLE_CHARDEV},path={log},append=on")
        plan.add_backend("-serial", f"chardev:{CONSOLE_CHARDEV}")
        plan.add_backend("-chardev",
                         f"file,id={MONITOR_CHARDEV},path={bundle.monitor_log},append=on",
                         "-serial", f"chardev:{MONITOR_CHARDEV}")
        return
    plan.add_backend(
        "-chardev",
        f"socket,id={CONSOLE_CHARDEV},path={files.console_socket},server=on,wait=off,"
        f"logfile={log},logappend=on",
    )
    plan.add_backend("-serial", f"chardev:{CONSOLE_CHARDEV}")


def add_boot_and_disks(plan: MachinePlan, config: VMConfig, bundle: Bundle) -> None:
    """The VM's disk, plus direct kernel boot (image) or a read-only cdrom drive (ISO).

    Firmware boot order: the disk first, then the cdrom. SeaBIOS boots a disk only if its
    first sector carries the boot signature, so the blank disk of a new ISO install falls
    through to the installer on the cdrom, and once the installer has made the disk
    bootable the VM boots its installed system, whether the ISO is still inserted or not.
    An ejected cdrom (``vm media eject``) starts as an empty drive.
    """
    plan.add_backend(
        "-drive", f"file={bundle.disk},if=none,id=disk0,format=qcow2,discard=unmap"
    )
    # bootindex 0 is taken by QEMU's linuxboot ROM when the image's kernel is booted directly
    plan.add_device("virtio-blk-pci", "disk0dev", "system disk", drive="disk0", bootindex="1")
    boot = config.boot
    if isinstance(boot, ImageBoot):
        image = resolve_image(boot)
        cmdline = " ".join([image.cmdline, *kernel_params(config, plan.accel),
                            *plan.kernel_params])
        plan.add_backend("-kernel", str(image.kernel), "-initrd", str(image.initrd),
                         "-append", cmdline)
        if has_sample_drive(config):  # on virtio-scsi: the cloud kernel has no AHCI driver
            plan.add_backend("-drive", "if=none,id=cd0,media=cdrom,readonly=on")
            plan.add_device("virtio-scsi-pci", "scsi0", "controller of the sample drive")
            plan.add_device("scsi-cd", CDROM_DEVICE_ID, "sample drive (read-only, empty)",
                            drive="cd0", bus="scsi0.0")
    elif isinstance(boot, IsoBoot):
        medium = "" if boot.ejected else f"file={_option_value(boot.path)},format=raw,"
        plan.add_backend("-drive", f"{medium}if=none,id=cd0,media=cdrom,readonly=on")
        plan.add_device("ide-cd", CDROM_DEVICE_ID, "cdrom drive (read-only)", drive="cd0",
                        bootindex="2")
    elif isinstance(boot, DiskImageBoot):
        pass


def has_sample_drive(config: VMConfig) -> bool:
    """Whether ``config``'s VM has an empty read-only cdrom drive for sample media: every
    malware-analysis VM booted from a SecVF image (``secvf analyze`` inserts the sample's
    medium over QMP; the image's detonator waits for it)."""
    return config.kind is VMKind.MALWARE_ANALYSIS and isinstance(config.boot, ImageBoot)


def has_cdrom(config: VMConfig) -> bool:
    """Whether ``config``'s VM has a cdrom drive (``vm media``, ``secvf analyze``)."""
    return isinstance(config.boot, IsoBoot) or has_sample_drive(config)


def kernel_params(config: VMConfig, accel: str) -> list[str]:
    """Parameters SecVF's guest init reads: hostname, network, what the serial console
    offers, and the host's time now plus :data:`PRE_KERNEL_NS` for ``accel`` (the guest
    sets its clock from it)."""
    host = guest_hostname(config.name)
    guest_time = time.time_ns() + PRE_KERNEL_NS.get(accel, 0)
    return [f"secvf_hostname={host}", nics_kernel_param(config),
            f"secvf_console={config.console}", f"secvf_time={guest_time}"]


_TIME_PARAM = re.compile(r"\bsecvf_time=\d+")


def restamp_kernel_time(argv: list[str], accel: str) -> list[str]:
    """``argv`` with its ``secvf_time=`` set again for now: the plan is built before the
    device helpers and the jails start, which takes a while; QEMU starts right after."""
    stamp = f"secvf_time={time.time_ns() + PRE_KERNEL_NS.get(accel, 0)}"
    return [_TIME_PARAM.sub(stamp, arg) for arg in argv]


def guest_hostname(name: str) -> str:
    """The guest hostname of VM ``name``: its name, made a valid host name."""
    return re.sub(r"[^A-Za-z0-9-]", "-", name)[:63].strip("-") or "secvf"


def add_display(plan: MachinePlan, config: VMConfig, files: RuntimeFiles) -> None:
    """The graphical console of a ``--display vnc`` VM: a standard VGA adapter and QEMU's
    VNC server on the VM's private Unix socket (never a TCP port).

    Input is a USB tablet (an absolute pointer, so a VNC client's mouse lines up) and
    the machine's PS/2 keyboard. A malware-analysis VM's console is view-only, as its
    serial console is output-only: it gets neither the tablet nor the PS/2 controller
    (``i8042=off``), so keys and clicks a VNC client sends reach no device in the guest.
    None of these devices is a host-guest channel: pixels go out to the VNC client, key
    and pointer events come in, and no host process or file is reachable through them
    (see :mod:`secvf.model.channels`).
    """
    if config.display is DisplayMode.NONE:
        return
    plan.add_backend("-vnc", f"unix:{_option_value(str(files.vnc_socket))}")
    plan.add_device("VGA", "vga0", "graphical console (VNC)")
    if display_is_view_only(config):
        plan.add_backend("-machine", "i8042=off")
        return
    plan.add_device("qemu-xhci", "usb0", "USB controller (console pointer)")
    plan.add_device("usb-tablet", "tablet0", "console pointer (absolute)", bus="usb0.0")


def display_is_view_only(config: VMConfig) -> bool:
    """Whether ``config``'s graphical console has no input devices: a malware-analysis
    VM's, as its serial console takes no input either."""
    return config.kind is VMKind.MALWARE_ANALYSIS


def _option_value(text: str) -> str:
    """``text`` as the value of a QEMU ``key=value,…`` option (a comma doubled)."""
    return text.replace(",", ",,")


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
