"""The library of isolated networks (``$SECVF_HOME/networks``) and the fixed addresses
its NICs get (IPAM), on the real files of the test's ``SECVF_HOME``."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path

import pytest

from secvf.errors import AlreadyExists, ConfigError, InvalidName, NetworkError, NotFound
from secvf.model.config import Nic, VMConfig, parse_config, save_config
from secvf.model.network import NetworkLimits, parse_nic_requests
from secvf.store import networks, paths
from secvf.store.networks import (
    build_nics,
    create_network,
    list_networks,
    load_network,
    network_users,
    networks_lock,
    remove_network,
    renew_nics,
)
from tests.unit.test_networks_model import raw_vm


def add_vm(name: str, *specs: str) -> VMConfig:
    """Put VM ``name`` with the NICs ``specs`` ask for into the library, as ``vm create``
    does: addresses handed out and ``vm.json`` written under the networks lock."""
    with networks_lock():
        nics = build_nics(parse_nic_requests(list(specs)), vm=name)
        config = parse_config(raw_vm(name=name, nics=[n.model_dump(mode="json") for n in nics]),
                              source=name)
        bundle = paths.vms_dir() / name
        bundle.mkdir()
        save_config(bundle / "vm.json", config)
    return config


def address(config: VMConfig, nic: int = 0) -> str | None:
    return config.nics[nic].address


def nics_for(name: str, *specs: str, keep: list[Nic] | None = None) -> list[Nic]:
    with networks_lock():
        return build_nics(parse_nic_requests(list(specs)), vm=name, keep=keep or [])


# ---- create, list, load, remove ---------------------------------------------------------


def test_create_list_load_remove(secvf_env: Path) -> None:
    lab = create_network("lab", subnet="10.0.100.0/24")
    wan = create_network("wan", subnet="10.0.110.0/24", isolate_guests=True, ipam=False,
                         limits=NetworkLimits(frames_per_s=0, broadcast_per_s=5),
                         ring_frames=10)
    record = secvf_env / "networks" / "lab" / "network.json"
    assert json.loads(record.read_text())["id"] == lab.id
    assert record.stat().st_mode & 0o777 == 0o600
    assert (secvf_env / "networks").stat().st_mode & 0o777 == 0o700
    assert load_network("lab") == lab and str(lab.gateway) == "10.0.100.1"
    assert load_network("wan") == wan
    assert (wan.isolate_guests, wan.ipam, wan.limits.frames_per_s, wan.limits.broadcast_per_s,
            wan.ring_frames) == (True, False, 0, 5, 10)
    assert [(n.name, n.config, n.error) for n in list_networks()] == [
        ("lab", lab, None), ("wan", wan, None)]
    assert sorted(p.name for p in (secvf_env / "networks").iterdir()) == [".lock", "lab",
                                                                           "wan"]
    remove_network("lab")
    assert not (secvf_env / "networks" / "lab").exists()
    assert [n.name for n in list_networks()] == ["wan"]
    with pytest.raises(NotFound, match="no network called 'lab'; create it with: "
                                       "secvf net create lab"):
        load_network("lab")
    with pytest.raises(NotFound):
        remove_network("lab")


def test_a_name_twice_is_refused() -> None:
    create_network("lab", subnet="10.0.100.0/24")
    with pytest.raises(AlreadyExists, match="a network named 'lab' already exists"):
        create_network("lab", subnet="10.7.0.0/24")
    assert load_network("lab").subnet == "10.0.100.0/24"


@pytest.mark.parametrize("subnet", ["10.0.100.128/25", "10.0.0.0/16", "10.0.100.0/24",
                                    "10.0.100.4/30", "10.0.0.0/8"])
def test_overlapping_subnets_are_refused(subnet: str) -> None:
    create_network("lab", subnet="10.0.100.0/24")
    with pytest.raises(ConfigError, match=rf"subnet {subnet} overlaps network 'lab' "
                                          r"\(10\.0\.100\.0/24\); choose another --subnet"):
        create_network("other", subnet=subnet)
    assert [n.name for n in list_networks()] == ["lab"]


def test_a_small_network_inside_a_big_one_is_refused_either_way() -> None:
    create_network("big", subnet="172.16.0.0/12")
    with pytest.raises(ConfigError, match="overlaps network 'big'"):
        create_network("small", subnet="172.20.5.0/24")
    create_network("beside", subnet="10.0.101.0/24")
    create_network("next", subnet="10.0.100.0/24")  # adjacent, not overlapping
    with pytest.raises(ConfigError, match="overlaps network 'beside'"):
        create_network("around", subnet="10.0.0.0/16")


@pytest.mark.parametrize("subnet", ["10.0.100.1/24", "10.0.0.0/31", "fd00::/64", "lab"])
def test_a_bad_subnet_is_a_config_error(subnet: str) -> None:
    with pytest.raises(ConfigError, match="subnet"):
        create_network("lab", subnet=subnet)
    assert list_networks() == []


@pytest.mark.parametrize("name", ["../x", "", ".x", "a b", "x" * 256, "a/b", "é" * 128])
def test_invalid_network_names(name: str) -> None:
    with pytest.raises(InvalidName, match="network name"):
        create_network(name, subnet="10.0.100.0/24")
    assert list_networks() == []
    with pytest.raises(InvalidName):
        load_network(name)


def test_a_255_byte_name_is_a_network_name(secvf_env: Path) -> None:
    name = "n" * 255
    create_network(name, subnet="10.0.100.0/24")
    assert load_network(name).name == name
    assert sorted(p.name for p in (secvf_env / "networks").iterdir()) == [".lock", name]


def test_bad_limits_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="network 'lab'"):
        create_network("lab", subnet="10.0.100.0/24", ring_frames=-1)
    assert list_networks() == []


@pytest.mark.parametrize(("content", "words"), [
    ("{", ["is not valid JSON (line 1)"]),
    ("", ["is not valid JSON"]),
    ("[]", ["field '(top level)'"]),
    ("WRONG_SUBNET", ["field 'subnet'", "not an IPv4 network"]),
    ("EXTRA_FIELD", ["field 'colour'"]),
    ("BAD_ID", ["field 'id'"]),
])
def test_a_corrupt_record_is_a_config_error_naming_its_file(
        content: str, words: list[str], secvf_env: Path) -> None:
    good = create_network("good", subnet="10.0.1.0/24")
    bad = create_network("bad", subnet="10.0.2.0/24")
    path = secvf_env / "networks" / "bad" / "network.json"
    data = bad.model_dump(mode="json")
    edits = {"WRONG_SUBNET": {"subnet": "10.0.2.0/33"}, "EXTRA_FIELD": {"colour": "red"},
             "BAD_ID": {"id": "nope"}}
    path.write_text(json.dumps(data | edits[content]) if content in edits else content)
    with pytest.raises(ConfigError) as info:
        load_network("bad")
    for word in [str(path), *words]:
        assert word in str(info.value)
    listed = list_networks()
    assert [(n.name, n.config) for n in listed] == [("bad", None), ("good", good)]
    assert str(path) in (listed[0].error or "") and listed[1].error is None


def test_a_directory_with_a_bad_name_or_no_record_is_listed_as_invalid(
        secvf_env: Path) -> None:
    lab = create_network("lab", subnet="10.0.100.0/24")
    (secvf_env / "networks" / "bad name").mkdir()
    (secvf_env / "networks" / "empty").mkdir()
    (secvf_env / "networks" / ".staging-leftover").mkdir()
    listed = {n.name: n for n in list_networks()}
    assert sorted(listed) == ["bad name", "empty", "lab"]
    assert listed["lab"].config == lab
    assert "network name" in (listed["bad name"].error or "")
    assert "no network called 'empty'" in (listed["empty"].error or "")


def test_remove_is_refused_while_a_stopped_vm_uses_the_network() -> None:
    create_network("lab", subnet="10.0.100.0/24")
    create_network("wan", subnet="10.0.110.0/24")
    add_vm("zed", "isolated:lab")
    add_vm("alpha", "nat", "isolated:wan", "isolated:lab,router")
    add_vm("other", "isolated:wan")
    users = network_users("lab")
    assert [(u.vm, u.nic, u.config.address) for u in sorted(users, key=lambda u: u.vm)] == [
        ("alpha", 2, "10.0.100.1/24"), ("zed", 0, "10.0.100.2/24")]
    with pytest.raises(NetworkError, match=r"network 'lab' is used by: alpha, zed; move them "
                                           r"first \(secvf vm set-network VM \.\.\.\)"):
        remove_network("lab")
    assert load_network("lab").name == "lab"
    for vm in ("alpha", "zed"):
        shutil.rmtree(paths.vms_dir() / vm)
    remove_network("lab")
    assert [n.name for n in list_networks()] == ["wan"]


# ---- IPAM -------------------------------------------------------------------------------


def test_router_gets_dot_1_and_guests_dot_2_upwards() -> None:
    create_network("lab", subnet="10.0.100.0/24")
    assert address(add_vm("g1", "isolated:lab")) == "10.0.100.2/24"
    assert address(add_vm("r", "isolated:lab,router")) == "10.0.100.1/24"
    assert address(add_vm("g2", "isolated:lab")) == "10.0.100.3/24"
    assert address(add_vm("g3", "isolated:lab")) == "10.0.100.4/24"
    shutil.rmtree(paths.vms_dir() / "g2")  # its address is free again
    assert address(add_vm("g4", "isolated:lab")) == "10.0.100.3/24"
    with pytest.raises(ConfigError, match=r"network 'lab' already has a router at 10\.0\.100\.1"):
        nics_for("r2", "isolated:lab,router")


def test_each_network_has_its_own_addresses() -> None:
    create_network("lab", subnet="10.0.100.0/24")
    create_network("wan", subnet="192.168.50.0/28")
    vm = add_vm("g", "nat", "isolated:lab", "isolated:wan,router")
    assert [n.address for n in vm.nics] == [None, "10.0.100.2/24", "192.168.50.1/28"]
    assert [n.router for n in vm.nics] == [False, False, True]
    assert len({n.mac for n in vm.nics}) == 3


def test_explicit_addresses() -> None:
    create_network("lab", subnet="10.0.100.0/24")
    assert address(add_vm("a", "isolated:lab,ip=10.0.100.9")) == "10.0.100.9/24"
    assert address(add_vm("b", "isolated:lab")) == "10.0.100.2/24"
    assert address(add_vm("r", "isolated:lab,router,ip=10.0.100.1")) == "10.0.100.1/24"
    assert address(add_vm("c", "isolated:lab,ip=10.0.100.254")) == "10.0.100.254/24"
    refused = {
        "10.0.100.9": r"address 10\.0\.100\.9 on network 'lab' is taken",
        "10.0.100.2": "is taken",
        "10.0.101.5": r"address 10\.0\.101\.5 is not a host address of network 'lab' "
                      r"\(10\.0\.100\.0/24\)",
        "10.0.100.0": "is not a host address",
        "10.0.100.255": "is not a host address",
        "10.0.100.1": r"10\.0\.100\.1 is network 'lab''s router address; add ',router'",
    }
    for wanted, message in refused.items():
        with pytest.raises(ConfigError, match=message):
            nics_for("d", f"isolated:lab,ip={wanted}")
    assert not (paths.vms_dir() / "d").exists()


def test_the_router_address_is_refused_to_a_guest_even_when_free() -> None:
    create_network("lab", subnet="10.0.100.0/24")
    with pytest.raises(ConfigError, match="router address"):
        nics_for("g", "isolated:lab,ip=10.0.100.1")


def test_a_30_has_room_for_a_router_and_one_guest() -> None:
    create_network("tiny", subnet="10.9.9.8/30")
    assert address(add_vm("r", "isolated:tiny,router")) == "10.9.9.9/30"
    assert address(add_vm("g", "isolated:tiny")) == "10.9.9.10/30"
    with pytest.raises(NetworkError, match=r"network 'tiny' \(10\.9\.9\.8/30\) has no free "
                                           "address left; remove a VM from it or create a "
                                           "larger network"):
        nics_for("h", "isolated:tiny")


def test_guests_never_take_the_router_address() -> None:
    create_network("tiny", subnet="10.9.9.8/30")
    assert address(add_vm("g", "isolated:tiny")) == "10.9.9.10/30"
    with pytest.raises(NetworkError, match="no free address left"):
        nics_for("h", "isolated:tiny")
    assert address(add_vm("r", "isolated:tiny,router")) == "10.9.9.9/30"


def test_no_ipam_gives_no_address() -> None:
    create_network("far", subnet="10.0.120.0/24", ipam=False)
    first, second = add_vm("a", "isolated:far"), add_vm("b", "isolated:far,router")
    assert [address(first), address(second)] == [None, None]
    assert second.nics[0].router and second.nics[0].network == "far"


def test_a_missing_network_is_not_found() -> None:
    with pytest.raises(NotFound, match="no network called 'nope'; create it with"):
        nics_for("a", "isolated:nope")


def test_a_vm_asking_again_keeps_its_nic_and_a_changed_nic_is_new() -> None:
    create_network("lab", subnet="10.0.100.0/24")
    add_vm("other", "isolated:lab")
    vm = add_vm("g", "nat", "isolated:lab")
    nat, lab = vm.nics
    assert nics_for("g", "isolated:lab", "nat", keep=vm.nics) == [lab, nat]
    assert nics_for("g", f"isolated:lab,ip={lab.address.split('/')[0]}", keep=vm.nics) == [lab]
    moved = nics_for("g", "isolated:lab,ip=10.0.100.50", keep=vm.nics)[0]
    assert (moved.address, moved.mac == lab.mac) == ("10.0.100.50/24", False)
    router = nics_for("g", "isolated:lab,router", keep=vm.nics)[0]
    assert (router.address, router.router, router.mac == lab.mac) == ("10.0.100.1/24", True,
                                                                      False)
    # without keep, the VM's own address counts as free (it is being replaced)
    assert nics_for("g", "isolated:lab")[0].address == lab.address


def test_renew_gives_a_copy_new_macs_and_addresses() -> None:
    create_network("lab", subnet="10.0.100.0/24")
    vm = add_vm("src", "nat", "isolated:lab,ip=10.0.100.7")
    with networks_lock():
        copy = renew_nics(vm.nics, vm="copy")
    assert [(n.mode, n.network, n.router) for n in copy] == [
        (n.mode, n.network, n.router) for n in vm.nics]
    assert not {n.mac for n in copy} & {n.mac for n in vm.nics}
    assert [n.address for n in copy] == [None, "10.0.100.2/24"]


def test_the_networks_lock_times_out_with_lock_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    from secvf.errors import LockBusy

    monkeypatch.setattr(networks, "LOCK_WAIT_S", 0.2)
    ctx = multiprocessing.get_context("fork")
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(held, release))
    holder.start()
    try:
        assert held.wait(10)
        with pytest.raises(LockBusy, match="the networks lock is busy"), networks_lock():
            pass
    finally:
        release.set()
        holder.join(10)
    with networks_lock():
        pass


def _hold_lock(held: object, release: object) -> None:
    with networks_lock():
        held.set()  # type: ignore[attr-defined]
        release.wait(10)  # type: ignore[attr-defined]


# ---- two processes allocating at once ---------------------------------------------------

PER_PROCESS = 12


def _allocate(prefix: str, barrier: object) -> None:
    barrier.wait(10)  # type: ignore[attr-defined]
    for k in range(PER_PROCESS):
        add_vm(f"{prefix}{k}", "isolated:lab")


def test_two_processes_allocating_at_once_never_share_an_address() -> None:
    create_network("lab", subnet="10.0.100.0/24")
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    workers = [ctx.Process(target=_allocate, args=(prefix, barrier)) for prefix in "pq"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    addresses = [u.config.address for u in network_users("lab")]
    assert len(addresses) == 2 * PER_PROCESS
    assert sorted(addresses) == sorted(set(addresses))
    assert {a.split("/")[0] for a in addresses} == {
        f"10.0.100.{n}" for n in range(2, 2 + 2 * PER_PROCESS)}

