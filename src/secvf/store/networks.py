"""The library of isolated networks: ``$SECVF_HOME/networks/<name>/network.json``, and
the fixed addresses (IPAM) their NICs get.

Changes that must see every network and every VM at once — creating a network (its
subnet must not overlap another's), removing one (no VM may use it), handing out an
address (no two NICs may get the same) — happen under one lock,
``networks/.lock``, taken with :func:`networks_lock` by the caller for as long as
it needs the answer to stay true (until the VM's ``vm.json`` is written).
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from secvf.errors import (
    AlreadyExists,
    ConfigError,
    LockBusy,
    NetworkError,
    NotFound,
    SecVFError,
)
from secvf.model.config import Nic, VMConfig, new_mac, now_iso, write_json_atomic
from secvf.model.enums import NetworkMode
from secvf.model.names import validate_name
from secvf.model.network import NetworkConfig, NetworkLimits, NicRequest, parse_subnet
from secvf.store import events as seclog
from secvf.store import paths
from secvf.store.bundle import Bundle

CONFIG_FILE = "network.json"
LOCK_WAIT_S = 10.0


def networks_dir() -> Path:
    """The directory of network records (0700)."""
    return paths.ensure_private_dir(paths.secvf_home() / "networks")


@contextmanager
def networks_lock() -> Iterator[None]:
    """Hold the networks lock (waiting up to :data:`LOCK_WAIT_S` for another command).

    Raises:
        LockBusy: another secvf command held it all that time.
    """
    fd = os.open(networks_dir() / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockBusy("the networks lock is busy: another secvf command has "
                                   f"held it for {LOCK_WAIT_S:.0f} s") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


def load_network(name: str) -> NetworkConfig:
    """The record of network ``name``.

    Raises:
        InvalidName, NotFound (with how to create it), ConfigError (a corrupt record).
    """
    path = networks_dir() / validate_name(name, "network") / CONFIG_FILE
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFound(f"there is no network called '{name}'; create it with: "
                       f"secvf net create {name}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    try:
        return NetworkConfig.model_validate(json.loads(raw))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON (line {exc.lineno}): {exc.msg}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ConfigError(f"{path}: field '{loc}': {err['msg']}") from None


@dataclass(frozen=True)
class ListedNetwork:
    """One row of ``net list``: a valid record, or the error that makes it unusable."""

    name: str
    config: NetworkConfig | None
    error: str | None


def list_networks() -> list[ListedNetwork]:
    """Every network directory, by name (an unusable one with why)."""
    out = []
    for path in sorted(networks_dir().iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        try:
            out.append(ListedNetwork(path.name, load_network(path.name), None))
        except SecVFError as exc:  # also an invalid directory name (InvalidName)
            out.append(ListedNetwork(path.name, None, str(exc)))
    return out


def create_network(name: str, *, subnet: str, isolate_guests: bool = False, ipam: bool = True,
                   limits: NetworkLimits | None = None, ring_frames: int | None = None,
                   analysis: bool = False) -> NetworkConfig:
    """Create network ``name`` over ``subnet`` (``analysis``: a detonation's network, whose
    subnet may overlap others').

    Raises:
        InvalidName, AlreadyExists, ConfigError (a bad subnet, or one overlapping another
        network's), LockBusy.
    """
    validate_name(name, "network")
    try:
        wanted = parse_subnet(subnet)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    data: dict[str, object] = {"id": str(uuid.uuid4()), "name": name, "subnet": str(wanted),
                               "isolate_guests": isolate_guests, "ipam": ipam,
                               "analysis": analysis, "created_at": now_iso()}
    if limits is not None:
        data["limits"] = limits.model_dump()
    if ring_frames is not None:
        data["ring_frames"] = ring_frames
    try:
        config = NetworkConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"network '{name}': {exc.errors()[0]['msg']}") from None
    with networks_lock():
        directory = networks_dir() / name
        if directory.exists():
            raise AlreadyExists(f"a network named '{name}' already exists")
        for other in list_networks():
            if (other.config is not None and not (analysis or other.config.analysis)
                    and other.config.network.overlaps(wanted)):
                raise ConfigError(f"subnet {wanted} overlaps network '{other.name}' "
                                  f"({other.config.subnet}); choose another --subnet")
        staging = networks_dir() / f".new-{os.getpid()}-{uuid.uuid4().hex[:12]}"  # not NAME: 255 B
        staging.mkdir(mode=0o700)
        write_json_atomic(staging / CONFIG_FILE, config.model_dump(mode="json"))
        os.rename(staging, directory)
    seclog.write_event("network_created", network=name, subnet=config.subnet,
                       isolate_guests=isolate_guests, ipam=ipam)
    return config


@dataclass(frozen=True)
class NetworkUser:
    """A NIC of a VM in the library on a network."""

    vm: str
    nic: int
    config: Nic


def network_users(name: str, *, vms: list[VMConfig] | None = None) -> list[NetworkUser]:
    """The NICs (of every VM in the library, running or not) on network ``name``."""
    found = []
    for config in all_vm_configs() if vms is None else vms:
        for index, nic in enumerate(config.nics):
            if nic.network == name:
                found.append(NetworkUser(config.name, index, nic))
    return found


def all_vm_configs() -> list[VMConfig]:
    """The configs of every usable VM in the library (unusable bundles are skipped:
    ``vm list`` reports them)."""
    configs = []
    for path in sorted(paths.vms_dir().iterdir()):
        if path.name.startswith(".") or not path.is_dir() or path.is_symlink():
            continue
        try:
            configs.append(Bundle(path).load())
        except SecVFError:  # unusable bundles are vm list's to report
            continue
    return configs


def remove_network(name: str) -> None:
    """Remove network ``name``.

    Raises:
        NotFound, NetworkError (VMs have NICs on it: named, with how to move them).
    """
    with networks_lock():
        load_network(name)
        users = network_users(name)
        if users:
            vms = ", ".join(sorted({u.vm for u in users}))
            raise NetworkError(f"network '{name}' is used by: {vms}; move them first "
                               "(secvf vm set-network VM ...) or delete them")
        shutil.rmtree(networks_dir() / name)
    seclog.write_event("network_removed", network=name)


def build_nics(requests: list[NicRequest], *, vm: str, keep: Sequence[Nic] = ()) -> list[Nic]:
    """The NICs of VM ``vm`` for ``requests``: each with a new MAC and, on a network with
    IPAM, a fixed address (the requested one, or the next free one). The caller holds
    :func:`networks_lock` until the VM's config is written. ``keep`` are NICs whose MACs
    and addresses stay (the VM's own when it changes its networks) where a request
    asks for the same attachment again.

    Raises:
        NotFound (a network), ConfigError (an address outside the subnet, taken, or the
        network's router address for a non-router NIC), NetworkError (no address left).
    """
    vms = all_vm_configs()
    nics = []
    for request in requests:
        same = next((n for n in keep if n.mode is request.mode and n.network == request.network
                     and n.router == request.router and (request.address is None
                     or (n.address or "").split("/")[0] == request.address)), None)
        if same is not None:
            nics.append(same)
            continue
        if request.mode is NetworkMode.NAT:
            nics.append(Nic(mode=NetworkMode.NAT, mac=new_mac()))
            continue
        assert request.network is not None
        network = load_network(request.network)
        used = {u.config.address.split("/")[0] for u in network_users(request.network, vms=vms)
                if u.config.address is not None and u.vm != vm}
        if request.address is not None and not network.ipam:
            raise ConfigError(f"network '{network.name}' has no IPAM (--no-ipam): its guests "
                              "set their own addresses, so ip= cannot be given")
        address = _address_for(network, request, used) if network.ipam else None
        nics.append(Nic(mode=NetworkMode.ISOLATED, network=request.network, mac=new_mac(),
                        address=address, router=request.router))
    return nics


def renew_nics(nics: list[Nic], *, vm: str) -> list[Nic]:
    """``nics`` for a copy of a VM (clone, import): same attachments, new MACs and, on
    IPAM networks, new addresses (the caller holds :func:`networks_lock`)."""
    return build_nics([NicRequest(n.mode, n.network, n.router) for n in nics], vm=vm)


def _address_for(network: NetworkConfig, request: NicRequest, used: set[str]) -> str:
    subnet, gateway = network.network, network.gateway
    prefix = subnet.prefixlen
    if request.router and request.address not in (None, str(gateway)):
        raise ConfigError(f"the router of network '{network.name}' has its address "
                          f"{gateway}; leave out ip= for ',router'")
    if request.address is not None and not request.router:
        wanted = ipaddress.IPv4Address(request.address)
        if wanted not in subnet or wanted in (subnet.network_address, subnet.broadcast_address):
            raise ConfigError(f"address {wanted} is not a host address of network "
                              f"'{network.name}' ({network.subnet})")
        if wanted == gateway and not request.router:
            raise ConfigError(f"{wanted} is network '{network.name}''s router address; "
                              "add ',router' to give it to this VM")
        if str(wanted) in used:
            raise ConfigError(f"address {wanted} on network '{network.name}' is taken")
        return f"{wanted}/{prefix}"
    if request.router:
        if str(gateway) in used:
            raise ConfigError(f"network '{network.name}' already has a router at {gateway}")
        return f"{gateway}/{prefix}"
    for host in subnet.hosts():
        if host != gateway and str(host) not in used:
            return f"{host}/{prefix}"
    raise NetworkError(f"network '{network.name}' ({network.subnet}) has no free address "
                       "left; remove a VM from it or create a larger network")
