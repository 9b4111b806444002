"""The network model: a VM's NICs in ``vm.json`` (version 2, and version 1 read as 2),
the ``--network`` grammar, subnets and switch port names."""

from __future__ import annotations

import ipaddress
import json
import re
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from secvf.errors import ConfigError, SecVFError
from secvf.model.config import (
    MAX_NICS,
    Nic,
    load_config,
    network_summary,
    new_mac,
    now_iso,
    parse_config,
    save_config,
)
from secvf.model.enums import NetworkMode
from secvf.model.network import (
    MAX_PREFIX,
    MIN_PREFIX,
    NicRequest,
    parse_nic_request,
    parse_nic_requests,
    parse_subnet,
    port_name,
)
from secvf.net.config import PORT_NAME


def raw_vm(**over: object) -> dict[str, object]:
    """A version 2 ``vm.json`` object (no NIC unless ``nics`` is given)."""
    data: dict[str, object] = {
        "schema_version": 2, "id": str(uuid.uuid4()), "name": "vm1", "kind": "generic",
        "cpus": 1, "memory_mib": 512, "disk_bytes": 1 << 30,
        "boot": {"type": "iso", "path": "/x.iso"}, "nics": [],
        "created_at": now_iso(), "updated_at": now_iso(),
    }
    data.update(over)
    return data


def nat() -> dict[str, object]:
    return {"mode": "nat", "mac": new_mac()}


def isolated(network: str, **over: object) -> dict[str, object]:
    return {"mode": "isolated", "network": network, "mac": new_mac(), **over}


# ---- Nic ------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [{"network": "lab"}, {"address": "10.0.100.2/24"},
                                   {"router": True}])
def test_a_nat_nic_has_no_network_address_or_router(extra: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match="a nat NIC has no network, address or router"):
        Nic.model_validate({**nat(), **extra})


def test_an_isolated_nic_names_its_network() -> None:
    with pytest.raises(ValidationError, match="an isolated NIC names its network"):
        Nic.model_validate({"mode": "isolated", "mac": new_mac()})


def test_none_is_not_a_nic_mode() -> None:
    with pytest.raises(ValidationError, match="'none' means no NIC"):
        Nic.model_validate({"mode": "none", "mac": new_mac()})


@pytest.mark.parametrize("address", ["10.0.100.300/24", "10.0.100.2/33", "bogus",
                                     "fd00::2/64"])
def test_an_isolated_nic_address_must_be_ipv4_with_prefix(address: str) -> None:
    with pytest.raises(ConfigError, match=r"vm\.json: field 'nics\.0'"):
        parse_config(raw_vm(nics=[isolated("lab", address=address)]), source="vm.json")


@pytest.mark.parametrize("mac", ["zz", "52:54:00:AA:BB:CC", "02:00:00:00:00:01", ""])
def test_a_nic_mac_is_in_qemus_range(mac: str) -> None:
    with pytest.raises(ConfigError, match=r"field 'nics\.0\.mac'"):
        parse_config(raw_vm(nics=[{"mode": "nat", "mac": mac}]), source="vm.json")


@pytest.mark.parametrize("network", ["../x", ".x", "a b", ""])
def test_a_bad_network_name_in_vm_json_is_a_config_error_naming_the_file(network: str) -> None:
    with pytest.raises(ConfigError, match=r"/lib/vm1/vm\.json: field 'nics\.0'"):
        parse_config(raw_vm(nics=[isolated(network)]), source="/lib/vm1/vm.json")


def test_a_bad_network_name_is_refused() -> None:
    """Whatever the exception type, a NIC on network '../x' never validates."""
    with pytest.raises((ValueError, SecVFError)):
        parse_config(raw_vm(nics=[isolated("../x")]), source="vm.json")
    with pytest.raises(Exception, match="network name"):
        Nic.model_validate(isolated("../x"))


def test_distinct_nics_each_refused_with_a_clear_message() -> None:
    mac = new_mac()
    cases = {
        "two NICs have the same MAC": [isolated("a", mac=mac), isolated("b", mac=mac)],
        "at most one nat NIC": [nat(), nat()],
        "at most one NIC on each isolated network": [isolated("lab"), isolated("lab")],
    }
    for message, nics in cases.items():
        with pytest.raises(ConfigError, match=rf"vm\.json: field 'nics': .*{message}"):
            parse_config(raw_vm(nics=nics), source="vm.json")


def test_at_most_eight_nics() -> None:
    nics = [nat(), *(isolated(f"n{i}") for i in range(MAX_NICS - 1))]
    assert len(parse_config(raw_vm(nics=nics), source="t").nics) == MAX_NICS == 8
    with pytest.raises(ConfigError, match="nics"):
        parse_config(raw_vm(nics=[*nics, isolated("one-more")]), source="t")


def test_nics_round_trip_through_vm_json(tmp_path: Path) -> None:
    nics = [nat(), isolated("lab", address="10.0.100.2/24"),
            isolated("wan", address="10.0.110.1/24", router=True)]
    config = parse_config(raw_vm(nics=nics), source="t")
    save_config(tmp_path / "vm.json", config)
    assert load_config(tmp_path / "vm.json") == config
    assert [n.describe() for n in config.nics] == ["nat", "isolated:lab",
                                                    "isolated:wan (router)"]


# ---- version 1 vm.json ------------------------------------------------------------------


def version_1(network: str, mac: str) -> dict[str, object]:
    data = raw_vm(network=network, mac=mac)
    data.pop("nics")
    data["schema_version"] = 1
    return data


def test_version_1_nat_is_read_as_one_nat_nic_and_saved_as_version_2(tmp_path: Path) -> None:
    mac = new_mac()
    path = tmp_path / "vm.json"
    path.write_text(json.dumps(version_1("nat", mac)))
    config = load_config(path)
    assert config.schema_version == 2
    assert [(n.mode, n.mac, n.network, n.address, n.router) for n in config.nics] == [
        (NetworkMode.NAT, mac, None, None, False)]
    save_config(path, config)
    saved = json.loads(path.read_text())
    assert saved["schema_version"] == 2 and "network" not in saved and "mac" not in saved
    assert saved["nics"] == [{"mode": "nat", "mac": mac, "network": None, "address": None,
                              "router": False}]
    assert load_config(path) == config


def test_version_1_without_schema_version_and_none_is_read_as_no_nic() -> None:
    data = version_1("none", new_mac())
    del data["schema_version"]  # the oldest files had none
    config = parse_config(data, source="t")
    assert config.nics == [] and config.schema_version == 2
    assert config.network_summary == "none"


def test_version_1_with_a_bad_network_or_mac_is_still_refused() -> None:
    with pytest.raises(ConfigError, match=r"nics\.0"):
        parse_config(version_1("bridge", new_mac()), source="t")
    with pytest.raises(ConfigError, match=r"nics\.0\.mac"):
        parse_config(version_1("nat", "zz"), source="t")


def test_version_2_keys_of_version_1_are_refused() -> None:
    with pytest.raises(ConfigError, match="network"):
        parse_config(raw_vm(network="nat"), source="t")


# ---- network_summary ------------------------------------------------------------------


def test_network_summary() -> None:
    def summary(*nics: dict[str, object]) -> str:
        return network_summary([Nic.model_validate(n) for n in nics])

    assert summary() == "none"
    assert summary(nat()) == "nat"
    assert summary(nat(), isolated("lab")) == "nat,isolated:lab"
    assert summary(isolated("lab", router=True), nat()) == "isolated:lab (router),nat"


# ---- parse_nic_requests -----------------------------------------------------------------


def test_nic_request_grammar() -> None:
    assert parse_nic_requests(["none"]) == []
    assert parse_nic_requests(["nat"]) == [NicRequest(NetworkMode.NAT)]
    assert parse_nic_requests(["isolated:lab", "nat", "isolated:wan,router"]) == [
        NicRequest(NetworkMode.ISOLATED, "lab"), NicRequest(NetworkMode.NAT),
        NicRequest(NetworkMode.ISOLATED, "wan", router=True)]
    assert parse_nic_request("isolated:lab,ip=10.0.100.9") == NicRequest(
        NetworkMode.ISOLATED, "lab", address="10.0.100.9")
    assert parse_nic_request("isolated:lab,ip=10.0.100.1,router") == NicRequest(
        NetworkMode.ISOLATED, "lab", router=True, address="10.0.100.1")


@pytest.mark.parametrize(("values", "words"), [
    (["none", "nat"], ["none", "cannot go with another"]),
    (["isolated:lab", "none"], ["cannot go with another"]),
    (["bridge"], ["'bridge'", "expected none, nat or isolated:NAME"]),
    (["NAT"], ["expected none, nat"]),
    (["isolated"], ["expected none, nat"]),
    (["isolated:"], ["expected none, nat"]),
    (["nat,router"], ["expected none, nat"]),
    (["isolated:lab,gateway"], ["unknown option 'gateway'", "router, ip=ADDRESS"]),
    (["isolated:lab,"], ["unknown option ''"]),
    (["isolated:../x"], ["network name", "'../x'"]),
    (["isolated:.x"], ["network name"]),
    (["isolated:a b"], ["network name"]),
    (["isolated:" + "x" * 256], ["longer than 255 bytes"]),
    (["isolated:lab,ip=10.0.100.300"], ["'10.0.100.300' is not an IPv4 address"]),
    (["isolated:lab,ip=fd00::1"], ["is not an IPv4 address"]),
    (["isolated:lab,ip=10.0.100.9/24"], ["is not an IPv4 address"]),
    (["isolated:lab,ip="], ["'' is not an IPv4 address"]),
])
def test_bad_nic_requests_are_config_errors(values: list[str], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_nic_requests(values)
    for word in words:
        assert word in str(info.value)


SPEC_PARTS = st.sampled_from(["none", "nat", "isolated", ":", ",", "router", "ip=", "lab",
                              "10.0.100.9", "=", ".", "..", "/", " ", "-", "1", "\x00", "é"])
specs = st.one_of(st.text(max_size=40), st.lists(SPEC_PARTS, max_size=8).map("".join))


@settings(max_examples=400, deadline=None)
@given(st.lists(specs, max_size=4))
def test_any_network_values_parse_or_give_a_config_error(values: list[str]) -> None:
    try:
        requests = parse_nic_requests(values)
    except ConfigError:
        return
    for request in requests:
        if request.mode is NetworkMode.NAT:
            assert request == NicRequest(NetworkMode.NAT)
            continue
        assert request.mode is NetworkMode.ISOLATED
        assert request.network and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", request.network)
        if request.address is not None:
            ipaddress.IPv4Address(request.address)


names = st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9._-]{0,30}\Z")


@settings(max_examples=200, deadline=None)
@given(names, st.booleans(), st.none() | st.ip_addresses(v=4).map(str))
def test_a_written_spec_parses_back(name: str, router: bool, address: str | None) -> None:
    spec = f"isolated:{name}" + (",router" if router else "") + (
        f",ip={address}" if address else "")
    assert parse_nic_request(spec) == NicRequest(NetworkMode.ISOLATED, name, router, address)


# ---- parse_subnet, port_name ----------------------------------------------------------


def test_parse_subnet_accepts_prefixes_8_to_30() -> None:
    assert (MIN_PREFIX, MAX_PREFIX) == (8, 30)
    assert parse_subnet("10.0.0.0/8") == ipaddress.IPv4Network("10.0.0.0/8")
    assert parse_subnet("10.0.100.0/24").num_addresses == 256
    assert parse_subnet("192.168.7.4/30") == ipaddress.IPv4Network("192.168.7.4/30")


@pytest.mark.parametrize(("text", "words"), [
    ("10.0.100.1/24", ["not an IPv4 network", "host bits"]),
    ("10.0.0.0/7", ["/8 to /30"]),
    ("10.0.0.0/31", ["/8 to /30"]),
    ("10.0.0.1/32", ["/8 to /30"]),
    ("10.0.0.1", ["/8 to /30"]),
    ("fd00::/64", ["not an IPv4 network"]),
    ("10.0.0.0/33", ["not an IPv4 network"]),
    ("lab", ["not an IPv4 network"]),
    ("", ["not an IPv4 network"]),
])
def test_parse_subnet_refuses(text: str, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        parse_subnet(text)
    for word in words:
        assert word in str(info.value)


def test_port_name_is_short_and_what_the_switch_accepts() -> None:
    vm_id = "a1b2c3d4-e5f6-4789-8abc-def012345678"
    assert port_name(vm_id, 0) == "a1b2c3d4-0"
    assert port_name(vm_id, 7) == "a1b2c3d4-7"
    for _ in range(20):
        name = port_name(str(uuid.uuid4()), MAX_NICS - 1)
        assert PORT_NAME.match(name) and len(name) == 10
    assert port_name(str(uuid.UUID(int=0xABCDEF)), 1) == "00000000-1"
