"""An isolated network's record (``networks/<name>/network.json``) and the NIC requests
``--network`` takes.

A network is an L2 segment served by its own switch process (:mod:`secvf.net`). Its
subnet is what SecVF hands out fixed addresses from (IPAM): ``.1`` is the router's (a
NIC created with ``router``), guests get ``.2`` upwards. With ``ipam`` off the guests
address themselves (a router VM's DHCP, static config in an installed guest).
"""

from __future__ import annotations

import ipaddress
import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator

from secvf.errors import ConfigError, InvalidName
from secvf.model.config import _Strict
from secvf.model.enums import NetworkMode
from secvf.model.names import validate_name

DEFAULT_SUBNET = "10.0.100.0/24"
#: Prefix lengths a network may have: /30 leaves two hosts (router and one guest).
MIN_PREFIX, MAX_PREFIX = 8, 30
DEFAULT_FRAMES_PER_S = 10_000
DEFAULT_BROADCAST_PER_S = 1_000
DEFAULT_RING_FRAMES = 1_000
#: Largest Ethernet frame a port accepts (header included) and the guest MTU that fits it.
MAX_FRAME_BYTES = 9_000
GUEST_MAX_MTU = MAX_FRAME_BYTES - 14


class NetworkLimits(_Strict):
    """Per-port limits the switch enforces (0: no limit)."""

    frames_per_s: int = Field(default=DEFAULT_FRAMES_PER_S, ge=0, le=10_000_000)
    broadcast_per_s: int = Field(default=DEFAULT_BROADCAST_PER_S, ge=0, le=10_000_000)


class NetworkConfig(_Strict):
    """Validated content of an isolated network's ``network.json``."""

    schema_version: Literal[1] = 1
    id: str  # UUID: names the network's runtime directory
    name: str
    subnet: str  # IPv4 network in CIDR form, e.g. 10.0.100.0/24
    isolate_guests: bool = False  # guest ports reach only router ports (a private VLAN)
    ipam: bool = True  # SecVF gives each NIC a fixed address from the subnet
    limits: NetworkLimits = NetworkLimits()
    ring_frames: int = Field(default=DEFAULT_RING_FRAMES, ge=0, le=1_000_000)
    # made by secvf analyze for one detonation (or its clean states): its subnet may
    # overlap other networks' (every analysis network uses the same one), and it is
    # removed with the detonation
    analysis: bool = False
    created_at: str

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        try:
            return validate_name(value, "network")
        except InvalidName as exc:
            raise ValueError(str(exc)) from None

    @field_validator("subnet")
    @classmethod
    def _valid_subnet(cls, value: str) -> str:
        return str(parse_subnet(value))

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        return str(uuid.UUID(value))

    @property
    def network(self) -> ipaddress.IPv4Network:
        """The subnet as an address object."""
        return ipaddress.IPv4Network(self.subnet)

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The router's address: the subnet's first host."""
        return next(self.network.hosts())


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    """``text`` as an IPv4 subnet SecVF can hand out addresses from.

    Raises:
        ValueError: not an IPv4 network in CIDR form (host bits set count as an error),
            or a prefix outside /8 to /30.
    """
    try:
        subnet = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise ValueError(f"subnet {text!r} is not an IPv4 network in CIDR form ({exc})") from None
    if not MIN_PREFIX <= subnet.prefixlen <= MAX_PREFIX:
        raise ValueError(f"subnet {text}: the prefix must be /{MIN_PREFIX} to /{MAX_PREFIX}")
    return subnet


@dataclass(frozen=True)
class NicRequest:
    """One ``--network`` value: ``nat``, or ``isolated:NAME`` with options
    (``isolated:lab,router``, ``isolated:lab,ip=10.0.100.9``)."""

    mode: NetworkMode
    network: str | None = None
    router: bool = False
    address: str | None = None  # an explicit address (inside the network's subnet)


def parse_nic_requests(values: list[str]) -> list[NicRequest]:
    """The NICs ``--network`` values ask for (``none`` alone: no NIC).

    Raises:
        ConfigError: an unknown mode or option, ``none`` beside a NIC, a bad name or address.
    """
    if values == [str(NetworkMode.NONE)]:
        return []
    if str(NetworkMode.NONE) in values:
        raise ConfigError("--network none means no NIC: it cannot go with another --network")
    return [parse_nic_request(v) for v in values]


def parse_nic_request(text: str) -> NicRequest:
    """One ``--network`` value (see :class:`NicRequest`).

    Raises:
        ConfigError: what is wrong with it, and what is expected.
    """
    if text == NetworkMode.NAT:
        return NicRequest(NetworkMode.NAT)
    head, _, rest = text.partition(":")
    if head != NetworkMode.ISOLATED or not rest:
        raise ConfigError(f"--network {text!r}: expected none, nat or isolated:NAME"
                          "[,router][,ip=ADDRESS]")
    name, *options = rest.split(",")
    try:
        validate_name(name, "network")
    except InvalidName as exc:
        raise ConfigError(f"--network {text!r}: {exc}") from None
    router, address = False, None
    for option in options:
        if option == "router":
            router = True
        elif option.startswith("ip="):
            try:
                address = str(ipaddress.IPv4Address(option[3:]))
            except ValueError:
                raise ConfigError(f"--network {text!r}: {option[3:]!r} is not an IPv4 "
                                  "address") from None
        else:
            raise ConfigError(f"--network {text!r}: unknown option {option!r} (options: "
                              "router, ip=ADDRESS)")
    return NicRequest(NetworkMode.ISOLATED, name, router, address)


def port_name(vm_id: str, nic: int) -> str:
    """The switch port of NIC ``nic`` of the VM with id ``vm_id``: ``a1b2c3d4-0`` (short:
    socket paths are limited to 108 bytes)."""
    return f"{vm_id.replace('-', '')[:8]}-{nic}"
