"""Turning ``vm create`` options into a validated :class:`~secvf.model.config.VMConfig`.

Every option is checked here, before anything touches the disk: sizes that cannot
work, a missing or unreadable image/ISO/disk image, conflicting boot sources, and
channel options (shares, workspace) on a kind that must not have channels.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path

from secvf.errors import ConfigError, ForbiddenDevice
from secvf.model.config import (
    MAX_CPUS,
    MAX_DISK_BYTES,
    MAX_MEMORY_MIB,
    MIN_DISK_BYTES,
    MIN_MEMORY_MIB,
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
from secvf.model.sizes import parse_size
from secvf.store.library import DiskError, image_info


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
        InvalidName, ConfigError, DiskError, NotFound (image), ForbiddenDevice.
    """
    validate_name(name)
    if kind is not VMKind.AI_SANDBOX:
        if shares:
            raise ForbiddenDevice("shares", str(kind), "--share is only for ai-sandbox VMs")
        if workspace is not None:
            raise ForbiddenDevice("workspace", str(kind), "--workspace is only for ai-sandbox VMs")
    memory_mib = parse_size(memory, default_unit="M") >> 20
    if not MIN_MEMORY_MIB <= memory_mib <= MAX_MEMORY_MIB:
        raise ConfigError(f"--memory {memory}: must be between {MIN_MEMORY_MIB}M and 1T")
    disk_bytes = parse_size(disk_size, default_unit="G")
    if not MIN_DISK_BYTES <= disk_bytes <= MAX_DISK_BYTES:
        raise ConfigError(f"--disk {disk_size}: must be between 64M and 64T")
    if not 1 <= cpus <= MAX_CPUS:
        raise ConfigError(f"--cpus {cpus}: must be between 1 and {MAX_CPUS}")
    if kind is VMKind.AI_SANDBOX and channels is None:
        from secvf.machine.sandbox import sandbox_channels

        channels = sandbox_channels(name, shares=shares, workspace=workspace)
    data = {
        "id": str(uuid.uuid4()), "name": name, "kind": str(kind), "cpus": cpus,
        "memory_mib": memory_mib, "disk_bytes": disk_bytes,
        "boot": _boot(kind, image, disk_image, iso).model_dump(mode="json"),
        "network": network or _default_network(kind), "mac": new_mac(), "accel": accel,
        "created_at": now_iso(), "updated_at": now_iso(),
    }
    if channels is not None:
        data["channels"] = channels.model_dump(mode="json")
    return parse_config(data, source="vm create options")


def _default_network(kind: VMKind) -> str:
    return NetworkMode.NONE if kind is VMKind.MALWARE_ANALYSIS else NetworkMode.NAT


def _boot(kind: VMKind, image: str | None, disk_image: Path | None,
          iso: Path | None) -> ImageBoot | DiskImageBoot | IsoBoot:
    chosen = [opt for opt, val in (("--image", image), ("--disk-image", disk_image),
                                   ("--iso", iso)) if val is not None]
    if len(chosen) > 1:
        raise ConfigError(f"choose one boot source, not {' and '.join(chosen)}")
    if disk_image is not None:
        path = disk_image.expanduser().resolve()
        fmt = str(image_info(path).get("format", ""))
        if not fmt:
            raise DiskError(f"cannot tell the format of disk image {path}")
        return DiskImageBoot(path=str(path), format=fmt)
    if iso is not None:
        path = iso.expanduser().resolve()
        if not path.is_file():
            raise DiskError(f"ISO {path} does not exist or is not a file")
        with path.open("rb"):
            pass
        return IsoBoot(path=str(path))
    from secvf.image import get_image

    name = image or ("sandbox" if kind is VMKind.AI_SANDBOX else "base")
    info = get_image(name)
    if kind is not VMKind.AI_SANDBOX and info.has_agent:
        raise ForbiddenDevice("image", str(kind),
                              f"image '{name}' contains the exec agent; use 'base'")
    if kind is VMKind.AI_SANDBOX and not info.has_agent:
        raise ConfigError(f"image '{name}' has no exec agent; an ai-sandbox needs 'sandbox'")
    return ImageBoot(image=name, recipe_hash=info.recipe_hash)
