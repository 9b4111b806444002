"""``secvf sandbox template …``: build, list and remove sandbox templates.

A template is a booted sandbox guest saved at "agent ready"; a new session of the same
shape (image build, vCPUs, memory, network, disk size, accelerator, QEMU) is restored
from it instead of booting. ``sandbox create``/``run`` pick one by themselves.
"""

from __future__ import annotations

import click

from secvf import api
from secvf.faces.cli.app import SecVFGroup, format_time
from secvf.faces.cli.common import escape, new_table, note, out, print_json

#: How many characters of a template's ID the CLI shows (``rm`` takes any unique prefix).
SHORT_ID_CHARS = 12


@click.group("template", cls=SecVFGroup)
def sandbox_template() -> None:
    """Sandbox templates: saved, booted guests that sessions are restored from."""


@sandbox_template.command("build")
@click.option("--image", default="sandbox", show_default=True)
@click.option("--cpus", type=int, default=1, show_default=True)
@click.option("--memory", default="1G", show_default=True, help="Guest RAM (e.g. 512M, 2G).")
@click.option("--network", type=click.Choice(["nat", "none"]), default="nat",
              show_default=True)
@click.option("--disk", "disk_size", default="8G", show_default=True,
              help="The disk size sessions get.")
@click.option("--accel", type=click.Choice([a.value for a in api.Accel]), default="auto",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the template's record as JSON.")
def template_build(image: str, cpus: int, memory: str, network: str, disk_size: str,
                   accel: str, as_json: bool) -> None:
    """Build the template for sandboxes of this shape (replaces an older one of the same
    shape). Sessions created with the same options are then restored from it."""
    info = api.build_template(image=image, cpus=cpus, memory=memory, network=network,
                              disk_size=disk_size, accel=accel, progress=note)
    if as_json:
        print_json(info.model_dump(mode="json"))
        return
    shape = info.state.shape
    out.print(f"template [bold]{info.id[:SHORT_ID_CHARS]}[/] ready: {escape(info.image)}, "
              f"{shape.cpus} vCPU, {api.format_size(shape.memory_mib << 20)}, "
              f"{escape(info.network)}, {shape.accel}; "
              f"RAM saved {api.format_size(info.state.ram_allocated_bytes)}; "
              f"built in {info.build_s:.1f} s", highlight=False)


@sandbox_template.command("list")
@click.option("--json", "as_json", is_flag=True)
def template_list(as_json: bool) -> None:
    """List sandbox templates, newest first."""
    templates = api.list_templates()
    if as_json:
        print_json([info.model_dump(mode="json") for info in templates])
        return
    table = new_table("ID", "IMAGE", "VCPUS", "MEMORY", "NETWORK", "DISK", "ACCEL",
                      "RAM SAVED", "CREATED", "BUILD S")
    for info in templates:
        shape = info.state.shape
        table.add_row(info.id[:SHORT_ID_CHARS], escape(info.image), str(shape.cpus),
                      api.format_size(shape.memory_mib << 20), escape(info.network),
                      api.format_size(info.disk_bytes), escape(shape.accel),
                      api.format_size(info.state.ram_allocated_bytes),
                      escape(format_time(info.created_at)), f"{info.build_s:.1f}")
    out.print(table)


@sandbox_template.command("rm")
@click.argument("template_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True)
def template_rm(template_id: str, as_json: bool) -> None:
    """Remove the template whose ID starts with ID (sessions made from it keep working)."""
    full_id = api.remove_template(template_id)
    if as_json:
        print_json({"id": full_id, "removed": True})
        return
    out.print(f"removed template [bold]{full_id[:SHORT_ID_CHARS]}[/]", highlight=False)
