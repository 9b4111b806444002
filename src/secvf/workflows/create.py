"""Turning ``vm create`` options into a validated :class:`~secvf.model.config.VMConfig`.

Every option is checked here, before anything touches the disk: sizes that cannot
work (a disk smaller than the image it sits on, too), a missing or unreadable
image/ISO/disk image, conflicting boot sources, ``--accel kvm`` on a host where KVM
does not work, channel options (shares, workspace) on a kind that must not have
channels, and console logins (a root password, autologin) anywhere but on a generic VM
booted from a SecVF image. A VM bigger than the host (more CPUs or RAM) is allowed, with
a warning logged on ``secvf.workflows.create``.

A root password is never stored: :func:`hash_root_password` turns it into a SHA-512
crypt hash (``openssl passwd -6``), which is all the VM's disk gets.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path

from secvf.errors import ConfigError, ForbiddenDevice, NotFound
from secvf.image import list_images
from secvf.model.config import (
    MAX_CPUS,
    MAX_DISK_BYTES,
    MAX_MEMORY_MIB,
    MIN_DISK_BYTES,
    MIN_MEMORY_MIB,
    Accel,
    ConsoleAccess,
    DiskImageBoot,
    DisplayMode,
    ImageBoot,
    IsoBoot,
    NetworkMode,
    SandboxChannels,
    VMConfig,
    VMKind,
    now_iso,
    parse_config,
)
from secvf.model.names import validate_name
from secvf.model.network import NicRequest, parse_nic_requests
from secvf.model.sizes import format_size, parse_size, round_up_size
from secvf.runtime.accel import kvm_problem
from secvf.store.disks import check_host_file, disk_image_format, image_info
from secvf.store.isos import cached_iso_path
from secvf.store.networks import build_nics

log = logging.getLogger(__name__)

#: Hashes a root password read from stdin as SHA-512 crypt with a random salt.
_PASSWD_HASH_ARGV = ("openssl", "passwd", "-6", "-stdin")


def build_config(
    *,
    name: str,
    kind: VMKind,
    cpus: int = 1,
    memory: str = "1G",
    disk_size: str = "8G",
    image: str | None = None,
    disk_image: Path | None = None,
    iso: Path | str | None = None,
    networks: Sequence[str] = (),
    allow_internet: bool = False,
    accel: str = "auto",
    shares: Sequence[str] = (),
    workspace: Path | None = None,
    channels: SandboxChannels | None = None,
    autologin: bool = False,
    root_password: str | None = None,
    display: str = "none",
) -> VMConfig:
    """Validate create options and return the config of the new VM (nothing is written).

    ``networks`` are ``--network`` values (:func:`secvf.model.network.parse_nic_requests`;
    none given: ``nat``, or no NIC for a malware-analysis VM, which gets ``nat`` only with
    ``allow_internet``). An isolated NIC gets its fixed address here, so the caller holds
    :func:`secvf.store.networks.networks_lock` until the VM's config is written.

    ``iso`` is a file, or (a ``str`` without ``/``) the name of a cached ISO
    (:mod:`secvf.store.isos`), which wins over a file of that name in the current directory.

    ``display`` is ``none`` or ``vnc`` (a graphical console; not for an ai-sandbox, and
    view-only on a malware-analysis VM).

    ``autologin`` (a root shell on the serial console) and ``root_password`` (checked
    here, not kept: see :func:`hash_root_password`) are for generic VMs booted from a
    SecVF image only, and exclude each other.

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
    elif display != DisplayMode.NONE:
        raise ConfigError(f"--display {display}: an ai-sandbox VM has no display; drive it "
                          "with 'secvf vm exec'")
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
    boot = boot_source(kind, image, disk_image, iso, disk_bytes)
    _check_console_login(kind, boot, autologin=autologin, root_password=root_password)
    data = {
        "id": str(uuid.uuid4()), "name": name, "kind": str(kind), "cpus": cpus,
        "memory_mib": memory_mib, "disk_bytes": disk_bytes,
        "boot": boot.model_dump(mode="json"),
        "nics": [n.model_dump(mode="json") for n in
                 build_nics(_nic_requests(name, kind, networks, allow_internet), vm=name)],
        "accel": accel,
        "display": display, "created_at": now_iso(), "updated_at": now_iso(),
    }
    if autologin:
        data["console"] = str(ConsoleAccess.AUTOLOGIN)
    if channels is not None:
        data["channels"] = channels.model_dump(mode="json")
    check_accel(accel)
    config = parse_config(data, source="vm create options")
    _warn_if_bigger_than_host(config)
    return config


def hash_root_password(password: str) -> str:
    """Return the SHA-512 crypt hash (``$6$…``, random salt) of ``password``.

    The password goes to ``openssl passwd -6 -stdin`` on a pipe, never on a command line.

    Raises:
        ConfigError: the password is empty or has a line break or NUL, or openssl is
            missing or fails.
    """
    _check_password(password)
    if shutil.which(_PASSWD_HASH_ARGV[0]) is None:
        raise ConfigError("hashing a root password needs openssl: apt-get install openssl")
    proc = subprocess.run(_PASSWD_HASH_ARGV, input=password + "\n", capture_output=True,
                          text=True, check=False)
    hashed = proc.stdout.strip()
    if proc.returncode != 0 or not hashed.startswith("$6$") or ":" in hashed:
        detail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        raise ConfigError(f"openssl passwd could not hash the root password: {detail[0]}")
    return hashed


def _check_console_login(kind: VMKind, boot: ImageBoot | DiskImageBoot | IsoBoot, *,
                         autologin: bool, root_password: str | None) -> None:
    """Refuse a console login where SecVF's guest init does not run or must not offer one."""
    if not autologin and root_password is None:
        return
    option = "--autologin" if autologin else "a root password"
    if autologin and root_password is not None:
        raise ConfigError("--autologin and a root password exclude each other: autologin "
                          "needs no password")
    if kind is not VMKind.GENERIC:
        way_in = ("its console is output-only" if kind is VMKind.MALWARE_ANALYSIS
                  else "use 'secvf vm exec' to run commands in it")
        raise ConfigError(f"{option} is only for generic VMs: a {kind} VM has no console "
                          f"login ({way_in})")
    if not isinstance(boot, ImageBoot):
        raise ConfigError(f"{option} is only for VMs booted from a SecVF image: the guest "
                          "init that offers the login is part of the image")
    if root_password is not None:
        _check_password(root_password)


def _check_password(password: str) -> None:
    if not password:
        raise ConfigError("the root password is empty")
    if any(c in password for c in "\n\r\0"):
        raise ConfigError("the root password must be one line (no line break or NUL)")


def check_accel(accel: str) -> None:
    """Check that accelerator ``accel`` can run a VM on this host.

    Only ``kvm`` can fail: ``tcg`` always works and ``auto`` falls back to it. The
    verdict is :func:`secvf.runtime.accel.kvm_problem`'s, probed with the kernel of a
    built image when there is one.

    Raises:
        ConfigError: ``accel`` is ``kvm`` and KVM does not work here (with the reason).
    """
    if accel != Accel.KVM:
        return
    image = next(iter(list_images()), None)
    problem = kvm_problem(image.kernel if image else None, image.initrd if image else None)
    if problem is not None:
        raise ConfigError(f"KVM is not usable here: {problem}; use --accel tcg or auto")


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


def _nic_requests(name: str, kind: VMKind, networks: Sequence[str], allow_internet: bool
                  ) -> list[NicRequest]:
    """What ``--network`` asks for, with the kind's default, and a malware-analysis VM's
    internet access (``nat``) only when asked for explicitly."""
    if not networks:
        networks = [NetworkMode.NONE if kind is VMKind.MALWARE_ANALYSIS else NetworkMode.NAT]
    requests = parse_nic_requests(list(networks))
    check_internet(name, kind, requests, allow_internet)
    return requests


def check_internet(name: str, kind: VMKind, requests: list[NicRequest],
                   allow_internet: bool) -> None:
    """Refuse ``nat`` for a malware-analysis VM unless ``allow_internet`` (then warn).

    Raises:
        ConfigError: it asks for ``nat`` without ``allow_internet``.
    """
    if kind is VMKind.MALWARE_ANALYSIS and any(r.mode is NetworkMode.NAT for r in requests):
        if not allow_internet:
            raise ConfigError("--network nat gives a malware-analysis VM (and the sample in "
                              "it) the internet; add --allow-internet if that is what you want, "
                              "or use an isolated network")
        log.warning("malware-analysis VM %s gets the internet (--network nat): a sample in "
                    "it can reach the outside world", name)


def boot_source(kind: VMKind, image: str | None, disk_image: Path | None,
                iso: Path | str | None,
                disk_bytes: int) -> ImageBoot | DiskImageBoot | IsoBoot:
    """The boot source of a new VM of ``kind``, checked like ``vm create`` checks it: one
    source only; an ISO or disk image is a readable regular file outside system trees
    (a disk image standalone, qcow2 or raw); an image is built and fits the kind.

    Raises:
        ConfigError, DiskError (UnsafeDisk), NotFound, ForbiddenDevice.
    """
    chosen = [opt for opt, val in (("--image", image), ("--disk-image", disk_image),
                                   ("--iso", iso)) if val is not None]
    if len(chosen) > 1:
        raise ConfigError(f"choose one boot source, not {' and '.join(chosen)}")
    if disk_image is not None:
        path = check_host_file(disk_image, "disk image")
        fmt = disk_image_format(path)
        size = image_info(path).get("virtual-size")
        _check_disk_fits(disk_bytes, size if isinstance(size, int) else 0, f"disk image {path}")
        return DiskImageBoot(path=str(path), format=fmt)
    if iso is not None:
        cached = cached_iso_path(iso) if isinstance(iso, str) else None
        return IsoBoot(path=str(check_host_file(cached or iso, "ISO")))
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


def _check_disk_fits(disk_bytes: int, base_bytes: int, base: str) -> None:
    """Refuse a ``--disk`` smaller than the disk the VM's overlay sits on."""
    if disk_bytes < base_bytes:
        raise ConfigError(f"--disk {format_size(disk_bytes)} is smaller than {base} "
                          f"({format_size(base_bytes)}); use --disk "
                          f"{format_size(round_up_size(base_bytes))} or more")
