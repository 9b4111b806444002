"""``secvf net …``, ``vm create --network``, ``vm set-network`` and ``vm clone`` through
the real CLI (ISO VMs: nothing to build, nothing booted)."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from secvf.net.engine import DROP_REASONS
from secvf.store.bundle import bundle_for
from tests.helpers import run_cli
from tests.unit.test_cli_badinput import assert_clean_error

NETWORK_KEYS = {"schema_version", "id", "name", "subnet", "isolate_guests", "ipam", "limits",
                "ring_frames", "analysis", "created_at"}
ROW_KEYS = {"name", "subnet", "isolate_guests", "ipam", "vms", "switch", "ports"}
SHOW_KEYS = NETWORK_KEYS | {"gateway", "switch", "switch_pid", "switch_started_at",
                            "switch_cpu_s", "nics", "drops", "capture", "ring"}
SHOW_NIC_KEYS = {"vm", "nic", "port", "mac", "address", "router", "vm_running", "attached",
                 "learned", "counters"}
COUNTER_KEYS = {"rx", "rx_bytes", "tx", "tx_bytes", "drops"}


def cli_json(*args: str) -> Any:
    return json.loads(run_cli(*args, "--json", check=True).stdout)


def create_vm(name: str, iso: Path, *args: str) -> dict[str, Any]:
    return cli_json("vm", "create", name, "--iso", str(iso), *args)


def nics_of(name: str) -> list[dict[str, Any]]:
    return cli_json("vm", "status", name)["nics"]


def vm_names() -> list[str]:
    return [row["name"] for row in cli_json("vm", "list")]


@contextmanager
def pretend_running(vm: str) -> Iterator[None]:
    """Hold ``vm``'s run lock, as its supervisor does while it runs."""
    fd = os.open(bundle_for(vm).run_lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ---- net create / list / show / rm ------------------------------------------------------


def test_net_create_list_show_rm_json_shapes(secvf_env: Path) -> None:
    lab = cli_json("net", "create", "lab")
    assert set(lab) == NETWORK_KEYS
    assert (lab["name"], lab["subnet"], lab["isolate_guests"], lab["ipam"], lab["limits"],
            lab["ring_frames"]) == ("lab", "10.0.100.0/24", False, True,
                                    {"frames_per_s": 10000, "broadcast_per_s": 1000}, 1000)
    wan = cli_json("net", "create", "wan", "--subnet", "10.0.110.0/28", "--isolate-guests",
                   "--no-ipam", "--frames-per-s", "0", "--broadcast-per-s", "5",
                   "--ring-frames", "20")
    assert (wan["subnet"], wan["isolate_guests"], wan["ipam"], wan["limits"],
            wan["ring_frames"]) == ("10.0.110.0/28", True, False,
                                    {"frames_per_s": 0, "broadcast_per_s": 5}, 20)
    rows = cli_json("net", "list")
    assert [set(r) for r in rows] == [ROW_KEYS, ROW_KEYS]
    assert rows[0] == {"name": "lab", "subnet": "10.0.100.0/24", "isolate_guests": False,
                       "ipam": True, "vms": [], "switch": "stopped", "ports": 0}
    assert rows[1]["name"] == "wan" and rows[1]["isolate_guests"] is True
    shown = cli_json("net", "show", "wan")
    assert set(shown) == SHOW_KEYS
    assert {k: shown[k] for k in NETWORK_KEYS} == wan
    assert (shown["gateway"], shown["switch"], shown["switch_pid"], shown["nics"],
            shown["drops"], shown["capture"], shown["ring"]) == (
        "10.0.110.1", "stopped", None, [], dict.fromkeys(DROP_REASONS, 0), None, None)
    removed = run_cli("net", "rm", "lab", check=True)
    assert "removed network lab" in removed.stdout
    assert not (secvf_env / "networks" / "lab").exists()
    assert [r["name"] for r in cli_json("net", "list")] == ["wan"]
    assert_clean_error(run_cli("net", "show", "lab"), "no network called 'lab'",
                       "secvf net create lab")
    assert_clean_error(run_cli("net", "rm", "lab"), "no network called 'lab'")


def test_net_create_errors_are_clean(secvf_env: Path) -> None:
    run_cli("net", "create", "lab", check=True)
    assert_clean_error(run_cli("net", "create", "lab", "--subnet", "10.9.0.0/24"),
                       "a network named 'lab' already exists")
    assert_clean_error(run_cli("net", "create", "in", "--subnet", "10.0.100.128/25"),
                       "overlaps network 'lab'", "choose another --subnet")
    assert_clean_error(run_cli("net", "create", "bad", "--subnet", "10.0.100.1/24"),
                       "host bits set")
    assert_clean_error(run_cli("net", "create", "v6", "--subnet", "fd00::/64"),
                       "not an IPv4 network")
    assert_clean_error(run_cli("net", "create", "../x"), "network name")
    assert_clean_error(run_cli("net", "create", "n" * 256), "longer than 255 bytes")
    long_name = "n" * 255
    run_cli("net", "create", long_name, "--subnet", "10.1.0.0/24", check=True)
    failed = run_cli("net", "create", "lab", "--json")
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["error"]["type"] == "AlreadyExists"
    assert sorted(p.name for p in (secvf_env / "networks").iterdir()) == [
        ".lock", "lab", long_name]


def test_net_list_shows_a_corrupt_record_and_the_others(secvf_env: Path) -> None:
    run_cli("net", "create", "good", check=True)
    run_cli("net", "create", "bad", "--subnet", "10.0.1.0/24", check=True)
    record = secvf_env / "networks" / "bad" / "network.json"
    record.write_text("{ not json")
    rows = cli_json("net", "list")
    assert [r["name"] for r in rows] == ["bad", "good"]
    assert set(rows[0]) == {"name", "error"} and str(record) in rows[0]["error"]
    assert rows[1]["subnet"] == "10.0.100.0/24"
    listed = run_cli("net", "list", check=True).stdout
    assert "invalid" in listed and "good" in listed
    assert_clean_error(run_cli("net", "show", "bad"), str(record), "not valid JSON")


# ---- vm create --network ----------------------------------------------------------------


def test_a_malware_analysis_vm_has_no_nic_and_nat_only_when_asked(iso: Path) -> None:
    assert create_vm("m", iso, "--kind", "malware-analysis")["nics"] == []
    refused = run_cli("vm", "create", "m2", "--kind", "malware-analysis", "--iso", str(iso),
                      "--network", "nat")
    assert refused.returncode == 1
    assert_clean_error(refused, "--network nat gives a malware-analysis VM",
                       "add --allow-internet", "or use an isolated network")
    assert "m2" not in vm_names()
    allowed = run_cli("vm", "create", "m2", "--kind", "malware-analysis", "--iso", str(iso),
                      "--network", "nat", "--allow-internet", "--json")
    assert allowed.returncode == 0, allowed.stderr
    assert "malware-analysis VM m2 gets the internet" in allowed.stderr
    assert [n["mode"] for n in json.loads(allowed.stdout)["nics"]] == ["nat"]
    assert sorted(vm_names()) == ["m", "m2"]


def test_a_generic_vm_defaults_to_nat_and_takes_several_networks(iso: Path) -> None:
    assert [n["mode"] for n in create_vm("g", iso)["nics"]] == ["nat"]
    run_cli("net", "create", "lab", check=True)
    run_cli("net", "create", "wan", "--subnet", "10.0.110.0/24", check=True)
    nics = create_vm("h", iso, "--network", "isolated:lab", "--network", "nat",
                     "--network", "isolated:wan,router")["nics"]
    assert [(n["mode"], n["network"], n["address"], n["router"]) for n in nics] == [
        ("isolated", "lab", "10.0.100.2/24", False), ("nat", None, None, False),
        ("isolated", "wan", "10.0.110.1/24", True)]
    assert cli_json("vm", "list")[1]["network"] == "isolated:lab,nat,isolated:wan (router)"
    assert create_vm("i", iso, "--network", "isolated:lab,ip=10.0.100.40")["nics"][0][
        "address"] == "10.0.100.40/24"


def test_vm_create_network_errors_are_clean(iso: Path) -> None:
    run_cli("net", "create", "lab", check=True)
    create_vm("a", iso, "--network", "isolated:lab,ip=10.0.100.9")
    for args, words in [
        (["--network", "none", "--network", "nat"], ["cannot go with another"]),
        (["--network", "bridge"], ["expected none, nat or isolated:NAME"]),
        (["--network", "isolated:nope"], ["no network called 'nope'"]),
        (["--network", "isolated:lab,ip=10.0.100.9"], ["10.0.100.9", "is taken"]),
        (["--network", "isolated:lab,ip=10.0.100.1"], ["router address", "',router'"]),
        (["--network", "nat", "--network", "nat"], ["at most one nat NIC"]),
        (["--network", "isolated:lab", "--network", "isolated:lab"],
         ["at most one NIC on each isolated network"]),
    ]:
        assert_clean_error(run_cli("vm", "create", "b", "--iso", str(iso), *args), *words)
    assert vm_names() == ["a"]


# ---- vm set-network ---------------------------------------------------------------------


def test_set_network_keeps_an_unchanged_nic_and_none_removes_all(iso: Path) -> None:
    run_cli("net", "create", "lab", check=True)
    run_cli("net", "create", "wan", "--subnet", "10.0.110.0/24", check=True)
    create_vm("other", iso, "--network", "isolated:lab")
    before = create_vm("g", iso, "--network", "nat", "--network", "isolated:lab")["nics"]
    assert before[1]["address"] == "10.0.100.3/24"
    after = cli_json("vm", "set-network", "g", "--network", "isolated:lab",
                     "--network", "isolated:wan")
    assert after[0] == before[1]  # same MAC, same address
    assert (after[1]["network"], after[1]["address"]) == ("wan", "10.0.110.2/24")
    assert after[1]["mac"] not in {n["mac"] for n in before}
    assert nics_of("g") == after
    assert [n["vm"] for n in cli_json("net", "show", "wan")["nics"]] == ["g"]
    human = run_cli("vm", "set-network", "g", "--network", "isolated:lab,router", check=True)
    assert "nic0: isolated:lab (router)" in human.stdout and "10.0.100.1/24" in human.stdout
    cleared = run_cli("vm", "set-network", "g", "--network", "none", check=True)
    assert "g has no NIC now" in cleared.stdout
    assert nics_of("g") == []
    assert cli_json("net", "show", "wan")["nics"] == []
    run_cli("net", "rm", "wan", check=True)  # nobody uses it now


def test_set_network_refuses_a_running_vm_and_internet_for_malware(iso: Path) -> None:
    run_cli("net", "create", "lab", check=True)
    create_vm("m", iso, "--kind", "malware-analysis", "--network", "isolated:lab")
    before = nics_of("m")
    assert_clean_error(run_cli("vm", "set-network", "m", "--network", "nat"),
                       "add --allow-internet")
    with pretend_running("m"):
        assert_clean_error(run_cli("vm", "set-network", "m", "--network", "none"),
                           "VM 'm' is running; stop it to change its networks")
    assert nics_of("m") == before
    done = run_cli("vm", "set-network", "m", "--network", "nat", "--allow-internet",
                   "--json")
    assert done.returncode == 0 and "gets the internet" in done.stderr
    assert [n["mode"] for n in json.loads(done.stdout)] == ["nat"]
    assert_clean_error(run_cli("vm", "set-network", "nope", "--network", "none"), "nope")


def test_net_rm_is_refused_while_a_vm_uses_it(iso: Path, secvf_env: Path) -> None:
    run_cli("net", "create", "lab", check=True)
    create_vm("b", iso, "--network", "isolated:lab")
    create_vm("a", iso, "--network", "isolated:lab")
    assert_clean_error(run_cli("net", "rm", "lab"), "network 'lab' is used by: a, b",
                       "secvf vm set-network")
    assert (secvf_env / "networks" / "lab" / "network.json").exists()


# ---- vm clone, net show -----------------------------------------------------------------


def test_a_clone_gets_a_new_mac_and_address(iso: Path) -> None:
    run_cli("net", "create", "lab", check=True)
    source = create_vm("src", iso, "--network", "isolated:lab,ip=10.0.100.20",
                       "--network", "nat")["nics"]
    run_cli("vm", "clone", "src", "dst", check=True)
    copy = nics_of("dst")
    assert [(n["mode"], n["network"]) for n in copy] == [("isolated", "lab"), ("nat", None)]
    assert copy[0]["address"] == "10.0.100.2/24"
    assert not {n["mac"] for n in copy} & {n["mac"] for n in source}
    assert nics_of("src") == source
    shown = cli_json("net", "show", "lab")["nics"]
    assert sorted((n["vm"], n["address"]) for n in shown) == [("dst", "10.0.100.2/24"),
                                                               ("src", "10.0.100.20/24")]


def test_cloning_a_router_is_refused_cleanly(iso: Path) -> None:
    """A network has one router address, so the copy of its router cannot be one too."""
    run_cli("net", "create", "lab", check=True)
    create_vm("r", iso, "--network", "isolated:lab,router")
    assert_clean_error(run_cli("vm", "clone", "r", "r2"),
                       "network 'lab' already has a router at 10.0.100.1")
    assert vm_names() == ["r"]


def test_net_show_without_a_switch_shows_stopped_vms_and_zero_counters(iso: Path) -> None:
    run_cli("net", "create", "lab", "--isolate-guests", check=True)
    gw = create_vm("gw", iso, "--network", "nat", "--network", "isolated:lab,router")
    guest = create_vm("guest", iso, "--network", "isolated:lab")
    shown = cli_json("net", "show", "lab")
    assert shown["switch"] == "stopped" and shown["switch_pid"] is None
    nics = sorted(shown["nics"], key=lambda n: n["vm"])
    assert [set(n) for n in nics] == [SHOW_NIC_KEYS, SHOW_NIC_KEYS]
    assert [(n["vm"], n["nic"], n["port"], n["mac"], n["address"], n["router"])
            for n in nics] == [
        ("guest", 0, f"{guest['id'][:8]}-0", guest["nics"][0]["mac"], "10.0.100.2/24", False),
        ("gw", 1, f"{gw['id'][:8]}-1", gw["nics"][1]["mac"], "10.0.100.1/24", True)]
    for nic in nics:
        assert (nic["vm_running"], nic["attached"], nic["learned"]) == (False, False, False)
        assert set(nic["counters"]) == COUNTER_KEYS
        assert [nic["counters"][k] for k in ("rx", "rx_bytes", "tx", "tx_bytes")] == [0] * 4
        assert sum(nic["counters"]["drops"].values()) == 0
    human = run_cli("net", "show", "lab", check=True).stdout
    assert "stopped (starts with the first VM)" in human and "guests isolated" in human
    assert "gw (router)" in human
    assert cli_json("net", "list")[0]["vms"] == ["guest", "gw"]


def test_net_capture_errors_are_clean(tmp_path: Path) -> None:
    run_cli("net", "create", "idle", check=True)
    out = tmp_path / "x.pcapng"
    assert_clean_error(run_cli("net", "capture", "idle", "--duration", "1", "-w", str(out)),
                       "network 'idle' has no running switch")
    assert_clean_error(run_cli("net", "capture", "idle", "--ring", "-w", str(out)),
                       "no running switch, so no ring")
    assert_clean_error(run_cli("net", "capture", "idle", "--filter", "tcp.prot == 1"),
                       "at character")
    assert_clean_error(run_cli("net", "capture", "nope"), "no network called 'nope'")
