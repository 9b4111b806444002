"""``secvf packets``: show the packets of a capture, decoded and filtered."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import click

from secvf import api
from secvf.faces.cli.common import print_json

if TYPE_CHECKING:
    from secvf.api import Packet

#: Column widths of the one-line summaries (a longer value widens its row, never cut).
_COLUMNS = (("TIME", 15), ("VM", 12), ("SRC", 15), ("DST", 15), ("PROTO", 6), ("LEN", 5))


@click.command("packets")
@click.argument("source", required=False)
@click.option("--filter", "-f", "expression", metavar="EXPR",
              help="Show only packets matching EXPR (see docs/packets.md).")
@click.option("--preset", "-p", metavar="NAME",
              help="A ready-made filter ('list' shows them); combined with --filter by 'and'.")
@click.option("--limit", "-n", type=click.IntRange(min=1), metavar="N",
              help="Stop after N matching packets.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per packet (JSON Lines).")
def packets(source: str | None, expression: str | None, preset: str | None,
            limit: int | None, as_json: bool) -> None:
    """Decode the packets of SOURCE, a pcapng or pcap capture file (or an isolated
    network's name: its switch's ring of recent frames), and show those
    matching --filter / --preset: time, VM, addresses, protocol, length and what is
    in it (ports, TCP flags, DNS names, HTTP host and path, TLS SNI, ARP, DHCP)."""
    if preset == "list":
        _print_presets(as_json)
        return
    if source is None:
        raise click.UsageError("missing SOURCE (a capture file or a network), or use "
                               "--preset list")
    found = api.read_packets(source, filter=expression, preset=preset, limit=limit)
    if as_json:
        for packet in found:
            print_json(packet.as_json(), one_line=True)
        return
    header = False
    for packet in found:  # the header only once the source could be read
        if not header:
            click.echo(_line([name for name, _ in _COLUMNS] + ["INFO"]))
            header = True
        click.echo(_line(_row(packet)))


def _row(packet: Packet) -> list[str]:
    when = datetime.fromtimestamp(packet.ts).strftime("%H:%M:%S.%f")
    return [when, packet.vm, packet.src, packet.dst, packet.protocol, str(packet.length),
            packet.info]


def _line(cells: list[str]) -> str:
    padded = [f"{cell:<{width}}" for cell, (_, width) in zip(cells, _COLUMNS, strict=False)]
    return " ".join([*padded, *cells[len(_COLUMNS):]]).rstrip()


def _print_presets(as_json: bool) -> None:
    presets = api.packet_presets()
    if as_json:
        print_json(presets)
        return
    section = None
    for preset in presets:
        if preset["section"] != section:
            if section is not None:
                click.echo()
            section = preset["section"]
            click.echo(section)
        click.echo(f"  {preset['name']:<22} {preset['expression']}\n"
                   f"  {'':<22} catches: {preset['catches']}\n"
                   f"  {'':<22} cannot:  {preset['cannot']}")
