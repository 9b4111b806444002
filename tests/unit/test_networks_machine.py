"""A VM's NICs on QEMU's command line, the switch ports its supervisor registers, and
what guest init is told (``secvf_nics``); plans are built without starting anything."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from secvf.errors import NotFound
from secvf.machine.generic import build_generic_machine
from secvf.machine.network import add_nics, nics_kernel_param
from secvf.machine.plan import MachinePlan
from secvf.model.config import VMConfig
from secvf.model.network import GUEST_MAX_MTU, MAX_FRAME_BYTES, port_name
from secvf.net.config import NetPaths, PortConfig, SwitchConfig
from secvf.store import paths
from secvf.store.bundle import Bundle, RuntimeFiles
from secvf.store.networks import create_network, networks_dir
from tests.unit.test_networks_store import add_vm

SUN_PATH_BYTES = 108  # sockaddr_un.sun_path, the terminating NUL included


def plan_for(config: VMConfig) -> MachinePlan:
    plan = MachinePlan(vm=config, accel="tcg")
    add_nics(plan, config)
    return plan


def options(plan: MachinePlan, flag: str) -> list[str]:
    return [value for key, value in zip(plan.args, plan.args[1:], strict=False)
            if key == flag]


def props(option: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in option.split(",")[1:])


@pytest.fixture
def three_nics() -> VMConfig:
    create_network("lab", subnet="10.0.100.0/24")
    create_network("lab2", subnet="10.0.110.0/24", isolate_guests=True)
    return add_vm("web", "nat", "isolated:lab", "isolated:lab2,router")


def test_qemu_args_for_nat_and_two_isolated_nics(three_nics: VMConfig) -> None:
    config = three_nics
    plan = plan_for(config)
    netdevs, devices = options(plan, "-netdev"), options(plan, "-device")
    assert [n.split(",")[0] for n in netdevs] == ["user", "dgram", "dgram"]
    assert [props(n)["id"] for n in netdevs] == ["net0", "net1", "net2"]
    assert netdevs[0] == "user,id=net0"
    assert [d.split(",")[0] for d in devices] == ["virtio-net-pci"] * 3
    assert [props(d) for d in devices] == [
        {"id": "net0dev", "netdev": "net0", "mac": config.nics[0].mac},
        {"id": "net1dev", "netdev": "net1", "mac": config.nics[1].mac,
         "host_mtu": str(GUEST_MAX_MTU)},
        {"id": "net2dev", "netdev": "net2", "mac": config.nics[2].mac,
         "host_mtu": str(GUEST_MAX_MTU)}]
    assert GUEST_MAX_MTU + 14 == MAX_FRAME_BYTES == 9000  # the largest frame fits the switch
    for index, network in ((1, "lab"), (2, "lab2")):
        netdir = paths.network_runtime_dir(_network_id(network))
        port = port_name(config.id, index)
        dgram = props(netdevs[index])
        assert dgram == {"id": f"net{index}", "local.type": "unix",
                         "local.path": f"{netdir}/p/{port}.q", "remote.type": "unix",
                         "remote.path": f"{netdir}/p/{port}.s"}
        for path in (dgram["local.path"], dgram["remote.path"]):
            assert Path(path).parent.parent == netdir
            assert len(path.encode()) < SUN_PATH_BYTES
        assert not netdir.exists()  # planning creates nothing: the switch's launcher does
        assert netdir.parent.stat().st_mode & 0o777 == 0o700
    assert [(d.id, d.driver, d.purpose) for d in plan.devices] == [
        ("net0dev", "virtio-net-pci", "NIC (NAT)"),
        ("net1dev", "virtio-net-pci", "NIC (isolated:lab)"),
        ("net2dev", "virtio-net-pci", "NIC (isolated:lab2 (router))")]


def _network_id(name: str) -> str:
    from secvf.store.networks import load_network

    return load_network(name).id


def test_switch_ports_are_what_the_switch_accepts(three_nics: VMConfig,
                                                  secvf_env: Path) -> None:
    config = three_nics
    ports = plan_for(config).switch_ports
    assert [p.name for p in ports] == [port_name(config.id, 1), port_name(config.id, 2)]
    for port, index, network, router in ((ports[0], 1, "lab", False),
                                         (ports[1], 2, "lab2", True)):
        netdir = paths.network_runtime_dir(_network_id(network))
        net_paths = NetPaths(netdir)
        assert port.netdir == netdir
        assert port.record == {
            "port": port.name, "vm": "web", "vm_id": config.id, "nic": index,
            "mac": config.nics[index].mac, "router": router,
            "qemu_path": str(net_paths.qemu_path(port.name)),
            "switch_path": str(net_paths.switch_path(port.name))}
        # the switch's own parsers take them (the supervisor adds its pid)
        PortConfig.from_json({**port.record, "pid": os.getpid()},
                             net_paths.port_file(port.name), net_paths)
        switch = SwitchConfig.from_json(port.switch_config, net_paths.switch_json)
        assert (switch.network, switch.network_id, switch.isolate_guests) == (
            network, _network_id(network), network == "lab2")
        assert port.switch_config == {
            "network": network, "network_id": _network_id(network),
            "isolate_guests": network == "lab2", "frames_per_s": 10000,
            "broadcast_per_s": 1000, "min_frame": 14, "max_frame": 9000,
            "ring_frames": 1000, "logs_dir": str(secvf_env / "logs")}


def test_limits_and_ring_of_the_network_reach_switch_json() -> None:
    from secvf.model.network import NetworkLimits

    create_network("fast", subnet="10.0.120.0/24",
                   limits=NetworkLimits(frames_per_s=0, broadcast_per_s=7), ring_frames=5)
    (port,) = plan_for(add_vm("g", "isolated:fast")).switch_ports
    assert {k: port.switch_config[k] for k in ("frames_per_s", "broadcast_per_s",
                                                 "ring_frames")} == {
        "frames_per_s": 0, "broadcast_per_s": 7, "ring_frames": 5}


def test_kernel_parameter(three_nics: VMConfig) -> None:
    create_network("far", subnet="10.0.130.0/24", ipam=False)
    config = three_nics
    nat, lab, lab2 = (n.mac for n in config.nics)
    assert nics_kernel_param(config) == (
        f"secvf_nics={nat}+dhcp,{lab}+10.0.100.2/24@10.0.100.1,{lab2}+10.0.110.1/24")
    far = add_vm("far-guest", "isolated:far", "isolated:lab,ip=10.0.100.77")
    assert nics_kernel_param(far) == (f"secvf_nics={far.nics[0].mac}+manual,"
                                      f"{far.nics[1].mac}+10.0.100.77/24@10.0.100.1")
    assert nics_kernel_param(add_vm("alone", "none")) == "secvf_nics="


def test_a_vm_without_nics_has_no_netdev() -> None:
    plan = plan_for(add_vm("alone", "none"))
    assert options(plan, "-netdev") == [] and plan.switch_ports == [] and plan.devices == []


def test_a_removed_network_is_not_found_naming_it(three_nics: VMConfig) -> None:
    shutil.rmtree(networks_dir() / "lab2")  # as if removed behind the VM's back
    with pytest.raises(NotFound, match="no network called 'lab2'; create it with: "
                                       "secvf net create lab2"):
        plan_for(three_nics)
    shutil.rmtree(networks_dir() / "lab")
    with pytest.raises(NotFound, match="no network called 'lab'"):
        nics_kernel_param(three_nics)  # the guest NIC's gateway is the network's


def test_the_generic_builder_adds_the_nics(three_nics: VMConfig, tmp_path: Path) -> None:
    iso = tmp_path / "boot.iso"
    iso.write_bytes(b"\0" * 2048)
    config = VMConfig.model_validate(three_nics.model_dump(mode="json")
                                     | {"boot": {"type": "iso", "path": str(iso)}})
    plan = build_generic_machine(config, Bundle(tmp_path), RuntimeFiles(config.id), "tcg")
    assert [props(n)["id"] for n in options(plan, "-netdev")] == ["net0", "net1", "net2"]
    assert [p.name for p in plan.switch_ports] == [port_name(config.id, i) for i in (1, 2)]
