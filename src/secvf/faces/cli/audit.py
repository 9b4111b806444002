"""``secvf audit``: every VM's host-guest surfaces; exit 1 on any finding."""

from __future__ import annotations

import sys
from typing import Any

import click

from secvf import api
from secvf.faces.cli.common import escape, new_table, out, print_json


@click.command("audit")
@click.option("--json", "as_json", is_flag=True)
def audit(as_json: bool) -> None:
    """Show every VM's host-guest surfaces (hot-plugged devices too); exit 1 if any
    contradicts its kind."""
    data = api.audit()
    if as_json:
        print_json(data)
    else:
        table = new_table("VM", "KIND", "STATE", "CHANNELS", "HOT-PLUGGED", "EXEC SOCKET",
                          "SHARES", "NIC", "DISK CHAIN", "JAIL", "FINDINGS")
        for res in data["vms"]:
            chans = ", ".join(sorted({str(d.get("channel")) for d in res["channel_devices"]}))
            sock = f"{res['exec_socket']['mode']}" if res["exec_socket"] else "-"
            shares = ", ".join(f"{s['host_path']} ({s['mode']})" for s in res["shares"]) or "-"
            chain = "\n".join(
                ("[red]outside:[/] " if d["where"] == "outside" else "")
                + escape(f"{d['format']} {d['path']}") for d in res["disk_chain"]) or "-"
            table.add_row(escape(res["name"]), escape(res["kind"]), escape(res["state"]),
                          escape(f"{chans or '-'} [{res['source']}]"),
                          _hotplugged(res.get("hotplugged", [])), escape(sock),
                          escape(shares), escape(res["network"]), chain,
                          _jail(res.get("jail")),
                          escape("\n".join(res["findings"])) or "[green]none[/]")
        out.print(table)
        for finding in data["stray"]:
            out.print(f"[red]finding:[/] {escape(finding)}")
    sys.exit(1 if data["finding_count"] else 0)


def _hotplugged(devices: list[dict[str, Any]]) -> str:
    """The HOT-PLUGGED cell: one device a line, ``id type (channel)``; one that the
    VM's machine plan did not ask for is marked."""
    lines = []
    for dev in devices:
        channel = f" ({dev['channel']})" if dev.get("channel") else ""
        text = escape(f"{dev['path'].rsplit('/', 1)[-1]} {dev['type']}{channel}")
        lines.append(text if dev.get("planned") else f"[yellow]not planned:[/] {text}")
    return "\n".join(lines) or "-"


def _jail(jail: dict[str, Any] | None) -> str:
    """The JAIL cell: uid and limits of a running VM's jail (``-``: none)."""
    if jail is None:
        return "-"
    who = "user ns" if jail.get("user_namespace") else f"uid {jail['uid']}"
    limits = jail.get("limits")
    if limits is None:
        return escape(f"{who}, no cgroup")
    return escape(f"{who}\nmem {limits['memory_bytes'] >> 20} MiB, pids {limits['pids_max']}")
