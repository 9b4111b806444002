"""``secvf image …``: build, list and remove guest images."""

from __future__ import annotations

from typing import Any

import click

from secvf import api
from secvf.errors import NotFound
from secvf.faces.cli.app import SecVFGroup
from secvf.faces.cli.common import err, escape, new_table, out, print_json


@click.group(cls=SecVFGroup)
def image() -> None:
    """Build and manage guest images."""


@image.command("build")
@click.argument("names", nargs=-1)
@click.option("--force", is_flag=True, help="Rebuild even if a build of this recipe exists.")
@click.option("--json", "as_json", is_flag=True)
def image_build(names: tuple[str, ...], force: bool, as_json: bool) -> None:
    """Build guest images (default: every image a new user needs)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    known = api.image_recipes()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise NotFound(f"there is no image recipe called '{unknown[0]}' "
                       f"(known: {', '.join(known)})")
    built = []
    for name in names or api.DEFAULT_IMAGES:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                      TextColumn("{task.fields[step]}"), TimeElapsedColumn(),
                      console=err.console, transient=as_json) as progress:
            task = progress.add_task(name, total=1.0, step="")

            def report(step: str, fraction: float, task: Any = task, bar: Any = progress) -> None:
                bar.update(task, completed=fraction, step=step)

            info = api.build_image(name, force=force, progress=report)
        built.append(_image_row(info))
    if as_json:
        print_json(built)
    else:
        for row in built:
            out.print(f"image [bold]{escape(row['name'])}[/] {row['recipe_hash'][:12]} "
                      f"({api.format_size(row['size_bytes'])}) ready at {escape(row['path'])}")


def _image_row(info: api.ImageInfo) -> dict[str, Any]:
    return {"name": info.name, "recipe_hash": info.recipe_hash, "built_at": str(info.built_at)[:19],
            "size_bytes": info.size_bytes, "kernel_version": info.kernel_version,
            "path": str(info.path)}


@image.command("list")
@click.option("--json", "as_json", is_flag=True)
def image_list(as_json: bool) -> None:
    """List built images."""
    rows = [_image_row(i) for i in api.list_images()]
    if as_json:
        print_json(rows)
        return
    table = new_table("NAME", "RECIPE", "SIZE", "KERNEL", "BUILT")
    for row in rows:
        table.add_row(*map(escape, (row["name"], row["recipe_hash"][:12],
                                    api.format_size(row["size_bytes"]), row["kernel_version"],
                                    row["built_at"])))
    out.print(table)


@image.command("rm")
@click.argument("name")
def image_rm(name: str) -> None:
    """Remove a built image."""
    api.remove_image(name)
    out.print(f"removed image [bold]{escape(name)}[/]")
