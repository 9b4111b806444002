"""Isolated networks end to end: real guests on real switches.

Three sandboxes (their exec channel drives the traffic; it is separate from the NICs)
share the module:

* ``na``: ``lab`` (10.0.100.2) and ``priv``'s router (10.0.110.1);
* ``nb``: ``lab`` (10.0.100.3) and a ``priv`` guest (10.0.110.2);
* ``nc``: a ``priv`` guest (10.0.110.3) and ``far`` (no IPAM: the test gives it an address
  inside *lab*'s subnet, so a frame leaking from ``far`` into ``lab`` would be answered).

``priv`` isolates guests: its guests reach its router, not each other.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from secvf.runtime.control import wait_for_ready
from secvf.sdk import Sandbox
from tests.helpers import alive, run_cli

pytestmark = pytest.mark.vm

VMS = ("na", "nb", "nc")
LAB_A, LAB_B = "10.0.100.2", "10.0.100.3"
PRIV_ROUTER, PRIV_B, PRIV_C = "10.0.110.1", "10.0.110.2", "10.0.110.3"
SECVF = os.path.join(os.path.dirname(sys.executable), "secvf")
#: nc's address on ``far``: inside lab's subnet, so only a leak could make it reachable
FAR_C = "10.0.100.50"


def cli_json(*args: str) -> dict | list:
    return json.loads(run_cli(*args, "--json", check=True).stdout)


def root(vm: str, script: str, timeout: float = 60) -> tuple[int, str]:
    """Run ``script`` with sh as root in ``vm``; its exit code and stdout+stderr."""
    result = Sandbox.from_vm(vm).run(["sh", "-c", script], user="root", timeout=timeout)
    return result.exit_code, (result.stdout + result.stderr).decode(errors="replace")


def iface_of(vm: str, mac: str) -> str:
    """The guest interface whose MAC is ``mac``."""
    code, text = root(vm, f"grep -l {mac} /sys/class/net/*/address")
    assert code == 0, text
    return text.strip().split("/")[-2]


def nic(vm: str, network: str) -> dict:
    status = cli_json("vm", "status", vm)
    return next(n for n in status["nics"] if n.get("network") == network)


def security_events(library: Path, event: str) -> list[dict]:
    found = []
    for path in sorted((library / "logs").glob("security-*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("event") == event:
                found.append(record)
    return found


def eventually(condition: Callable[[], object], within_s: float = 5.0) -> None:
    """Wait until ``condition()`` is true (the switch counts and logs asynchronously)."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.1)


def ping(vm: str, address: str, count: int = 3) -> bool:
    code, _ = root(vm, f"busybox ping -c {count} -W 2 {address}")
    return code == 0


@pytest.fixture(scope="module")
def nets(vm_library: Path) -> Iterator[Path]:
    """The three networks and the three sandboxes on them, booted and ready."""
    run_cli("net", "create", "lab", "--subnet", "10.0.100.0/24", check=True)
    run_cli("net", "create", "priv", "--subnet", "10.0.110.0/24", "--isolate-guests",
            check=True)
    run_cli("net", "create", "far", "--subnet", "10.0.120.0/24", "--no-ipam", check=True)
    layout = {"na": ["isolated:lab", "isolated:priv,router"],
              "nb": ["isolated:lab", "isolated:priv"],
              "nc": ["isolated:priv", "isolated:far"]}
    for vm, networks in layout.items():
        flags = [arg for net in networks for arg in ("--network", net)]
        run_cli("sandbox", "create", vm, "--memory", "512M", *flags, check=True)
    for vm in VMS:
        run_cli("vm", "start", vm, check=True)
    for vm in VMS:
        wait_for_ready(vm, 180)
    far = iface_of("nc", nic("nc", "far")["mac"])
    code, text = root("nc", f"ip addr add {FAR_C}/24 dev {far}")
    assert code == 0, text
    yield vm_library
    for vm in VMS:
        run_cli("sandbox", "rm", "--purge", "--force", vm)
    for name in ("lab", "priv", "far"):
        run_cli("net", "rm", name)


def test_vms_get_their_fixed_addresses(nets: Path) -> None:
    assert nic("na", "lab")["address"] == f"{LAB_A}/24"
    assert nic("na", "priv")["address"] == f"{PRIV_ROUTER}/24"
    assert nic("nb", "priv")["address"] == f"{PRIV_B}/24"
    assert nic("nc", "far")["address"] is None
    code, text = root("nb", "ip -4 -o addr show")
    assert code == 0 and f"{LAB_B}/24" in text and f"{PRIV_B}/24" in text, text


def test_two_vms_on_a_network_ping_and_move_tcp_data(nets: Path) -> None:
    assert ping("na", LAB_B)
    payload_mib = 8
    server = ("import hashlib,socket\n"
              "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
              "s.bind(('0.0.0.0', 5001)); s.listen(1); s.settimeout(60)\n"
              "c,_=s.accept(); h=hashlib.sha256(); n=0\n"
              "while True:\n"
              "    b=c.recv(1<<16)\n"
              "    if not b: break\n"
              "    h.update(b); n+=len(b)\n"
              "print(n, h.hexdigest())\n")
    received: dict[str, str] = {}

    def serve() -> None:
        result = Sandbox.from_vm("nb").run(["python3", "-c", server], timeout=90)
        received["out"] = result.stdout.decode()

    thread = threading.Thread(target=serve)
    thread.start()
    client = ("import socket,time\n"
              "for _ in range(50):\n"
              "    try:\n"
              f"        c=socket.create_connection(('{LAB_B}', 5001), timeout=5); break\n"
              "    except OSError: time.sleep(0.2)\n"
              f"c.sendall(bytes(range(256))*4096*{payload_mib}); c.close()\n")
    result = Sandbox.from_vm("na").run(["python3", "-c", client], timeout=90)
    thread.join(120)
    assert result.exit_code == 0, result.stderr
    expected = hashlib.sha256(bytes(range(256)) * 4096 * payload_mib).hexdigest()
    assert received["out"].split() == [str(payload_mib << 20), expected]


def test_networks_do_not_reach_each_other(nets: Path) -> None:
    assert not ping("nc", LAB_A, count=2)  # nc's far NIC sits in lab's subnet
    far_mac = nic("nc", "far")["mac"]
    lab = cli_json("net", "show", "lab")
    assert far_mac not in {n["mac"] for n in lab["nics"]}
    frames = json.loads("[" + ",".join(run_cli("packets", "lab", "--json", check=True)
                                       .stdout.splitlines()) + "]")
    assert frames, "lab's ring holds the lab VMs' frames"
    assert all(far_mac not in (f.get("eth_src"), f.get("eth_dst")) for f in frames)


def test_isolated_guests_reach_the_router_but_not_each_other(nets: Path) -> None:
    assert ping("nb", PRIV_ROUTER)
    to_c = _port("priv", "nc")["counters"]["tx"]
    assert not ping("nb", PRIV_C, count=2)  # its ARP broadcasts reach only the router
    # (the router may send nc a frame of its own meanwhile: fewer than nb's two)
    assert _port("priv", "nc")["counters"]["tx"] - to_c < 2
    # told nc's MAC, nb sends unicast: the switch drops it
    iface, c_mac = iface_of("nb", nic("nb", "priv")["mac"]), nic("nc", "priv")["mac"]
    before = cli_json("net", "show", "priv")["drops"].get("isolation", 0)
    code, text = root("nb", f"ip neigh replace {PRIV_C} lladdr {c_mac} dev {iface} nud "
                            f"permanent && ! busybox ping -c 2 -W 1 {PRIV_C}")
    assert code == 0, text
    assert cli_json("net", "show", "priv")["drops"]["isolation"] >= before + 2
    assert _port("priv", "nc")["counters"]["tx"] - to_c < 2


def test_a_spoofed_mac_is_dropped_with_one_critical_event(nets: Path) -> None:
    victim_mac, spoofer = nic("na", "lab")["mac"], nic("nb", "lab")
    iface = iface_of("nb", spoofer["mac"])
    before = len(security_events(nets, "mac_spoof"))
    code, text = root("nb", f"ip link set dev {iface} address {victim_mac} && "
                            f"busybox ping -c 4 -W 1 {LAB_A}; "
                            f"ip link set dev {iface} address {spoofer['mac']}")
    assert "0 packets received" in text or code != 0, text
    events = security_events(nets, "mac_spoof")[before:]
    assert len(events) == 1, events
    assert events[0]["severity"] == "CRITICAL" and events[0]["vm"] == "nb"
    assert "na" in json.dumps(events[0])  # the VM whose MAC was claimed
    drops = next(n for n in cli_json("net", "show", "lab")["nics"] if n["vm"] == "nb")
    assert drops["counters"]["drops"]["spoof"] >= 1
    assert ping("nb", LAB_A)  # its own MAC back: forwarded again


FLOOD = """
import socket, sys, time
iface, mac = sys.argv[1], bytes.fromhex(sys.argv[2].replace(':', ''))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((iface, 0))
frame = b'\\xff' * 6 + mac + b'\\x88\\xb5' + bytes(46)
sent, began = 0, time.monotonic()
while time.monotonic() - began < 3:
    for _ in range(100):
        try:
            s.send(frame); sent += 1
        except OSError:
            pass
print(sent)
"""


def test_a_broadcast_flood_is_limited_with_one_event_per_window(nets: Path) -> None:
    flooder = nic("nb", "lab")
    iface = iface_of("nb", flooder["mac"])
    before = len(security_events(nets, "frame_rate_limited"))
    rx_before = _port("lab", "na")["counters"]["tx"]
    result = Sandbox.from_vm("nb").run(["python3", "-c", FLOOD, iface, flooder["mac"]],
                                       user="root", timeout=60)
    assert result.exit_code == 0, result.stderr
    sent = int(result.stdout)
    delivered = _port("lab", "na")["counters"]["tx"] - rx_before
    drops = _port("lab", "nb")["counters"]["drops"]
    assert sent > 3 * 1000 and drops["broadcast_rate"] > 0, (sent, drops)
    assert delivered <= 4 * 1000 + 100  # at most 1,000 a second for ~3 s, plus a window edge
    def flood_events() -> list[dict]:
        return [e for e in security_events(nets, "frame_rate_limited")[before:]
                if e["vm"] == "nb" and e["reason"] == "broadcast_rate"]

    # a window's event is written when the window closes: wait for the last one
    eventually(lambda: sum(e["dropped"] for e in flood_events()) == drops["broadcast_rate"])
    events = flood_events()
    # one per port per window, each counting that window's drops: not one per frame
    assert events and all(e["dropped"] >= 1 for e in events), events
    assert len(events) * 100 < drops["broadcast_rate"], (len(events), drops)
    assert sum(e["dropped"] for e in events) == drops["broadcast_rate"]


def _port(network: str, vm: str) -> dict:
    return next(n for n in cli_json("net", "show", network)["nics"] if n["vm"] == vm)


def test_a_dns_query_is_captured_and_read_back(nets: Path, tmp_path: Path) -> None:
    out = tmp_path / "dns.pcapng"
    capture = subprocess.Popen(
        [SECVF, "net", "capture", "lab",
         "-w", str(out), "--duration", "12", "--filter", "udp.port == 53", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    root("na", f"busybox nslookup secvf-probe.example {LAB_B}", timeout=30)
    stdout, stderr = capture.communicate(timeout=60)
    assert capture.returncode == 0, stderr
    result = json.loads(stdout)
    assert result["frames"] >= 1 and result["switch_dropped"] == 0, result
    shown = subprocess.run(["tcpdump", "-nn", "-r", str(out)], capture_output=True, text=True)
    assert shown.returncode == 0 and "secvf-probe.example" in shown.stdout, shown
    for expression in ("udp.port == 53", "dns"):
        lines = run_cli("packets", str(out), "--filter", expression, "--json",
                        check=True).stdout.splitlines()
        assert any("secvf-probe.example" in line for line in lines), (expression, lines)
    assert run_cli("packets", str(out), "--filter", "tcp", "--json").stdout.strip() == ""


def test_capture_on_a_full_disk_stops_clearly_and_the_switch_keeps_forwarding(
        nets: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], check=True)
    try:
        flood = "busybox ping -c 400 -i 0.01 -s 1400 " + LAB_B
        capture = subprocess.Popen(
            [SECVF, "net", "capture",
             "lab", "-w", str(small / "cap.pcapng"), "--duration", "30"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2)
        root("na", flood, timeout=60)
        _, stderr = capture.communicate(timeout=60)
        assert capture.returncode == 1
        assert "disk is full" in stderr and "switch keeps forwarding" in stderr, stderr
        assert ping("na", LAB_B)
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_a_killed_switch_is_restarted_and_the_vms_talk_again(nets: Path) -> None:
    before = cli_json("net", "show", "lab")
    assert before["switch"] == "running"
    events = len(security_events(nets, "switch_restarted"))
    os.kill(before["switch_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = cli_json("net", "show", "lab")
        if now["switch"] == "running" and now["switch_pid"] != before["switch_pid"]:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the switch was not restarted within 10 s")
    assert not alive(before["switch_pid"])
    eventually(lambda: security_events(nets, "switch_restarted")[events:])
    restarted = security_events(nets, "switch_restarted")[events:]
    assert len(restarted) == 1 and restarted[0]["network"] == "lab", restarted
    assert ping("na", LAB_B)


def test_a_foreign_sender_is_dropped_and_logged(nets: Path) -> None:
    port = _port("lab", "na")
    netdir = Path(os.environ["SECVF_RUNTIME_DIR"]) / "net"
    (switch_socket,) = netdir.glob(f"*/p/{port['port']}.s")
    before = port["counters"]["drops"].get("foreign_sender", 0)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as intruder:
        intruder.bind(str(netdir / "intruder.sock"))
        intruder.sendto(b"\xff" * 6 + bytes.fromhex(port["mac"].replace(":", "")) +
                        b"\x08\x06" + bytes(46), str(switch_socket))
    eventually(lambda: _port("lab", "na")["counters"]["drops"]["foreign_sender"] == before + 1)
    eventually(lambda: any(e["network"] == "lab"
                           for e in security_events(nets, "foreign_sender")))


def test_a_network_in_use_cannot_be_removed(nets: Path) -> None:
    result = run_cli("net", "rm", "lab")
    assert result.returncode == 1 and "used by: na, nb" in result.stderr
    assert cli_json("net", "show", "lab")["name"] == "lab"
