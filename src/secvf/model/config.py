"""The VM bundle's ``vm.json``: schema, validation and atomic persistence.

``vm.json`` is the single source of truth for a VM's configuration. It is
validated with pydantic on every read, so a hand-edited or corrupt file gives a
one-line error naming the file and the field instead of a traceback. Host-guest
channels (vsock, virtio-fs shares) live only in :class:`SandboxChannels`, which
only an ``ai-sandbox`` VM may carry; any other attempt to describe a channel in
``vm.json`` is refused as :class:`~secvf.errors.ForbiddenDevice`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from secvf.errors import ConfigError, ForbiddenDevice, InvalidName
from secvf.model.enums import Accel as Accel  # re-exported: defined without pydantic
from secvf.model.enums import DisplayMode as DisplayMode
from secvf.model.enums import NetworkMode as NetworkMode
from secvf.model.enums import VMKind as VMKind
from secvf.model.names import validate_name

MIN_MEMORY_MIB = 128
MAX_MEMORY_MIB = 1 << 20
MAX_CPUS = 64
MIN_DISK_BYTES = 64 << 20
MAX_DISK_BYTES = 64 << 40
#: A malware-analysis VM's serial and monitor logs are cut at this size (the guest
#: writes them; the host must not fill up): default and bounds.
GUEST_LOG_MAX_BYTES = 64 << 20
MIN_GUEST_LOG_BYTES = 64 << 10
MAX_GUEST_LOG_BYTES = 16 << 30
DEFAULT_GUEST_CID = 3

#: Field names that describe a host-guest channel. Seen anywhere outside
#: ``channels`` (or in ``channels`` of a non-sandbox VM) they are refused by name.
CHANNEL_FIELDS = frozenset(
    {
        "channels", "vsock", "vhost_vsock", "vsock_cid", "guest_cid", "shares", "virtiofs",
        "virtio_fs", "9p", "virtio_9p", "p9", "virtio_serial", "serial_ports", "guest_agent",
        "qga", "workspace", "extra_args", "qemu_args", "devices",
    }
)


class ConsoleAccess(StrEnum):
    """What the guest of a SecVF image offers on its serial console (``secvf_console``)."""

    OUTPUT_ONLY = "output-only"  # nothing reads the console (malware analysis, AI sandbox)
    LOGIN = "login"  # a getty: root logs in with the password set at create (none: a hint)
    AUTOLOGIN = "autologin"  # a root shell without a password (throwaway VMs)


def default_console(data: dict[str, Any]) -> ConsoleAccess:
    """The console of a VM whose config does not say: a login on a generic VM, output only
    on every other kind."""
    return ConsoleAccess.LOGIN if data.get("kind") is VMKind.GENERIC else ConsoleAccess.OUTPUT_ONLY


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class ImageBoot(_Strict):
    """Boot the kernel/initrd of a SecVF-built image; disk is an overlay of its rootfs."""

    type: Literal["image"] = "image"
    image: str  # image name, e.g. "base"
    recipe_hash: str  # which build of it the overlay is based on


class DiskImageBoot(_Strict):
    """Boot a user-supplied disk image (firmware boot); disk is an overlay of it."""

    type: Literal["disk-image"] = "disk-image"
    path: str  # absolute path of the base disk image
    format: str  # qemu-img format of the base (raw, qcow2, ...)


class IsoBoot(_Strict):
    """Install from an ISO: a blank disk, booted first once it is bootable, and a read-only
    cdrom drive (``vm media eject|insert`` changes its medium)."""

    type: Literal["iso"] = "iso"
    path: str  # absolute path of the ISO last put in the drive (vm create --iso, vm media)
    ejected: bool = False  # vm media eject: the drive is empty at the next start

    @model_serializer(mode="wrap")
    def _only_when_ejected(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """``ejected`` is written only when true: the boot of a VM whose drive holds its
        ISO stays what SecVF wrote before there was ``vm media``."""
        data: dict[str, Any] = handler(self)
        if not self.ejected:
            data.pop("ejected", None)
        return data


Boot = Annotated[ImageBoot | DiskImageBoot | IsoBoot, Field(discriminator="type")]


class Share(_Strict):
    """A virtio-fs share of an AI-sandbox VM."""

    tag: str  # virtio-fs mount tag, also the share's name
    host_path: str  # absolute, resolved host directory
    guest_path: str  # absolute mount point in the guest
    read_only: bool  # enforced on the host side


MAC_PATTERN = r"^52:54:00(:[0-9a-f]{2}){3}$"
#: NICs a VM may have (QEMU's q35 has room for more; nobody needs more here).
MAX_NICS = 8


class Nic(_Strict):
    """One virtio NIC of a VM: on QEMU user networking (``nat``) or a port of an isolated
    network's switch (``isolated``, with the network's name)."""

    mode: NetworkMode
    network: str | None = None  # the isolated network's name
    mac: str = Field(pattern=MAC_PATTERN)
    # fixed IPv4 address with prefix length ("10.0.100.5/24") from the network's IPAM;
    # None: the guest configures the NIC itself (--no-ipam, nat)
    address: str | None = None
    router: bool = False  # the network's router port (reaches every guest with --isolate-guests)

    @model_validator(mode="after")
    def _fits_mode(self) -> Nic:
        if self.mode is NetworkMode.NONE:
            raise ValueError("a NIC is 'nat' or 'isolated'; 'none' means no NIC")
        if self.mode is NetworkMode.ISOLATED:
            if self.network is None:
                raise ValueError("an isolated NIC names its network")
            try:
                validate_name(self.network, "network")
            except InvalidName as exc:
                raise ValueError(str(exc)) from None
            if self.address is not None:
                ipaddress.IPv4Interface(self.address)  # ValueError names the problem
        elif self.network is not None or self.address is not None or self.router:
            raise ValueError("a nat NIC has no network, address or router flag")
        return self

    def describe(self) -> str:
        """``nat``, ``isolated:lab`` or ``isolated:lab (router)``."""
        if self.mode is NetworkMode.NAT:
            return "nat"
        return f"isolated:{self.network}" + (" (router)" if self.router else "")


def network_summary(nics: list[Nic]) -> str:
    """A VM's networks in one word-list (``none``, ``nat``, ``nat,isolated:lab``): what
    ``vm list`` shows and what a sandbox template's key records."""
    return ",".join(n.describe() for n in nics) or str(NetworkMode.NONE)


class SandboxChannels(_Strict):
    """The host-guest channels of an AI-sandbox VM (and only of one)."""

    guest_cid: int = Field(default=DEFAULT_GUEST_CID, ge=3, le=0xFFFFFFFE)  # guest's vsock CID
    vsock_backend: Literal["userspace", "kernel"] = "userspace"
    shares: list[Share] = []
    # the sandbox template the disk was created over (a session restores it at its first start)
    template: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class VMConfig(_Strict):
    """Validated content of a VM's ``vm.json``."""

    # vm.json format version; a new format bumps it (version 1 had one "network" and
    # one "mac" instead of "nics" and is read as its version 2 equivalent)
    schema_version: Literal[2] = 2
    id: str  # UUID, stable for the VM's life (names the runtime files)
    name: str
    kind: VMKind
    cpus: int = Field(ge=1, le=MAX_CPUS)
    memory_mib: int = Field(ge=MIN_MEMORY_MIB, le=MAX_MEMORY_MIB)
    disk_bytes: int = Field(ge=MIN_DISK_BYTES, le=MAX_DISK_BYTES)
    boot: Boot
    nics: list[Nic] = Field(default=[], max_length=MAX_NICS)
    accel: Accel = Accel.AUTO
    # serial console of an image-booted VM; only a generic VM's can take input
    console: ConsoleAccess = Field(default_factory=default_console)
    # graphical console; never on an AI sandbox, view-only (no input devices) for malware analysis
    display: DisplayMode = DisplayMode.NONE
    channels: SandboxChannels | None = None
    # where a malware-analysis VM's file-backed serial ports (console, monitor) are cut
    guest_log_max_bytes: int = Field(default=GUEST_LOG_MAX_BYTES, ge=MIN_GUEST_LOG_BYTES,
                                     le=MAX_GUEST_LOG_BYTES)
    created_at: str
    updated_at: str

    @model_validator(mode="before")
    @classmethod
    def _upgrade_version_1(cls, data: object) -> object:
        """Read a version 1 ``vm.json`` (``network``: none|nat, ``mac``) as version 2."""
        if not isinstance(data, dict) or data.get("schema_version", 1) != 1:
            return data
        if "network" not in data or "nics" in data:
            return data
        data = dict(data)
        network, mac = data.pop("network"), data.pop("mac", None)
        data["nics"] = [] if network == NetworkMode.NONE else [{"mode": network, "mac": mac}]
        data["schema_version"] = 2
        return data

    @model_validator(mode="before")
    @classmethod
    def _refuse_channel_fields(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        kind = str(data.get("kind", ""))
        for key in data:
            if key in CHANNEL_FIELDS and not (key == "channels" and kind == VMKind.AI_SANDBOX):
                if key == "channels" and data[key] is None:
                    continue
                raise ForbiddenDevice(key, kind or "non-sandbox")
        return data

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        try:
            return validate_name(value)
        except InvalidName as exc:
            raise ValueError(str(exc)) from None

    @field_validator("console")
    @classmethod
    def _console_fits_kind(cls, value: ConsoleAccess, info: ValidationInfo) -> ConsoleAccess:
        kind = info.data.get("kind")
        if value is not ConsoleAccess.OUTPUT_ONLY and kind is not VMKind.GENERIC:
            raise ValueError(f"the console of a {kind} VM is output-only, not '{value}'")
        return value

    @field_validator("display")
    @classmethod
    def _display_fits_kind(cls, value: DisplayMode, info: ValidationInfo) -> DisplayMode:
        if value is not DisplayMode.NONE and info.data.get("kind") is VMKind.AI_SANDBOX:
            raise ValueError(f"an ai-sandbox VM has no display, not '{value}': drive it with "
                             "'secvf vm exec'")
        return value

    @field_validator("nics")
    @classmethod
    def _distinct_nics(cls, value: list[Nic]) -> list[Nic]:
        macs = [n.mac for n in value]
        if len(set(macs)) != len(macs):
            raise ValueError("two NICs have the same MAC")
        if sum(n.mode is NetworkMode.NAT for n in value) > 1:
            raise ValueError("a VM has at most one nat NIC")
        networks = [n.network for n in value if n.network is not None]
        if len(set(networks)) != len(networks):
            raise ValueError("a VM has at most one NIC on each isolated network")
        return value

    @property
    def network_summary(self) -> str:
        """This VM's networks as one string (see :func:`network_summary`)."""
        return network_summary(self.nics)

    @model_validator(mode="after")
    def _sandbox_has_channels(self) -> VMConfig:
        if self.kind is VMKind.AI_SANDBOX and self.channels is None:
            raise ValueError("an ai-sandbox VM needs a 'channels' section")
        uuid.UUID(self.id)
        return self


def now_iso() -> str:
    """Current UTC time as an RFC 3339 string."""
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def new_mac() -> str:
    """A random locally administered MAC in QEMU's 52:54:00 range."""
    tail = os.urandom(3)
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)


def load_config(path: Path) -> VMConfig:
    """Read and validate ``vm.json``.

    Raises:
        ConfigError: unreadable, not JSON, or fails validation (names the field).
        ForbiddenDevice: it asks for a host-guest channel its kind must not have.
    """
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON (line {exc.lineno}): {exc.msg}") from exc
    return parse_config(data, source=str(path))


def parse_config(data: object, *, source: str) -> VMConfig:
    """Validate already-decoded ``vm.json`` content; ``source`` names it in errors."""
    try:
        return VMConfig.model_validate(data)
    except ForbiddenDevice as exc:
        raise ForbiddenDevice(exc.field, exc.kind, f"in {source}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ConfigError(f"{source}: field '{loc}': {err['msg']}") from None


def save_config(path: Path, config: VMConfig) -> None:
    """Write ``vm.json`` atomically (temp file, fsync, rename, fsync dir), mode 0600."""
    write_json_atomic(path, config.model_dump(mode="json"))


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON to ``path`` so readers see the old or the new file, never a torn one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
