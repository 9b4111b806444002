"""What the switch reads from its network directory: ``switch.json`` and ``ports/*.json``.

The layout and the JSON shapes are fixed by ``docs/networks.md`` ("Files and protocol"); this module
parses them into frozen dataclasses and checks every field, because a port file decides
which socket paths the switch binds and unlinks. A port whose file is not valid is
skipped with one line on stderr, and the other ports keep working.

:class:`NetPaths` names every file in ``NETDIR`` so no other module builds paths.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secvf.net.frame import is_group, parse_mac

PORT_NAME = re.compile(r"^[0-9a-f]{8}-[0-9]{1,3}$")  # first 8 hex digits of the VM id, NIC
MAX_CONFIG_BYTES = 64 << 10  # switch.json and port files are tiny; anything bigger is wrong
MIN_FRAME_FLOOR = 14  # an Ethernet header
MAX_FRAME_CEILING = 65535  # the largest datagram the switch receives


class ConfigError(ValueError):
    """A ``switch.json`` or port file that cannot be used; the message names the file."""


@dataclass(frozen=True)
class NetPaths:
    """Every path inside one network's runtime directory ``NETDIR``."""

    root: Path

    @property
    def switch_json(self) -> Path:
        return self.root / "switch.json"

    @property
    def ports(self) -> Path:
        return self.root / "ports"

    @property
    def sockets(self) -> Path:
        return self.root / "p"

    @property
    def control(self) -> Path:
        return self.root / "control.sock"

    @property
    def watchdog_lock(self) -> Path:
        return self.root / "watchdog.lock"

    @property
    def launch_lock(self) -> Path:
        return self.root / "launch.lock"

    @property
    def log(self) -> Path:
        return self.root / "switch.log"

    def port_file(self, port: str) -> Path:
        """``ports/<port>.json``."""
        return self.ports / f"{port}.json"

    def qemu_path(self, port: str) -> Path:
        """Where QEMU binds port ``port``'s socket."""
        return self.sockets / f"{port}.q"

    def switch_path(self, port: str) -> Path:
        """Where the switch binds port ``port``'s socket."""
        return self.sockets / f"{port}.s"


@dataclass(frozen=True)
class SwitchConfig:
    """``switch.json``: the network and its limits (0 turns a rate limit off)."""

    network: str  # the network's name, in every event
    network_id: str
    isolate_guests: bool  # non-router ports reach only router ports
    frames_per_s: int  # per port, all frames; 0 = unlimited
    broadcast_per_s: int  # per port, I/G-bit frames; 0 = unlimited
    min_frame: int  # shorter frames are dropped (runt)
    max_frame: int  # longer frames are dropped (oversize)
    ring_frames: int  # how many recent frames the always-on ring keeps
    logs_dir: Path  # the event log's directory

    @classmethod
    def from_json(cls, data: object, source: Path) -> SwitchConfig:
        """Parse ``switch.json``'s object; raises :class:`ConfigError` naming ``source``."""
        obj = _object(data, source)
        config = cls(
            network=_field(obj, "network", str, source),
            network_id=_field(obj, "network_id", str, source),
            isolate_guests=_field(obj, "isolate_guests", bool, source),
            frames_per_s=_count(obj, "frames_per_s", source),
            broadcast_per_s=_count(obj, "broadcast_per_s", source),
            min_frame=_count(obj, "min_frame", source),
            max_frame=_count(obj, "max_frame", source),
            ring_frames=_count(obj, "ring_frames", source),
            logs_dir=Path(_field(obj, "logs_dir", str, source)),
        )
        if not MIN_FRAME_FLOOR <= config.min_frame <= config.max_frame <= MAX_FRAME_CEILING:
            raise ConfigError(f"{source}: want {MIN_FRAME_FLOOR} <= min_frame <= max_frame "
                              f"<= {MAX_FRAME_CEILING}, got {config.min_frame}, "
                              f"{config.max_frame}")
        return config


@dataclass(frozen=True)
class PortConfig:
    """``ports/<port>.json``: one VM NIC on the network."""

    port: str  # "<8 hex of the VM id>-<nic>", also the file's stem
    vm: str  # the VM's name, in events
    vm_id: str
    nic: int
    mac: str  # the pinned source MAC, "52:54:00:12:34:56"
    router: bool  # with isolate_guests, router ports reach and are reached by everyone
    qemu_path: str  # QEMU's bound socket: the only sender accepted on this port
    switch_path: str  # the switch's socket for this port
    pid: int  # the VM's supervisor; the port is stale once it is dead

    @classmethod
    def from_json(cls, data: object, source: Path, paths: NetPaths) -> PortConfig:
        """Parse a port file's object; raises :class:`ConfigError` naming ``source``.

        The socket paths must be exactly ``NETDIR/p/<port>.q`` and ``.s``: the switch
        unlinks and binds ``switch_path``, so a port file may not point anywhere else.
        """
        obj = _object(data, source)
        port = cls(
            port=_field(obj, "port", str, source), vm=_field(obj, "vm", str, source),
            vm_id=_field(obj, "vm_id", str, source), nic=_count(obj, "nic", source),
            mac=_field(obj, "mac", str, source), router=_field(obj, "router", bool, source),
            qemu_path=_field(obj, "qemu_path", str, source),
            switch_path=_field(obj, "switch_path", str, source),
            pid=_count(obj, "pid", source),
        )
        port.check(source, paths)
        return port

    def check(self, source: Path, paths: NetPaths) -> None:
        """Raise :class:`ConfigError` unless name, MAC and paths are what the contract says."""
        if not PORT_NAME.match(self.port) or source.stem != self.port:
            raise ConfigError(f"{source}: port {self.port!r} must be <8 hex>-<nic> and match "
                              "the file name")
        try:
            mac = parse_mac(self.mac)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        if is_group(mac):
            raise ConfigError(f"{source}: mac {self.mac} is a group address")
        if self.pid < 1:
            raise ConfigError(f"{source}: pid must be the supervisor's pid, got {self.pid}")
        for name, want in (("qemu_path", paths.qemu_path(self.port)),
                           ("switch_path", paths.switch_path(self.port))):
            if Path(getattr(self, name)) != want:
                raise ConfigError(f"{source}: {name} must be {want}")

    def to_json(self) -> dict[str, Any]:
        """The port file's object."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def read_json(path: Path) -> object:
    """Read one small JSON file; raises :class:`ConfigError` (or OSError if unreadable)."""
    with path.open("rb") as fh:
        raw = fh.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not JSON: {exc}") from None


def load_switch_config(paths: NetPaths) -> SwitchConfig:
    """``switch.json``; raises :class:`ConfigError` or OSError."""
    return SwitchConfig.from_json(read_json(paths.switch_json), paths.switch_json)


def load_ports(paths: NetPaths, report: bool = True) -> list[PortConfig]:
    """Every valid port file, sorted by port; each invalid one is skipped, with a line on
    stderr if ``report``."""
    ports = []
    for path in sorted(paths.ports.glob("*.json")):
        try:
            ports.append(PortConfig.from_json(read_json(path), path, paths))
        except (ConfigError, OSError) as exc:
            if report:
                print(f"secvf-switch: skipping port file: {exc}", file=sys.stderr, flush=True)
    return ports


def _object(data: object, source: Path) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: want a JSON object, got {type(data).__name__}")
    return data


def _field(obj: dict[str, Any], name: str, kind: type[Any], source: Path) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{source}: field {name!r} must be {kind.__name__}, got {value!r}")
    return value


def _count(obj: dict[str, Any], name: str, source: Path) -> int:
    value: int = _field(obj, name, int, source)
    if value < 0:
        raise ConfigError(f"{source}: field {name!r} must be >= 0, got {value}")
    return value
