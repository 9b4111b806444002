"""Network benchmark: guest→guest TCP throughput and ping RTT through an isolated
network's switch, beside the same two guests talking QEMU to QEMU without a switch.

Two SecVF sandboxes (``--accel tcg``, 512 MiB, cold boot) on one isolated network
(``secvf net create``, default limits: 10,000 frames/s and 1,000 broadcast/s per port).
Each round measures, driven through the exec channel (which is separate from the NIC):

* **ping**: ``busybox ping -c 20 -i 0.2`` from A to B; min and avg RTT;
* **TCP**: A ``sendall``s ``--mib`` MiB in 256 KiB chunks to a Python sink in B, which
  reports bytes over its own time from the first byte to EOF (Mbit/s).

Each round runs both paths on the same running guests:

* **switch**: the product path, ``-netdev dgram`` → ``secvf.net.switch`` → ``-netdev dgram``;
* **baseline, no switch**: the switch is stopped (its watchdog paused with SIGSTOP, the
  switch killed) and each port's switch socket path is replaced by a symlink to the
  *other* QEMU's socket, so the two QEMUs send datagrams straight to each other (QEMU
  resolves the path on every send). That is the floor any switch could reach with these
  guests: the prototype measured QEMU's multicast hub at the same level as this direct
  path (shared/notes/prototype-switch.md §3a), and the hub needs a QEMU command line
  SecVF never builds. Afterwards the symlinks go and the watchdog, resumed, restarts
  the switch (one ``switch_restarted`` event per round in the private log).

The switch's CPU per frame over the TCP run comes from its ``stats`` (``cpu_s`` and the
ports' ``rx``). Synthetic frames/s of the switch alone (capture off and on) are
``bench/switch.py``; run it separately.

    .venv/bin/python bench/network.py [--rounds N] [--mib M]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import threading
import time
from pathlib import Path

import benchlib as bl

from secvf.net.control import query
from secvf.runtime.control import wait_for_ready
from secvf.sdk import Sandbox
from secvf.store import networks, paths

VMS = ("nbench-a", "nbench-b")
NETWORK = "nbench"
SINK_PORT = 5201

SINK = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1); s.settimeout(120)
c, _ = s.accept(); first = None; n = 0
while True:
    b = c.recv(1 << 18)
    if not b:
        break
    if first is None:
        first = time.monotonic()
    n += len(b)
print(n, time.monotonic() - first)
"""

SOURCE = """
import socket, sys, time
for _ in range(100):
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[3])), timeout=5); break
    except OSError:
        time.sleep(0.1)
chunk = bytes(256 << 10)
for _ in range(int(sys.argv[2]) * 4):
    c.sendall(chunk)
c.close()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both paths (3)")
    parser.add_argument("--mib", type=int, default=48, help="MiB per TCP run (48)")
    args = parser.parse_args()
    rep = bl.Report("Network: guest→guest through the isolated-network switch",
                    f"bench/network.py --rounds {args.rounds} --mib {args.mib}")
    with bl.private_secvf():
        run(rep, args.rounds, args.mib)
    rep.print()


def run(rep: bl.Report, rounds: int, mib: int) -> None:
    """Boot the two guests, then alternate the two paths ``rounds`` times."""
    bl.secvf("net", "create", NETWORK, "--subnet", "10.0.130.0/24")
    for vm in VMS:
        bl.secvf("sandbox", "create", vm, "--cold", "--accel", "tcg", "--memory", "512M",
                 "--network", f"isolated:{NETWORK}")
        bl.secvf("vm", "start", vm)
    for vm in VMS:
        wait_for_ready(vm, 240)
    peer = _address(VMS[1])
    results: dict[str, dict[str, list[float]]] = {
        path: {"mbit": [], "rtt_min": [], "rtt_avg": []} for path in ("switch", "direct")}
    per_frame: list[float] = []
    drops: dict[str, int] = {}
    for number in range(rounds):
        bl.log(f"round {number + 1}/{rounds}: switch")
        before = _stats()
        _measure(results["switch"], peer, mib)
        after = _stats()
        frames = _rx(after) - _rx(before)
        if frames:
            per_frame.append((after["cpu_s"] - before["cpu_s"]) / frames * 1e6)
        for reason, count in after["drops"].items():
            drops[reason] = drops.get(reason, 0) + count - before["drops"].get(reason, 0)
        bl.log(f"round {number + 1}/{rounds}: direct (switch stopped)")
        with _without_switch():
            _measure(results["direct"], peer, mib)
    _report(rep, results, per_frame, drops, mib)


def _measure(into: dict[str, list[float]], peer: str, mib: int) -> None:
    a, b = (Sandbox.from_vm(vm) for vm in VMS)
    ping = a.run(["busybox", "ping", "-c", "20", "-i", "0.2", peer], user="root", timeout=60)
    match = re.search(rb"min/avg/max = ([\d.]+)/([\d.]+)/", ping.stdout)
    if ping.exit_code != 0 or match is None:
        raise RuntimeError(f"ping failed: {ping.stdout!r} {ping.stderr!r}")
    into["rtt_min"].append(float(match[1]))
    into["rtt_avg"].append(float(match[2]))
    sink: dict[str, bytes] = {}
    thread = threading.Thread(target=lambda: sink.update(
        out=b.run(["python3", "-c", SINK, str(SINK_PORT)], timeout=180).stdout))
    thread.start()
    sent = a.run(["python3", "-c", SOURCE, peer, str(mib), str(SINK_PORT)], timeout=180)
    thread.join(200)
    if sent.exit_code != 0 or "out" not in sink:
        raise RuntimeError(f"TCP run failed: {sent.stderr!r}")
    count, seconds = sink["out"].split()
    if int(count) != mib << 20:
        raise RuntimeError(f"the sink got {int(count)} bytes, not {mib << 20}")
    into["mbit"].append(int(count) * 8 / float(seconds) / 1e6)


def _netdir() -> Path:
    return paths.network_runtime_dir(networks.load_network(NETWORK).id)


def _stats() -> dict:
    reply = query(_netdir(), {"op": "stats"})
    if not reply.get("ok"):
        raise RuntimeError(f"switch stats: {reply}")
    return reply


def _rx(stats: dict) -> int:
    return sum(p["rx"] for p in stats["ports"])


class _without_switch:
    """Pause the watchdog, kill the switch, cross-link the two QEMUs' sockets; undo."""

    def __enter__(self) -> None:
        netdir = _netdir()
        self.watchdog = int((netdir / "watchdog.lock").read_text().split()[0])
        switch = _stats()["pid"]
        os.kill(self.watchdog, signal.SIGSTOP)
        os.kill(switch, signal.SIGKILL)
        while Path(f"/proc/{switch}").exists() and _state(switch) != "Z":
            time.sleep(0.01)
        ports = [json.loads(p.read_text()) for p in sorted((netdir / "ports").glob("*.json"))]
        if len(ports) != 2:
            raise RuntimeError(f"expected 2 ports, found {len(ports)}")
        self.links = []
        for mine, other in (ports, ports[::-1]):
            link = Path(mine["switch_path"])
            link.unlink(missing_ok=True)
            link.symlink_to(other["qemu_path"])
            self.links.append(link)

    def __exit__(self, *exc: object) -> None:
        for link in self.links:
            link.unlink(missing_ok=True)
        os.kill(self.watchdog, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                _stats()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the switch did not come back within 10 s")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _address(vm: str) -> str:
    _, out = bl.secvf("vm", "status", vm, "--json")
    return str(json.loads(out)["nics"][0]["address"]).split("/")[0]


def _report(rep: bl.Report, results: dict[str, dict[str, list[float]]],
            per_frame: list[float], drops: dict[str, int], mib: int) -> None:
    switch, direct = results["switch"], results["direct"]
    tcp_ratio = statistics.median(switch["mbit"]) / statistics.median(direct["mbit"])
    rep.add(bl.Row(f"TCP A→B, {mib} MiB, Mbit/s (median of {len(switch['mbit'])})",
                   f"{statistics.median(switch['mbit']):.0f} ({_each(switch['mbit'])})",
                   "same guests, QEMU↔QEMU dgram, no switch",
                   f"{statistics.median(direct['mbit']):.0f} ({_each(direct['mbit'])})",
                   f"{tcp_ratio:.2f}× of no switch",
                   f"goal ≥ 0.9× the hub: {'met' if tcp_ratio >= 0.9 else 'MISSED'}"))
    for key, label in (("rtt_min", "min"), ("rtt_avg", "avg")):
        rep.add(bl.Row(f"ping RTT {label}, ms (median of rounds)",
                       f"{statistics.median(switch[key]):.2f} ({_each(switch[key], 2)})",
                       "same guests, no switch",
                       f"{statistics.median(direct[key]):.2f} ({_each(direct[key], 2)})",
                       bl.ratio(statistics.median(switch[key]),
                                statistics.median(direct[key]))))
    if per_frame:
        rep.add(bl.Row("switch CPU per frame during the switch rounds, µs",
                       f"{statistics.median(per_frame):.1f}", "-", "-", "",
                       "stats cpu_s / frames received by the switch"))
    rep.facts.update({
        "guests": "2 SecVF sandboxes, 1 vCPU, 512 MiB, TCG, cold boot, NIC MTU 8986 "
                  "(host_mtu)",
        "network": "secvf net create, default limits (10,000 frames/s, 1,000 broadcast/s "
                   "per port)",
        "switch drops during the switch rounds": ", ".join(
            f"{k} {v}" for k, v in sorted(drops.items()) if v) or "none",
    })
    rep.notes.append("Rounds alternate switch / no switch on the same running guests; "
                     "two TCG guests and the switch share the host's cores, so compare "
                     "within this run only.")


def _each(values: list[float], digits: int = 0) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


if __name__ == "__main__":
    main()
