"""``secvf gc``: remove disk layers no VM uses and work directories killed commands left."""

from __future__ import annotations

import click

from secvf import api
from secvf.faces.cli.common import escape, out, print_json


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--json", "as_json", is_flag=True)
def gc(dry_run: bool, as_json: bool) -> None:
    """Remove frozen disk layers no VM's disk uses and leftover work directories of
    killed creates, clones, imports and deletes (vm delete does this too)."""
    report = api.collect_garbage(dry_run=dry_run)
    if as_json:
        print_json(report)
        return
    verb = "would remove" if dry_run else "removed"
    for item in report["removed"]:
        out.print(f"{verb} {item['kind']} {escape(item['path'])} "
                  f"({api.format_size(item['size_bytes'])})")
    for problem in report["problems"]:
        out.print(f"[yellow]kept every layer:[/] {escape(problem)}")
    out.print(f"{verb} {len(report['removed'])} item(s), "
              f"{api.format_size(report['freed_bytes'])}; {report['kept_layers']} layer(s) "
              "in use kept")
