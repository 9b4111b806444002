"""Turning ``vm create`` options into a validated :class:`~secvf.model.config.VMConfig`.

Every option is checked here, before anything touches the disk: sizes that cannot
work (a disk smaller than the image it sits on, too), a missing or unreadable
image/ISO/disk image, conflicting boot sources, ``--accel kvm`` on a host where KVM
does not work, and channel options (shares, workspace) on a kind that must not have
channels. A VM bigger than the host (more CPUs or RAM) is allowed, with a warning
logged on ``secvf.workflows.create``.
"""

from __future__ import annotations

import logging
import os
import select
import stat
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path

from secvf.errors import ConfigError, ForbiddenDevice, NotFound
from secvf.model.config import (
    MAX_CPUS,
    MAX_DISK_BYTES,
    MAX_MEMORY_MIB,
    MIN_DISK_BYTES,
    MIN_MEMORY_MIB,
    Accel,
    DiskImageBoot,
    ImageBoot,
    IsoBoot,
    NetworkMode,
    SandboxChannels,
    VMConfig,
    VMKind,
    new_mac,
    now_iso,
    parse_config,
)
from secvf.model.names import validate_name
from secvf.model.sizes import format_size, parse_size, round_up_size
from secvf.runtime.accel import KVM_DEVICE
from secvf.store.library import DiskError, image_info

log = logging.getLogger(__name__)

#: How long the KVM check waits for QEMU's firmware to run its first instructions.
KVM_CHECK_TIMEOUT_S = 5.0

#: QEMU under KVM running only its firmware (SeaBIOS), which writes to the debug console.
_KVM_CHECK_ARGV = (
    "qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-machine", "q35", "-m", "64",
    "-nodefaults", "-no-user-config", "-display", "none",
    "-chardev", "stdio,id=fw", "-device", "isa-debugcon,iobase=0x402,chardev=fw",
)


def build_config(
    *,
    name: str,
    kind: VMKind,
    cpus: int = 1,
    memory: str = "1G",
    disk_size: str = "8G",
    image: str | None = None,
    disk_image: Path | None = None,
    iso: Path | None = None,
    network: str | None = None,
    accel: str = "auto",
    shares: Sequence[str] = (),
    workspace: Path | None = None,
    channels: SandboxChannels | None = None,
) -> VMConfig:
    """Validate create options and return the config of the new VM (nothing is written).

    Raises:
        InvalidName, ConfigError (also: ``kvm`` requested where KVM does not work),
        DiskError, NotFound (image), ForbiddenDevice.
    """
    validate_name(name)
    if kind is not VMKind.AI_SANDBOX:
        if shares:
            raise ForbiddenDevice("shares", str(kind), "--share is only for ai-sandbox VMs")
        if workspace is not None:
            raise ForbiddenDevice("workspace", str(kind), "--workspace is only for ai-sandbox VMs")
    memory_mib = parse_size(memory, default_unit="M") >> 20
    if not MIN_MEMORY_MIB <= memory_mib <= MAX_MEMORY_MIB:
        raise ConfigError(f"--memory {memory}: must be between "
                          f"{format_size(MIN_MEMORY_MIB << 20)} and "
                          f"{format_size(MAX_MEMORY_MIB << 20)}")
    disk_bytes = parse_size(disk_size, default_unit="G")
    if not MIN_DISK_BYTES <= disk_bytes <= MAX_DISK_BYTES:
        raise ConfigError(f"--disk {disk_size}: must be between {format_size(MIN_DISK_BYTES)} "
                          f"and {format_size(MAX_DISK_BYTES)}")
    if not 1 <= cpus <= MAX_CPUS:
        raise ConfigError(f"--cpus {cpus}: must be between 1 and {MAX_CPUS}")
    if kind is VMKind.AI_SANDBOX and channels is None:
        from secvf.machine.sandbox import sandbox_channels

        channels = sandbox_channels(name, shares=shares, workspace=workspace)
    data = {
        "id": str(uuid.uuid4()), "name": name, "kind": str(kind), "cpus": cpus,
        "memory_mib": memory_mib, "disk_bytes": disk_bytes,
        "boot": _boot(kind, image, disk_image, iso, disk_bytes).model_dump(mode="json"),
        "network": network or _default_network(kind), "mac": new_mac(), "accel": accel,
        "created_at": now_iso(), "updated_at": now_iso(),
    }
    if channels is not None:
        data["channels"] = channels.model_dump(mode="json")
    check_accel(accel)
    config = parse_config(data, source="vm create options")
    _warn_if_bigger_than_host(config)
    return config


def check_accel(accel: str) -> None:
    """Check that accelerator ``accel`` can run a VM on this host.

    Only ``kvm`` can fail: ``tcg`` always works and ``auto`` falls back to it.

    Raises:
        ConfigError: ``accel`` is ``kvm`` and KVM does not work here (with the reason).
    """
    if accel != Accel.KVM:
        return
    problem = kvm_problem()
    if problem is not None:
        raise ConfigError(f"KVM is not usable here: {problem}; use --accel tcg or auto")


def kvm_problem() -> str | None:
    """Why KVM does not work on this host, or None if it does (as far as can be seen).

    ``/dev/kvm`` being there is not enough: on some hosts QEMU aborts when the first
    vCPU runs. So this starts QEMU under KVM with nothing but its firmware and waits
    (up to :data:`KVM_CHECK_TIMEOUT_S`) for the firmware's first byte on the debug
    console. If QEMU neither prints nor exits in that time, KVM is not ruled out.
    """
    if not KVM_DEVICE.exists():
        return f"{KVM_DEVICE} does not exist (no KVM module, or no nested virtualization)"
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return f"this user cannot open {KVM_DEVICE} (add it to the 'kvm' group)"
    try:
        qemu = subprocess.Popen(_KVM_CHECK_ARGV, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        return f"cannot run {_KVM_CHECK_ARGV[0]}: {exc.strerror}"
    assert qemu.stdout is not None
    try:
        readable, _, _ = select.select([qemu.stdout], [], [], KVM_CHECK_TIMEOUT_S)
        if not readable or os.read(qemu.stdout.fileno(), 1):
            return None
    finally:
        qemu.kill()
        _, stderr = qemu.communicate()
    lines = [line for line in stderr.decode(errors="replace").splitlines()
             if line.strip() and "warning:" not in line]
    return f"QEMU under KVM failed: {lines[0] if lines else f'exit status {qemu.returncode}'}"


def _warn_if_bigger_than_host(config: VMConfig) -> None:
    host_cpus = os.cpu_count()
    if host_cpus is not None and config.cpus > host_cpus:
        log.warning("--cpus %d is more than this host's %d CPUs; the guest will be slow",
                    config.cpus, host_cpus)
    host_ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    memory = config.memory_mib << 20
    if memory > host_ram:
        log.warning("--memory %s is more than this host's RAM (%s); the guest may be "
                    "killed when it uses it", format_size(memory), format_size(host_ram))


def _default_network(kind: VMKind) -> str:
    return NetworkMode.NONE if kind is VMKind.MALWARE_ANALYSIS else NetworkMode.NAT


def _boot(kind: VMKind, image: str | None, disk_image: Path | None, iso: Path | None,
          disk_bytes: int) -> ImageBoot | DiskImageBoot | IsoBoot:
    chosen = [opt for opt, val in (("--image", image), ("--disk-image", disk_image),
                                   ("--iso", iso)) if val is not None]
    if len(chosen) > 1:
        raise ConfigError(f"choose one boot source, not {' and '.join(chosen)}")
    if disk_image is not None:
        path = _readable_file(disk_image, "disk image")
        info = image_info(path)
        fmt = str(info.get("format", ""))
        if not fmt:
            raise DiskError(f"cannot tell the format of disk image {path}")
        size = info.get("virtual-size")
        _check_disk_fits(disk_bytes, size if isinstance(size, int) else 0, f"disk image {path}")
        return DiskImageBoot(path=str(path), format=fmt)
    if iso is not None:
        return IsoBoot(path=str(_readable_file(iso, "ISO")))
    from secvf.image import RECIPES, get_image

    name = image or ("sandbox" if kind is VMKind.AI_SANDBOX else "base")
    try:
        built = get_image(name)
    except NotFound:
        if name in RECIPES:
            raise  # its message says how to build it
        raise NotFound(f"there is no image called '{name}' "
                       f"(images SecVF can build: {', '.join(sorted(RECIPES))})") from None
    if kind is not VMKind.AI_SANDBOX and built.has_agent:
        raise ForbiddenDevice("image", str(kind),
                              f"image '{name}' contains the exec agent; use 'base'")
    if kind is VMKind.AI_SANDBOX and not built.has_agent:
        raise ConfigError(f"image '{name}' has no exec agent; an ai-sandbox needs 'sandbox'")
    _check_disk_fits(disk_bytes, built.rootfs.stat().st_size, f"image '{name}'")
    return ImageBoot(image=name, recipe_hash=built.recipe_hash)


def _readable_file(path: Path, what: str) -> Path:
    """``path`` made absolute, if it is a regular file this process can read.

    Raises:
        DiskError: it does not exist, is a directory or special file, or cannot be read.
    """
    resolved = Path(os.path.realpath(path.expanduser()))
    try:
        mode = resolved.stat().st_mode
        if stat.S_ISDIR(mode):
            raise DiskError(f"{what} {resolved} is a directory, not a file")
        if not stat.S_ISREG(mode):
            raise DiskError(f"{what} {resolved} is not a regular file")
        with resolved.open("rb"):
            pass
    except FileNotFoundError:
        raise DiskError(f"{what} {resolved} does not exist") from None
    except OSError as exc:
        raise DiskError(f"{what} {resolved} cannot be read: {exc.strerror}") from None
    return resolved


def _check_disk_fits(disk_bytes: int, base_bytes: int, base: str) -> None:
    """Refuse a ``--disk`` smaller than the disk the VM's overlay sits on."""
    if disk_bytes < base_bytes:
        raise ConfigError(f"--disk {format_size(disk_bytes)} is smaller than {base} "
                          f"({format_size(base_bytes)}); use --disk "
                          f"{format_size(round_up_size(base_bytes))} or more")
