"""``secvf net``: isolated networks as a user sees them, and a stopped VM's NICs.

A network's record says what it is (subnet, isolation, limits); the VMs' records say
which NICs are on it (with their fixed addresses); its switch, while one runs, says what
is happening (ports, learned MACs, counters, drops by reason). :func:`show_network`
puts the three together.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from secvf.errors import NetworkError, StateError
from secvf.model.config import VMConfig, now_iso, save_config
from secvf.model.network import NetworkConfig, NetworkLimits, parse_nic_requests, port_name
from secvf.net.engine import DROP_REASONS
from secvf.store import library, networks
from secvf.store import paths as store_paths
from secvf.store.bundle import bundle_for
from secvf.store.locks import locked
from secvf.store.runstate import is_running
from secvf.workflows.create import check_internet

#: How long ``net show`` / ``net list`` wait for a switch's answer.
QUERY_TIMEOUT_S = 2.0


def create_network(name: str, *, subnet: str, isolate_guests: bool = False, ipam: bool = True,
                   frames_per_s: int | None = None, broadcast_per_s: int | None = None,
                   ring_frames: int | None = None) -> NetworkConfig:
    """Create isolated network ``name`` (see :func:`secvf.store.networks.create_network`)."""
    limits = None
    if frames_per_s is not None or broadcast_per_s is not None:
        defaults = NetworkLimits()
        limits = NetworkLimits(
            frames_per_s=defaults.frames_per_s if frames_per_s is None else frames_per_s,
            broadcast_per_s=(defaults.broadcast_per_s if broadcast_per_s is None
                             else broadcast_per_s))
    return networks.create_network(name, subnet=subnet, isolate_guests=isolate_guests,
                                   ipam=ipam, limits=limits, ring_frames=ring_frames)


def runtime_dir(config: NetworkConfig) -> Path:
    """The runtime directory of ``config``'s switch."""
    return store_paths.network_runtime_dir(config.id)


def switch_stats(config: NetworkConfig) -> dict[str, Any] | None:
    """The running switch's ``stats`` reply, or None when no switch runs."""
    from secvf.net.control import SwitchUnavailable, query

    try:
        reply = query(runtime_dir(config), {"op": "stats"}, timeout=QUERY_TIMEOUT_S)
    except SwitchUnavailable:
        return None
    return reply if reply.get("ok") else None


def list_networks() -> list[dict[str, Any]]:
    """One row per network: name, subnet, isolation, VMs on it, whether its switch runs
    (an unusable record: name and error)."""
    vms = networks.all_vm_configs()
    rows: list[dict[str, Any]] = []
    for listed in networks.list_networks():
        if listed.config is None:
            rows.append({"name": listed.name, "error": listed.error})
            continue
        config = listed.config
        users = networks.network_users(config.name, vms=vms)
        stats = switch_stats(config)
        rows.append({"name": config.name, "subnet": config.subnet,
                     "isolate_guests": config.isolate_guests, "ipam": config.ipam,
                     "vms": sorted({u.vm for u in users}),
                     "switch": "running" if stats else "stopped",
                     "ports": len(stats["ports"]) if stats else 0})
    return rows


def show_network(name: str) -> dict[str, Any]:
    """Everything about network ``name``: its record, each NIC on it (VM, MAC, address,
    router, whether the VM runs) with its switch port's live counters, and the network's
    drop totals (zeros and ``switch: stopped`` while no switch runs).

    Raises:
        NotFound, ConfigError.
    """
    config = networks.load_network(name)
    vms = {vm.name: vm for vm in networks.all_vm_configs()}
    stats = switch_stats(config)
    live = {p["port"]: p for p in stats["ports"]} if stats else {}
    nics = []
    for user in networks.network_users(name, vms=list(vms.values())):
        vm = vms[user.vm]
        port = port_name(vm.id, user.nic)
        counters = live.get(port)
        nics.append({"vm": user.vm, "nic": user.nic, "port": port, "mac": user.config.mac,
                     "address": user.config.address, "router": user.config.router,
                     "vm_running": is_running(bundle_for(user.vm)),
                     "attached": counters is not None,
                     "learned": bool(counters and counters.get("learned")),
                     "counters": _counters(counters)})
    return {**config.model_dump(mode="json"), "gateway": str(config.gateway),
            "switch": "running" if stats else "stopped",
            "switch_pid": stats["pid"] if stats else None,
            "switch_started_at": stats.get("started_at") if stats else None,
            "switch_cpu_s": stats.get("cpu_s") if stats else None,
            "nics": nics,
            "drops": stats["drops"] if stats else dict.fromkeys(DROP_REASONS, 0),
            "capture": stats["capture"] if stats else None,
            "ring": stats["ring"] if stats else None}


def _counters(port: dict[str, Any] | None) -> dict[str, Any]:
    keys = ("rx", "rx_bytes", "tx", "tx_bytes")
    if port is None:
        return {**dict.fromkeys(keys, 0), "drops": {}}
    return {**{k: port.get(k, 0) for k in keys}, "drops": port.get("drops", {})}


def remove_network(name: str) -> None:
    """Remove network ``name`` (refused while a VM has a NIC on it)."""
    config = networks.load_network(name)
    networks.remove_network(name)
    # the stopped switch's leftovers: no VM uses the network, so no port or watchdog remains
    with contextlib.suppress(OSError):
        shutil.rmtree(runtime_dir(config))


def set_vm_networks(vm: str, values: list[str], *, allow_internet: bool = False) -> VMConfig:
    """Give stopped VM ``vm`` the NICs ``values`` ask for (``--network`` values; ``none``:
    no NIC). A NIC asked for again keeps its MAC and address.

    Raises:
        StateError: the VM runs. ConfigError, NotFound, NetworkError: as ``vm create``.
    """
    bundle, config = library.get_vm(vm)
    requests = parse_nic_requests(values)
    check_internet(config.name, config.kind, requests, allow_internet)
    with locked(bundle.edit_lock, f"VM '{vm}'"), networks.networks_lock():
        if is_running(bundle):
            raise StateError(f"VM '{vm}' is running; stop it to change its networks", "running")
        nics = networks.build_nics(requests, vm=vm, keep=config.nics)
        new = config.model_copy(update={"nics": nics, "updated_at": now_iso()})
        try:
            new = type(config).model_validate(new.model_dump(mode="json"))
        except ValueError as exc:
            raise NetworkError(f"VM '{vm}': {exc}") from None
        save_config(bundle.config_file, new)
    return new
