"""A VM's NICs on QEMU's command line, and what its guest init is told about them.

* ``nat``: a virtio NIC on QEMU user networking (``-netdev user``); the guest runs DHCP.
* ``isolated:NAME``: a virtio NIC on a ``-netdev dgram`` pair of Unix sockets in the
  network's private runtime directory: QEMU binds ``p/<port>.q`` and sends every frame
  to the switch's ``p/<port>.s`` (see ``docs/networks.md``). ``host_mtu`` caps the guest's
  MTU so its largest frame fits the switch's frame bound (a bigger one would be dropped
  silently: a path-MTU black hole). The supervisor registers the port with the switch
  (:class:`SwitchPort`) before QEMU starts.

Guest init finds each NIC by MAC (``secvf_nics=MAC+MODE,...``): ``dhcp``, ``manual``, or a
fixed ``ADDR/PREFIX`` with ``@GATEWAY`` (the network's router address) for a guest NIC.
"""

from __future__ import annotations

from typing import Any

from secvf.machine.plan import MachinePlan, SwitchPort
from secvf.model.config import Nic, VMConfig
from secvf.model.enums import NetworkMode
from secvf.model.network import GUEST_MAX_MTU, MAX_FRAME_BYTES, NetworkConfig, port_name
from secvf.store import paths
from secvf.store.networks import load_network


def add_nics(plan: MachinePlan, config: VMConfig) -> None:
    """Add every NIC of ``config`` to ``plan`` (nothing for a VM without one)."""
    for index, nic in enumerate(config.nics):
        netdev, dev_id = f"net{index}", f"net{index}dev"
        if nic.mode is NetworkMode.NAT:
            plan.add_backend("-netdev", f"user,id={netdev}")
            plan.add_device("virtio-net-pci", dev_id, "NIC (NAT)", netdev=netdev, mac=nic.mac)
            continue
        port = switch_port(config, index, nic)
        plan.switch_ports.append(port)
        plan.add_backend("-netdev", ",".join([
            f"dgram,id={netdev}", "local.type=unix", f"local.path={port.record['qemu_path']}",
            "remote.type=unix", f"remote.path={port.record['switch_path']}"]))
        plan.add_device("virtio-net-pci", dev_id, f"NIC ({nic.describe()})", netdev=netdev,
                        mac=nic.mac, host_mtu=str(GUEST_MAX_MTU))


def switch_port(config: VMConfig, index: int, nic: Nic) -> SwitchPort:
    """The switch port of isolated NIC ``index`` of ``config``.

    Raises:
        NotFound: its network no longer exists (with how to create it or move the VM).
    """
    assert nic.network is not None
    network = load_network(nic.network)
    netdir = paths.network_runtime_dir(network.id)
    name = port_name(config.id, index)
    sockets = netdir / "p"
    return SwitchPort(netdir, switch_config(network), {
        "port": name, "vm": config.name, "vm_id": config.id, "nic": index, "mac": nic.mac,
        "router": nic.router, "qemu_path": str(sockets / f"{name}.q"),
        "switch_path": str(sockets / f"{name}.s")})


def switch_config(network: NetworkConfig) -> dict[str, Any]:
    """The ``switch.json`` of ``network``'s switch."""
    return {"network": network.name, "network_id": network.id,
            "isolate_guests": network.isolate_guests,
            "frames_per_s": network.limits.frames_per_s,
            "broadcast_per_s": network.limits.broadcast_per_s,
            "min_frame": 14, "max_frame": MAX_FRAME_BYTES, "ring_frames": network.ring_frames,
            "logs_dir": str(paths.logs_dir())}


def nics_kernel_param(config: VMConfig) -> str:
    """``secvf_nics=MAC+MODE,...`` for guest init (empty value: no NIC)."""
    entries = []
    for nic in config.nics:
        if nic.mode is NetworkMode.NAT:
            mode = "dhcp"
        elif nic.address is None:
            mode = "manual"
        else:
            mode = nic.address
            if not nic.router:
                assert nic.network is not None
                mode += f"@{load_network(nic.network).gateway}"
        entries.append(f"{nic.mac}+{mode}")
    return "secvf_nics=" + ",".join(entries)
