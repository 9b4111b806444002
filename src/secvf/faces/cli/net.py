"""``secvf net …``: isolated networks (create, list, show, rm, capture), and
``secvf vm set-network``."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import click

from secvf import api
from secvf.faces.cli.app import NETWORK_HELP, Seconds, SecVFGroup
from secvf.faces.cli.common import err, escape, new_table, note, out, print_json


@click.group(cls=SecVFGroup)
def net() -> None:
    """Isolated networks: L2 segments of their own switch, with capture."""


@net.command("create")
@click.argument("name")
@click.option("--subnet", default="10.0.100.0/24", show_default=True,
              help="IPv4 subnet the VMs' fixed addresses come from (.1 is the router's).")
@click.option("--isolate-guests", is_flag=True,
              help="Guest NICs reach only the router NIC (a private VLAN).")
@click.option("--no-ipam", is_flag=True,
              help="Give NICs no fixed address: the guests address themselves.")
@click.option("--frames-per-s", type=click.IntRange(min=0), metavar="N",
              help="Per-port limit of frames per second (default 10000; 0: none).")
@click.option("--broadcast-per-s", type=click.IntRange(min=0), metavar="N",
              help="Per-port limit of broadcast/multicast frames per second (default 1000).")
@click.option("--ring-frames", type=click.IntRange(min=0), metavar="N",
              help="Frames the always-on capture ring keeps (default 1000).")
@click.option("--json", "as_json", is_flag=True)
def net_create(name: str, subnet: str, isolate_guests: bool, no_ipam: bool,
               frames_per_s: int | None, broadcast_per_s: int | None, ring_frames: int | None,
               as_json: bool) -> None:
    """Create isolated network NAME (VMs join it with --network isolated:NAME)."""
    config = api.create_network(name, subnet=subnet, isolate_guests=isolate_guests,
                                ipam=not no_ipam, frames_per_s=frames_per_s,
                                broadcast_per_s=broadcast_per_s, ring_frames=ring_frames)
    if as_json:
        print_json(config.model_dump(mode="json"))
        return
    extra = ", guests isolated" if isolate_guests else ""
    out.print(f"created network [bold]{escape(name)}[/] ({config.subnet}{extra}); "
              f"join it with: secvf vm create VM --network isolated:{escape(name)}",
              highlight=False)


@net.command("list")
@click.option("--json", "as_json", is_flag=True)
def net_list(as_json: bool) -> None:
    """List isolated networks."""
    rows = api.list_networks()
    if as_json:
        print_json(rows)
        return
    if not rows:
        note("no networks; create one with: secvf net create NAME")
        return
    table = new_table("NAME", "SUBNET", "GUESTS", "VMS", "SWITCH")
    for row in rows:
        if "error" in row:
            table.add_row(escape(row["name"]), "[red]invalid[/]", "", "", escape(row["error"]))
            continue
        table.add_row(escape(row["name"]), row["subnet"],
                      "isolated" if row["isolate_guests"] else "shared",
                      escape(", ".join(row["vms"]) or "-"),
                      f"{row['switch']} ({row['ports']} ports)" if row["switch"] == "running"
                      else row["switch"])
    out.print(table)


@net.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def net_show(name: str, as_json: bool) -> None:
    """Show network NAME: its NICs, learned MACs, counters and drops by reason."""
    info = api.show_network(name)
    if as_json:
        print_json(info)
        return
    limits = info["limits"]
    out.print(f"[bold]{escape(info['name'])}[/] {info['subnet']} (router {info['gateway']}, "
              f"{'guests isolated' if info['isolate_guests'] else 'guests shared'}, "
              f"{'fixed addresses' if info['ipam'] else 'no IPAM'})", highlight=False)
    out.print(f"  limits: {_limit(limits['frames_per_s'])} frames/s, "
              f"{_limit(limits['broadcast_per_s'])} broadcast/s per port; "
              f"ring {info['ring_frames']} frames", highlight=False)
    switch = (f"running, pid {info['switch_pid']}, cpu {info['switch_cpu_s']:.2f} s"
              if info["switch"] == "running" else "stopped (starts with the first VM)")
    out.print(f"  switch: {switch}", highlight=False)
    if info["nics"]:
        out.print(_nic_table(info["nics"]))
    drops = {k: v for k, v in info["drops"].items() if v}
    if drops:
        out.print("  drops: " + ", ".join(f"{k} {v}" for k, v in sorted(drops.items())),
                  highlight=False)
    if info["capture"] and info["capture"]["clients"]:
        out.print(f"  captures: {info['capture']['clients']} running, "
                  f"{info['capture']['dropped']} frames they missed", highlight=False)


def _limit(value: int) -> str:
    return "unlimited" if value == 0 else str(value)


def _nic_table(nics: list[dict[str, Any]]) -> Any:
    table = new_table("VM", "NIC", "MAC", "ADDRESS", "STATE", "RX", "TX", "DROPS")
    for nic in nics:
        counters = nic["counters"]
        state = ("attached" if nic["attached"] else "running" if nic["vm_running"]
                 else "stopped")
        if nic["learned"]:
            state += ", learned"
        drops = sum(counters["drops"].values())
        role = " (router)" if nic["router"] else ""
        table.add_row(escape(nic["vm"]) + role, str(nic["nic"]), nic["mac"],
                      nic["address"] or "-", state, f"{counters['rx']}", f"{counters['tx']}",
                      str(drops))
    return table


@net.command("rm")
@click.argument("name")
def net_rm(name: str) -> None:
    """Remove network NAME (refused while a VM has a NIC on it)."""
    api.remove_network(name)
    out.print(f"removed network [bold]{escape(name)}[/]")


@net.command("capture")
@click.argument("name")
@click.option("--vm", help="Only this VM's NICs.")
@click.option("-w", "--write", "path", type=click.Path(path_type=Path), metavar="FILE",
              help="First pcapng file (default: $SECVF_HOME/captures/NAME-TIME.pcapng).")
@click.option("--filter", "-f", "expression", metavar="EXPR",
              help="Keep only frames matching EXPR (see: secvf packets; docs/packets.md).")
@click.option("--duration", type=Seconds(), help="Stop after this many seconds.")
@click.option("--count", "-c", type=click.IntRange(min=1), help="Stop after N frames.")
@click.option("--max-size", metavar="SIZE", help="Start a new file at this size (e.g. 100M).")
@click.option("--max-files", type=click.IntRange(min=1), default=10, show_default=True,
              help="Keep at most this many files (the oldest is removed).")
@click.option("--ring", is_flag=True, help="Write the always-on ring (the last frames) and end.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def net_capture(name: str, vm: str | None, path: Path | None, expression: str | None,
                duration: float | None, count: int | None, max_size: str | None,
                max_files: int, ring: bool, as_json: bool) -> None:
    """Capture network NAME's frames into pcapng files (one interface per VM NIC) until
    --duration, --count or Ctrl-C; frames the capture could not keep up with are counted
    and shown, never dropped silently."""
    if ring:
        if vm or expression or duration or count or max_size:
            raise click.UsageError("--ring writes the whole ring: it takes only -w")
        result = api.export_ring(name, path)
    else:
        request = api.CaptureRequest(
            network=name, path=path, vm=vm, filter=expression, duration_s=duration,
            max_frames=count, max_size=api.parse_size(max_size) if max_size else None,
            max_files=max_files)
        result = _capture_live(request, show=not as_json)
    if as_json:
        print_json(vars(result))
        return
    missed = (f", [yellow]{result.switch_dropped} frames missed[/] (the capture fell behind)"
              if result.switch_dropped else "")
    out.print(f"{result.frames} frames, {api.format_size(result.bytes)} written to "
              f"{escape(', '.join(result.files))}{missed}", highlight=False)


def _capture_live(request: Any, *, show: bool) -> Any:
    stopping = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stopping.set())
    try:
        with err.status(f"capturing {escape(request.network)}") as status:
            def progress(state: Any) -> None:
                if show:
                    status.update(f"capturing {escape(request.network)}: {state.frames} "
                                  f"frames, {api.format_size(state.bytes)}, "
                                  f"{state.switch_dropped} missed (Ctrl-C ends)")

            return api.capture_network(request, progress, stopping.is_set)
    finally:
        signal.signal(signal.SIGINT, previous)


@click.command("set-network")
@click.argument("name")
@click.option("--network", "networks", multiple=True, required=True, metavar="SPEC",
              help=NETWORK_HELP)
@click.option("--allow-internet", is_flag=True,
              help="Let a malware-analysis VM have --network nat (the sample gets the internet).")
@click.option("--json", "as_json", is_flag=True)
def vm_set_network(name: str, networks: tuple[str, ...], allow_internet: bool,
                   as_json: bool) -> None:
    """Give stopped VM NAME these NICs (replacing its NICs; --network none: no NIC)."""
    config = api.set_vm_networks(name, networks, allow_internet=allow_internet)
    if as_json:
        print_json([nic.model_dump(mode="json") for nic in config.nics])
        return
    for index, nic in enumerate(config.nics):
        address = f" {nic.address}" if nic.address else ""
        out.print(f"nic{index}: {escape(nic.describe())} {nic.mac}{address}", highlight=False)
    if not config.nics:
        out.print(f"{escape(name)} has no NIC now")
